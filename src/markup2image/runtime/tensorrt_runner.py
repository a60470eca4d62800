"""TensorRT backend of the runtime: the U-Net engine with device buffers, ``execute_async_v3`` and a CUDA graph.

Torch-free: ``tensorrt`` (>= 10) and ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` in older
releases) only, imported lazily behind :func:`import_tensorrt` / :func:`import_cudart`, which raise
:class:`TensorRTUnavailableError` naming what to install. The markup encoder runs in ONNX Runtime (once per batch).

Per batch shape ``(B, N)`` the runner allocates device buffers for the four U-Net inputs and the output, copies the
markup features and mask once, runs the engine once (TensorRT needs one run before capture), then captures
``execute_async_v3`` into a CUDA graph. Each step is then: copy ``x_t`` and ``t`` in, launch the graph, copy
``eps`` out; the numpy scheduler update runs on the host.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from markup2image.runtime.onnx_runner import OnnxRuntimeDenoiser

log = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
TENSORRT_INSTALL_HINT = (
    "install TensorRT >= 10 for your CUDA version and cuda-python on a machine with an NVIDIA GPU "
    "(pip install tensorrt-cu12 cuda-python, or NVIDIA's TensorRT container)"
)


class TensorRTUnavailableError(ImportError):
    """TensorRT or cuda-python is missing or too old; the message says what to install."""


def import_tensorrt() -> Any:
    """``import tensorrt`` (>= 10) or raise :class:`TensorRTUnavailableError` with the reason and the fix."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or the PyPI stub's error when the real libs are absent
        raise TensorRTUnavailableError(
            f"TensorRT is not importable ({type(exc).__name__}: {exc}); {TENSORRT_INSTALL_HINT}"
        ) from exc
    version = getattr(trt, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(
            f"TensorRT {version} is too old (need >= {MIN_TENSORRT_MAJOR}); {TENSORRT_INSTALL_HINT}"
        )
    return trt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python, or :class:`TensorRTUnavailableError`."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise TensorRTUnavailableError(f"cuda-python is not importable ({exc}); {TENSORRT_INSTALL_HINT}") from exc
    return cudart


def tensorrt_status() -> tuple[bool, str]:
    """``(True, "TensorRT x.y")`` when an engine can be built and run here, else ``(False, reason)``."""
    try:
        trt = import_tensorrt()
        import_cudart()
    except TensorRTUnavailableError as exc:
        return False, str(exc)
    return True, f"TensorRT {trt.__version__}"


def _check(result: Any) -> Any:
    """cuda-python calls return ``(err, *values)``; raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


class _Bound:
    """Device buffers, host output and the captured CUDA graph for one ``(B, N)``."""

    def __init__(self, key: tuple[int, int], buffers: dict[str, tuple[int, int]], out: np.ndarray) -> None:
        self.key = key
        self.buffers = buffers  # name -> (device pointer, bytes)
        self.out = out
        self.graph_exec: Any = None
        self.held_markup: tuple[np.ndarray, np.ndarray] | None = None  # host copies of the hidden/mask on the device


class TensorRTDenoiser:
    """The exported folder's TensorRT U-Net engine (and ONNX Runtime for the encoder).

    Args:
        folder: the exported folder; ``manifest["tensorrt"]`` names the engine.
        manifest: its manifest.
        cuda_graph: capture each step's engine launch into a CUDA graph (default) or call ``execute_async_v3``.
    """

    def __init__(self, folder: str | Path, manifest: dict[str, Any], cuda_graph: bool = True) -> None:
        record = manifest.get("tensorrt")
        if not isinstance(record, dict) or "engine" not in record:
            raise TensorRTUnavailableError(
                f"{folder}: the export has no TensorRT engine ({record or 'no tensorrt record'}); rebuild it with the "
                f"export stage on a GPU machine where TensorRT is installed: {TENSORRT_INSTALL_HINT}"
            )
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.encoder = OnnxRuntimeDenoiser(folder, manifest, load_unet=False)
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        engine_bytes = (Path(folder) / record["engine"]).read_bytes()
        self.engine = self.trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError(
                f"{folder}/{record['engine']}: TensorRT could not load the engine; it must be built "
                "on the same GPU model and TensorRT version (re-run the export stage here)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.cuda_graph = cuda_graph
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._bound: _Bound | None = None

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.encoder.encode(input_ids, attention_mask)

    def _bind(self, feeds: dict[str, np.ndarray], out_shape: tuple[int, ...]) -> _Bound:
        """Allocate device buffers for these shapes and point the execution context at them."""
        self.close_bound()
        cudart, buffers = self.cudart, {}
        for name, arr in feeds.items():
            self.context.set_input_shape(name, arr.shape)
        out = np.empty(out_shape, dtype=np.float32)
        for name, nbytes in [(n, a.nbytes) for n, a in feeds.items()] + [("noise_pred", out.nbytes)]:
            ptr = _check(cudart.cudaMalloc(nbytes))
            buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
        key = (feeds["sample"].shape[0], feeds["encoder_hidden_states"].shape[1])
        return _Bound(key, buffers, out)

    def _h2d(self, name: str, arr: np.ndarray) -> None:
        ptr, nbytes = self._bound.buffers[name]
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, nbytes, kind, self.stream))

    def _launch(self) -> None:
        if self._bound.graph_exec is not None:
            _check(self.cudart.cudaGraphLaunch(self._bound.graph_exec, self.stream))
            return
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        if self.cuda_graph:  # first run done: capture the next ones
            mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
            self.context.execute_async_v3(int(self.stream))
            graph = _check(self.cudart.cudaStreamEndCapture(self.stream))
            self._bound.graph_exec = _check(self.cudart.cudaGraphInstantiate(graph, 0))

    def denoise(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One U-Net step on the GPU: ``[B, C, H, W]``, ``[B]``, ``[B, N, D]``, ``[B, N]`` -> eps ``[B, C, H, W]``."""
        feeds = {
            "sample": np.ascontiguousarray(sample, dtype=np.float32),
            "timestep": np.ascontiguousarray(timestep, dtype=np.int64),
            "encoder_hidden_states": np.ascontiguousarray(hidden, dtype=np.float32),
            "encoder_attention_mask": np.ascontiguousarray(mask, dtype=np.int64),
        }
        key = (sample.shape[0], hidden.shape[1])
        if self._bound is None or self._bound.key != key:
            self._bound = self._bind(feeds, sample.shape)
        held = self._bound.held_markup
        new_context = held is None or not (np.array_equal(held[0], hidden) and np.array_equal(held[1], mask))
        if new_context:  # markup features and mask: copied once per batch, not once per step
            self._h2d("encoder_hidden_states", feeds["encoder_hidden_states"])
            self._h2d("encoder_attention_mask", feeds["encoder_attention_mask"])
            self._bound.held_markup = (feeds["encoder_hidden_states"].copy(), feeds["encoder_attention_mask"].copy())
        self._h2d("sample", feeds["sample"])
        self._h2d("timestep", feeds["timestep"])
        self._launch()
        ptr, nbytes = self._bound.buffers["noise_pred"]
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(self._bound.out.ctypes.data, ptr, nbytes, kind, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return self._bound.out.copy()

    def close_bound(self) -> None:
        """Free the device buffers and the CUDA graph of the current shape."""
        if self._bound is None:
            return
        if self._bound.graph_exec is not None:
            self.cudart.cudaGraphExecDestroy(self._bound.graph_exec)
        for ptr, _ in self._bound.buffers.values():
            self.cudart.cudaFree(ptr)
        self._bound = None

    def __del__(self) -> None:
        try:
            self.close_bound()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
