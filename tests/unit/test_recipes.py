"""Paper recipes (configs/paper/<domain>.yaml): valid against params.yaml, the paper's settings, dry-built."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from markup2image.config import ConfigError, load_params
from markup2image.recipes import apply_overrides, dvc_command, load_recipe, recipe_check, recipe_params
from markup2image.training.loop import steps_for_epochs

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
BATCH = {"math": 16, "tables": 24, "music": 8, "molecules": 16}  # FSA-CDM section 4.2


def _encoder_config(folder: Path, hub_id: str) -> Path:
    """An offline stand-in with the published architecture of the recipe's encoder (config.json only: a dry build
    reads no weights)."""
    from transformers import GPTNeoConfig, RobertaConfig

    if "gpt-neo-125M" in hub_id:  # EleutherAI/gpt-neo-125M
        cfg = GPTNeoConfig(
            vocab_size=50257,
            max_position_embeddings=2048,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            attention_types=[[["global", "local"], 6]],
            window_size=256,
        )
    else:  # DeepChem/ChemBERTa-77M-MLM, a small RoBERTa
        cfg = RobertaConfig(
            vocab_size=600,
            hidden_size=384,
            num_hidden_layers=3,
            num_attention_heads=12,
            intermediate_size=464,
            max_position_embeddings=515,
            type_vocab_size=1,
        )
    cfg.save_pretrained(folder)
    return folder


def _offline(recipe: Path, tmp_path: Path) -> Path:
    """The recipe with its hub encoder replaced by the local stand-in (what `-S model.pretrained_encoder=` does)."""
    name, overrides = load_recipe(recipe)
    folder = _encoder_config(tmp_path / "encoder", overrides["model.pretrained_encoder"])
    out = tmp_path / recipe.name
    out.write_text(yaml.safe_dump({"name": name, "set": overrides | {"model.pretrained_encoder": str(folder)}}))
    return out


def test_there_is_a_recipe_per_domain():
    assert [p.stem for p in RECIPES] == sorted(BATCH)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_the_paper_protocol_and_builds_on_meta(recipe: Path, tmp_path: Path):
    report = recipe_check(_offline(recipe, tmp_path), ROOT / "params.yaml")
    domain = recipe.stem
    t = report["train"]
    assert report["domain"] == domain
    assert (t["lr"], t["warmup_steps"], t["lr_schedule"], t["epochs"]) == (1e-4, 500, "cosine", 100)
    assert t["global_batch"] == BATCH[domain]
    params = recipe_params(_offline(recipe, tmp_path / "again"), ROOT / "params.yaml")
    assert params.tokenize.max_length == params.model.max_text_length == (512 if domain == "molecules" else 1024)
    layout = report["attention"]
    assert all(site["heads"] == 8 for site in layout["sites"])  # SS-DM: 8 heads (not 64)
    assert layout["ccam"] == 5
    parts = report["parameters"]
    assert parts["encoder_frozen"] > 0 and parts["encoder"] == 0  # frozen LM, its states straight in
    assert parts["fsa"] > 0 and parts["ccam"] > 0 and parts["contrastive_head"] > 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dvc_command_round_trips_the_overrides(recipe: Path, tmp_path: Path):
    """DVC's own ``-S`` code (Hydra overrides on params.yaml) turns the command into the params the recipe means."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    name, _ = load_recipe(recipe)
    cmd = dvc_command(recipe)
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", name]
    params_file = tmp_path / "params.yaml"
    params_file.write_text((ROOT / "params.yaml").read_text())
    dvc_apply_overrides(params_file, [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-S"])
    assert load_params(params_file) == recipe_params(recipe, ROOT / "params.yaml")


def test_epochs_take_precedence_over_steps(tmp_path: Path):
    recipe = _offline(ROOT / "configs" / "paper" / "math.yaml", tmp_path)
    params = recipe_params(recipe, ROOT / "params.yaml")
    resolved = steps_for_epochs(params, num_items=75_275)  # im2latex-100k's train split
    assert resolved.train.steps == math.ceil(100 * 75_275 / 16)
    assert steps_for_epochs(params.__class__(), 1000).train.steps == params.__class__().train.steps  # epochs 0


def test_overrides_set_nested_keys_and_reject_bad_paths():
    raw = {"train": {"lr": 0.1}, "lambda": 0.5}
    out = apply_overrides(raw, {"train.lr": 1e-4, "domain.math.height": 64, "lambda": 0.01})
    assert out == {"train": {"lr": 1e-4}, "lambda": 0.01, "domain": {"math": {"height": 64}}}
    assert raw["train"]["lr"] == 0.1  # the input is not modified
    with pytest.raises(ConfigError, match="lambda"):
        apply_overrides(raw, {"lambda.x": 1})


def test_a_malformed_recipe_is_one_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("set: [1, 2]\n")
    with pytest.raises(ConfigError, match="needs 'name' and a 'set' mapping"):
        load_recipe(bad)


def test_parameter_table_is_like_for_like_with_paper_table1(tmp_path: Path):
    from markup2image.models.summary import paper_table

    report = recipe_check(_offline(ROOT / "configs" / "paper" / "math.yaml", tmp_path), ROOT / "params.yaml")
    rows = paper_table(report["parameters"])
    unet = rows[0]
    assert unet["cumulative"] == pytest.approx(209e6, rel=0.01)  # SS-DM's U-Net on the same footing
    assert rows[-1]["added"] == pytest.approx(125.2e6, rel=0.01)  # GPT-Neo-125M, frozen, counted apart
    assert rows[-2]["cumulative"] == report["parameters"]["trainable"]
