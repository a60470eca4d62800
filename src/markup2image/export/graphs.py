"""What the ONNX graphs are: export-safe wrappers of the encoder and U-Net, their inputs and dynamic axes, and
:func:`export_onnx`. Shared by the export stage (:mod:`markup2image.export.onnx_export`), the parity check
(:mod:`markup2image.export.parity`) and the fp16 TensorRT graph (:mod:`markup2image.export.tensorrt`), so none of
them imports another."""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from markup2image.models.position import PositionalAttnProcessor

log = logging.getLogger(__name__)

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


def export_ready_unet(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` whose stock diffusers attention processors are the project's
    :class:`~markup2image.models.position.PositionalAttnProcessor` without positions (the same maths; its
    key-padding bias exports with a dynamic batch, diffusers' ``prepare_attention_mask`` does not).

    The project's own processors (learned positions, CCAM) are kept as they are. None of them keeps a
    cross-attention K/V cache: the graph computes the markup K/V itself on every call.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = copy.deepcopy(unet).eval()
    procs = unet.attn_processors
    for proc in procs.values():
        if isinstance(proc, PositionalAttnProcessor):
            proc.text_cache = None
    stock = {name for name, p in procs.items() if type(p) in (AttnProcessor, AttnProcessor2_0)}
    if stock:
        log.info("export: %d stock diffusers attention processor(s) -> PositionalAttnProcessor", len(stock))
        unet.set_attn_processor({n: PositionalAttnProcessor() if n in stock else p for n, p in procs.items()})
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
        if exporter == "dynamo":
            dims = {
                "batch": torch.export.Dim("batch", min=1),
                "text_len": torch.export.Dim("text_len", min=1, max=max(max_text_length, 2)),
            }
            # positional, in input order: independent of the module's argument names
            shapes = tuple({ax: dims[d] for ax, d in dynamic.get(n, {}).items()} or None for n in names)
            options = dict(dynamo=True, dynamic_shapes=shapes, external_data=external, optimize=True)
        elif exporter == "torchscript":
            axes = {n: dict(a) for n, a in dynamic.items()} | {o: {0: "batch"} for o in output_names}
            options = dict(dynamo=False, dynamic_axes=axes, do_constant_folding=True)
        else:
            raise ValueError(f"export.exporter: unknown exporter {exporter!r}; choose dynamo or torchscript")
        with torch.no_grad(), _mha_fastpath_disabled():
            torch.onnx.export(
                module,
                args,
                str(tmp),
                opset_version=opset,
                input_names=list(names),
                output_names=list(output_names),
                **options,
            )
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
