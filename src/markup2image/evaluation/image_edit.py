"""im2markup's image metrics (Deng et al. 2017, harvardnlp/im2markup ``scripts/evaluation/evaluate_image.py``).

Both images are binarised (ink = gray ``<= 128``) and read as a sequence of columns, each column a bit string.

- **Column edit distance**: Levenshtein distance between the two column sequences (a column matches only if every
  pixel does); im2markup reports ``1 - sum(distance) / sum(ref)`` over a set, ``ref`` being the longer sequence
  (:data:`EDIT_KEYS`: ``edit_accuracy``). The same on the sequences without blank columns
  (``edit_accuracy_nonblank``) is our addition: it does not reward a model for the white space between glyphs.
- **Exact match** (im2markup's "Accuracy w/ spaces"): the images match unless a replaced or deleted run of five or
  more gold columns remains after columns that differ in fewer than five pixels are taken as equal; "w/o spaces"
  (``exact_match_nonblank``) does the same after dropping blank columns. As in the original, the column
  alphabet is built from the gold's columns first, then the prediction's, each column joining the first seen column
  within L1 distance < 5; an inserted run never breaks a match (the original tests the gold-side span, which is
  empty for an insertion).

Gray images of different heights are padded with blank rows at the bottom, as the original pads the shorter bit
string. The edit distances come from ``python-Levenshtein`` (the original used ``distance`` and ``LevSeq``).
"""

from __future__ import annotations

from collections.abc import Sequence

import Levenshtein
import numpy as np

INK_LEVEL = 128  # im2markup: a pixel is ink when its gray value is <= 128
FUZZY_PIXELS = 5  # columns closer than this (L1, in pixels) count as the same column for exact match
RUN_COLUMNS = 5  # a differing run of at least this many gold columns breaks an exact match
EDIT_KEYS = ("edit_accuracy", "edit_accuracy_nonblank", "exact_match", "exact_match_nonblank")  # set level
PAIR_KEYS = ("edit_distance", "edit_ref", "exact_match", "edit_distance_nonblank", "edit_ref_nonblank")
PAIR_KEYS += ("exact_match_nonblank",)  # what image_edit_scores returns per pair


def _columns(gray: np.ndarray, height: int) -> np.ndarray:
    """``[W, height]`` 0/1 columns of ``gray`` (``[H, W]`` uint8), padded with blank rows to ``height``."""
    ink = (gray <= INK_LEVEL).astype(np.uint8).T  # (W, H)
    return np.pad(ink, ((0, 0), (0, height - ink.shape[1])))


def _keys(cols: np.ndarray) -> list[bytes]:
    return [c.tobytes() for c in cols]


def _fuzzy_symbols(gold: np.ndarray, pred: np.ndarray) -> tuple[list[int], list[int]]:
    """One symbol per column; a column within L1 < 5 of a column seen before (gold first) takes its symbol."""
    seen: list[np.ndarray] = []
    table: dict[bytes, int] = {}

    def symbol(col: np.ndarray) -> int:
        key = col.tobytes()
        if key not in table:
            near = next((i for i, s in enumerate(seen) if int(np.abs(col.astype(int) - s).sum()) < FUZZY_PIXELS), None)
            if near is None:
                seen.append(col.astype(int))
                near = len(seen) - 1
            table[key] = near
        return table[key]

    gold_syms = [symbol(c) for c in gold]
    return gold_syms, [symbol(c) for c in pred]


def _match(gold: np.ndarray, pred: np.ndarray) -> bool:
    """im2markup's exact match on two column arrays."""
    a, b = _fuzzy_symbols(gold, pred)
    return all(tag == "equal" or i2 - i1 < RUN_COLUMNS for tag, i1, i2, _, _ in Levenshtein.opcodes(a, b))


def image_edit_scores(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Per-pair counts: ``edit_distance``/``edit_ref`` and the same ``_nonblank``, and ``exact_match``,
    ``exact_match_nonblank`` (0/1). ``pred``, ``gold``: uint8 gray ``[H, W]``."""
    height = max(pred.shape[0], gold.shape[0])
    g, p = _columns(gold, height), _columns(pred, height)
    out = {
        "edit_distance": float(Levenshtein.distance(_keys(g), _keys(p))),
        "edit_ref": float(max(len(g), len(p))),
        "exact_match": float(_match(g, p)),
    }
    g_ink, p_ink = g[g.any(1)], p[p.any(1)]
    out["edit_distance_nonblank"] = float(Levenshtein.distance(_keys(g_ink), _keys(p_ink)))
    out["edit_ref_nonblank"] = float(max(len(g_ink), len(p_ink)))
    if len(g_ink) == 0 or len(p_ink) == 0:
        out["exact_match_nonblank"] = float(len(g_ink) == len(p_ink))
    else:
        out["exact_match_nonblank"] = float(_match(g_ink, p_ink))
    return out


def summarize_image_edit(rows: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """im2markup's set-level figures from per-pair rows: ``1 - sum(distance) / sum(ref)`` and mean matches."""
    if not rows:
        return {k: None for k in EDIT_KEYS}
    out: dict[str, float | None] = {}
    for suffix in ("", "_nonblank"):
        ref = sum(r[f"edit_ref{suffix}"] for r in rows)
        dist = sum(r[f"edit_distance{suffix}"] for r in rows)
        out[f"edit_accuracy{suffix}"] = 1.0 - dist / ref if ref else 1.0
        out[f"exact_match{suffix}"] = float(np.mean([r[f"exact_match{suffix}"] for r in rows]))
    return out
