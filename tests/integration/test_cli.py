"""The `markup2image` command line: render, score and the one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from markup2image.cli import main


def test_render_math_writes_png(tmp_path):
    out = tmp_path / "a.png"
    assert main(["render", "--domain", "math", "--markup", r"\frac { a } { b }", "--out", str(out)]) == 0
    arr = np.asarray(Image.open(out))
    assert arr.shape == (64, 320)
    assert arr.min() < 100 and arr[-1, -1] == 255  # ink somewhere, white bottom-right corner


def test_render_bad_markup_exits_with_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "markup2image.cli",
            "render",
            "--domain",
            "math",
            "--markup",
            r"\frac {",
            "--out",
            str(tmp_path / "bad.png"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "parse_error" in lines[0]
    assert not (tmp_path / "bad.png").exists()


def test_score_folders_json(tmp_path):
    pred, gold = tmp_path / "pred", tmp_path / "gold"
    pred.mkdir(), gold.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        g = np.full((16, 40), 255, np.uint8)
        g[4:10, 5 : 5 + rng.integers(5, 30)] = 0
        Image.fromarray(g).save(gold / f"{name}.png")
        Image.fromarray(g).save(pred / f"{name}.png")
    out = tmp_path / "s.json"
    assert main(["score", "--pred", str(pred), "--gold", str(gold), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["n"] == 2 and result["summary"]["dtw"] == 0.0
    assert {r["name"] for r in result["per_image"]} == {"a", "b"}
    assert result["blank_baseline"]["dtw"] > 0


def test_wrong_params_key_names_it(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr_rate: 0.1\n")
    with pytest.raises(SystemExit, match=r"train\.lr_rate: unknown params key"):
        main(["--params", str(bad), "summary"])
