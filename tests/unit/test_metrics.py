"""Evaluation metrics (design §6): hand-computed DTW, references in plain numpy, sewar/torchmetrics parity, scoring."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sewar.full_ref import ergas as sewar_ergas
from sewar.full_ref import psnr as sewar_psnr
from sewar.full_ref import rase as sewar_rase
from sewar.full_ref import rmse as sewar_rmse
from sewar.full_ref import ssim as sewar_ssim
from torchmetrics.functional.image import (
    error_relative_global_dimensionless_synthesis,
    relative_average_spectral_error,
)

from markup2image.bench.metrics import bench_metrics, synthetic_pair
from markup2image.evaluation import metrics as M
from markup2image.evaluation.image_edit import EDIT_KEYS, PAIR_KEYS
from markup2image.evaluation.report import save_comparison_grid, save_image_grid
from markup2image.evaluation.score import score_arrays, score_folders
from markup2image.io import load_image

W, B = 255, 0  # white paper, black ink


# ---------------------------------------------------------------- plain references, written for clarity not speed


def reference_dtw(cost: np.ndarray) -> float:
    """Textbook DTW over a full accumulated-cost matrix; returns the accumulated cost (no sqrt)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return float(acc[n, m])


def columns(img: np.ndarray) -> np.ndarray:
    return (img < 150).astype(np.float64).T  # [W, H]


def reference_sq_cost(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    p, g = columns(pred), columns(gold)
    return np.array([[np.sum((x - y) ** 2) for y in g] for x in p])


def reference_ti_cost(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """The original per-column-pair loop: min over shifts of the squared distance over the overlapping rows."""
    p, g = columns(pred), columns(gold)
    slack = int(np.floor(pred.shape[0] * 0.1))

    def dist(x: np.ndarray, y: np.ndarray) -> float:
        dists = [np.sum((x - y) ** 2)]
        if dists[0] != 0:
            for s in range(1, slack + 1):
                dists.append(np.sum((x[s:] - y[:-s]) ** 2))
                dists.append(np.sum((x[:-s] - y[s:]) ** 2))
        return min(dists)

    return np.array([[dist(x, y) for y in g] for x in p])


def glyph_image(rng: np.random.Generator, height: int, width: int, margin: int) -> np.ndarray:
    """White image with dark blocks, ``margin`` blank rows at the top and bottom."""
    img = np.full((height, width), W, dtype=np.uint8)
    for _ in range(width // 6):
        h, w = rng.integers(2, 9), rng.integers(1, 6)
        top, left = rng.integers(margin, height - margin - h), rng.integers(0, width - w)
        img[top : top + h, left : left + w] = rng.integers(0, 120)
    return img


def random_binary(rng: np.random.Generator, height: int, width: int, ink: float = 0.2) -> np.ndarray:
    return np.where(rng.random((height, width)) < ink, B, W).astype(np.uint8)


# ---------------------------------------------------------------- grayscale


def test_to_gray_uses_opencv_luma_weights() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30]]], dtype=np.uint8)
    gray = M.to_gray(rgb)
    assert gray.dtype == np.uint8 and gray.shape == (1, 4)
    # OpenCV: 0.299 R + 0.587 G + 0.114 B, rounded
    assert gray.tolist() == [[76, 150, 29, round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)]]
    np.testing.assert_array_equal(gray, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert M.to_gray(img) is img
    np.testing.assert_array_equal(M.to_gray(img[:, :, None]), img)


def test_to_gray_rejects_non_uint8() -> None:
    with pytest.raises(TypeError, match="uint8"):
        M.to_gray(np.zeros((4, 4), dtype=np.float32))


# ---------------------------------------------------------------- DTW by hand


def test_dtw_hand_computed_2x3() -> None:
    pred = np.array([[B, W, W], [W, B, W]], dtype=np.uint8)  # ink columns p0=(1,0) p1=(0,1) p2=(0,0)
    gold = np.array([[B, B, W], [W, W, W]], dtype=np.uint8)  # ink columns g0=(1,0) g1=(1,0) g2=(0,0)
    # local cost C[i, j] = |p_i - g_j|^2     accumulated D[i, j] = C + min(up, left, diagonal)
    #        g0 g1 g2                              g0 g1 g2
    #   p0 [  0  0  1 ]                       p0 [  0  0  1 ]
    #   p1 [  2  2  1 ]                       p1 [  2  2  1 ]   D[1,2] = 1 + min(1, 0, 2) = 1
    #   p2 [  1  1  0 ]                       p2 [  3  3  1 ]   D[2,2] = 0 + min(1, 2, 3) = 1
    # DTW = sqrt(D[2, 2]) = 1.  H = 2 gives no shift slack (floor(0.2) = 0), so DTW-TI is the same.
    assert M.dtw_distance(pred, gold) == pytest.approx(1.0, abs=1e-12)
    assert M.dtw_ti_distance(pred, gold) == pytest.approx(1.0, abs=1e-12)
    assert M.dtw_accumulated_cost(reference_sq_cost(pred, gold)) == 1.0


def test_dtw_takes_sqrt_of_the_accumulated_squared_cost() -> None:
    pred = np.array([[B, W], [W, B]], dtype=np.uint8)  # p0=(1,0) p1=(0,1)
    gold = np.full((2, 2), W, dtype=np.uint8)  # g0=g1=(0,0): every local cost is 1
    # D = [[1, 2], [2, 1 + min(2, 2, 1)]] = [[1, 2], [2, 2]]: sqrt(2), not 2 (a sum of Euclidean costs) nor 2
    # (the accumulated cost without the square root).
    assert M.dtw_distance(pred, gold) == pytest.approx(math.sqrt(2), abs=1e-12)
    assert M.dtw_ti_distance(pred, gold) == pytest.approx(math.sqrt(2), abs=1e-12)


def test_dtw_warps_repeated_columns_to_zero() -> None:
    pred = np.array([[B, W], [W, B]], dtype=np.uint8)  # columns a, b
    gold = np.array([[B, B, W], [W, W, B]], dtype=np.uint8)  # columns a, a, b
    assert M.dtw_distance(pred, gold) == 0.0
    assert M.dtw_ti_distance(pred, gold) == 0.0


def test_ink_threshold_is_below_150() -> None:
    pred = np.array([[149]], dtype=np.uint8)  # ink
    assert M.dtw_distance(pred, np.array([[150]], dtype=np.uint8)) == 1.0  # 150 is paper
    assert M.dtw_distance(pred, np.array([[0]], dtype=np.uint8)) == 0.0  # both ink


def test_dtw_ti_forgives_shifts_up_to_ten_percent_only() -> None:
    def one_column(row: int) -> np.ndarray:
        img = np.full((10, 1), W, dtype=np.uint8)  # H = 10: shifts of floor(1.0) = 1 row
        img[row, 0] = B
        return img

    assert M.dtw_distance(one_column(3), one_column(4)) == pytest.approx(math.sqrt(2))
    assert M.dtw_ti_distance(one_column(3), one_column(4)) == 0.0  # one row: forgiven
    assert M.dtw_ti_distance(one_column(3), one_column(5)) == pytest.approx(math.sqrt(2))  # two rows: not
    # The shifted distance only sums the overlapping rows, so ink in the last row against a blank column
    # costs nothing once shifted out; the original metric behaves the same way.
    blank = np.full((10, 1), W, dtype=np.uint8)
    assert M.dtw_distance(one_column(9), blank) == 1.0
    assert M.dtw_ti_distance(one_column(9), blank) == 0.0


@pytest.mark.parametrize("shape", [(12, 20), (20, 15), (31, 9), (64, 40)])
def test_dtw_matches_plain_numpy_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    height, width = shape
    for gold_width in (width, width + 7):  # equal and unequal lengths
        pred, gold = random_binary(rng, height, width), random_binary(rng, height, gold_width, ink=0.3)
        sq, ti = reference_sq_cost(pred, gold), reference_ti_cost(pred, gold)
        assert M.dtw_distance(pred, gold) == pytest.approx(math.sqrt(reference_dtw(sq)), rel=1e-12)
        assert M.dtw_ti_distance(pred, gold) == pytest.approx(math.sqrt(reference_dtw(ti)), rel=1e-12)
        np.testing.assert_array_equal(M.translation_invariant_cost(columns(pred), columns(gold)), ti)
        # the fast DP also reproduces dtaidistance on the plain squared cost, and handles float costs
        assert M.dtw_accumulated_cost(sq) == reference_dtw(sq)
        noisy = rng.random(sq.shape)
        assert M.dtw_accumulated_cost(noisy) == pytest.approx(reference_dtw(noisy), rel=1e-12)


def test_dtw_at_paper_size_matches_reference_dp() -> None:
    rng = np.random.default_rng(7)
    pred, gold = synthetic_pair(rng, 64, 320)
    sq = M.squared_distances(columns(pred), columns(gold))
    assert M.dtw_distance(pred, gold) == pytest.approx(math.sqrt(reference_dtw(sq)), rel=1e-12)
    assert M.dtw_ti_distance(pred, gold) < M.dtw_distance(pred, gold)


def test_vertically_shifted_copy_has_zero_dtw_ti_but_not_dtw() -> None:
    rng = np.random.default_rng(0)
    gold = glyph_image(rng, 64, 320, margin=12)
    for shift in (3, 6):  # within floor(0.1 * 64) = 6 rows
        pred = np.full_like(gold, W)
        pred[shift:] = gold[:-shift]
        assert M.dtw_distance(pred, gold) > 5.0
        assert M.dtw_ti_distance(pred, gold) == 0.0
    pred = np.full_like(gold, W)
    pred[8:] = gold[:-8]  # beyond the slack
    assert M.dtw_ti_distance(pred, gold) > 1.0


# ---------------------------------------------------------------- pixel metrics


def test_identical_images_score_perfectly() -> None:
    img = glyph_image(np.random.default_rng(1), 64, 320, margin=2)
    scores = M.score_pair(img, img.copy())
    assert scores["dtw"] == 0.0 and scores["dtw_ti"] == 0.0 and scores["rmse"] == 0.0
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert scores["ergas"] == 0.0 and scores["rase"] == 0.0
    assert scores["ergas_tm"] == 0.0 and scores["rase_tm"] == 0.0
    assert M.psnr(img, img) == math.inf
    assert scores["psnr"] == M.PSNR_CAP_DB
    assert set(scores) == set(M.METRIC_NAMES)


def test_rmse_psnr_ergas_by_hand() -> None:
    gold = np.full((16, 16), 200, dtype=np.uint8)
    pred = gold - 10  # error 10 everywhere
    assert M.rmse(pred, gold) == pytest.approx(10.0)
    assert M.psnr(pred, gold) == pytest.approx(10 * math.log10(255**2 / 100))
    # SS-DM calls sewar with the prediction as sewar's ground truth: ERGAS divides by the prediction's mean
    assert M.ergas(pred, gold) == pytest.approx(100 / 4 * 10 / 190)
    assert M.ergas(gold, pred) == pytest.approx(100 / 4 * 10 / 200)
    # torchmetrics' form: gold is the target, it divides by the gold mean
    assert M.ergas_tm(pred, gold) == pytest.approx(100 / 4 * 10 / 200)
    # RASE on a constant error: 100 / local mean * local RMSE, the prediction's mean (190) for SS-DM's call
    assert M.rase(pred, gold) == pytest.approx(100 / 190 * 10)


def test_pixel_metrics_match_sewar_and_torchmetrics() -> None:
    rng = np.random.default_rng(3)
    pairs = [synthetic_pair(rng, 64, 320) for _ in range(3)]
    pairs.append((rng.integers(0, 256, (40, 57), dtype=np.uint8), rng.integers(0, 256, (40, 57), dtype=np.uint8)))
    pairs.append((np.full((64, 64), W, np.uint8), glyph_image(rng, 64, 64, margin=2)))
    for pred, gold in pairs:
        assert M.ssim(pred, gold) == pytest.approx(sewar_ssim(pred, gold)[0], abs=1e-10)
        assert M.rmse(pred, gold) == pytest.approx(sewar_rmse(pred, gold), rel=1e-12)
        assert M.psnr(pred, gold) == pytest.approx(sewar_psnr(gold, pred), rel=1e-12)
        p = torch.from_numpy(pred.astype(np.float64))[None, None]
        g = torch.from_numpy(gold.astype(np.float64))[None, None]
        assert M.rase_tm(pred, gold) == pytest.approx(float(relative_average_spectral_error(p, g)), rel=1e-9)
        assert M.ergas_tm(pred, gold) == pytest.approx(
            float(error_relative_global_dimensionless_synthesis(p, g)), rel=1e-12
        )
        # SS-DM's eval_utils/image_evals.py: sewar with the prediction in the first slot
        assert M.ergas(pred, gold) == pytest.approx(sewar_ergas(pred, gold), rel=1e-12)
        assert M.rase(pred, gold) == pytest.approx(sewar_rase(pred, gold), rel=1e-12)
        assert M.ergas(pred, gold) != pytest.approx(sewar_ergas(gold, pred), rel=1e-6)


def test_ssim_is_valid_mode_uniform_window() -> None:
    rng = np.random.default_rng(4)
    pred, gold = synthetic_pair(rng, 64, 320)
    same_mode = sewar_ssim(pred, gold, mode="same")[0]
    assert M.ssim(pred, gold) != pytest.approx(same_mode, abs=1e-6)  # would pass if the borders were padded


def test_rgb_is_scored_like_its_opencv_gray() -> None:
    rng = np.random.default_rng(5)
    pred_rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    gold = glyph_image(rng, 32, 48, margin=2)
    assert M.score_pair(pred_rgb, gold) == M.score_pair(cv2.cvtColor(pred_rgb, cv2.COLOR_RGB2GRAY), gold)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(64, 320\).*\(64, 300\)"):
        M.score_pair(np.zeros((64, 320), np.uint8), np.zeros((64, 300), np.uint8))


# ---------------------------------------------------------------- scoring folders and arrays


def _write(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img).save(path)


def test_blank_baseline_is_scored_on_the_golds() -> None:
    rng = np.random.default_rng(6)
    golds = [glyph_image(rng, 64, 320, margin=2) for _ in range(3)]
    preds = [synthetic_pair(rng, 64, 320)[0] for _ in range(3)]
    result = score_arrays(preds, golds, ["a", "b", "c"])
    blank = result["blank_baseline"]
    assert blank["n"] == 3
    # an all-white prediction has no ink, so every gold ink pixel costs 1 exactly once: DTW = sqrt(#ink)
    expected_dtw = np.mean([math.sqrt(np.sum(g < 150)) for g in golds])
    assert blank["dtw"] == pytest.approx(expected_dtw, rel=1e-12)
    expected_rmse = np.mean([math.sqrt(np.mean((255.0 - g) ** 2)) for g in golds])
    assert blank["rmse"] == pytest.approx(expected_rmse, rel=1e-12)
    expected_model_dtw = np.mean([M.dtw_distance(p, g) for p, g in zip(preds, golds, strict=True)])
    assert result["summary"]["dtw"] == pytest.approx(expected_model_dtw, rel=1e-12)
    assert [row["name"] for row in result["per_image"]] == ["a", "b", "c"]


def test_row_shift_baseline_is_the_gold_one_row_down() -> None:
    """A 1-px bar of length L one row off misses every ink pixel twice (its own and the gold's): DTW sqrt(2L)."""
    gold = np.full((16, 48), 255, np.uint8)
    gold[7, 10:20] = 0
    result = score_arrays([gold], [gold], ["bar"])
    assert result["row_shift_dtw"] == pytest.approx(math.sqrt(20), rel=1e-12)
    assert result["summary"]["dtw"] == 0 and result["blank_baseline"]["dtw"] == pytest.approx(math.sqrt(10))
    moved = M.shifted(gold, rows=1)
    assert moved[8, 10:20].max() == 0 and (moved[0] == 255).all() and (moved[7] == 255).all()


def test_score_arrays_rejects_bad_input() -> None:
    img = np.zeros((16, 16), np.uint8)
    with pytest.raises(ValueError, match="differ in length"):
        score_arrays([img], [img, img], ["a"])
    with pytest.raises(ValueError, match="repeated"):
        score_arrays([img, img], [img, img], ["a", "a"])


def test_score_folders_schema_missing_and_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(8)
    pred_dir, gold_dir = tmp_path / "pred", tmp_path / "gold"
    pred_dir.mkdir()
    gold_dir.mkdir()
    golds = {name: glyph_image(rng, 64, 320, margin=2) for name in ("a", "b", "c", "d", "e")}
    for name, gold in golds.items():
        _write(gold_dir / f"{name}.png", np.stack([gold] * 3, axis=-1))  # RGB gold, as in the SS-DM release
    _write(pred_dir / "a.png", golds["a"])  # identical
    _write(pred_dir / "b.jpg", golds["b"])  # jpg is matched by name
    _write(pred_dir / "c.png", np.full((64, 300), W, np.uint8))  # wrong shape
    (pred_dir / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt
    _write(pred_dir / "z.png", golds["e"])  # no gold; "e" has no prediction
    (pred_dir / "notes.txt").write_text("ignored")

    with caplog.at_level(logging.INFO, logger="markup2image.evaluation.score"):
        result = score_folders(pred_dir, gold_dir, progress=False)

    assert set(result) >= {"summary", "per_image", "blank_baseline", "missing_pred", "missing_gold", "unreadable"}
    assert set(result["summary"]) == {*M.METRIC_NAMES, *EDIT_KEYS, "n"}
    assert result["summary"]["n"] == 2 and result["blank_baseline"]["n"] == 2
    assert [row["name"] for row in result["per_image"]] == ["a", "b"]
    assert set(result["per_image"][0]) == {"name", *M.METRIC_NAMES, *PAIR_KEYS}
    row_a = result["per_image"][0]
    assert row_a["dtw"] == 0.0 and row_a["ssim"] == pytest.approx(1.0) and row_a["psnr"] == M.PSNR_CAP_DB
    assert result["psnr_capped"] == 1
    assert result["per_image"][1]["dtw"] == pytest.approx(
        M.dtw_distance(load_image(pred_dir / "b.jpg"), golds["b"]), rel=1e-12
    )
    assert result["missing_pred"] == ["e"] and result["missing_gold"] == ["z"]
    assert [u["name"] for u in result["unreadable"]] == ["d"]
    assert result["unreadable"][0]["file"].endswith("d.png")
    assert result["mismatched"] == [{"name": "c", "pred_shape": [64, 300], "gold_shape": [64, 320]}]
    assert result["summary"]["n"] + len(result["mismatched"]) + len(result["unreadable"]) == 4  # names in both
    json.dumps(result, allow_nan=False)  # JSON-able, no inf/nan

    messages = [r.getMessage() for r in caplog.records]
    assert any("1 image(s) have no prediction" in m and "e" in m for m in messages)
    assert any("1 image(s) have no gold image" in m and "z" in m for m in messages)
    assert any(r.levelno == logging.ERROR and "d.png" in r.getMessage() for r in caplog.records)


def test_score_folders_without_common_names_raises(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _write(tmp_path / "p" / "x.png", np.zeros((16, 16), np.uint8))
    _write(tmp_path / "g" / "y.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="no same-named images"):
        score_folders(tmp_path / "p", tmp_path / "g", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        score_folders(tmp_path / "nowhere", tmp_path / "g", progress=False)


# ---------------------------------------------------------------- reports and bench


def test_comparison_grid_puts_gold_left_and_generated_right(tmp_path: Path) -> None:
    gold = np.zeros((20, 30), np.uint8)  # black
    pred = np.full((20, 30), 255, np.uint8)  # white
    out = tmp_path / "grid.png"
    save_comparison_grid([gold] * 20, [pred] * 20, out, titles=[f"id{i} dtw=1.0" for i in range(20)], max_items=3)
    grid = np.asarray(Image.open(out).convert("L"))
    assert grid.shape[0] < 3 * (20 + 14 + 4) + 14 + 4 + 1  # three rows only
    rows = [y for y in range(grid.shape[0]) if (grid[y, 4:34] == 0).all()]
    assert len(rows) == 3 * 20  # three gold images on the left
    assert (grid[rows[0], 4 + 30 + 4 : 4 + 30 + 4 + 30] == 255).all()  # generated on the right
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_image_grid_layout(tmp_path: Path) -> None:
    images = [np.full((10, 12, 3), v, np.uint8) for v in (0, 60, 120, 180, 240)]
    out = tmp_path / "golds.png"
    save_image_grid(images, out, ncols=2)
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (4 + 3 * (10 + 4), 4 + 2 * (12 + 4), 3)
    assert (grid[4 + 14, 4 + 16] == 180).all()  # fourth image: second row, second column


def test_bench_metrics_is_json_able() -> None:
    result = bench_metrics(num_pairs=2, height=32, width=64, seed=1)
    json.dumps(result, allow_nan=False)
    assert set(result["metrics"]) == {*M.METRIC_NAMES, "score_pair"}
    assert all(v["median_s"] > 0 for v in result["metrics"].values())
