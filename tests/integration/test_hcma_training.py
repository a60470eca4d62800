"""HCMA inside training: the train stage's dataset maps renderer layouts onto token ids, the model owns the HCMA
module (optimizer, EMA, checkpoints, saved model), its terms are logged, and with both weights 0 nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from markup2image.config import params_from_dict
from markup2image.data.dataset import MarkupImageDataset, collate
from markup2image.models.model import MODEL_CONFIG, MODEL_WEIGHTS, load_model
from markup2image.training.checkpoints import run_fingerprint
from markup2image.training.loop import TrainPaths, build_model, train
from markup2image.training.synthetic import tiny_params_dict, write_synthetic_training_set

HCMA_ON = {"global_weight": 1.0, "local_weight": 1.0, "patch_size": 4, "dim": 16, "layers": 1, "heads": 2}


def _params(hcma: dict | None = None, **train):
    d = tiny_params_dict(**train)
    if hcma is not None:
        d["hcma"] = hcma
    return params_from_dict(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("data")
    params = _params()
    markups = write_synthetic_training_set(root / "rendered", root / "tokenized", params.domain_config("math"), n=8)
    return root / "rendered", root / "tokenized", markups


def test_dataset_maps_each_box_to_its_symbols_tokens(data) -> None:
    from markup2image.text.tokenizer import load_tokenizer

    rendered, tokenized, markups = data
    ds = MarkupImageDataset(rendered, tokenized, "train", 1, layouts=True, max_boxes=4)
    tok = load_tokenizer(tokenized)
    batch = collate([ds[i] for i in range(4)])
    layout = batch["layout"]
    n = batch["input_ids"].shape[1]
    assert layout.segment_mask.shape[0] == 4 and layout.segment_mask.shape[2] == n
    for i in range(4):
        symbols = markups[i].split()
        ids = batch["input_ids"][i].tolist()
        for k in range(min(4, len(symbols))):
            assert bool(layout.box_mask[i, k])
            picked = [ids[j] for j in torch.nonzero(layout.segment_mask[i, k]).flatten().tolist()]
            assert tok.decode(picked).replace(" ", "") == symbols[k]  # the BPE pieces of symbol k, nothing else
            x0 = float(layout.boxes[i, k, 0]) * 32
            assert x0 == pytest.approx(1 + 3 * k)  # the bar of symbol k (training/synthetic.py)
    assert len(MarkupImageDataset(rendered, tokenized, "train", 1)[0]) == 3  # without layouts: as before


def test_training_with_hcma_carries_the_module_everywhere(data, tmp_path) -> None:
    rendered, tokenized, _ = data
    params = _params(HCMA_ON, steps=3, checkpoint_every=3)
    out = tmp_path / "models"
    train(params, "math", TrainPaths(rendered, tokenized, out))
    cfg = json.loads((out / "model" / MODEL_CONFIG).read_text())
    assert cfg["hcma_module"]["hcma"]["local_weight"] == 1.0
    weights = load_file(str(out / "model" / MODEL_WEIGHTS))
    assert any(k.startswith("hcma.vit.") for k in weights) and any(k.startswith("hcma.local_head.") for k in weights)
    model, init = load_model(out / "model"), build_model(params, "math", tokenized)
    assert model.hcma is not None and init.hcma is not None
    assert not torch.equal(init.hcma.local_head.out[-1].weight, model.hcma.local_head.out[-1].weight)  # trained
    metrics = (out / "live" / "plots" / "metrics" / "train").glob("hcma_*.tsv")
    assert {p.stem for p in metrics} == {"hcma_global", "hcma_local", "hcma_boxes"}
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("hcma.") for k in saved)
    assert run_fingerprint(params, "math") != run_fingerprint(_params(), "math")


def test_zero_weights_train_bit_identically(data, tmp_path) -> None:
    rendered, tokenized, _ = data
    plain = _params(steps=2)
    off = _params({"global_weight": 0.0, "local_weight": 0.0, "dim": 8, "translate": False}, steps=2)
    assert run_fingerprint(plain, "math") == run_fingerprint(off, "math")
    for name, params in (("plain", plain), ("off", off)):
        train(params, "math", TrainPaths(rendered, tokenized, tmp_path / name))
    a = (tmp_path / "plain" / "model" / MODEL_WEIGHTS).read_bytes()
    assert a == (tmp_path / "off" / "model" / MODEL_WEIGHTS).read_bytes()
    assert "hcma_module" not in json.loads((tmp_path / "off" / "model" / MODEL_CONFIG).read_text())
    assert not list((tmp_path / "off" / "live" / "plots" / "metrics" / "train").glob("hcma_*"))
