"""`bench steps`: the DTW-vs-steps table samples the evaluate protocol's items at each (sampler, steps)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_MODEL

from markup2image.bench.steps import bench_steps, markdown_table
from markup2image.cli import main
from markup2image.config import DiffusionConfig, DomainConfig, Params
from markup2image.diffusion.sampling import sample_images, to_uint8
from markup2image.evaluation.evaluate import select_test_items
from markup2image.evaluation.metrics import score_pair
from markup2image.io import load_image, read_jsonl, save_png, write_jsonl
from markup2image.models.model import MarkupToImageModel
from markup2image.text.tokenizer import TOKENIZER_FILE, encode_batch, train_bpe

MARKUP = ["x ^ { 2 }", "a + b", "\\frac { a } { b }", "y _ { i }", "\\sqrt { x }"]
IMAGE = DomainConfig(height=16, width=32, channels=1)
TINY = dataclasses.replace(TINY_MODEL, cross_attention_levels=(False, True))
DIFFUSION = DiffusionConfig(num_train_timesteps=20)  # saved with the model: ddpm runs all 20 steps


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("steps")
    model_dir, rendered = root / "model", root / "rendered"
    tok = train_bpe(MARKUP * 4, vocab_size=40, min_frequency=1)
    torch.manual_seed(0)
    model = MarkupToImageModel(model_cfg=TINY, image=IMAGE, vocab_size=tok.get_vocab_size(), diffusion=DIFFUSION)
    model.save(model_dir, extra={"params": {"diffusion": dataclasses.asdict(DIFFUSION)}})
    (model_dir / TOKENIZER_FILE).write_text(tok.to_str())
    rng = np.random.default_rng(0)
    rows = []
    for i, markup in enumerate(MARKUP):
        gold = np.full((IMAGE.height, IMAGE.width), 255, np.uint8)
        gold[4:12, 2 : 6 + 4 * i] = rng.integers(0, 80)
        save_png(rendered / "images" / f"t{i}.png", gold)
        rows.append({"id": f"t{i}", "markup": markup, "image": f"images/t{i}.png"})
    write_jsonl(rendered / "test.jsonl", rows)
    return model_dir, rendered


def test_rows_follow_the_evaluate_protocol(folders: tuple[Path, Path]) -> None:
    model_dir, rendered = folders
    params = dataclasses.replace(Params(), evaluate=dataclasses.replace(Params().evaluate, batch_size=2))
    result = bench_steps(model_dir, rendered, steps=(20, 5), num_samples=2, params=params)
    assert [(r["sampler"], r["steps"]) for r in result["rows"]] == [
        ("ddpm", 20),
        ("ddim", 20),
        ("ddim", 5),
        ("dpm_solver", 20),
        ("dpm_solver", 5),
    ]
    assert [(s["sampler"], s["steps"]) for s in result["skipped"]] == [("ddpm", 5)]
    assert "runs all 20 steps" in result["skipped"][0]["reason"]
    assert result["num_samples"] == 2 and all(r["seconds_per_image"] > 0 for r in result["rows"])

    # the same two items (seed-42 shuffle), one batch seeded evaluate.seed + 0, scored against their golds
    from markup2image.models.model import load_model
    from markup2image.text.tokenizer import load_tokenizer

    items = select_test_items(read_jsonl(rendered / "test.jsonl"), 2, 42)
    golds = [load_image(rendered / r["image"]) for r in items]
    ids, mask = encode_batch(load_tokenizer(model_dir), [r["markup"] for r in items], TINY.max_text_length)
    images = sample_images(
        load_model(model_dir),
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        sampler="ddim",
        steps=5,
        seed=42,
        diffusion=DIFFUSION,
    )
    dtw = np.mean([score_pair(p, g)["dtw"] for p, g in zip(to_uint8(images), golds)])
    assert result["rows"][2]["dtw"] == pytest.approx(dtw, abs=1e-4)
    blank = np.mean([score_pair(np.full_like(g, 255), g)["dtw"] for g in golds])
    assert result["blank_baseline"]["dtw"] == pytest.approx(blank, abs=1e-4)
    table = markdown_table(result)
    assert table.count("\n| ") == 1 + len(result["rows"]) + 1  # separator, one line per row, blank baseline
    assert "| blank (all white) |" in table


def test_cli_writes_json_and_markdown(folders: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, rendered = folders
    out = tmp_path / "steps.json"
    argv = ["--params", str(tmp_path / "none.yaml"), "bench", "steps", "--model", str(model_dir)]
    argv += ["--rendered", str(rendered), "--steps", "5", "3", "--samplers", "ddim", "--num-samples", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["steps"]) for r in result["rows"]] == [("ddim", 5), ("ddim", 3)]
    assert set(result["rows"][0]) == {"sampler", "steps", "dtw", "dtw_ti", "rmse", "ssim", "psnr", "seconds_per_image"}
    assert "| ddim | 3 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no \\(sampler, steps\\) pair"):
        main([*argv[:-4], "--samplers", "ddpm", "--num-samples", "2", "--out", str(out)])
