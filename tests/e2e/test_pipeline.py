"""The whole DVC pipeline on tiny params in a temporary git repository with one commit.

Runs `dvc repro`, checks every stage's outputs, then `dvc exp run -S lambda=0.01` (training onward re-runs, the
data stages do not) and `dvc metrics diff`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "domains": ["math"],
    "data": {"train_size": 16, "val_size": 4, "test_size": 6},
    "render": {"workers": 1},
    "tokenize": {"vocab_size": 128, "min_frequency": 1},
    "model": {
        "block_out_channels": [8, 16, 16, 16],
        "cross_attention_levels": [False, False, False, True],
        "norm_num_groups": 4,
        "attention_head_dim": 4,
        "encoder_dim": 16,
        "encoder_layers": 1,
        "encoder_heads": 2,
    },
    "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 2, "warmup_steps": 1},
    "evaluate": {"num_samples": 4, "steps": 2, "batch_size": 4, "grid_rows": 4},
    "export": {"parity_steps": 2},
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml"):
        shutil.copy(REPO / name, work / name)
    for name in ("stages", "src", ".dvc"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    _run(["git", "init", "-q"], work)
    _run([*git, "add", "-A"], work)
    _run([*git, "commit", "-qm", "tiny pipeline"], work)
    return work


@pytest.mark.slow
def test_dvc_repro_then_experiment(workdir: Path):
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], workdir)

    report = json.loads((workdir / "data/rendered/math/render_report.json").read_text())
    assert report["total"] == report["rendered"] + report["rejected"] == 26
    metrics = json.loads((workdir / "eval/math/metrics.json").read_text())
    for key in ("dtw", "dtw_ti", "rmse", "ssim", "psnr", "ergas", "rase", "blank_dtw", "parameters"):
        assert key in metrics, key
    assert metrics["num_samples"] == 4 and metrics["blank_dtw"] > 0
    assert (workdir / "eval/math/grid.png").stat().st_size > 1000
    assert len(list((workdir / "eval/math/samples").glob("*.png"))) == 4
    assert (workdir / "models/math/model/model.safetensors").exists()
    assert (workdir / "models/math/live/metrics.json").exists()
    manifest = json.loads((workdir / "export/math/manifest.json").read_text())
    assert manifest["domain"] == "math"
    parity = json.loads((workdir / "export/math/parity.json").read_text())
    assert parity["passed"] is True
    assert (workdir / "dvc.lock").exists()

    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    _run([*git, "add", "dvc.lock"], workdir)
    _run([*git, "commit", "-qm", "lock"], workdir)
    out = _run([*dvc, "exp", "run", "-S", "lambda=0.01"], workdir).stdout
    assert "Running stage 'train@math'" in out
    assert "Running stage 'render@math'" not in out and "Running stage 'download@math'" not in out
    diff = _run([*dvc, "metrics", "diff", "--all", "--md"], workdir).stdout
    assert "eval/math/metrics.json" in diff and "dtw" in diff


@pytest.mark.slow
def test_study_queue_run_and_report(workdir: Path):
    """The Tables 1-3 study end to end on the tiny pipeline: run two rows x two seeds two at a time, report; a
    second `study run` finds them all done."""
    m2i = [sys.executable, "-m", "markup2image.cli"]
    out = _run([*m2i, "study", "run", "--rows", "ddpm", "fsa", "--seeds", "0", "1", "-j", "2"], workdir).stdout
    assert "4 ran, 0 failed, 0 done before" in out
    again = _run([*m2i, "study", "run", "--rows", "ddpm", "fsa", "--seeds", "0", "1"], workdir).stdout
    assert "0 ran, 0 failed, 4 done before" in again
    _run([sys.executable, "-m", "dvc", "repro", "render@math"], workdir)  # the golds beside the samples
    out = _run([*m2i, "study", "report", "--out", "study", "--rendered", "data/rendered/math"], workdir).stdout
    result = json.loads((workdir / "study/results.json").read_text())
    assert result["runs"] == ["t23-ddpm-s0", "t23-ddpm-s1", "t23-fsa-s0", "t23-fsa-s1"], out
    rows = {r["config"]: r for r in result["rows"]}
    dtw = rows["ddpm"]["metrics"]["dtw"]
    assert dtw["n"] == 2 and dtw["values"][0] != dtw["values"][1]  # two seeds, two models
    assert rows["fsa"]["seeds"] == [0, 1] and rows["fsa"]["se"] is not None
    assert rows["cdcd"]["verdict"] == "not run"
    assert rows["fsa"]["metrics"]["train_seconds"]["n"] == 2  # evaluate wrote each run's training time
    assert result["samples_columns"] == ["gold", "ddpm", "fsa"] and result["samples_missing"] == []
    kept = sorted(p.name for p in (workdir / "study/samples/t23-fsa-s0").iterdir())  # read from the exp's outputs
    assert kept and all(name.endswith(".png") for name in kept), kept
    for name in ("results.md", "results.png", "samples.png"):
        assert (workdir / "study" / name).stat().st_size > 500, name
