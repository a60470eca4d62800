"""The evaluate stage (design §6): sample the test set, score it, and write metrics, per-image scores and a grid.

Protocol: the test split shuffled with seed 42 (``evaluate.seed``), the first ``evaluate.num_samples`` items;
images saved as 8-bit PNGs; scored in grayscale. The blank-image baseline (all white) is always reported.

HCMA (design §8): a model with an HCMA module samples with guidance at the ``hcma.guidance_global`` /
``hcma.guidance_local`` scales (the local term grounded on each test item's renderer layout, where it has one). For
test items with a layout, the layout accuracy of the samples (``layout_f1``, ``ink_in_boxes``, ``box_fill`` against
the gold image's ink, :mod:`markup2image.evaluation.layout_metrics`) is reported with or without HCMA.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from markup2image.config import DiffusionConfig, Params
from markup2image.data.layout_tensors import layout_batch
from markup2image.data.layouts import load_layouts
from markup2image.diffusion.guidance import guided_sample_images
from markup2image.diffusion.sampling import to_uint8
from markup2image.evaluation.image_edit import EDIT_KEYS
from markup2image.evaluation.layout_metrics import layout_scores, mean_layout_scores
from markup2image.evaluation.markup_use import markup_use_from_arrays
from markup2image.evaluation.metrics import METRIC_NAMES
from markup2image.evaluation.report import save_comparison_grid
from markup2image.evaluation.score import score_arrays
from markup2image.io import load_image, read_jsonl, save_png, write_json
from markup2image.models.model import MODEL_CONFIG, load_model
from markup2image.text.tokenizer import empty_markup_like, encode_batch, load_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

METRICS = (*METRIC_NAMES, *EDIT_KEYS)


def select_test_items(rows: list[dict], num_samples: int, seed: int = 42) -> list[dict]:
    """Shuffle the test split with ``seed`` and keep the first ``num_samples`` (all if ``num_samples <= 0``)."""
    order = np.random.RandomState(seed).permutation(len(rows))
    chosen = [rows[i] for i in order]
    return chosen if num_samples <= 0 else chosen[:num_samples]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate(params: Params, domain: str, model_dir: Path, rendered_dir: Path, out_dir: Path) -> dict:
    """Sample, score and write ``metrics.json``, ``scores.json``, ``grid.png`` and ``samples/`` into ``out_dir``."""

    cfg = params.evaluate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, map_location=device).to(device)
    tok = load_tokenizer(model_dir)
    items = select_test_items(read_jsonl(rendered_dir / "test.jsonl"), cfg.num_samples, cfg.seed)
    if not items:
        raise ValueError(f"{rendered_dir}/test.jsonl: no rendered test items to evaluate")
    layouts = load_layouts(rendered_dir)
    guidance = guidance_scales(params, model)
    names = [r["id"] for r in items]
    golds = [load_image(rendered_dir / r["image"], model.image.channels) for r in items]
    t0 = time.perf_counter()
    preds = sample_items(
        model,
        tok,
        items,
        sampler=cfg.sampler,
        steps=cfg.steps,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        diffusion=params.diffusion,
        guidance=guidance,
        layouts=layouts,
        desc=f"evaluate {domain}",
        guidance_scale=cfg.guidance_scale,
    )
    seconds = time.perf_counter() - t0
    for name, img in zip(names, preds):
        save_png(out_dir / "samples" / f"{name}.png", img)
    scores = score_arrays(preds, golds, names)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = flat_metrics(scores, n_params=n_params, seconds_per_image=seconds / len(items), n=len(items))
    metrics |= layout_accuracy(preds, golds, [layouts.get(n) for n in names])
    if len(items) > 1:
        metrics |= markup_use_from_arrays(model, golds, tok, [r["markup"] for r in items])
    metrics |= training_facts(model_dir)
    run = {
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "guidance_scale": cfg.guidance_scale,
        "device": device_name(),
        "seconds_per_image": seconds / len(items),
        "parameters": n_params,
        "num_samples": len(items),
        **guidance,
    }
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "scores.json", scores | {"run": run})
    write_json(out_dir / "per_image.json", scores["per_image"])  # a list of records: what `dvc plots` reads
    save_comparison_grid(golds, preds, out_dir / "grid.png", titles=names, max_items=cfg.grid_rows)
    log.info(
        "evaluated %d %s items: DTW %.2f (blank %.2f, the gold one row off %.2f)",
        len(items),
        domain,
        metrics["dtw"],
        metrics["blank_dtw"],
        metrics["row_shift_dtw"],
    )
    return metrics


def sample_items(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    items: list[dict],
    *,
    sampler: str,
    steps: int,
    seed: int,
    batch_size: int,
    diffusion: DiffusionConfig,
    guidance: dict[str, float],
    layouts: dict,
    desc: str = "sampling",
    guidance_scale: float = 1.0,
) -> list[np.ndarray]:
    """The image of each item's ``markup``, ``batch_size`` at a time: uint8 ``[H, W]`` or ``[H, W, 3]``, in order.

    Batch ``b`` draws its noise from ``seed + b`` (one generator per batch); ``guidance`` are the HCMA scales of
    :func:`guidance_scales` (the local term grounded on the items' renderer ``layouts``).
    """
    device = next(model.parameters()).device
    preds: list[np.ndarray] = []
    for b, start in enumerate(tqdm(range(0, len(items), batch_size), desc=desc)):
        chunk = items[start : start + batch_size]
        ids, mask = encode_batch(tokenizer, [r["markup"] for r in chunk], model.model_cfg.max_text_length)
        layout = _chunk_layout(model, tokenizer, chunk, layouts, ids.shape[1]) if guidance["guidance_local"] else None
        uncond = None
        if guidance_scale != 1.0:
            uncond = tuple(torch.from_numpy(a).to(device) for a in empty_markup_like(tokenizer, ids))
        images = guided_sample_images(
            model,
            model.hcma,
            torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device),
            sampler=sampler,
            steps=steps,
            seed=seed + b,  # one generator per batch
            diffusion=diffusion,
            layout=layout,
            guidance_scale=guidance_scale,
            uncond=uncond,
            **guidance,
        )
        preds += list(to_uint8(images))
    return preds


def guidance_scales(params: Params, model: torch.nn.Module) -> dict[str, float]:
    """``hcma.guidance_global`` / ``hcma.guidance_local`` for a model with an HCMA module (0 for one without, with a
    warning when params ask for guidance); raises naming the key when the module lacks the head a scale needs."""
    h = params.hcma
    if model.hcma is None:
        if h.guidance_global or h.guidance_local:
            log.warning("hcma.guidance_*: the model has no HCMA module (trained with both weights 0); no guidance")
        return {"guidance_global": 0.0, "guidance_local": 0.0}
    for key, head in (("guidance_global", model.hcma.global_head), ("guidance_local", model.hcma.local_head)):
        if getattr(h, key) > 0 and head is None:
            raise ValueError(f"hcma.{key}: the model's HCMA module was trained without this module (weight 0)")
    return {"guidance_global": h.guidance_global, "guidance_local": h.guidance_local}


def _chunk_layout(model: torch.nn.Module, tok, chunk: list[dict], layouts: dict, num_tokens: int):
    """The renderer layouts of a batch of test items (items without one get no boxes)."""

    hw = (model.image.height, model.image.width)
    return layout_batch(
        [layouts.get(r["id"]) for r in chunk], [r["markup"] for r in chunk], tok, num_tokens, hw,
        model.hcma.cfg.max_boxes,
    )  # fmt: skip


def layout_accuracy(preds: list[np.ndarray], golds: list[np.ndarray], layouts: list) -> dict[str, float]:
    """Mean ``layout_f1`` / ``ink_in_boxes`` / ``box_fill`` of the samples over the items with a layout (against the
    gold image's ink), and how many items that was; empty when no item has one."""

    scored = [layout_scores(p, boxes, gold=g) for p, g, boxes in zip(preds, golds, layouts) if boxes]
    if not scored:
        return {}
    return mean_layout_scores(scored) | {"layout_items": len(scored)}


def training_facts(model_dir: Path) -> dict[str, float]:
    """``train_seconds`` and ``steps_trained`` of the model (what its training loop saved), so ``dvc exp show``
    puts each experiment's training cost beside its scores; empty for a model saved without them."""
    try:
        saved = json.loads((Path(model_dir) / MODEL_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return {k: saved[k] for k in ("train_seconds", "steps_trained") if isinstance(saved.get(k), (int, float))}


def flat_metrics(scores: dict, *, n_params: int, seconds_per_image: float, n: int) -> dict[str, float]:
    """Flat keys for ``dvc metrics diff``: model means, ``blank_*`` baseline means, ``row_shift_dtw`` (each gold
    moved down one row: a perfect rendering one row off) and run facts."""
    out: dict[str, float] = {}
    for k in METRICS:
        out[k] = float(scores["summary"][k])
    for k in METRICS:
        out[f"blank_{k}"] = float(scores["blank_baseline"][k])
    out["row_shift_dtw"] = float(scores["row_shift_dtw"])  # the gold one row off: the scale DTW is read on
    out["num_samples"] = n
    out["parameters"] = n_params
    out["seconds_per_image"] = round(seconds_per_image, 4)
    return out
