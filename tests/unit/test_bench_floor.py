"""``bench floor``: the metrics of the gold moved or degraded, as ratios to the blank page."""

from __future__ import annotations

import json

import numpy as np

from markup2image.bench.floor import bench_floor, shifted
from markup2image.cli import main
from markup2image.io import save_png


def _glyphs(seed: int) -> np.ndarray:
    """A 16x48 gold: a few 1-3 px wide black strokes, like small glyphs at a low dpi."""
    rng = np.random.default_rng(seed)
    img = np.full((16, 48), 255, np.uint8)
    for x in range(3, 40, 7):
        top = int(rng.integers(3, 8))
        img[top : top + int(rng.integers(3, 7)), x : x + int(rng.integers(1, 4))] = 0
        img[top + 2, x : x + 5] = 0  # a horizontal bar: a one-row shift misses it entirely
    return img


def _rendered(tmp_path, n: int = 4):
    (tmp_path / "images").mkdir()
    with open(tmp_path / "test.jsonl", "w") as f:
        for i in range(n):
            save_png(tmp_path / "images" / f"g{i}.png", _glyphs(i))
            f.write(json.dumps({"id": f"g{i}", "markup": "x", "image": f"images/g{i}.png"}) + "\n")
    return tmp_path


def test_shift_moves_and_fills_with_white():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    down = shifted(img, rows=1)
    assert (down[0] == 255).all() and (down[1:] == img[:-1]).all()
    left = shifted(img, cols=-2)
    assert (left[:, :2] == img[:, 2:]).all() and (left[:, 2:] == 255).all()


def test_ratios_read_as_the_metrics_define_them(tmp_path):
    result = bench_floor(_rendered(tmp_path), num_samples=0)
    rows = {r["perturbation"]: r for r in result["rows"]}
    assert result["items"] == 4 and result["image"] == [16, 48]
    assert rows["gold"]["dtw"] == 0 and rows["gold"]["ssim"] == 1.0
    assert rows["blank"]["dtw_over_blank"] == 1.0 and rows["blank"]["dtw_ti_over_blank"] == 1.0
    # DTW warps columns, so a horizontal move costs nothing; a vertical one costs, DTW-TI forgives it
    assert rows["right 2 columns"]["dtw"] == 0
    assert rows["down 1 row"]["dtw_over_blank"] > 0.5 and rows["down 1 row"]["dtw_ti"] == 0
    assert rows["down 2 rows"]["dtw"] > rows["down 1 row"]["dtw"]
    assert 0 < rows["30% of ink erased"]["dtw_over_blank"] < 1
    # con_aug's positive view: always moved 1-2 columns, a row up or down two times in three, so it costs DTW but
    # never a blank page's worth; deterministic under the seed
    pos = rows["con_aug positive"]
    assert 0 < pos["dtw_over_blank"] < 1 and pos["ssim"] < 1
    assert bench_floor(tmp_path, num_samples=0)["rows"] == result["rows"]


def test_cli_writes_the_json_with_the_host_record(tmp_path):
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    out = tmp_path / "floor.json"
    assert main(["bench", "floor", "--rendered", str(_rendered(rendered)), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "host" in got and {r["perturbation"] for r in got["rows"]} >= {"gold", "blank", "down 1 row"}
