"""Sampling benchmark: torch eager vs the exported runtime (ONNX Runtime, TensorRT where present), JSON out.

``bench_sample(path)`` times full sampling runs (markup encoding once + ``steps`` U-Net calls + scheduler updates)
for each backend x batch size x step count, after ``warmup`` untimed runs, and reports medians over ``repeats``:
seconds per step, seconds per image and images per second. Peak resident memory of each backend's sampling path
is measured in a fresh subprocess (``VmHWM`` of ``/proc/self/status``, else ``getrusage`` ``ru_maxrss``, which on
Linux can report the forking parent's peak): ONNX Runtime allocates outside Python, so tracemalloc would miss it.

Backends: ``torch`` (eager fp32, :func:`markup2image.diffusion.sampling.sample_images`), ``torch_fast`` (CUDA only:
bf16, channels-last, ``torch.compile(mode="reduce-overhead")``, whose CUDA graphs replay the step), ``onnxruntime``
and ``tensorrt`` (:mod:`markup2image.runtime`). A backend that cannot run here is listed under ``skipped`` with the
reason. Both torch backends compute the cross-attention K/V once per batch; ``torch_no_kv_cache`` is ``torch``
computing them at every step, for comparison.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from markup2image.config import DiffusionConfig, Params
from markup2image.diffusion.sampling import sample_images
from markup2image.export.onnx_export import export_model
from markup2image.models.model import load_model
from markup2image.runtime.manifest import MANIFEST, load_manifest
from markup2image.runtime.sampler import ExportedModel
from markup2image.runtime.tensorrt_runner import tensorrt_status

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch_fast", "torch_no_kv_cache", "onnxruntime", "tensorrt")


def diffusion_from_manifest(manifest: dict[str, Any]) -> Any:

    s = manifest["scheduler"]
    return DiffusionConfig(
        num_train_timesteps=s["num_train_timesteps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule=s["beta_schedule"],
    )


def _resolve(path: Path, params: Any, work: Path) -> tuple[Path, Path | None, float | None]:
    """``(export_dir, model_dir or None, export seconds or None)`` for a model folder or an exported folder."""

    if (path / MANIFEST).exists():
        model_dir = Path(load_manifest(path).get("source", {}).get("model_dir", ""))
        return path, (model_dir if (model_dir / "model_config.json").exists() else None), None
    if not (path / "model_config.json").exists():
        raise FileNotFoundError(
            f"{path}: neither an exported folder (manifest.json) nor a model folder "
            "(model_config.json); pass export/<domain> or models/<domain>/model"
        )

    t0 = time.perf_counter()
    export_model(params or Params(), path, work / "export", progress=False)
    return work / "export", path, time.perf_counter() - t0


def _time_runs(run: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def _torch_runner(
    model_dir: Path, manifest: dict, fast: bool, threads: int | None, kv_cache: bool = True
) -> Callable[..., Any]:
    """``run(ids, mask, steps)`` through ``sample_images``; ``fast``: the CUDA bf16/compile path."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if fast else "cpu")
    model = load_model(model_dir, map_location=device).to(device)
    diffusion = diffusion_from_manifest(manifest)
    if fast:
        model = _FastDenoiser(model)

    def run(ids: np.ndarray, mask: np.ndarray, steps: int) -> Any:
        out = sample_images(
            model,
            torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device),
            sampler="ddim",
            steps=steps,
            seed=0,
            diffusion=diffusion,
            kv_cache=kv_cache,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


class _FastDenoiser:
    """The torch fast path for GPUs without TensorRT: bf16 weights, channels-last activations and
    ``torch.compile(mode="reduce-overhead")`` of the U-Net (CUDA graphs replay each step); fp32 in and out.

    The cross-attention K/V are computed once per batch: ``encode`` returns the bf16 markup features and
    ``sample_images`` prefills the K/V cache (:func:`markup2image.models.position.cross_attention_kv_cache`) from
    that very tensor, eagerly, before the first compiled step. The compiled graph only reads the cached K/V (inputs
    of the graph, copied into the CUDA graph's static buffers on replay like the sample), so the step stays one
    graph with no break, and the next batch (same shapes) reuses it without recompiling.
    """

    def __init__(self, model: Any) -> None:
        import torch

        self.image = model.image
        self.model = model.to(dtype=torch.bfloat16, memory_format=torch.channels_last).eval()
        self.unet = torch.compile(self.model.unet, mode="reduce-overhead", fullgraph=False)

    def encode(self, ids: Any, mask: Any) -> Any:
        import torch

        return self.model.encode(ids, mask).to(torch.bfloat16)  # once per batch: the tensor the K/V cache holds

    def denoise(self, x: Any, t: Any, hidden: Any, mask: Any) -> Any:
        import torch

        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out = self.unet(x, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
        return out.float()


def _runtime_runner(export_dir: Path, backend: str, threads: int | None) -> Callable[..., Any]:

    model = ExportedModel(export_dir, backend=backend, threads=threads)

    def run(ids: np.ndarray, mask: np.ndarray, steps: int) -> Any:
        return model.sample(ids, mask, sampler="ddim", steps=steps, seed=0)

    return run


def _skip_reason(backend: str, model_dir: Path | None) -> str | None:
    if backend not in BACKENDS:
        return f"unknown backend; choose from {list(BACKENDS)}"
    if backend.startswith("torch") and model_dir is None:
        return "the torch backends need the trained model folder (manifest source.model_dir not found)"
    if backend == "torch_fast":
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU (bf16, channels-last, torch.compile, CUDA graphs); this machine has none"
    if backend == "tensorrt":
        ok, reason = tensorrt_status()
        if not ok:
            return reason
    return None


def peak_rss_mb(
    backend: str,
    export_dir: Path,
    model_dir: Path | None,
    batch: int,
    length: int,
    steps: int = 2,
    threads: int | None = None,
) -> float:
    """Peak resident memory (MB) of loading ``backend`` and sampling one batch, in a fresh interpreter."""
    args = json.dumps([backend, str(export_dir), str(model_dir or ""), batch, length, steps, threads])
    cmd = [sys.executable, "-m", "markup2image.bench.memory_probe", args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe for {backend} failed: {proc.stderr[-1500:]}")
    return round(int(lines[-1].split()[1]) / 1024, 1)  # Linux reports KiB


def _bench_backend(
    backend: str,
    run: Callable[[np.ndarray, np.ndarray, int], Any],
    batch_sizes: Sequence[int],
    steps: Sequence[int],
    length: int,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """Median timings of ``run(ids, mask, steps)`` for every batch size x step count."""
    rows = []
    for batch in batch_sizes:
        ids = np.random.default_rng(batch).integers(4, 30, (batch, length)).astype(np.int64)  # (B, N)
        mask = np.ones_like(ids)
        for n in steps:
            times = _time_runs(functools.partial(run, ids, mask, n), warmup, repeats)
            med = statistics.median(times)
            rows.append(
                {
                    "backend": backend,
                    "batch": batch,
                    "steps": n,
                    "seconds_per_run": round(med, 4),
                    "seconds_per_step": round(med / n, 5),
                    "seconds_per_image": round(med / batch, 4),
                    "images_per_second": round(batch / med, 3),
                    "runs": [round(t, 4) for t in times],
                }
            )
            log.info("%s B=%d steps=%d: %.4f s/step", backend, batch, n, med / n)
    return rows


def bench_sample(
    model_dir_or_export_dir: str | Path,
    backends: Sequence[str] = ("torch", "onnxruntime"),
    batch_sizes: Sequence[int] = (1, 4),
    steps: Sequence[int] = (20,),
    warmup: int = 1,
    repeats: int = 3,
    *,
    text_length: int = 32,
    threads: int | None = None,
    memory: bool = True,
    params: Any = None,
) -> dict[str, Any]:
    """Time ddim sampling per backend x batch size x step count; JSON-able result.

    Args:
        model_dir_or_export_dir: an exported folder (its manifest points at the model folder for the torch
            backends) or a trained model folder (exported to a temporary folder first, with ``params``).
        text_length: markup tokens per item (capped at the model's ``max_text_length``).
        threads: intra-op threads for torch and ONNX Runtime alike (default: torch's current setting).
        memory: also measure each backend's peak RSS in a subprocess at the largest batch size.
    """
    import torch

    threads = threads or torch.get_num_threads()
    path = Path(model_dir_or_export_dir)
    with tempfile.TemporaryDirectory(prefix="bench_sample.") as work:
        export_dir, model_dir, export_seconds = _resolve(path, params, Path(work))
        manifest = load_manifest(export_dir)
        length = max(1, min(text_length, manifest["max_text_length"]))
        results, skipped, mem = [], {}, {}
        for backend in backends:
            reason = _skip_reason(backend, model_dir)
            if reason:
                skipped[backend] = reason
                continue
            if backend.startswith("torch"):
                run = _torch_runner(
                    model_dir, manifest, backend == "torch_fast", threads, kv_cache=backend != "torch_no_kv_cache"
                )
            else:
                run = _runtime_runner(export_dir, backend, threads)
            results += _bench_backend(backend, run, batch_sizes, steps, length, warmup, repeats)
            del run  # free the model before the next backend loads
            if memory:
                mem[backend] = {
                    "batch": max(batch_sizes),
                    "text_length": length,
                    "peak_rss_mb": peak_rss_mb(
                        backend, export_dir, model_dir, max(batch_sizes), length, threads=threads
                    ),
                }
        return {
            "sampler": "ddim",
            "threads": threads,
            "text_length": length,
            "image": manifest["image"],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "export_seconds": export_seconds,
            "results": results,
            "speedup": _speedups(results),
            "peak_memory": mem,
            "skipped": skipped,
            "versions": manifest.get("versions", {}),
        }


def _speedups(results: list[dict[str, Any]]) -> dict[str, float]:
    """``{"<backend>_vs_torch/b<B>_s<steps>": torch s/step / backend s/step}`` where both ran."""
    base = {(r["batch"], r["steps"]): r["seconds_per_step"] for r in results if r["backend"] == "torch"}
    out = {}
    for r in results:
        key = (r["batch"], r["steps"])
        if r["backend"] != "torch" and key in base:
            out[f"{r['backend']}_vs_torch/b{key[0]}_s{key[1]}"] = round(base[key] / r["seconds_per_step"], 2)
    return out


def run(args: Any, params: Any) -> dict[str, Any]:
    """``markup2image bench sample``."""
    return bench_sample(
        args.model, backends=tuple(args.backends), batch_sizes=tuple(args.batch_sizes), steps=tuple(args.steps),
        params=params,
    )  # fmt: skip
