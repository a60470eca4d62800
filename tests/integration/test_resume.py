"""A killed training run resumes from its newest intact checkpoint and ends exactly where an unbroken run ends.

The killed run is a real subprocess (``stages/train.py``) that gets SIGKILL in the middle of writing its step-6
checkpoint: accelerate has written ``.tmp_step_00000006`` but the COMPLETE marker and the rename never happen. A
``step_00000007`` folder without marker (garbage inside) is planted too. The resumed run must start from step 3,
ignore both, and end bit-identical (max |Δ| = 0, asserted <= 1e-6) to an unbroken 8-step run, raw and EMA
weights, with DVCLive rows logged after step 3 by the killed run dropped.

The unbroken run also draws a sample grid every 4 steps (``train.sample_every``) and the broken ones do not, so
the equality also shows that sampling with the EMA weights leaves training untouched.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from markup2image.config import params_from_dict
from markup2image.models.model import MODEL_WEIGHTS
from markup2image.training.checkpoints import newest_checkpoint
from markup2image.training.loop import TrainPaths, train
from markup2image.training.synthetic import tiny_params_dict, write_synthetic_training_set

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY, KILL_AT = 8, 3, 6
TOLERANCE = 1e-6

# Runs stages/train.py, but SIGKILLs itself right after accelerate wrote the step-6 checkpoint's files.
KILLER = f"""
import os, runpy, signal, sys
import accelerate

real_save_state = accelerate.Accelerator.save_state

def save_state_then_die(self, output_dir=None, **kwargs):
    out = real_save_state(self, output_dir, **kwargs)
    if str(output_dir).endswith(".tmp_step_{KILL_AT:08d}"):
        os.kill(os.getpid(), signal.SIGKILL)
    return out

accelerate.Accelerator.save_state = save_state_then_die
sys.argv = [{str(REPO / "stages/train.py")!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def one_thread():
    """Same thread count in this process as in the killed subprocess, so float reductions run in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _setup(root: Path, **train) -> tuple[dict, TrainPaths]:
    raw = tiny_params_dict(**{"steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 0, "lr": 2e-3, **train})
    rendered, tokenized = root.parent / "rendered", root.parent / "tokenized"
    if not rendered.exists():
        write_synthetic_training_set(rendered, tokenized, params_from_dict(raw).domain_config("math"))
    return raw, TrainPaths(rendered, tokenized, root)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, one_thread):
    raw, straight = _setup(tmp_path / "straight", sample_every=4)
    assert train(params_from_dict(raw), "math", straight)["resumed_from"] == 0

    raw, broken = _setup(tmp_path / "broken")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "killer.py").write_text(KILLER)
    args = ["--domain", "math", "--params", str(tmp_path / "params.yaml"), "--rendered", str(broken.rendered)]
    args += ["--tokenized", str(broken.tokenized), "--out", str(broken.out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = broken.checkpoints
    assert (ckpts / f".tmp_step_{KILL_AT:08d}").is_dir() and not (ckpts / f"step_{KILL_AT:08d}").exists()
    garbage = ckpts / "step_00000007"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"not a checkpoint")
    assert newest_checkpoint(ckpts) == ckpts / f"step_{EVERY:08d}"

    summary = train(params_from_dict(raw), "math", broken)
    assert summary["resumed_from"] == EVERY and summary["finished"]

    # final EMA model and the raw weights of the last checkpoint
    delta_ema = _max_diff(*(load_file(str(p.model / MODEL_WEIGHTS)) for p in (straight, broken)))
    last = f"step_{STEPS:08d}/model.safetensors"
    delta_raw = _max_diff(*(load_file(str(p.checkpoints / last)) for p in (straight, broken)))
    print(f"resume vs unbroken after {STEPS} steps: max |delta| EMA {delta_ema:.3g}, raw {delta_raw:.3g}")
    assert delta_ema <= TOLERANCE and delta_raw <= TOLERANCE

    # DVCLive: one row per step, the killed run's rows after step 3 replaced, not duplicated
    for run in (straight, broken):
        lines = (run.live / "plots/metrics/train/loss.tsv").read_text().splitlines()
        assert [int(ln.split("\t")[0]) for ln in lines[1:]] == list(range(1, STEPS + 1))
        assert json.loads((run.live / "metrics.json").read_text())["step"] == STEPS
    samples = sorted(p.name for p in (straight.live / "plots/images/samples").iterdir())
    assert samples == ["step_00000004.png", "step_00000008.png"]
    with Image.open(straight.live / "plots/images/samples" / samples[-1]) as grid:
        assert grid.width >= 2 * 32 and grid.height >= 4 * 16  # gold | generated, 4 rows


def test_checkpoints_of_other_params_are_not_resumed(tmp_path, one_thread):
    raw, paths = _setup(tmp_path / "run", steps=4, checkpoint_every=2)
    train(params_from_dict(raw), "math", paths, max_steps=2)
    assert newest_checkpoint(paths.checkpoints).name == "step_00000002"
    raw["train"]["checkpoint_every"] = 1  # not part of the fingerprint: still the same run
    assert train(params_from_dict(raw), "math", paths, max_steps=1)["resumed_from"] == 2
    raw["train"]["lr"] = 5e-3  # another run
    assert train(params_from_dict(raw), "math", paths, max_steps=1)["resumed_from"] == 0


def test_rerun_after_dvc_removed_outputs_restores_the_logs(tmp_path, one_thread):
    """DVC deletes ``live/`` and ``model/`` (outputs) but keeps the persisted checkpoints when an upstream stage
    reruns with identical data: the rerun resumes at the end, restores the logs from the checkpoint and rewrites the
    model; with other training data the checkpoints are not resumed."""
    import shutil

    raw, paths = _setup(tmp_path / "run", steps=4, checkpoint_every=2)
    params = params_from_dict(raw)
    assert train(params, "math", paths)["resumed_from"] == 0
    loss_tsv = paths.live / "plots/metrics/train/loss.tsv"
    logged, weights = loss_tsv.read_text(), load_file(str(paths.model / MODEL_WEIGHTS))
    shutil.rmtree(paths.live)
    shutil.rmtree(paths.model)
    assert train(params, "math", paths)["resumed_from"] == 4
    assert loss_tsv.read_text() == logged
    assert json.loads((paths.live / "metrics.json").read_text())["step"] == 4
    assert _max_diff(load_file(str(paths.model / MODEL_WEIGHTS)), weights) == 0.0

    rows = [json.loads(line) for line in (paths.tokenized / "train.jsonl").read_text().splitlines()]
    rows[0]["ids"] = rows[0]["ids"][:-2] + rows[0]["ids"][-1:]  # another tokenization of one item
    (paths.tokenized / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train(params, "math", paths, max_steps=1)["resumed_from"] == 0
