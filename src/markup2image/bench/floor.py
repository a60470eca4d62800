"""What the image metrics give near-perfect generations: the gold itself, moved or degraded a little (JSON out).

A model's DTW is read against the blank page (``dtw / blank_dtw``). This bench scores, on the evaluate stage's
test items, copies of each gold image that a good generator could plausibly draw (moved by one or two rows or
columns, blurred, partly erased, a row thicker), so the ratio a model reaches can be read against what a
pixel-perfect but slightly misplaced rendering reaches at the same geometry. Shifts fill with white; nothing is
wrapped around. Every perturbation is deterministic (``--seed`` drives the erasure and the positive view).

``con_aug positive`` is the view ``y0'`` that FSA-CDM's contrast-augmented objective trains the denoiser to draw
for the same markup (:func:`~markup2image.diffusion.objectives.augment_positive`): what that extra target scores
against the gold tells how far it pulls a model from row-exact strokes at this geometry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from markup2image.config import Params
from markup2image.diffusion.objectives import augment_positive
from markup2image.evaluation.evaluate import select_test_items
from markup2image.evaluation.metrics import INK_THRESHOLD, WHITE, dtw_distance, dtw_ti_distance, shifted, ssim
from markup2image.io import load_image, read_jsonl


def perturbations(seed: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> ``gold [H, W] uint8 -> perturbed copy``; ``blank`` is the baseline every ratio divides by."""
    rng = np.random.default_rng(seed)

    def erase(img: np.ndarray, fraction: float = 0.3) -> np.ndarray:
        out = img.copy()
        out[(img < INK_THRESHOLD) & (rng.random(img.shape) < fraction)] = WHITE
        return out

    generator = torch.Generator().manual_seed(seed)

    def positive(img: np.ndarray) -> np.ndarray:
        y0 = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0)[None, None]  # (1, 1, H, W) in [-1, 1]
        view = augment_positive(y0, generator)[0, 0].numpy()
        return np.clip(np.round((view + 1.0) * 127.5), 0, 255).astype(np.uint8)

    return {
        "gold": lambda g: g,
        "down 1 row": lambda g: shifted(g, rows=1),
        "up 1 row": lambda g: shifted(g, rows=-1),
        "down 2 rows": lambda g: shifted(g, rows=2),
        "right 1 column": lambda g: shifted(g, cols=1),
        "right 2 columns": lambda g: shifted(g, cols=2),
        "blur sigma 1": lambda g: cv2.GaussianBlur(g, (0, 0), 1.0),
        "30% of ink erased": erase,
        "one row thicker": lambda g: np.minimum(g, shifted(g, rows=1)),
        "con_aug positive": positive,
        "blank": lambda g: np.full_like(g, WHITE),
    }


def bench_floor(rendered: Path, num_samples: int, seed: int = 42) -> dict[str, Any]:
    """Mean DTW, DTW-TI and SSIM of every perturbation over the test items, and DTW / DTW-TI as ratios to blank."""
    items = select_test_items(read_jsonl(rendered / "test.jsonl"), num_samples, seed)
    if not items:
        raise ValueError(f"{rendered}/test.jsonl: no rendered test items; run the render stage first")
    golds = [load_image(rendered / r["image"], 1) for r in items]
    sums: dict[str, dict[str, float]] = {}
    for name, perturb in perturbations(seed).items():
        s = sums.setdefault(name, {"dtw": 0.0, "dtw_ti": 0.0, "ssim": 0.0})
        for gold in golds:
            pred = perturb(gold)
            s["dtw"] += dtw_distance(pred, gold)
            s["dtw_ti"] += dtw_ti_distance(pred, gold)
            s["ssim"] += ssim(pred, gold)
    n, blank = len(golds), sums["blank"]
    rows = [
        {"perturbation": name, **{k: v / n for k, v in s.items()}}
        | {"dtw_over_blank": s["dtw"] / blank["dtw"], "dtw_ti_over_blank": s["dtw_ti"] / blank["dtw_ti"]}
        for name, s in sums.items()
    ]
    h, w = golds[0].shape
    ink = float(np.mean([(g < INK_THRESHOLD).sum() for g in golds]))
    return {"rendered": str(rendered), "items": n, "image": [h, w], "mean_ink_pixels": ink, "rows": rows}


def run(args: Any, params: Params) -> dict[str, Any]:
    n = args.n or params.evaluate.num_samples
    return bench_floor(args.rendered, n, params.evaluate.seed)
