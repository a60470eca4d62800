"""Speed benchmark of the evaluation metrics on synthetic formula-like pairs (JSON out, no timed tests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from markup2image.evaluation import metrics

logger = logging.getLogger(__name__)


def synthetic_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A gold ``[H, W]`` uint8 image of black glyph-like blocks on white, and a shifted, noisy copy as the pred."""
    gold = np.full((height, width), 255, dtype=np.uint8)
    x = int(rng.integers(1, 8))
    while x < width - 8:
        w, h = int(rng.integers(2, 10)), int(rng.integers(3, max(4, height // 3)))
        top = int(rng.integers(0, max(1, height // 2 - h // 2)))
        gold[top : top + h, x : x + w] = rng.integers(0, 100)
        x += w + int(rng.integers(1, 12))
    pred = np.full_like(gold, 255)
    dy, dx = int(rng.integers(0, 4)), int(rng.integers(0, 6))
    pred[dy:, dx:] = gold[: height - dy, : width - dx]
    noise = rng.normal(0.0, 12.0, size=gold.shape)
    pred = np.clip(pred.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return pred, gold


def _time_per_pair(fn: Callable[[np.ndarray, np.ndarray], Any], pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    fn(*pairs[0])  # warm-up: first calls pay for imports, allocations and torch's first dispatch
    seconds = []
    for pred, gold in pairs:
        start = time.perf_counter()
        fn(pred, gold)
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    return {"median_s": median, "pairs_per_s": (1.0 / median) if median > 0 else None, "total_s": float(sum(seconds))}


def bench_metrics(num_pairs: int = 32, height: int = 64, width: int = 320, seed: int = 0) -> dict[str, Any]:
    """Time each metric and ``score_pair`` on ``num_pairs`` synthetic ``[height, width]`` pairs.

    Returns a JSON-able dict: ``{"config": {...}, "environment": {...}, "metrics": {name: {"median_s",
    "pairs_per_s", "total_s"}}}``; ``pairs_per_s`` is ``1 / median_s``.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    rng = np.random.default_rng(seed)
    pairs = [synthetic_pair(rng, height, width) for _ in range(num_pairs)]
    functions: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
        "dtw": metrics.dtw_distance,
        "dtw_ti": metrics.dtw_ti_distance,
        "rmse": metrics.rmse,
        "ssim": metrics.ssim,
        "psnr": metrics.psnr,
        "ergas": metrics.ergas,
        "rase": metrics.rase,
        "ergas_tm": metrics.ergas_tm,
        "rase_tm": metrics.rase_tm,
        "score_pair": metrics.score_pair,
    }
    results = {}
    for name, fn in functions.items():
        results[name] = _time_per_pair(fn, pairs)
        logger.info("%-10s %.3f ms/pair", name, 1e3 * results[name]["median_s"])
    return {
        "config": {"num_pairs": num_pairs, "height": height, "width": width, "seed": seed},
        "metrics": results,
    }


def run(args: Any, params: Any) -> dict[str, Any]:
    """``markup2image bench metrics``."""
    return bench_metrics(num_pairs=args.n)
