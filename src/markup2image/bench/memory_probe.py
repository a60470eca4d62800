"""One sampling pass of one backend in a fresh interpreter, then its peak resident memory (``bench sample``).

``python -m markup2image.bench.memory_probe '[backend, export_dir, model_dir, batch, length, steps, threads]'``
prints ``PEAK_RSS_KB <n>``. A fresh process, because ONNX Runtime allocates outside Python (tracemalloc would miss
it) and a process's peak cannot be reset. Peak: ``VmHWM`` of ``/proc/self/status`` (this process image), else
``getrusage`` ``ru_maxrss``, which on Linux can carry the forking parent's peak across exec.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np

from markup2image.runtime.manifest import load_manifest
from markup2image.runtime.sampler import ExportedModel


def peak_rss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as fh:
            return int(next(x for x in fh if x.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return peak


def probe(backend: str, export_dir: str, model_dir: str, batch: int, length: int, steps: int, threads: int) -> int:
    """Load ``backend``, sample one ``batch`` of random ids of ``length``, return the peak RSS in KiB."""
    ids = np.random.default_rng(0).integers(4, 30, (batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if backend.startswith("torch"):
        import torch  # only the torch backends pay for importing torch

        from markup2image.bench.sample import diffusion_from_manifest
        from markup2image.diffusion.sampling import sample_images
        from markup2image.models.model import load_model

        if threads:
            torch.set_num_threads(threads)
        model = load_model(model_dir)
        sample_images(
            model, torch.from_numpy(ids), torch.from_numpy(mask), sampler="ddim", steps=steps, seed=0,
            diffusion=diffusion_from_manifest(load_manifest(export_dir)), kv_cache=backend != "torch_no_kv_cache",
        )  # fmt: skip
    else:
        model = ExportedModel(export_dir, backend=backend, threads=threads or None)
        model.sample(ids, mask, sampler="ddim", steps=steps, seed=0)
    return peak_rss_kb()


if __name__ == "__main__":
    print("PEAK_RSS_KB", probe(*json.loads(sys.argv[1])))
