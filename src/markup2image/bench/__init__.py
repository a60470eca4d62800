"""Benchmarks, one module per bench, each its own ``markup2image bench <name>`` subcommand with only its own flags.

:data:`BENCHES` is the registry: name -> :class:`Bench` (help line, module, flags). Flags are declared here so
that building the command line imports no bench (several import torch); the module is imported when its bench
runs, and its ``run(args, params) -> dict | None`` returns the JSON result (written by :func:`emit`, with the
machine's record from :func:`machine_record`) or None when it wrote its own files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from markup2image.io import write_json
from markup2image.modes import OBJECTIVE_NAMES, SAMPLERS

Flag = tuple[tuple[str, ...], dict[str, Any]]

OUT: Flag = (("--out",), {"type": Path, "help": "JSON file (default: stdout)"})
DOMAIN: Flag = (("--domain",), {"help": "default: the first of params.yaml's domains"})


@dataclass(frozen=True)
class Bench:
    help: str
    module: str
    flags: tuple[Flag, ...] = field(default=())


BENCHES: dict[str, Bench] = {
    "metrics": Bench(
        "time every image metric on synthetic pairs",
        "markup2image.bench.metrics",
        ((("-n", "--num-pairs"), {"dest": "n", "type": int, "default": 32, "help": "pairs to score"}), OUT),
    ),
    "render": Bench(
        "render throughput of one worker (items/s, items per CPU second)",
        "markup2image.bench.render",
        (
            DOMAIN,
            (("--engine",), {"help": "default: the configured one"}),
            (("-n", "--num-items"), {"dest": "n", "type": int, "default": 200}),
            OUT,
        ),
    ),  # fmt: skip
    "robustness": Bench(
        "hostile and broken markup at volume through the render stage, sandbox checked",
        "markup2image.bench.robustness",
        (
            (("--domains",), {"nargs": "+", "help": "default: params.yaml's domains"}),
            (("-n", "--num-items"), {"dest": "n", "type": int, "default": 1000, "help": "items per domain"}),
            (("--work",), {"type": Path, "default": Path("robustness_run"), "help": "scratch folder"}),
            (("--trace",), {"action": "store_true", "help": "run the stage under strace (file, network calls)"}),
            (("--timeout",), {"type": float, "default": 0.0, "help": "render.timeout for the run (0: params')"}),
            OUT,
        ),
    ),
    "sample": Bench(
        "sampling speed and peak memory: torch vs ONNX Runtime (vs TensorRT where present)",
        "markup2image.bench.sample",
        (
            (("--model",), {"type": Path, "required": True, "help": "models/<domain>/model or export/<domain>"}),
            (
                ("--backends",),
                {
                    "nargs": "+",
                    "default": ["torch", "onnxruntime"],
                    "help": "torch, torch_fast (CUDA), torch_no_kv_cache, onnxruntime, tensorrt",
                },
            ),
            (("--batch-sizes",), {"type": int, "nargs": "+", "default": [1, 4]}),
            (("--steps",), {"type": int, "nargs": "+", "default": [20], "help": "sampler step counts"}),
            OUT,
        ),
    ),  # fmt: skip
    "steps": Bench(
        "DTW against sampler steps (DDPM 1000 vs DDIM / DPM-Solver++); writes a .md table beside --out",
        "markup2image.bench.steps",
        (
            (("--model",), {"type": Path, "required": True, "help": "models/<domain>/model"}),
            (("--rendered",), {"type": Path, "required": True, "help": "data/rendered/<domain>"}),
            (("--samplers",), {"nargs": "+", "default": list(SAMPLERS)}),
            (("--steps",), {"type": int, "nargs": "+", "default": [1000, 250, 100, 50, 20]}),
            (
                ("-n", "--num-samples"),
                {"dest": "n", "type": int, "default": 0, "help": "test items to score (0: evaluate.num_samples)"},
            ),
            OUT,
        ),
    ),  # fmt: skip
    "floor": Bench(
        "DTW / blank of the gold itself moved by a row or column, blurred or partly erased (what a ratio means)",
        "markup2image.bench.floor",
        (
            (("--rendered",), {"type": Path, "required": True, "help": "data/rendered/<domain>"}),
            (
                ("-n", "--num-samples"),
                {"dest": "n", "type": int, "default": 0, "help": "test items to score (0: evaluate.num_samples)"},
            ),
            OUT,
        ),
    ),  # fmt: skip
    "train": Bench(
        "training step time per objective and model size, or of the real train stage per process count",
        "markup2image.bench.train",
        (
            DOMAIN,
            (("--objectives",), {"nargs": "+", "default": list(OBJECTIVE_NAMES)}),
            (("--sizes",), {"nargs": "+", "default": ["tiny"], "help": "tiny, paper, params"}),
            (("--steps",), {"type": int, "default": 20, "help": "timed steps"}),
            (("--batch",), {"type": int, "default": None, "help": "images per step (default 8; 2 for paper)"}),
            (
                ("--processes",),
                {"type": int, "nargs": "+", "help": "time the real train stage at these process counts instead"},
            ),
            OUT,
        ),
    ),  # fmt: skip
    "curve": Bench(
        "the learning curve: DTW, markup use, edit distance against training budget (JSON + .md + .png)",
        "markup2image.bench.curve",
        (
            DOMAIN,
            (("--rendered",), {"type": Path, "required": True, "help": "data/rendered/<domain>"}),
            (("--tokenized",), {"type": Path, "required": True, "help": "data/tokenized/<domain>"}),
            (("--multiples",), {"type": float, "nargs": "+", "default": [1, 2, 4, 8], "help": "x train.steps"}),
            (("--work",), {"type": Path, "help": "folder for the run (default: beside --out)"}),
            (("--out",), {"type": Path, "required": True, "help": "JSON file (.md and .png beside it)"}),
        ),
    ),
}


def add_parsers(bench: argparse.ArgumentParser) -> None:
    """One subcommand per registered bench under ``markup2image bench``."""
    sub = bench.add_subparsers(dest="what", required=True, metavar="NAME")
    for name, spec in BENCHES.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        for flags, kwargs in spec.flags:
            p.add_argument(*flags, **kwargs)


def run(args: argparse.Namespace, params: Any) -> int:
    """Run the bench ``args.what``; write its JSON result (if it returns one) to ``args.out`` or stdout."""
    result = importlib.import_module(BENCHES[args.what].module).run(args, params)
    if result is not None:
        emit({**result, "host": machine_record()}, getattr(args, "out", None))
    return 0


VERSIONS = ("torch", "numpy", "onnxruntime", "diffusers")  # the libraries whose speed a bench measures


def machine_record() -> dict[str, Any]:
    """What every bench result carries about the machine it ran on, in its one ``host`` field (read speeds as
    ratios within one run, with the load they ran under); the benches themselves record only what they set."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": versions,
    }


def emit(obj: Any, out: Path | None) -> None:
    """Write JSON to ``out`` (atomically) or to stdout."""
    if out is None:
        print(json.dumps(obj, indent=2))
    else:
        write_json(out, obj)
        print(f"wrote {out}")
