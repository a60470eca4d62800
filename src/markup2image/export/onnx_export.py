"""The export stage's library side: markup encoder + U-Net -> ONNX, parity, TensorRT, manifest (design §7).

``export_model(model_dir, out_dir, params)`` writes into ``out_dir``:

* ``encoder.onnx``: ``input_ids, attention_mask [B, N]`` int64 -> ``hidden [B, N, D]``; runs once per image.
* ``unet.onnx``: ``sample [B, C, H, W]``, ``timestep [B]`` int64, ``encoder_hidden_states [B, N, D]``,
  ``encoder_attention_mask [B, N]`` int64 (1 = token, 0 = padding) -> ``noise_pred [B, C, H, W]``.
  B and N are dynamic. Inside, ``UNet2DConditionModel`` turns the mask into diffusers' additive bias ``[B, 1, N]``
  and every attention processor broadcasts it as ``[B, 1, 1, N]`` over heads and queries. The project's processors
  already do; diffusers' stock ``AttnProcessor2_0`` (which repeats the mask head-major and reshapes it with the
  batch size, and so fails to export with a dynamic batch) is swapped for :class:`MaskBiasAttnProcessor`, its
  export-safe twin, in a copy of the U-Net.
* ``tokenizer.json``, ``parity.json`` (see :mod:`markup2image.export.parity`), a TensorRT engine where TensorRT is
  installed, and ``manifest.json`` last, with a sha256 of every other file.

Only ``model.encoder`` and ``model.unet`` are exported: the FSA image encoder and the contrastive head are
training-only. Weights go to an external data file (``<name>.onnx.data``) when a graph's parameters pass
:data:`EXTERNAL_DATA_BYTES` (the protobuf limit is 2 GiB); otherwise each graph is one self-contained file.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from markup2image.config import Params
from markup2image.diffusion.sampling import SAMPLERS, scheduler_config
from markup2image.export.parity import ExportParityError, run_parity
from markup2image.export.tensorrt import export_tensorrt
from markup2image.io import write_json
from markup2image.models.model import load_model
from markup2image.models.position import PositionalAttnProcessor, attention_bias, merge_heads, split_heads
from markup2image.runtime.manifest import FORMAT_VERSION, MANIFEST, file_records, sha256_file
from markup2image.text.tokenizer import TOKENIZER_FILE, load_tokenizer, pad_id

log = logging.getLogger(__name__)

ENCODER_FILE, UNET_FILE = "encoder.onnx", "unet.onnx"
ENCODER_INPUTS, ENCODER_OUTPUTS = ("input_ids", "attention_mask"), ("hidden",)
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "encoder_attention_mask")
UNET_OUTPUTS = ("noise_pred",)
# the U-Net graph's dynamic axes: any batch, any text length up to model.max_text_length
UNET_AXES = {
    "sample": {0: "batch"},
    "timestep": {0: "batch"},
    "encoder_hidden_states": {0: "batch", 1: "text_len"},
    "encoder_attention_mask": {0: "batch", 1: "text_len"},
}
EXPORT_BATCH, EXPORT_TEXT_LENGTH = 2, 5  # example shapes for tracing; parity runs at other shapes
EXTERNAL_DATA_BYTES = 1_500_000_000  # a graph with more parameter bytes keeps its weights in <name>.onnx.data


# -- export-safe modules ------------------------------------------------------------------------------------------


class MaskBiasAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the key-padding bias broadcast as ``[B, 1, 1, N]``.

    Same maths as the stock processor; it only drops ``prepare_attention_mask`` (head-major repeat + reshape by
    the batch size), which does not export with a dynamic batch under torch.export.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states [B, L, C]`` or ``[B, C, H, W]``, context ``[B, N, D]``, bias ``[B, 1, N]`` -> same shape."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, HW, C)
        bias = attention_bias(attention_mask, hidden_states.dtype)  # (B, 1, 1, N)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, h, L, C/h)
        k = split_heads(attn.to_k(context), attn.heads)  # (B, h, N, C/h)
        v = split_heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)).to(q.dtype)  # (B, L, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def export_ready_unet(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` whose stock diffusers attention processors are :class:`MaskBiasAttnProcessor`.

    The project's own processors (learned positions, CCAM) are kept as they are: they take the bias already. None
    of them keeps a cross-attention K/V cache: the graph computes the markup K/V itself on every call.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = copy.deepcopy(unet).eval()
    procs = unet.attn_processors
    for proc in procs.values():
        if isinstance(proc, PositionalAttnProcessor):
            proc.text_cache = None
    stock = {name for name, p in procs.items() if type(p) in (AttnProcessor, AttnProcessor2_0)}
    if stock:
        log.info("export: %d stock diffusers attention processor(s) -> MaskBiasAttnProcessor", len(stock))
        unet.set_attn_processor({n: MaskBiasAttnProcessor() if n in stock else p for n, p in procs.items()})
    return unet


class UNetForExport(nn.Module):
    """``unet.onnx``'s signature around a diffusers ``UNet2DConditionModel``."""

    def __init__(self, unet: nn.Module, to_epsilon: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = export_ready_unet(unet)
        self.to_epsilon = to_epsilon  # a v / y0-predicting U-Net: its output becomes eps inside the graph

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, C, H, W]``, ``[B]`` int64, ``[B, N, D]``, 0/1 ``[B, N]`` -> ``noise_pred [B, C, H, W]``."""
        mask = encoder_attention_mask.to(sample.dtype)  # the U-Net makes it the bias (1 - m) * -1e4, [B, 1, N]
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=mask)
        return out.sample if self.to_epsilon is None else self.to_epsilon(out.sample, sample, timestep)


class EncoderForExport(nn.Module):
    """``encoder.onnx``'s signature around the markup encoder."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids, attention_mask [B, N]`` int64 -> ``hidden [B, N, D]``."""
        return self.encoder(input_ids, attention_mask)


# -- example inputs and the exporter call ---------------------------------------------------------------------------


def random_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 ``[B, N]`` int64 key-padding mask: row ``i`` keeps a random prefix of length >= 1 (row 0 keeps all)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def encoder_inputs(batch: int, length: int, vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` (padding zeroed) and ``attention_mask``, ``[B, N]`` int64."""
    mask = random_mask(batch, length, generator)
    ids = torch.randint(1, max(vocab_size, 2), (batch, length), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask}


def unet_inputs(
    batch: int, length: int, image: tuple[int, int, int], dim: int, num_timesteps: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random U-Net inputs: ``sample [B, C, H, W]``, ``timestep [B]``, ``hidden [B, N, D]``, ``mask [B, N]``."""
    return {
        "sample": torch.randn(batch, *image, generator=generator),
        "timestep": torch.randint(0, num_timesteps, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, length, dim, generator=generator),
        "encoder_attention_mask": random_mask(batch, length, generator),
    }


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """nn.TransformerEncoder's fused fast path has no ONNX form; switch it off while exporting."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def effective_opset(opset: int, exporter: str) -> int:
    """The opset actually written: 17..20, and at least 18 for the dynamo exporter.

    opset 23 turns SDPA into ONNX ``Attention``, which ONNX Runtime rejects with a broadcast mask; the dynamo
    exporter's op library starts at 18 (asked for 17 it writes opset-18 ``Split`` nodes that ORT refuses).
    """
    if not 17 <= opset <= 20:
        raise ValueError(f"export.opset: {opset} is outside 17..20; use 17 (torchscript) or 18 (dynamo)")
    if exporter == "dynamo" and opset < 18:
        log.info("export.opset %d -> 18: the dynamo exporter writes opset 18 or later", opset)
        return 18
    return opset


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def export_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    output_names: tuple[str, ...],
    dynamic: dict[str, dict[int, str]],
    opset: int,
    exporter: str,
    max_text_length: int,
) -> dict[str, Any]:
    """Export ``module(**inputs)`` to ``path`` with the named axes of ``dynamic`` left dynamic.

    ``dynamic`` maps an input name to ``{axis: "batch" | "text_len"}``. Returns ``{"file", "external_data"}``.
    """
    opset = effective_opset(opset, exporter)
    external = parameter_bytes(module) > EXTERNAL_DATA_BYTES
    names = tuple(inputs)
    args = tuple(inputs.values())
    module = module.eval()
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))  # the exporter's own files land here
    tmp = scratch / path.name
    try:
        with torch.no_grad(), _mha_fastpath_disabled():
            if exporter == "dynamo":
                dims = {
                    "batch": torch.export.Dim("batch", min=1),
                    "text_len": torch.export.Dim("text_len", min=1, max=max(max_text_length, 2)),
                }
                # positional, in input order: independent of the module's argument names
                shapes = tuple({ax: dims[d] for ax, d in dynamic.get(n, {}).items()} or None for n in names)
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(names),
                    output_names=list(output_names),
                    dynamic_shapes=shapes,
                    external_data=external,
                    optimize=True,
                )
            elif exporter == "torchscript":
                axes = {n: dict(a) for n, a in dynamic.items()} | {o: {0: "batch"} for o in output_names}
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(names),
                    output_names=list(output_names),
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
            else:
                raise ValueError(f"export.exporter: unknown exporter {exporter!r}; choose dynamo or torchscript")
        if external:  # one <name>.onnx.data beside the graph, whatever pieces the exporter wrote
            import onnx

            onnx.save_model(
                onnx.load(str(tmp)),
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            tmp.replace(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data = path.with_name(path.name + ".data")
    return {"file": path.name, "external_data": data.name if external else None}


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

    import markup2image

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
    model_dir: str | Path, out_dir: str | Path, params: Params, progress: bool = True, domain: str | None = None
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
