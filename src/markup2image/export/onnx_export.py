"""The export stage's library side: markup encoder + U-Net -> ONNX, parity, TensorRT, manifest (design §7).

``export_model(params, model_dir, out_dir)`` writes into ``out_dir``:

* ``encoder.onnx``: ``input_ids, attention_mask [B, N]`` int64 -> ``hidden [B, N, D]``; runs once per image.
* ``unet.onnx``: ``sample [B, C, H, W]``, ``timestep [B]`` int64, ``encoder_hidden_states [B, N, D]``,
  ``encoder_attention_mask [B, N]`` int64 (1 = token, 0 = padding) -> ``noise_pred [B, C, H, W]``.
  B and N are dynamic. Inside, ``UNet2DConditionModel`` turns the mask into diffusers' additive bias ``[B, 1, N]``
  and every attention processor broadcasts it as ``[B, 1, 1, N]`` over heads and queries. The project's processors
  already do; diffusers' stock ``AttnProcessor2_0`` (which repeats the mask head-major and reshapes it with the
  batch size, and so fails to export with a dynamic batch) is swapped for the project's processor without
  positions, in a copy of the U-Net.
* ``tokenizer.json``, ``parity.json`` (see :mod:`markup2image.export.parity`), a TensorRT engine where TensorRT is
  installed, and ``manifest.json`` last, with a sha256 of every other file.

Only ``model.encoder`` and ``model.unet`` are exported: the FSA image encoder and the contrastive head are
training-only. Weights go to an external data file (``<name>.onnx.data``) when a graph's parameters pass
:data:`EXTERNAL_DATA_BYTES` (the protobuf limit is 2 GiB); otherwise each graph is one self-contained file.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

import markup2image
from markup2image.config import Params
from markup2image.diffusion.sampling import SAMPLERS, scheduler_config
from markup2image.export.graphs import (
    EXPORT_BATCH,
    EXPORT_TEXT_LENGTH,
    UNET_AXES,
    UNET_INPUTS,
    UNET_OUTPUTS,
    EncoderForExport,
    UNetForExport,
    effective_opset,
    encoder_inputs,
    export_onnx,
    unet_inputs,
)
from markup2image.export.parity import ExportParityError, run_parity
from markup2image.export.tensorrt import export_tensorrt
from markup2image.io import write_json
from markup2image.models.model import load_model
from markup2image.runtime.manifest import FORMAT_VERSION, MANIFEST, file_records, sha256_file
from markup2image.text.tokenizer import TOKENIZER_FILE, load_tokenizer, pad_id

log = logging.getLogger(__name__)

ENCODER_FILE, UNET_FILE = "encoder.onnx", "unet.onnx"
ENCODER_INPUTS, ENCODER_OUTPUTS = ("input_ids", "attention_mask"), ("hidden",)


def _io_record(names: tuple[str, ...], inputs: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]) -> dict:
    """``{name: {"shape": [dim or axis name], "dtype"}}`` for the manifest."""
    out = {}
    for n in names:
        t = inputs[n]
        shape = [axes.get(n, {}).get(i, int(s)) for i, s in enumerate(t.shape)]
        out[n] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
    return out


def export_graphs(model: nn.Module, out_dir: Path, params: Params) -> dict[str, Any]:
    """Write ``encoder.onnx`` and ``unet.onnx`` of ``model`` into ``out_dir``; return their manifest records."""
    cfg = params.export
    g = torch.Generator().manual_seed(0)
    img = model.image
    image_shape = (img.channels, img.height, img.width)
    max_len = model.model_cfg.max_text_length
    n = min(EXPORT_TEXT_LENGTH, max(max_len, 2))
    enc_in = encoder_inputs(EXPORT_BATCH, n, model.vocab_size, g)
    with torch.no_grad():
        hidden = model.encode(enc_in["input_ids"], enc_in["attention_mask"])
    unet_in = unet_inputs(EXPORT_BATCH, n, image_shape, hidden.shape[-1], params.diffusion.num_train_timesteps, g)
    enc_axes = {k: {0: "batch", 1: "text_len"} for k in ENCODER_INPUTS}
    common = dict(opset=cfg.opset, exporter=cfg.exporter, max_text_length=max_len)
    enc = export_onnx(
        EncoderForExport(model.encoder),
        enc_in,
        out_dir / ENCODER_FILE,
        output_names=ENCODER_OUTPUTS,
        dynamic=enc_axes,
        **common,
    )
    unet = export_onnx(
        UNetForExport(model.unet, model.to_epsilon),
        unet_in,
        out_dir / UNET_FILE,
        output_names=UNET_OUTPUTS,
        dynamic=UNET_AXES,
        **common,
    )
    enc_out = {"hidden": {"shape": ["batch", "text_len", int(hidden.shape[-1])], "dtype": "float32"}}
    unet_out = {"noise_pred": {"shape": ["batch", *image_shape], "dtype": "float32"}}
    return {
        "encoder": enc | {"inputs": _io_record(ENCODER_INPUTS, enc_in, enc_axes), "outputs": enc_out},
        "unet": unet | {"inputs": _io_record(UNET_INPUTS, unet_in, UNET_AXES), "outputs": unet_out},
    }


# -- the stage ------------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime

    return {
        "markup2image": markup2image.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    model: nn.Module, graphs: dict[str, Any], params: Params, *, domain: str | None, model_dir: Path, tok_pad: int
) -> dict[str, Any]:
    """Everything the runtime needs besides the files themselves (their checksums are added last)."""
    img = model.image
    ev = params.evaluate
    return {
        "format_version": FORMAT_VERSION,
        "domain": domain,
        "image": {"height": img.height, "width": img.width, "channels": img.channels},
        "max_text_length": model.model_cfg.max_text_length,
        "tokenizer": TOKENIZER_FILE,
        "pad_id": tok_pad,
        "encoder": graphs["encoder"],
        "unet": graphs["unet"],
        "exported_modules": ["encoder", "unet"],
        "opset": effective_opset(params.export.opset, params.export.exporter),
        "exporter": params.export.exporter,
        "scheduler": scheduler_config(params.diffusion),
        "samplers": list(SAMPLERS),
        "defaults": {
            "sampler": ev.sampler,
            "steps": params.diffusion.num_train_timesteps if ev.sampler == "ddpm" else ev.steps,
            "guidance_scale": ev.guidance_scale,
        },
        "source": {"model_dir": str(model_dir), "weights_sha256": sha256_file(model_dir / "model.safetensors")},
        "versions": versions(),
    }


def export_model(
    params: Params, model_dir: str | Path, out_dir: str | Path, progress: bool = True, domain: str | None = None
) -> dict[str, Any]:
    """Export a trained model folder (``model_config.json``, ``model.safetensors``, ``tokenizer.json``).

    Everything is written to a staging folder beside ``out_dir`` and moved into place at the end; ``manifest.json``
    is written only when parity passed, so the runtime never loads an export that failed it.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ExportParityError: ONNX Runtime and PyTorch disagree beyond ``export.parity_atol`` (``out_dir`` then holds
            the graphs and ``parity.json``, and no manifest).
    """
    from tqdm.auto import tqdm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if domain is None and out_dir.name in params.domain:
        domain = out_dir.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    bar = tqdm(total=5, desc=f"export {domain or out_dir.name}", disable=not progress)
    try:
        bar.set_postfix_str("load")
        model = load_model(model_dir).eval()
        tok = load_tokenizer(model_dir)
        shutil.copy2(model_dir / TOKENIZER_FILE, stage / TOKENIZER_FILE)
        bar.update()
        bar.set_postfix_str("onnx")
        graphs = export_graphs(model, stage, params)
        manifest = build_manifest(model, graphs, params, domain=domain, model_dir=model_dir, tok_pad=pad_id(tok))
        bar.update()
        bar.set_postfix_str("parity")
        try:
            report = run_parity(model, stage, manifest, params, progress=progress)
        except ExportParityError as exc:
            _replace_dir(stage, out_dir)  # the graphs and parity.json stay for inspection; no manifest
            raise ExportParityError(f"{out_dir}: {exc}") from None
        manifest["parity"] = {k: report[k] for k in ("passed", "max_abs_diff", "image")}
        bar.update()
        bar.set_postfix_str("tensorrt")
        manifest["tensorrt"] = export_tensorrt(model, stage, manifest, params)
        bar.update()
        manifest["files"] = file_records(stage)
        write_json(stage / MANIFEST, manifest)
        _replace_dir(stage, out_dir)
        bar.update()
    finally:
        bar.close()
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s -> %s (parity max |Δ| %s)", model_dir, out_dir, manifest["parity"]["max_abs_diff"])
    return manifest


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing what was there (the old folder is removed only after the move)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
