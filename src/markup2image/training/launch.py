"""Build the ``accelerate launch`` command for the train stage from params.

The same stage runs on 1 CPU process, N GPUs (``train.num_processes``) or several nodes
(``train.accelerate_config`` = a file written by ``accelerate config``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from markup2image.config import Params


def launch_command(params: Params, script: str, script_args: Sequence[str], cuda: bool | None = None) -> list[str]:
    """``python -m accelerate.commands.launch <flags> script <args>`` for these params."""
    import torch

    t = params.train
    cuda = torch.cuda.is_available() if cuda is None else cuda
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        cmd += ["--config_file", t.accelerate_config]
    else:
        cmd += ["--num_machines", "1", "--num_processes", str(t.num_processes), "--dynamo_backend", "no"]
        cmd += ["--mixed_precision", t.mixed_precision if cuda else "no"]
        if t.num_processes > 1:
            cmd.append("--multi_gpu")  # on a CPU-only machine this starts gloo processes
        elif not cuda:
            cmd.append("--cpu")
    return [*cmd, script, *script_args]


def run_launch(params: Params, script: str, script_args: Sequence[str]) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(launch_command(params, script, script_args), env=env)
