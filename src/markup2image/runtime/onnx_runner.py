"""The ONNX Runtime backend of the runtime: the exported encoder and U-Net in ORT sessions, and the protocol every
backend (this one, :mod:`markup2image.runtime.tensorrt_runner`) gives the sampling loop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Denoiser(Protocol):
    """What the sampling loop needs from a backend."""

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """``[B, N]`` int64 ids and mask -> markup features ``[B, N, D]`` float32."""
        ...

    def denoise(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``sample [B, C, H, W]``, ``timestep [B]`` int64, ``hidden [B, N, D]``, ``mask [B, N]`` -> eps."""
        ...


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options: every graph optimization (incl. NCHWc conv layouts, the fastest here),
    sequential execution, no memory-pattern planning, ``threads`` intra-op threads.

    ``threads=None`` keeps ORT's default (one per physical core).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The memory-pattern planner allocates one block for the recorded pattern on the second run while the first
    # run's arena chunks stay: +0.9 GB peak on the paper-size U-Net at B=4, for no speed gain.
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return so


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeDenoiser:
    """``encoder.onnx`` and ``unet.onnx`` of an exported folder in ONNX Runtime sessions.

    Args:
        folder: the exported folder (holds ``manifest.json``).
        manifest: its parsed manifest.
        threads: intra-op threads per session (``None``: ORT's default).
        providers: execution providers (default: CUDA if available, else CPU).
        load_unet: False loads the encoder only (the TensorRT backend runs the U-Net).
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: dict[str, Any],
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        load_unet: bool = True,
    ) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        providers = list(providers or default_providers())
        so = session_options(threads)
        self.encoder = ort.InferenceSession(str(folder / manifest["encoder"]["file"]), so, providers=providers)
        self.unet = None
        if load_unet:
            self.unet = ort.InferenceSession(str(folder / manifest["unet"]["file"]), so, providers=providers)
        self.providers = self.encoder.get_providers()

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return self.encoder.run(None, feeds)[0]

    def denoise(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {
            "sample": np.ascontiguousarray(sample, dtype=np.float32),
            "timestep": timestep.astype(np.int64),
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask.astype(np.int64),
        }
        return self.unet.run(None, feeds)[0]
