"""The learning curve: one recipe at increasing CPU (or GPU) budgets, each scored like the evaluate stage.

With ``train.lr_schedule: constant`` a run of ``N`` steps is exactly the first ``N`` steps of a longer run (same
noise, batches and learning rate at every step), so one run to ``max(multiples) x train.steps`` with EMA snapshots
at every ``multiple x train.steps`` (``train.snapshot_steps``) gives every budget at the cost of the longest. Each
snapshot is evaluated by :func:`~markup2image.evaluation.evaluate.evaluate` (the test split, the evaluate
params), and its training minutes are read from the snapshot (wall time of the training loop up to that step).

``markup2image bench curve --rendered data/rendered/math --tokenized data/tokenized/math --multiples 1 2 4 8
--work curve_run --out docs/curve/curve.json`` writes the JSON, ``curve.md`` (a table) and ``curve.png`` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from markup2image.config import ConfigError, Params, to_dict
from markup2image.evaluation.evaluate import evaluate
from markup2image.io import write_json
from markup2image.models.model import MODEL_CONFIG
from markup2image.training.launch import launch_command, launch_env, preflight

log = logging.getLogger(__name__)

TRAIN_SCRIPT = "stages/train.py"
CURVE_KEYS = ("dtw", "blank_dtw", "dtw_ti", "ssim", "markup_use", "edit_accuracy", "edit_accuracy_nonblank")
CURVE_KEYS += ("exact_match",)


def curve_params(params: Params, multiples: Sequence[float]) -> Params:
    """``params`` trained to ``max(multiples) x train.steps`` with a snapshot at every multiple."""
    if params.train.lr_schedule != "constant":
        raise ConfigError(
            "train.lr_schedule: the learning curve reads budgets off one run, which needs a constant schedule "
            "(a cosine schedule depends on train.steps); run it with -S train.lr_schedule=constant"
        )
    base = params.train.steps
    if not multiples or min(multiples) * base < 1:
        raise ValueError(f"multiples: need positive budgets of at least one step, got {list(multiples)}")
    steps = tuple(sorted({max(1, round(m * base)) for m in multiples}))
    return dataclasses.replace(params, train=dataclasses.replace(params.train, steps=steps[-1], snapshot_steps=steps))


def _train(params: Params, domain: str, rendered: Path, tokenized: Path, work: Path, script: str) -> float:
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    args = ["--domain", domain, "--params", str(work / "params.yaml"), "--rendered", str(rendered)]
    args += ["--tokenized", str(tokenized), "--out", str(work / "models")]
    plan = preflight(params)
    start = time.perf_counter()
    proc = subprocess.run(launch_command(params, script, args, plan), env=launch_env(plan))
    if proc.returncode != 0:
        raise RuntimeError(f"bench curve: the train stage failed (exit {proc.returncode}); see its output above")
    return time.perf_counter() - start


def learning_curve(
    params: Params,
    domain: str,
    rendered: Path,
    tokenized: Path,
    work: Path,
    multiples: Sequence[float] = (1, 2, 4, 8),
    script: str = TRAIN_SCRIPT,
) -> dict[str, Any]:
    """Train once to the largest budget (resuming where ``work`` holds checkpoints), evaluate every snapshot."""
    p = curve_params(params, multiples)
    wall = _train(p, domain, Path(rendered), Path(tokenized), Path(work), script)
    rows = []
    for step in p.train.snapshot_steps:
        folder = Path(work) / "models" / "snapshots" / f"step_{step:08d}"
        saved = json.loads((folder / MODEL_CONFIG).read_text())
        metrics = evaluate(p, domain, folder, Path(rendered), Path(work) / "eval" / folder.name)
        rows.append(
            {
                "multiple": round(step / params.train.steps, 3),
                "steps": step,
                "train_minutes": round(saved.get("train_seconds", float("nan")) / 60, 2),
                **{k: metrics.get(k) for k in CURVE_KEYS},
            }
        )
        log.info("curve: %d steps, DTW %.2f (blank %.2f)", step, metrics["dtw"], metrics["blank_dtw"])
    return {"domain": domain, "base_steps": params.train.steps, "wall_seconds": round(wall, 1), "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    head = "| budget | steps | train min | DTW | blank DTW | DTW / blank | DTW-TI | SSIM | markup use | edit acc |"
    head += " edit acc (ink cols) | exact match |"
    lines = [head, "|" + " --- |" * 12]
    for r in result["rows"]:
        ratio = r["dtw"] / r["blank_dtw"] if r["blank_dtw"] else float("nan")
        lines.append(
            f"| {r['multiple']:g}x | {r['steps']} | {r['train_minutes']:.1f} | {r['dtw']:.2f} | "
            f"{r['blank_dtw']:.2f} | {ratio:.3f} | {r['dtw_ti']:.2f} | {r['ssim']:.3f} | {r['markup_use']:.2f} | "
            f"{r['edit_accuracy']:.3f} | {r['edit_accuracy_nonblank']:.3f} | {r['exact_match']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(result: dict[str, Any], out_png: Path) -> None:
    """DTW (with the blank baseline), markup use and edit accuracy against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    minutes = [r["train_minutes"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(minutes, [r["dtw"] for r in rows], "o-", label="model")
    axes[0].plot(minutes, [r["blank_dtw"] for r in rows], "--", color="gray", label="blank image")
    axes[0].set_ylabel("DTW (lower is better)")
    axes[0].legend()
    axes[1].plot(minutes, [r["markup_use"] for r in rows], "o-", color="C1")
    axes[1].axhline(1.0, ls="--", color="gray")
    axes[1].set_ylabel("markup use (shuffled / own loss)")
    axes[2].plot(minutes, [r["edit_accuracy_nonblank"] for r in rows], "o-", color="C2", label="ink columns")
    axes[2].plot(minutes, [r["edit_accuracy"] for r in rows], "o-", color="C3", label="all columns")
    axes[2].set_ylabel("im2markup edit accuracy")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("training minutes")
    budgets = ", ".join(f"{r['multiple']:g}x" for r in rows)
    fig.suptitle(f"{result['domain']}: learning curve ({budgets} the default's steps)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_curve(result: dict[str, Any], out: Path) -> None:
    write_json(out, result)
    out.with_suffix(".md").write_text(markdown_table(result))
    plot_curve(result, out.with_suffix(".png"))


def run(args: Any, params: Params) -> None:
    """``markup2image bench curve``: JSON to ``--out`` with ``.md`` (table) and ``.png`` (plot) beside it."""
    domain = args.domain or params.domains[0]
    work = Path(args.work or args.out.with_name(args.out.stem + "_run"))
    result = learning_curve(params, domain, args.rendered, args.tokenized, work, multiples=tuple(args.multiples))
    write_curve(result, args.out)
    print(markdown_table(result), file=sys.stderr)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")
