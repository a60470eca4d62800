"""Score generated images against gold images, folder against folder or in memory (design §6).

Both entry points return the same JSON-able schema::

    {
      "summary": {"dtw": mean, "dtw_ti": ..., "rmse": ..., "ssim": ..., "psnr": ..., "ergas": ..., "rase": ...,
                  "edit_accuracy", "edit_accuracy_nonblank", "exact_match", "exact_match_nonblank": im2markup's
                  image metrics (evaluation/image_edit.py), "n": pairs scored},
      "per_image": [{"name": ..., "dtw": ..., ...}, ...],
      "blank_baseline": {same metrics: mean over an all-white (255) prediction of each gold's shape, "n": ...},
      "row_shift_dtw": mean DTW of each gold moved down by one row (white row on top): what a perfect rendering
                       one row off scores, the scale a model's DTW is read on (README, "What a DTW ratio means"),
      "missing_pred": [names with a gold image but no prediction],
      "missing_gold": [names with a prediction but no gold image],
      "unreadable": [{"name", "file", "error"}, ...],
      "mismatched": [{"name", "pred_shape", "gold_shape"}, ...],
      "psnr_cap_db": 100.0,
      "psnr_capped": number of pairs (model, not blank) whose PSNR was infinite and capped,
    }

Identical pairs have an infinite PSNR; it is capped at ``PSNR_CAP_DB`` per pair before averaging (see
``metrics``), so ``summary["psnr"]`` is finite and ``psnr_capped`` says how many pairs it touched. With no pair
scored, the means are ``None``. The counts add up: ``n + len(mismatched) + pairs with an unreadable file`` equals
the number of names found in both folders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from markup2image.evaluation.image_edit import image_edit_scores, summarize_image_edit
from markup2image.evaluation.metrics import METRIC_NAMES, PSNR_CAP_DB, dtw_distance, score_pair, shifted, to_gray
from markup2image.io import load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FEW = 5  # how many names a warning line quotes


def _index_folder(folder: Path) -> dict[str, Path]:
    """Map image name (file stem) to path for the png/jpg files directly inside ``folder``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in index:
            raise ValueError(
                f"{folder}: two images named {path.stem!r} ({index[path.stem].name}, {path.name}); keep one"
            )
        index[path.stem] = path
    return index


def _mean_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    means: dict[str, Any] = {k: (float(np.mean([r[k] for r in rows])) if rows else None) for k in METRIC_NAMES}
    means |= summarize_image_edit(rows)
    means["n"] = len(rows)
    return means


def _score_items(items: Iterable[tuple[str, np.ndarray | None, np.ndarray | None]], total: int, progress: bool):
    """Score ``(name, pred, gold)`` items; ``None`` images were unreadable and are skipped (already recorded)."""
    per_image: list[dict[str, Any]] = []
    blank_rows: list[dict[str, Any]] = []
    row_shift: list[float] = []
    mismatched: list[dict[str, Any]] = []
    capped = 0
    for name, pred, gold in tqdm(items, total=total, desc="scoring", unit="pair", disable=not progress):
        if pred is None or gold is None:
            continue
        pred_gray, gold_gray = to_gray(pred), to_gray(gold)
        if pred_gray.shape != gold_gray.shape:
            logger.warning(
                "%s: pred shape %s differs from gold shape %s; pair skipped", name, pred_gray.shape, gold_gray.shape
            )
            mismatched.append({"name": name, "pred_shape": list(pred_gray.shape), "gold_shape": list(gold_gray.shape)})
            continue
        scores = score_pair(pred_gray, gold_gray) | image_edit_scores(pred_gray, gold_gray)
        capped += scores["psnr"] == PSNR_CAP_DB
        per_image.append({"name": name, **scores})
        blank = np.full_like(gold_gray, 255)
        blank_rows.append(score_pair(blank, gold_gray) | image_edit_scores(blank, gold_gray))
        row_shift.append(dtw_distance(shifted(gold_gray, rows=1), gold_gray))
    if capped:
        logger.info("%d identical pair(s): PSNR capped at %.0f dB before averaging", capped, PSNR_CAP_DB)
    return {
        "summary": _mean_metrics(per_image),
        "per_image": per_image,
        "blank_baseline": _mean_metrics(blank_rows),
        "row_shift_dtw": float(np.mean(row_shift)) if row_shift else None,
        "missing_pred": [],
        "missing_gold": [],
        "unreadable": [],
        "mismatched": mismatched,
        "psnr_cap_db": PSNR_CAP_DB,
        "psnr_capped": int(capped),
    }


def _warn_missing(kind: str, names: list[str], folder: Path) -> None:
    if names:
        few = ", ".join(names[:_FEW]) + (", ..." if len(names) > _FEW else "")
        logger.warning("%d image(s) have no %s in %s and are not scored: %s", len(names), kind, folder, few)


def score_folders(pred_dir: str | Path, gold_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Score the same-named images (png/jpg, matched by file stem) of ``pred_dir`` against ``gold_dir``.

    Images are scored in grayscale (RGB through OpenCV's luma weights). Names present in only one folder are
    listed under ``missing_pred`` / ``missing_gold`` with one warning line each; an unreadable image gives one
    error line naming the file and is listed under ``unreadable``. Raises ValueError when the folders share no
    name at all. Schema: see the module docstring.
    """
    pred_dir, gold_dir = Path(pred_dir), Path(gold_dir)
    preds, golds = _index_folder(pred_dir), _index_folder(gold_dir)
    common = sorted(preds.keys() & golds.keys())
    missing_pred = sorted(golds.keys() - preds.keys())
    missing_gold = sorted(preds.keys() - golds.keys())
    _warn_missing("prediction", missing_pred, pred_dir)
    _warn_missing("gold image", missing_gold, gold_dir)
    if not common:
        raise ValueError(
            f"no same-named images in {pred_dir} ({len(preds)} images) and {gold_dir} ({len(golds)} images); "
            "name each prediction after its gold image"
        )
    unreadable: list[dict[str, str]] = []

    def read(name: str, path: Path) -> np.ndarray | None:
        try:
            return load_image(path, channels=3)  # RGB, then OpenCV's luma weights in to_gray
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three on damaged files
            logger.error("cannot read image %s (%s); pair %r skipped", path, exc, name)
            unreadable.append({"name": name, "file": str(path), "error": str(exc)})
            return None

    def items() -> Iterator[tuple[str, np.ndarray | None, np.ndarray | None]]:
        for name in common:
            yield name, read(name, preds[name]), read(name, golds[name])

    result = _score_items(items(), total=len(common), progress=progress)
    result.update(missing_pred=missing_pred, missing_gold=missing_gold, unreadable=unreadable)
    logger.info(
        "scored %d of %d pair(s) (%d unreadable file(s), %d shape mismatch(es))",
        result["summary"]["n"],
        len(common),
        len(unreadable),
        len(result["mismatched"]),
    )
    return result


def score_arrays(
    preds: list[np.ndarray], golds: list[np.ndarray], names: list[str], progress: bool = False
) -> dict[str, Any]:
    """Score in-memory uint8 images ``preds[i]`` against ``golds[i]`` (``[H, W]`` / ``[H, W, 3]``) as ``names[i]``.

    Same schema as :func:`score_folders` (``missing_*`` and ``unreadable`` are empty). Raises ValueError when the
    three lists differ in length or a name repeats.
    """
    if not len(preds) == len(golds) == len(names):
        raise ValueError(f"preds ({len(preds)}), golds ({len(golds)}) and names ({len(names)}) differ in length")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"names must be unique; repeated: {repeated[:_FEW]}")
    return _score_items(zip(names, preds, golds, strict=True), total=len(names), progress=progress)
