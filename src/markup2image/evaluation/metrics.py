"""Per-pair image metrics of the SS-DM evaluation protocol (design §6).

Every metric takes two uint8 images, a generated one (``pred``) and the rendered gold (``gold``), each ``[H, W]``
(gray) or ``[H, W, 3]`` (RGB), and scores them in grayscale. RGB is converted with OpenCV's luma weights
(``cv2.COLOR_RGB2GRAY``), which is what ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` gave the original code.

- ``dtw``: columns of the ink mask (``pixel < 150``) are the time steps, each a 0/1 vector of length H; the local
  cost is the squared Euclidean distance between columns; plain DTW (steps (i-1, j), (i, j-1), (i-1, j-1), unit
  weights, no window); the score is the square root of the accumulated cost (tslearn's ``dtw_path`` in the
  original code, dtaidistance here).
- ``dtw_ti``: the same DTW over a translation-invariant local cost, the minimum over vertical shifts of up to
  ``floor(0.1 * H)`` rows in both directions of the squared distance over the overlapping rows; square root at the
  end (the original ``euclidean_dist_translation_invariant`` under ``dtw_path_from_metric``).
- ``rmse``, ``psnr`` on 0..255; ``ssim`` as sewar computes it (11x11 uniform window, valid mode, K1=0.01, K2=0.03,
  L=255).
- ``ergas``, ``rase``: sewar's ``ergas(GT, P)`` (ratio 1/4) and ``rase(GT, P)`` (8x8 window) called exactly as SS-DM's
  ``eval_utils/image_evals.py`` calls them, the *prediction in sewar's first (ground-truth) slot*: ERGAS divides by
  the prediction's mean, RASE by the prediction's local means. Lower is better (SS-DM negates them for ranking).
- ``ergas_tm``, ``rase_tm``: the torchmetrics forms, gold as the target (what torchmetrics users report).

Identical images have an infinite PSNR. :func:`psnr` returns ``inf`` for them, as sewar does; :func:`score_pair`
caps it at :data:`PSNR_CAP_DB` (100 dB) so that means and JSON stay finite. For 8-bit images with fewer than
``1e10 / 255**2`` (about 153,000) pixels every finite PSNR is below 100 dB, so the cap never reorders two pairs.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from dtaidistance import dtw_ndim
from sewar.full_ref import ergas as sewar_ergas
from sewar.full_ref import rase as sewar_rase
from torchmetrics.functional.image import error_relative_global_dimensionless_synthesis

INK_THRESHOLD = 150  # a pixel is ink when its gray value is below this
WHITE = 255
TRANSLATION_SLACK = 0.1  # DTW-TI forgives vertical shifts of up to floor(0.1 * H) rows
SSIM_WINDOW = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03
RASE_WINDOW = 8
PIXEL_MAX = 255.0
PSNR_CAP_DB = 100.0
METRIC_NAMES = ("dtw", "dtw_ti", "rmse", "ssim", "psnr", "ergas", "rase", "ergas_tm", "rase_tm")


def to_gray(img: np.ndarray) -> np.ndarray:
    """Return a uint8 ``[H, W]`` image; ``[H, W, 3]`` RGB goes through ``cv2.cvtColor(img, COLOR_RGB2GRAY)``.

    ``[H, W, 1]`` is squeezed and ``[H, W, 4]`` RGBA drops its alpha (as ``cv2.imread`` in grayscale mode does).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {img.dtype}; convert to 8 bits (0..255) first")
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGBA2GRAY)
    raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got shape {img.shape}")


def gray_pair(pred: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images in grayscale ``[H, W]``; raise ValueError naming both shapes if they differ."""
    p, g = to_gray(pred), to_gray(gold)
    if p.shape != g.shape:
        raise ValueError(
            f"pred and gold differ in shape: pred {p.shape} vs gold {g.shape} (grayscale [H, W]); "
            "generate or render both at the domain's image size"
        )
    return p, g


def ink_columns(gray: np.ndarray) -> np.ndarray:
    """Ink mask of a gray ``[H, W]`` image as a C-contiguous float64 ``[W, H]`` sequence of 0/1 columns."""
    return np.ascontiguousarray((gray < INK_THRESHOLD).T, dtype=np.float64)


def _ink_pair(pred: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = to_gray(pred), to_gray(gold)
    if p.shape[0] != g.shape[0]:
        raise ValueError(f"DTW needs equal heights: pred {p.shape} vs gold {g.shape} (grayscale [H, W])")
    return ink_columns(p), ink_columns(g)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[N, M]`` between the rows of ``a [N, D]`` and ``b [M, D]``, in ``a``'s dtype.

    Exact for 0/1 ink columns, even in float32: every term is an integer of at most D.
    """
    cost = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :]
    cost -= 2 * (a @ b.T)
    return np.maximum(cost, 0, out=cost)


def translation_invariant_cost(pred_cols: np.ndarray, gold_cols: np.ndarray) -> np.ndarray:
    """DTW-TI local costs, float64 ``[Wp, Wg]``, for 0/1 column sequences ``[Wp, H]`` and ``[Wg, H]``.

    ``cost[i, j] = min_s sum_r (pred[i, r + s] - gold[j, r])**2`` over shifts ``s = -S..S``,
    ``S = floor(0.1 * H)``, the sum running over the rows where both shifted columns exist. The minimum includes
    the unshifted cost, so a zero unshifted cost stays zero, as in the original. Computed in float32, which is
    exact for 0/1 columns (integer counts of at most H) and twice as fast as float64.
    """
    pred32, gold32 = pred_cols.astype(np.float32), gold_cols.astype(np.float32)
    height = pred_cols.shape[1]
    slack = int(np.floor(height * TRANSLATION_SLACK))  # the original's expression, to round the same way
    cost = squared_distances(pred32, gold32)
    for s in range(1, slack + 1):
        # pred moved up by s rows against gold, then gold moved up by s rows against pred
        np.minimum(cost, squared_distances(pred32[:, s:], gold32[:, :-s]), out=cost)
        np.minimum(cost, squared_distances(pred32[:, :-s], gold32[:, s:]), out=cost)
    return cost.astype(np.float64)


def dtw_accumulated_cost(cost: np.ndarray) -> float:
    """Accumulated cost of the best warping path through a local cost matrix ``[N, M]``.

    ``D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])``, returns ``D[N-1, M-1]``. Row by row: with
    ``a[j] = cost[i, j] + min(D[i-1, j], D[i-1, j-1])`` and ``S = cumsum(cost[i])`` the horizontal recursion
    ``D[i, j] = min(a[j], D[i, j-1] + cost[i, j])`` unrolls to ``S[j] + min_{k<=j}(a[k] - S[k])``, a cumulative
    minimum, so each row is four numpy calls. Exact for integer costs (all sums stay integers in float64).
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"expected a non-empty cost matrix [N, M], got shape {cost.shape}")
    running = np.cumsum(cost, axis=1)  # [N, M] S per row
    offset = cost - running  # [N, M] a[k] - S[k] without the min(D[i-1, .]) part
    prev = running[0].copy()  # first row: only horizontal steps
    from_above = np.empty_like(prev)
    candidate = np.empty_like(prev)
    for i in range(1, cost.shape[0]):
        from_above[0] = prev[0]
        np.minimum(prev[1:], prev[:-1], out=from_above[1:])  # min(D[i-1, j], D[i-1, j-1])
        np.add(offset[i], from_above, out=candidate)
        np.minimum.accumulate(candidate, out=candidate)
        np.add(running[i], candidate, out=prev)
    return float(prev[-1])


def dtw_distance(pred: np.ndarray, gold: np.ndarray) -> float:
    """DTW between the ink columns of ``pred [H, Wp]`` and ``gold [H, Wg]``: sqrt of the accumulated squared cost.

    dtaidistance's ``dtw_ndim.distance`` uses the squared Euclidean inner distance and returns the square root of
    the accumulated cost, which is exactly tslearn's ``dtw_path`` score of the original code. Widths may differ.
    """
    pred_cols, gold_cols = _ink_pair(pred, gold)
    return float(dtw_ndim.distance(pred_cols, gold_cols, use_c=True))


def dtw_ti_distance(pred: np.ndarray, gold: np.ndarray) -> float:
    """Translation-invariant DTW of ``pred [H, Wp]`` and ``gold [H, Wg]``: sqrt of the accumulated DTW-TI cost."""
    pred_cols, gold_cols = _ink_pair(pred, gold)
    return math.sqrt(dtw_accumulated_cost(translation_invariant_cost(pred_cols, gold_cols)))


def shifted(img: np.ndarray, rows: int = 0, cols: int = 0) -> np.ndarray:
    """``img [H, W]`` moved down by ``rows`` and right by ``cols`` (negative: up / left), white where it left."""
    out = np.full_like(img, WHITE)
    h, w = img.shape[:2]
    src = img[max(0, -rows) : h - max(0, rows), max(0, -cols) : w - max(0, cols)]
    out[max(0, rows) : max(0, rows) + src.shape[0], max(0, cols) : max(0, cols) + src.shape[1]] = src
    return out


def _mse(p: np.ndarray, g: np.ndarray) -> float:
    diff = p.astype(np.float64) - g.astype(np.float64)
    return float(np.mean(diff * diff))


def rmse(pred: np.ndarray, gold: np.ndarray) -> float:
    """Root mean squared error on 0..255 of two images of the same shape ``[H, W]``."""
    return math.sqrt(_mse(*gray_pair(pred, gold)))


def psnr(pred: np.ndarray, gold: np.ndarray, cap_db: float | None = None) -> float:
    """``10 * log10(255**2 / MSE)`` in dB; ``inf`` for identical images, or ``cap_db`` when given."""
    mse = _mse(*gray_pair(pred, gold))
    value = math.inf if mse == 0.0 else 10.0 * math.log10(PIXEL_MAX**2 / mse)
    return value if cap_db is None else min(value, cap_db)


def _box_mean_valid(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over every ``size x size`` window fully inside ``x [H, W]``: ``[H - size + 1, W - size + 1]``.

    Summed-area table in int64 (exact for integer images), so it agrees with sewar's ``convolve2d`` of a
    ``1/size**2`` kernel to float64 rounding.
    """
    table = np.zeros((x.shape[0] + 1, x.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(x, axis=0), axis=1, out=table[1:, 1:])
    sums = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    return sums / float(size * size)


def ssim(pred: np.ndarray, gold: np.ndarray) -> float:
    """sewar's SSIM: 11x11 uniform window, valid mode, K1=0.01, K2=0.03, L=255, mean of the SSIM map.

    Images ``[H, W]`` with ``H, W >= 11``. Equals ``sewar.full_ref.ssim(pred, gold)[0]`` to ~1e-12 (tested).
    """
    p, g = gray_pair(pred, gold)
    if min(p.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {p.shape}")
    p64, g64 = p.astype(np.int64), g.astype(np.int64)
    mu_p, mu_g = _box_mean_valid(p64, SSIM_WINDOW), _box_mean_valid(g64, SSIM_WINDOW)
    var_p = _box_mean_valid(p64 * p64, SSIM_WINDOW) - mu_p * mu_p
    var_g = _box_mean_valid(g64 * g64, SSIM_WINDOW) - mu_g * mu_g
    cov = _box_mean_valid(p64 * g64, SSIM_WINDOW) - mu_p * mu_g
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    ssim_map = ((2 * mu_p * mu_g + c1) * (2 * cov + c2)) / ((mu_p * mu_p + mu_g * mu_g + c1) * (var_p + var_g + c2))
    return float(np.mean(ssim_map))


def _as_tensor(gray: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gray.astype(np.float64))[None, None]  # [1, 1, H, W]


def ergas(pred: np.ndarray, gold: np.ndarray) -> float:
    """ERGAS as SS-DM's evaluation computes it: ``sewar.full_ref.ergas(pred, gold)``, the prediction as sewar's GT.

    ``25 * RMSE / mean(pred)`` for gray images; ``inf`` for an all-black prediction (as sewar gives).
    """
    p, g = gray_pair(pred, gold)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(sewar_ergas(p, g))


def rase(pred: np.ndarray, gold: np.ndarray) -> float:
    """RASE as SS-DM's evaluation computes it: ``sewar.full_ref.rase(pred, gold)`` (8x8 window), prediction as GT.

    Windows whose prediction mean is 0 count 0, as in sewar.
    """
    p, g = gray_pair(pred, gold)
    if round(RASE_WINDOW / 2) >= min(g.shape):
        raise ValueError(f"RASE needs images larger than {round(RASE_WINDOW / 2)} pixels per side, got {g.shape}")
    return float(sewar_rase(p, g, ws=RASE_WINDOW))


def ergas_tm(pred: np.ndarray, gold: np.ndarray) -> float:
    """torchmetrics ERGAS (ratio 4) of ``pred [H, W]`` against ``gold`` as the target: ``25 * RMSE / mean(gold)``."""
    p, g = gray_pair(pred, gold)
    return float(error_relative_global_dimensionless_synthesis(_as_tensor(p), _as_tensor(g)))


def _box_mean_same(x: np.ndarray, size: int) -> np.ndarray:
    """torchmetrics' ``_uniform_filter``: ``[H, W]`` window means after symmetric padding of ``size // 2`` rows and
    columns before and ``size // 2 - 1 + size % 2`` after (4 and 3 for the 8x8 RASE window)."""
    before = size // 2
    after = size - 1 - before
    return _box_mean_valid(np.pad(x, ((before, after), (before, after)), mode="symmetric"), size)


def rase_tm(pred: np.ndarray, gold: np.ndarray) -> float:
    """torchmetrics' RASE (8x8 window) of ``pred [H, W]`` against ``gold`` as the target.

    Reproduces ``relative_average_spectral_error`` in numpy (it runs a float64 conv2d, ~20x slower on one CPU
    thread), equality tested to 1e-9. Like torchmetrics it divides the local target mean by the window area a
    second time, which makes the value 64x the textbook RASE; kept so numbers compare with torchmetrics users'.
    """
    p, g = gray_pair(pred, gold)
    size = RASE_WINDOW
    if round(size / 2) >= min(g.shape):
        raise ValueError(f"RASE needs images larger than {round(size / 2)} pixels per side, got {g.shape}")
    diff = p.astype(np.int64) - g.astype(np.int64)
    local_rmse = np.sqrt(_box_mean_same(diff * diff, size))  # [H, W]
    target_mean = _box_mean_same(g.astype(np.int64), size) / size**2  # torchmetrics' double division
    with np.errstate(divide="ignore", invalid="ignore"):
        rase_map = 100.0 / target_mean * local_rmse
    crop = round(size / 2)
    return float(np.mean(rase_map[crop:-crop, crop:-crop]))


def score_pair(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """All metrics of :data:`METRIC_NAMES` for one pair of same-shaped images, scored in grayscale.

    PSNR is capped at :data:`PSNR_CAP_DB` for identical images. Raises ValueError naming both shapes if the
    grayscale shapes differ.
    """
    p, g = gray_pair(pred, gold)
    pred_cols, gold_cols = ink_columns(p), ink_columns(g)
    return {
        "dtw": float(dtw_ndim.distance(pred_cols, gold_cols, use_c=True)),
        "dtw_ti": math.sqrt(dtw_accumulated_cost(translation_invariant_cost(pred_cols, gold_cols))),
        "rmse": rmse(p, g),
        "ssim": ssim(p, g),
        "psnr": psnr(p, g, cap_db=PSNR_CAP_DB),
        "ergas": ergas(p, g),
        "rase": rase(p, g),
        "ergas_tm": ergas_tm(p, g),
        "rase_tm": rase_tm(p, g),
    }
