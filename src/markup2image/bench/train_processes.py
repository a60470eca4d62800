"""Training throughput per process count: the real train stage under ``accelerate launch``, a few steps each.

For every process count the train stage (``stages/train.py``) is launched exactly as the pipeline launches it
(:func:`markup2image.training.launch.launch_command`), on a synthetic training set of the domain's geometry (or
the rendered + tokenized folders given). Images/s comes from DVCLive's ``train/images_per_s`` rows (global batch /
training seconds of each step, measured on rank 0 around the step, so start-up, checkpoint and log I/O are left
out); the first ``warmup`` steps are dropped. Speed targets live here, never in timed tests.

``python -m markup2image.bench.train_processes --params params.yaml --processes 1 2 --steps 12 --out bench.json``
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from markup2image.config import Params, to_dict
from markup2image.training.launch import launch_command, launch_env, preflight
from markup2image.training.synthetic import write_synthetic_training_set

log = logging.getLogger(__name__)

DEFAULT_SCRIPT = "stages/train.py"


def _images_per_second(live: Path, warmup: int) -> tuple[float, int]:
    """Harmonic mean of the per-step images/s rows after ``warmup`` (= images / seconds), and the rows used."""
    lines = (live / "plots/metrics/train/images_per_s.tsv").read_text().splitlines()
    rates = [float(ln.split("\t")[-1]) for ln in lines[1:]][warmup:]
    if not rates:
        raise ValueError(f"bench: no images/s rows after {warmup} warm-up steps; raise --steps")
    return len(rates) / sum(1.0 / r for r in rates), len(rates)


def _run_once(params: Params, domain: str, data: tuple[Path, Path], work: Path, script: str, warmup: int) -> dict:
    """Launch the train stage with ``params`` in ``work``; its images/s and wall seconds."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    args = ["--domain", domain, "--params", str(work / "params.yaml"), "--rendered", str(data[0])]
    args += ["--tokenized", str(data[1]), "--out", str(work / "out")]
    plan = preflight(params)
    start = time.perf_counter()
    proc = subprocess.run(launch_command(params, script, args, plan), env=launch_env(plan), capture_output=True,
                          text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bench: train stage with {plan.processes} process(es) failed:\n{proc.stderr[-3000:]}")
    ips, timed = _images_per_second(work / "out/live", warmup)
    return {
        "images_per_second": ips,
        "seconds_per_step": params.train.batch_size / ips,
        "timed_steps": timed,
        "wall_seconds": wall,  # includes interpreter start-up, model build, checkpoint and final save
        "device": "cpu" if plan.cpu else "gpu",
        "mixed_precision": plan.mixed_precision,
    }


def bench_train_processes(
    params: Params,
    processes: Sequence[int] = (1, 2),
    steps: int = 12,
    warmup: int = 2,
    domain: str | None = None,
    data: tuple[Path, Path] | None = None,
    script: str = DEFAULT_SCRIPT,
) -> dict:
    """Images/s of the real train stage for each process count (same global batch); JSON-able.

    ``data`` = (rendered, tokenized) folders; None writes a synthetic set of the domain's geometry. ``script`` is
    the train stage (run from the repository root). Returns ``{"results": {"<n>": {...}}, "speedup": {"<n>":
    images/s(n) / images/s(first)}, ...}``.
    """
    if steps <= warmup:
        raise ValueError(f"bench: --steps ({steps}) must exceed the {warmup} warm-up steps")
    domain = domain or params.domains[0]
    train = dataclasses.replace(
        params.train, steps=steps, log_every=1, checkpoint_every=steps, sample_every=0, keep_checkpoints=1
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if data is None:
            n = max(64, 2 * params.train.batch_size)
            data = (Path(tmp) / "rendered", Path(tmp) / "tokenized")
            write_synthetic_training_set(*data, params.domain_config(domain), n=n, seed=params.train.seed)
        for n_proc in processes:
            run_params = dataclasses.replace(params, train=dataclasses.replace(train, num_processes=n_proc))
            log.info("bench train: %d process(es), global batch %d, %d steps", n_proc, train.batch_size, steps)
            results[str(n_proc)] = _run_once(run_params, domain, data, Path(tmp) / f"p{n_proc}", script, warmup)
            log.info("  %.1f images/s", results[str(n_proc)]["images_per_second"])
    first = results[str(processes[0])]["images_per_second"]
    return {
        "results": results,
        "speedup": {k: v["images_per_second"] / first for k, v in results.items()},
        "batch_size": train.batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "domain": domain,
        "objective": train.objective,
        "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "1")),
    }
