"""Layout accuracy of grounded samples: does the ink land in the boxes it was asked to land in?

Ink is a pixel darker than 150 (the DTW metrics' threshold), on the gray image (OpenCV luma for RGB). For a sample
``y`` with layout boxes ``B_1..B_K`` (pixels, half-open, :mod:`markup2image.data.layouts`):

* ``ink_in_boxes`` (precision): ``|ink(y) ∩ (B_1 ∪ ... ∪ B_K)| / |ink(y)|`` — the share of the sample's ink that
  lies inside some box. 0 for a sample without ink (a blank image places nothing).
* ``box_fill`` (recall): the mean over boxes of ``min(1, |ink(y) ∩ B_k| / expected_k)``, where ``expected_k`` is
  the ink the box should hold: ``|ink(gold) ∩ B_k|`` when the gold image is given (boxes with no gold ink are
  skipped), else ``expected_fill x area(B_k)``.
* ``layout_f1``: the harmonic mean of the two (0 when both are 0).

A blank image scores 0 on all three; an image inked everywhere scores ``box_fill = 1`` but ``ink_in_boxes`` equal
to the boxes' share of the canvas, so neither alone can be gamed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from markup2image.data.layouts import LayoutBox
from markup2image.data.renderers.base import to_gray

INK_THRESHOLD = 150
EXPECTED_FILL = 0.2  # ink share of a box assumed without a gold image (glyph strokes fill ~15-30% of their box)

__all__ = ["EXPECTED_FILL", "INK_THRESHOLD", "layout_scores", "mean_layout_scores"]


def _ink(image: np.ndarray) -> np.ndarray:
    return to_gray(np.asarray(image)) < INK_THRESHOLD


def layout_scores(
    image: np.ndarray,
    boxes: Sequence[LayoutBox],
    gold: np.ndarray | None = None,
    expected_fill: float = EXPECTED_FILL,
) -> dict[str, float]:
    """``ink_in_boxes``, ``box_fill``, ``layout_f1`` (module docstring) of one uint8 image ``[H, W(, 3)]``."""
    ink = _ink(image)
    gold_ink = _ink(gold) if gold is not None else None
    if gold_ink is not None and gold_ink.shape != ink.shape:
        raise ValueError(f"gold image is {gold_ink.shape}, the sample {ink.shape}; they must be the same size")
    union = np.zeros_like(ink)
    fills = []
    for b in boxes:
        x0, y0, x1, y1 = (int(v) for v in b["box"])
        region = (slice(max(y0, 0), max(y1, 0)), slice(max(x0, 0), max(x1, 0)))
        union[region] = True
        expected = float(gold_ink[region].sum()) if gold_ink is not None else expected_fill * ink[region].size
        if expected > 0:
            fills.append(min(1.0, float(ink[region].sum()) / expected))
    total = int(ink.sum())
    precision = float((ink & union).sum()) / total if total else 0.0
    recall = float(np.mean(fills)) if fills else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"ink_in_boxes": precision, "box_fill": recall, "layout_f1": f1}


def mean_layout_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over images (empty input -> empty dict)."""
    if not scores:
        return {}
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
