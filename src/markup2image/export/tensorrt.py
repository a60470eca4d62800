"""TensorRT engine of the U-Net (design §7), behind an import guard.

* TensorRT >= 10. TensorRT 11 builds strongly typed networks only (no FP16/BF16 builder flags): precision lives in
  the ONNX graph. So ``export.trt_precision: fp16`` first exports ``unet_fp16.onnx`` (the U-Net run in half
  precision, fp32 inputs/outputs, casts inside) and builds a strongly typed engine from it; ``fp32`` builds from
  ``unet.onnx``.
* One optimization profile over batch (``export.trt_batch_sizes`` = min, opt, max) and markup length
  (1, ``max_text_length // 2``, ``max_text_length``): :func:`profile_shapes`.
* A timing cache (``timing.cache``) is loaded when present and saved after the build, so rebuilding on the same
  GPU skips kernel timing.

Where ``import tensorrt`` fails (as on CPU machines) the manifest records ``"tensorrt": "skipped: <reason>;
<what to install>"`` and the export stage carries on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from markup2image.config import ConfigError, Params
from markup2image.export.graphs import UNET_AXES, UNET_OUTPUTS, UNetForExport, export_onnx, unet_inputs
from markup2image.runtime.tensorrt_runner import TENSORRT_INSTALL_HINT, import_tensorrt, tensorrt_status

log = logging.getLogger(__name__)

ENGINE_FILE, FP16_ONNX_FILE, TIMING_CACHE_FILE = "unet.plan", "unet_fp16.onnx", "timing.cache"
WORKSPACE_BYTES = 8 << 30


def profile_shapes(
    params: Params, *, image: tuple[int, int, int], text_dim: int, max_text_length: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input name: (min, opt, max) shape}`` of the U-Net's optimization profile.

    Batch from ``export.trt_batch_sizes`` (min <= opt <= max), markup length ``1 .. max_text_length`` with the
    optimum at half of it.
    """
    sizes = params.export.trt_batch_sizes
    if len(sizes) != 3 or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise ConfigError(
            f"export.trt_batch_sizes: need [min, opt, max] with 1 <= min <= opt <= max, got {list(sizes)}"
        )
    if max_text_length < 1:
        raise ConfigError(f"model.max_text_length: must be at least 1 for a TensorRT profile, got {max_text_length}")
    texts = (1, max(1, max_text_length // 2), max_text_length)
    c, h, w = image
    return {
        "sample": tuple((b, c, h, w) for b in sizes),
        "timestep": tuple((b,) for b in sizes),
        "encoder_hidden_states": tuple((b, n, text_dim) for b, n in zip(sizes, texts)),
        "encoder_attention_mask": tuple((b, n) for b, n in zip(sizes, texts)),
    }


def skipped(reason: str) -> str:
    """The manifest's ``tensorrt`` record when no engine is built."""
    return f"skipped: {reason}"


class HalfUNetForExport(nn.Module):
    """The U-Net in fp16 with fp32 inputs and outputs, so both engines take the same buffers."""

    def __init__(self, unet_wrapper: nn.Module) -> None:
        super().__init__()
        self.inner = unet_wrapper.half()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """fp32 ``[B, C, H, W]``, int64 ``[B]``, fp32 ``[B, N, D]``, int64 ``[B, N]`` -> fp32 eps."""
        eps = self.inner(sample.half(), timestep, encoder_hidden_states.half(), encoder_attention_mask)
        return eps.float()


def export_fp16_unet(model: nn.Module, out_dir: Path, params: Params, device: str = "cuda") -> Path:
    """Write ``unet_fp16.onnx`` (half-precision U-Net, fp32 I/O) traced on ``device``."""

    g = torch.Generator().manual_seed(0)
    img = model.image
    module = HalfUNetForExport(UNetForExport(model.unet, model.to_epsilon)).to(device)
    inputs = unet_inputs(
        2,
        5,
        (img.channels, img.height, img.width),
        model.model_cfg.encoder_dim,
        params.diffusion.num_train_timesteps,
        g,
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    path = out_dir / FP16_ONNX_FILE
    export_onnx(
        module,
        inputs,
        path,
        output_names=UNET_OUTPUTS,
        dynamic=UNET_AXES,
        opset=params.export.opset,
        exporter=params.export.exporter,
        max_text_length=model.model_cfg.max_text_length,
    )
    return path


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: dict[str, tuple[tuple[int, ...], ...]],
    *,
    strongly_typed: bool,
    timing_cache: Path,
) -> dict[str, Any]:
    """Build a serialized TensorRT engine from ``onnx_path`` with one optimization ``profile``."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed and typed_flag is not None:
        flags |= 1 << int(typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"build_seconds": round(time.perf_counter() - t0, 1), "tensorrt_version": trt.__version__}


def export_tensorrt(model: nn.Module, out_dir: Path, manifest: dict[str, Any], params: Params) -> dict[str, Any] | str:
    """Build ``unet.plan`` into ``out_dir`` where TensorRT and a GPU are present; else the reason it was skipped."""
    if not params.export.tensorrt:
        return skipped("export.tensorrt is false")
    ok, reason = tensorrt_status()
    if not ok:
        log.info("TensorRT engine skipped: %s", reason)
        return skipped(reason)
    if not torch.cuda.is_available():
        return skipped(
            f"no CUDA GPU visible to torch; a TensorRT engine is built on the GPU it will run on. "
            f"{TENSORRT_INSTALL_HINT}"
        )
    image = manifest["image"]
    profile = profile_shapes(
        params,
        image=(image["channels"], image["height"], image["width"]),
        text_dim=manifest["unet"]["inputs"]["encoder_hidden_states"]["shape"][-1],
        max_text_length=manifest["max_text_length"],
    )
    fp16 = params.export.trt_precision == "fp16"
    onnx_path = export_fp16_unet(model, out_dir, params) if fp16 else out_dir / manifest["unet"]["file"]
    info = build_engine(
        onnx_path, out_dir / ENGINE_FILE, profile, strongly_typed=fp16, timing_cache=out_dir / TIMING_CACHE_FILE
    )
    return {
        "engine": ENGINE_FILE,
        "onnx": onnx_path.name,
        "precision": params.export.trt_precision,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "timing_cache": TIMING_CACHE_FILE,
        "device": torch.cuda.get_device_name(),
        **info,
    }
