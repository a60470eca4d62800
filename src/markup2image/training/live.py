"""DVCLive logging of a training run (rank 0 only): loss terms, lr, images/s, and its resume bookkeeping."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from dvclive import Live


def open_live(folder: Path, start: int):
    """DVCLive on rank 0; on a resume, rows and images logged after the checkpoint (then lost) are dropped."""
    if start > 0:
        prune_live_after(folder, start)
    # dvcyaml=False: DVCLive must not rewrite dvc.yaml; its files are declared there instead.
    live = Live(str(folder), dvcyaml=False, save_dvc_exp=False, resume=start > 0)
    (folder / "plots" / "images").mkdir(parents=True, exist_ok=True)  # a declared output, also with no samples
    return live


def prune_live_after(folder: Path, step: int) -> None:
    """Drop DVCLive metric rows and sample images of steps after ``step`` (written by a run that was then killed)."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        col = lines[0].rstrip("\n").split("\t").index("step") if lines else 0
        kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        if len(kept) != len(lines):
            tsv.write_text("".join(kept))
    for png in (folder / "plots" / "images" / "samples").glob("step_*.png"):
        if int(png.stem.split("_")[1]) > step:
            png.unlink()


def log_terms(live, terms: dict[str, float], lr: float, imgs_per_s: float, step: int) -> None:
    live.step = step
    for k, v in terms.items():
        if math.isfinite(v):
            live.log_metric(f"train/{k}", v)
    live.log_metric("train/lr", lr)
    live.log_metric("train/images_per_s", imgs_per_s)  # global batch x steps / training seconds (no I/O)
    live.next_step()


def restore_live(saved: Path, live: Path) -> None:
    """Put the checkpoint's copy of the DVCLive folder back where DVC expects it.

    DVC deletes a stage's outputs (``models/<d>/live``, ``models/<d>/model``) before it reruns the stage, but not the
    persisted checkpoints; without this a rerun that resumes (an upstream stage reran with identical data, or a
    killed run) would log nothing for the steps before the checkpoint, and with nothing left to train, DVC would
    fail on the missing ``live/plots/metrics``. Rows after the checkpoint are pruned by :func:`open_live`.
    """
    if not saved.is_dir():
        return
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(saved, live)
