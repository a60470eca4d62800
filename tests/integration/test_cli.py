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
    from markup2image.cli import _params

    cfg = _params("params.yaml").domain_config("math")  # the repository's params, or the defaults elsewhere
    assert arr.shape == (cfg.height, cfg.width)
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


@pytest.fixture(scope="module")
def hcma_model(tmp_path_factory):
    """A tiny model trained 2 steps with both HCMA modules (guidance scales saved with it), and one markup."""
    from markup2image.config import params_from_dict
    from markup2image.training.loop import TrainPaths, train
    from markup2image.training.synthetic import tiny_params_dict, write_synthetic_training_set

    root = tmp_path_factory.mktemp("hcma_cli")
    d = tiny_params_dict(steps=2)
    d["hcma"] = {"global_weight": 1.0, "local_weight": 1.0, "guidance_global": 1.0, "guidance_local": 50.0,
                 "patch_size": 4, "dim": 16, "layers": 1, "heads": 2}  # fmt: skip
    params = params_from_dict(d)
    markups = write_synthetic_training_set(root / "r", root / "t", params.domain_config("math"), n=4)
    train(params, "math", TrainPaths(root / "r", root / "t", root / "m"))
    return root / "m" / "model", markups[0]


def test_sample_with_layout_writes_grounded_png(hcma_model, tmp_path):
    model, markup = hcma_model
    first = markup.split()[0]
    layout = tmp_path / "boxes.json"
    layout.write_text(json.dumps({"boxes": [{"box": [10, 2, 16, 12], "chars": [0, len(first)]}]}))
    out, drawn = tmp_path / "g.png", tmp_path / "g_boxes.png"
    argv = ["sample", "--model", str(model), "--markup", markup, "--layout", str(layout), "--steps", "3"]
    assert main([*argv, "--out", str(out), "--boxes-out", str(drawn)]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (16, 32) and np.asarray(Image.open(drawn)).shape == (32, 64, 3)
    assert main([*argv, "--out", str(tmp_path / "p.png"), "--guidance-local", "0", "--guidance-global", "0"]) == 0
    assert not np.array_equal(image, np.asarray(Image.open(tmp_path / "p.png")))  # the layout steered the sample


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "not valid JSON"),
        ('[{"box": [0, 0, 40, 8], "chars": [0, 1]}]', "outside the model's 32x16 image"),
        ('[{"box": [0, 0, 4, 4]}]', "needs 'chars'"),
        ('[{"box": [0, 0, 4, 4], "chars": [90, 99]}]', "no box names a segment"),
    ],
)
def test_sample_with_a_bad_layout_exits_with_one_line_naming_the_file(hcma_model, tmp_path, content, says):
    model, markup = hcma_model
    layout = tmp_path / "bad.json"
    layout.write_text(content)
    argv = [
        "sample",
        "--model",
        str(model),
        "--markup",
        markup,
        "--layout",
        str(layout),
        "--out",
        str(tmp_path / "x.png"),
    ]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--steps", "2"])
    assert str(exc.value).startswith(f"error: {layout}") and says in str(exc.value)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_sample_with_a_missing_layout_file_fails_in_one_line(hcma_model, tmp_path):
    model, markup = hcma_model
    proc = subprocess.run(
        [sys.executable, "-m", "markup2image.cli", "sample", "--model", str(model), "--markup", markup,
         "--layout", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.png"), "--steps", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "missing.json: no such layout file" in lines[0]


def test_render_and_sample_a_markup_file_then_score_the_pairs(tmp_path):
    import dataclasses

    import torch
    from tiny_models import TINY_MODEL

    from markup2image.config import DomainConfig
    from markup2image.models.model import MarkupToImageModel
    from markup2image.text.tokenizer import TOKENIZER_FILE, train_tokenizer

    markups = ["x + y", "\\frac { a } { b }", "a ^ { 2 }"]
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(markups) + "\n\\frac {\n" + '{"id": "named", "markup": "y = 1"}\n')
    gold = tmp_path / "gold"
    assert (
        main(["render", "--domain", "math", "--engine", "mathtext", "--markup-file", str(f), "--out", str(gold)]) == 0
    )
    assert len(list(gold.glob("*.png"))) == 4 and (gold / "named.png").exists()  # the broken line is reported

    from markup2image.cli import _params

    image = _params("params.yaml").domain_config("math")  # what render drew with here
    assert isinstance(image, DomainConfig)
    tok = train_tokenizer("char", markups * 3, vocab_size=60)
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_MODEL, block_out_channels=(8, 16), cross_attention_levels=(False, True))
    model_dir = tmp_path / "model"
    MarkupToImageModel(model_cfg=cfg, image=image, vocab_size=tok.get_vocab_size()).save(
        model_dir, extra={"domain": "math"}
    )
    (model_dir / TOKENIZER_FILE).write_text(tok.to_str())
    pred = tmp_path / "pred"
    args = ["sample", "--model", str(model_dir), "--markup-file", str(f), "--out", str(pred), "--steps", "2"]
    assert main([*args, "--batch-size", "2"]) == 0
    assert (
        sorted(p.name for p in pred.glob("*.png"))
        == sorted(p.name for p in gold.glob("*.png"))
        + [sorted(set(p.name for p in pred.glob("*.png")) - set(p.name for p in gold.glob("*.png")))[0]]
        or len(list(pred.glob("*.png"))) == 5
    )  # every line sampled, the unrenderable one too
    out = tmp_path / "s.json"
    assert main(["score", "--pred", str(pred), "--gold", str(gold), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["n"] == 4 and result["missing_gold"] and "edit_accuracy" in result["summary"]


def test_each_bench_has_its_own_flags_only(capsys):
    from markup2image.bench import BENCHES

    flags = {}
    for name in BENCHES:
        with pytest.raises(SystemExit):
            main(["bench", name, "--help"])
        flags[name] = {w.strip(",") for w in capsys.readouterr().out.split() if w.startswith("--")}
    assert "--backends" in flags["sample"] and "--samplers" not in flags["sample"]
    assert "--samplers" in flags["steps"] and "--backends" not in flags["steps"]
    assert "--trace" in flags["robustness"] and not any("--trace" in flags[n] for n in BENCHES if n != "robustness")
    assert {"--multiples", "--tokenized"} <= flags["curve"] and "--processes" not in flags["curve"]
