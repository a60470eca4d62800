"""Export parity (design §7): ONNX Runtime (CPU, fp32) against PyTorch fp32 on the same inputs.

Two checks, both written to ``parity.json``:

1. **Per call.** Fresh random inputs at (B, N) shapes other than the traced ones (:data:`PARITY_SHAPES`), through
   ``encoder.onnx`` and ``unet.onnx``; ``max |Δ|`` of each must be <= ``export.parity_atol``. Shapes that differ
   from the export shapes catch sizes an exporter baked into the graph.
2. **A short full sampling run.** ``sample_images`` (torch, ``ddim``, ``export.parity_steps`` steps) against the
   torch-free runtime on the same markup and seed: ``max |Δ|`` of the float images is reported, and the uint8
   images may differ by at most :data:`IMAGE_UINT8_TOLERANCE` (one rounding step).

Failing either raises :class:`ExportParityError`, which fails the export stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from markup2image.config import Params
from markup2image.diffusion.sampling import sample_images
from markup2image.diffusion.sampling import to_uint8 as torch_to_uint8
from markup2image.export.graphs import encoder_inputs, unet_inputs
from markup2image.io import write_json
from markup2image.runtime.sampler import ExportedModel
from markup2image.runtime.sampler import to_uint8 as numpy_to_uint8
from markup2image.text.tokenizer import empty_markup_like

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
PARITY_SHAPES: tuple[tuple[int, int], ...] = ((3, 7), (1, 11))  # (B, N); the graphs are traced at (2, 5)
IMAGE_UINT8_TOLERANCE = 1


class ExportParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; the message carries the numbers."""


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def call_parity(
    model: nn.Module, exported: ExportedModel, params: Params, shapes: tuple[tuple[int, int], ...], seed: int = 1
) -> list[dict[str, Any]]:
    """Per-call ``max |Δ|`` of the encoder and the U-Net at each ``(B, N)`` in ``shapes`` on fresh random inputs."""

    g = torch.Generator().manual_seed(seed)
    img = model.image
    max_len = model.model_cfg.max_text_length
    rows = []
    for batch, length in shapes:
        length = min(length, max_len)
        enc_in = encoder_inputs(batch, length, model.vocab_size, g)
        with torch.no_grad():
            ref_hidden = model.encode(enc_in["input_ids"], enc_in["attention_mask"])
        dim = ref_hidden.shape[-1]
        unet_in = unet_inputs(
            batch, length, (img.channels, img.height, img.width), dim, params.diffusion.num_train_timesteps, g
        )
        with torch.no_grad():
            ref_eps = model.denoise(*unet_in.values())
        row: dict[str, Any] = {"batch": batch, "text_len": length}
        for part, fn, args, ref in (
            ("encoder", exported.backend.encode, enc_in.values(), ref_hidden),
            ("unet", exported.backend.denoise, unet_in.values(), ref_eps),
        ):
            try:
                row[part] = _max_abs(fn(*(t.numpy() for t in args)), ref.numpy())
            except Exception as exc:  # noqa: BLE001 - ORT raises its own types; a graph that cannot run fails parity
                row[part] = float("inf")
                row[f"{part}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(row)
    return rows


def parity_markup(tokenizer: Any, count: int = 2) -> list[str]:
    """``count`` markup strings of different lengths built from the tokenizer's own (non-special) vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab if not (w.startswith("[") and w.endswith("]"))] or ["x"]
    lengths = [3 + 6 * i for i in range(count)]
    return [" ".join(words[(7 * i + j) % len(words)] for j in range(n)) for i, n in enumerate(lengths)]


def sampling_parity(model: nn.Module, exported: ExportedModel, params: Params, seed: int = 0) -> dict[str, Any]:
    """Torch ``sample_images`` vs the runtime on the same markup and seed (``ddim``, ``export.parity_steps``, the
    evaluate stage's classifier-free guidance scale)."""
    steps, w = params.export.parity_steps, params.evaluate.guidance_scale
    ids, mask = exported.tokenize(parity_markup(exported.tokenizer))
    uncond = tuple(torch.from_numpy(a) for a in empty_markup_like(exported.tokenizer, ids)) if w != 1.0 else None
    with torch.no_grad():
        ref = sample_images(
            model,
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            sampler="ddim",
            steps=steps,
            seed=seed,
            diffusion=params.diffusion,
            guidance_scale=w,
            uncond=uncond,
        )
    got = exported.sample(ids, mask, sampler="ddim", steps=steps, seed=seed, guidance_scale=w)
    return {
        "sampler": "ddim",
        "guidance_scale": w,
        "steps": steps,
        "seed": seed,
        "batch": int(ids.shape[0]),
        "text_len": int(ids.shape[1]),
        "max_abs_diff": _max_abs(got, ref.numpy()),
        "max_uint8_diff": int(_max_abs(numpy_to_uint8(got), torch_to_uint8(ref))),
    }


def run_parity(
    model: nn.Module, folder: str | Path, manifest: dict[str, Any], params: Params, progress: bool = False
) -> dict[str, Any]:
    """Both checks on the graphs in ``folder``; writes ``folder/parity.json`` and returns the report.

    Raises:
        ExportParityError: a per-call ``max |Δ|`` above ``export.parity_atol``, a graph that fails to run at a
            shape, or a uint8 image difference above :data:`IMAGE_UINT8_TOLERANCE`.
    """
    folder = Path(folder)
    atol = params.export.parity_atol
    exported = ExportedModel(folder, manifest=manifest, backend="onnxruntime", providers=["CPUExecutionProvider"])
    calls = call_parity(model, exported, params, PARITY_SHAPES)
    worst = max(max(r["encoder"], r["unet"]) for r in calls)
    failures = [
        f"{part} at B={r['batch']}, N={r['text_len']}: max |Δ| {r[part]:.3g} > {atol:g}"
        + (f" ({r[part + '_error']})" if part + "_error" in r else "")
        for r in calls
        for part in ("encoder", "unet")
        if not r[part] <= atol
    ]
    image: dict[str, Any] = {}
    if not failures:  # sampling through a graph that already failed tells nothing more
        image = sampling_parity(model, exported, params)
        if image["max_uint8_diff"] > IMAGE_UINT8_TOLERANCE:
            failures.append(
                f"final image after {image['steps']} ddim steps: uint8 max |Δ| {image['max_uint8_diff']} > "
                f"{IMAGE_UINT8_TOLERANCE} (float max |Δ| {image['max_abs_diff']:.3g})"
            )
    report = {
        "passed": not failures,
        "atol": atol,
        "max_abs_diff": worst,
        "calls": calls,
        "image": image,
        "failures": failures,
        "provider": "CPUExecutionProvider",
    }
    write_json(folder / "parity.json", _json_safe(report))
    if failures:
        raise ExportParityError(
            "ONNX Runtime and PyTorch disagree: " + "; ".join(failures) + ". See parity.json; check for "
            "ops the exporter specialized (shapes, branches on tensor values) or a changed export.opset/exporter"
        )
    log.info("parity passed: per-call max |Δ| %.3g, image max |Δ| %.3g", worst, image["max_abs_diff"])
    return report


def _json_safe(obj: Any) -> Any:
    """``inf`` -> the string ``"inf"`` (strict JSON has no infinities)."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
