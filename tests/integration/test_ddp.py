"""Two gloo processes on the CPU run the real train stage (``stages/launch_train.py`` -> ``accelerate launch
--multi_gpu --num_processes 2`` -> ``stages/train.py``), as DVC would start it.

The 2-process run also accumulates gradients over 2 micro-steps (global batch 8 = 2 processes x 2 micro-steps x 2
items), so DDP's ``no_sync`` path runs too. Checks: both ranks end with bit-identical weights (raw and EMA), the
saved model holds the EMA weights, and the result equals a 1-process, 1-micro-step run with the same global batch
after 3 steps:

* max |Δ| <= 2e-6 over all weights (measured ~4e-7) except the attention KEY biases of the markup encoder;
* max |Δ| <= 1e-4 for those key biases (measured ~7e-6).

It cannot be bit-exact: one process sums the gradient over 8 items in one backward, the two processes sum 2 + 2
items per rank and DDP all-reduces and averages, so float additions happen in another order. The key biases stand
out because their true gradient is zero (softmax ignores a shift shared by all keys): their gradient is pure
summation noise (~1e-11), and Adam divides it by its own running size (plus eps 1e-8), so two noises give updates
that differ by a fair fraction of ``lr x g / eps``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from markup2image.config import params_from_dict
from markup2image.models.model import MODEL_WEIGHTS
from markup2image.training.loop import DUMP_RANK_WEIGHTS_ENV, TrainPaths, build_model, train
from markup2image.training.synthetic import tiny_params_dict, write_synthetic_training_set

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
TOLERANCE = 2e-6
KEY_BIAS_TOLERANCE = 1e-4
KEY_BIAS = "self_attn.in_proj_bias"  # torch MultiheadAttention: [q; k; v] biases


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _split_key_biases(state: dict) -> tuple[dict, dict]:
    """(everything with its key-bias thirds cut out, the key-bias thirds alone)."""
    rest, keys = {}, {}
    for k, v in state.items():
        if k.endswith(KEY_BIAS):
            n = v.numel() // 3
            rest[k] = torch.cat([v[:n], v[2 * n :]])
            keys[k] = v[n : 2 * n]
        else:
            rest[k] = v
    return rest, keys


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    raw = tiny_params_dict(steps=STEPS, batch_size=8, num_processes=2, grad_accum=2, checkpoint_every=STEPS, lr=2e-3)
    write_synthetic_training_set(root / "rendered", root / "tokenized", params_from_dict(raw).domain_config("math"))
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **{DUMP_RANK_WEIGHTS_ENV: str(root / "dump")})
    cmd = [
        sys.executable,
        str(REPO / "stages/launch_train.py"),
        "--domain",
        "math",
        "--params",
        str(root / "params.yaml"),
    ]
    cmd += [
        "--",
        "--rendered",
        str(root / "rendered"),
        "--tokenized",
        str(root / "tokenized"),
        "--out",
        str(root / "out"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_both_ranks_hold_identical_weights(two_process_run: Path):
    r0 = load_file(str(two_process_run / "dump/rank_0.safetensors"))
    r1 = load_file(str(two_process_run / "dump/rank_1.safetensors"))
    assert any(k.startswith("ema.") for k in r0) and any(k.startswith("model.") for k in r0)
    assert _max_diff(r0, r1) == 0.0
    state = json.loads((two_process_run / f"out/checkpoints/step_{STEPS:08d}/trainer_state.json").read_text())
    assert state["processes"] == 2 and state["step"] == STEPS
    assert json.loads((two_process_run / "out/live/metrics.json").read_text())["step"] == STEPS


def test_saved_model_holds_the_ema_weights(two_process_run: Path):
    r0 = load_file(str(two_process_run / "dump/rank_0.safetensors"))
    saved = load_file(str(two_process_run / "out/model" / MODEL_WEIGHTS))
    ema = {k[4:]: v for k, v in r0.items() if k.startswith("ema.")}
    raw = {k[6:]: v for k, v in r0.items() if k.startswith("model.")}
    assert all(torch.equal(saved[k], v) for k, v in ema.items())
    assert any(not torch.equal(saved[k], raw[k]) for k in ema)  # EMA, not the raw weights
    cfg = json.loads((two_process_run / "out/model/model_config.json").read_text())
    assert cfg["ema"] is True and cfg["processes"] == 2


def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run: Path, tmp_path, monkeypatch):
    raw = yaml.safe_load((two_process_run / "params.yaml").read_text())
    raw["train"] |= {"num_processes": 1, "grad_accum": 1}
    monkeypatch.setenv(DUMP_RANK_WEIGHTS_ENV, str(tmp_path / "dump"))
    paths = TrainPaths(two_process_run / "rendered", two_process_run / "tokenized", tmp_path / "out")
    summary = train(params_from_dict(raw), "math", paths)
    assert summary["processes"] == 1 and summary["steps"] == STEPS
    one = load_file(str(tmp_path / "dump/rank_0.safetensors"))
    two = load_file(str(two_process_run / "dump/rank_0.safetensors"))
    (one_rest, one_keys), (two_rest, two_keys) = _split_key_biases(one), _split_key_biases(two)
    delta, delta_keys = _max_diff(one_rest, two_rest), _max_diff(one_keys, two_keys)
    print(f"2 vs 1 process after {STEPS} steps: max |delta| {delta:.3g}, attention key biases {delta_keys:.3g}")
    assert delta <= TOLERANCE and delta_keys <= KEY_BIAS_TOLERANCE
    # the tolerance means something: 3 steps moved the weights by far more than that
    init = build_model(params_from_dict(raw), "math", two_process_run / "tokenized").state_dict()
    moved = max(float((one[f"model.{k}"] - v).abs().max()) for k, v in init.items() if f"model.{k}" in one)
    assert moved > 100 * TOLERANCE
