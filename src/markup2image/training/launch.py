"""Check the training settings, then build and run the ``accelerate launch`` command for the train stage.

The same stage runs on

* 1 CPU process: ``train.num_processes: 1`` where no GPU is visible (``--cpu``);
* N CPU processes (gloo): ``train.num_processes: N`` where no GPU is visible, or anywhere with ``train.cpu: true``;
* N GPUs of one machine: ``train.num_processes: N`` (``--multi_gpu``, DDP over NCCL);
* several machines: ``train.accelerate_config`` names an ``accelerate config`` file (examples in
  ``configs/accelerate/``). Every machine runs the same stage command with its own ``MARKUP2IMAGE_MACHINE_RANK``
  (and, if the file leaves it out, ``MARKUP2IMAGE_MAIN_PROCESS_IP``); ``models/`` must be on storage that all
  machines share, because checkpoints are written by rank 0 and read by every rank.

:func:`preflight` checks everything that can be checked before a process starts, so bad settings fail with one
line naming the params key. ``train.mixed_precision`` (params) always decides the precision, also over a
``mixed_precision`` in an accelerate config file, because it is part of the run's identity (DVC params,
checkpoint fingerprint).

Mixed precision on a CPU: ``bf16`` falls back to fp32 with a logged warning (bf16 is a GPU speed setting here, and
a params file tuned for a GPU should still run on a CPU box); ``fp16`` fails, since its grad scaler and kernels
need a GPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from markup2image.config import ConfigError, Params, TrainConfig, check_batch_split

log = logging.getLogger(__name__)

MACHINE_RANK_ENV = "MARKUP2IMAGE_MACHINE_RANK"
MAIN_PROCESS_IP_ENV = "MARKUP2IMAGE_MAIN_PROCESS_IP"
SUPPORTED_DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU")  # DDP; the loop's EMA and checkpoints assume whole models


@dataclass(frozen=True)
class LaunchPlan:
    """What will be started: ``processes`` over all ``machines``, on CPUs or GPUs, in ``mixed_precision``."""

    processes: int
    machines: int
    cpu: bool
    mixed_precision: str  # the precision actually used: "no" | "bf16" | "fp16"
    config_file: str = ""


def effective_mixed_precision(requested: str, cpu: bool, bf16_supported: bool = True) -> str:
    """The precision a run uses: ``requested`` on a GPU, fp32 (``"no"``) for bf16 on a CPU.

    Raises ConfigError for fp16 on a CPU and for bf16 on a GPU without bf16 support. The caller logs the bf16
    fallback (once, on the main process).
    """
    if requested == "no":
        return "no"
    if cpu:
        if requested == "fp16":
            raise ConfigError(
                "train.mixed_precision: fp16 needs a CUDA GPU (its grad scaler and kernels are GPU-only); "
                "use 'no' on a CPU, or bf16 on a GPU"
            )
        return "no"
    if requested == "bf16" and not bf16_supported:
        raise ConfigError(
            "train.mixed_precision: this GPU has no bf16 support (needs Ampere or newer); use fp16 or 'no'"
        )
    return requested


def read_accelerate_config(path: str | Path) -> dict:
    """The ``accelerate config`` YAML at ``path`` as a dict; ConfigError naming ``train.accelerate_config``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.accelerate_config: {p} not found; write one with `accelerate config` or clear it")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"train.accelerate_config: {p} is not a YAML mapping")
    kind = str(raw.get("distributed_type", "NO")).upper()
    if kind not in SUPPORTED_DISTRIBUTED:
        raise ConfigError(
            f"train.accelerate_config: {p} has distributed_type {kind}; only {list(SUPPORTED_DISTRIBUTED)} (DDP) "
            "are supported"
        )
    return raw


def _gpu_info() -> tuple[int, bool]:
    import torch

    if not torch.cuda.is_available():
        return 0, False
    return torch.cuda.device_count(), torch.cuda.is_bf16_supported()


def _layout(t: TrainConfig, gpus: int) -> tuple[int, int, bool, str]:
    """``(processes, machines, cpu, config_file)`` from the accelerate config file or from params."""
    if t.accelerate_config:
        raw = read_accelerate_config(t.accelerate_config)
        processes, machines = int(raw.get("num_processes", 1)), int(raw.get("num_machines", 1))
        cpu = bool(raw.get("use_cpu", False)) or t.cpu or gpus == 0
        mp = str(raw.get("mixed_precision", "no"))
        if mp != t.mixed_precision:
            log.warning(
                "%s: mixed_precision=%s there; train.mixed_precision=%s decides",
                t.accelerate_config,
                mp,
                t.mixed_precision,
            )
        per_node, what = processes // max(machines, 1), f"{t.accelerate_config} starts "
    else:
        processes, machines, cpu = t.num_processes, 1, t.cpu or gpus == 0
        per_node, what = processes, ""
    if not cpu and per_node > gpus:
        key = "train.accelerate_config" if t.accelerate_config else "train.num_processes"
        raise ConfigError(
            f"{key}: {what}{per_node} processes per machine but only {gpus} GPU(s) are visible; "
            "start fewer, or set train.cpu: true to run CPU processes (gloo)"
        )
    return processes, machines, cpu, t.accelerate_config


def preflight(params: Params, gpus: int | None = None, bf16_supported: bool | None = None) -> LaunchPlan:
    """Check process layout, batch split and precision against this machine before anything starts.

    ``gpus`` / ``bf16_supported`` default to what torch sees (tests pass them to pretend another machine).
    """
    seen_gpus, seen_bf16 = _gpu_info() if gpus is None or bf16_supported is None else (0, False)
    gpus = seen_gpus if gpus is None else gpus
    bf16_supported = seen_bf16 if bf16_supported is None else bf16_supported
    t = params.train
    processes, machines, cpu, config_file = _layout(t, gpus)
    check_batch_split(params, processes)
    precision = effective_mixed_precision(t.mixed_precision, cpu, bf16_supported)
    if precision != t.mixed_precision:
        log.warning("train.mixed_precision=%s needs a GPU; training in fp32 on the CPU", t.mixed_precision)
    if cpu and processes > 1 and gpus == 0 and not t.cpu:
        log.info("no GPU visible: starting %d CPU processes (gloo)", processes)
    return LaunchPlan(processes, machines, cpu, precision, config_file)


def launch_command(
    params: Params, script: str, script_args: Sequence[str], plan: LaunchPlan | None = None
) -> list[str]:
    """``python -m accelerate.commands.launch <flags> script <args>`` for these params (``plan``: preflight's)."""
    plan = preflight(params) if plan is None else plan
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if plan.config_file:
        cmd += ["--config_file", plan.config_file, "--mixed_precision", plan.mixed_precision]
        if os.environ.get(MACHINE_RANK_ENV):
            cmd += ["--machine_rank", os.environ[MACHINE_RANK_ENV]]
        if os.environ.get(MAIN_PROCESS_IP_ENV):
            cmd += ["--main_process_ip", os.environ[MAIN_PROCESS_IP_ENV]]
    else:
        cmd += ["--num_machines", "1", "--num_processes", str(plan.processes), "--dynamo_backend", "no"]
        cmd += ["--mixed_precision", plan.mixed_precision]
        if plan.processes > 1:
            # also on CPUs: accelerate's --cpu starts one process; --multi_gpu + no visible GPU starts gloo ones.
            cmd += ["--multi_gpu", "--main_process_port", "0"]  # 0: a free port, so runs can share a machine
        elif plan.cpu:
            cmd.append("--cpu")
    return [*cmd, script, *script_args]


def launch_env(plan: LaunchPlan, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the launched processes: one OpenMP thread unless set; no visible GPU for CPU runs."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    if plan.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.cpu on a GPU machine: the processes must not pick up a GPU
    return env


def run_launch(params: Params, script: str, script_args: Sequence[str]) -> int:
    """Preflight, then run ``script`` under ``accelerate launch``; returns its exit status (2: bad settings)."""
    try:
        plan = preflight(params)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    cmd = launch_command(params, script, script_args, plan)
    where = "CPU" if plan.cpu else "GPU"
    log.info(
        "training on %d %s process(es), %d machine(s), precision %s",
        plan.processes,
        where,
        plan.machines,
        plan.mixed_precision,
    )
    return subprocess.call(cmd, env=launch_env(plan))
