"""TensorRT: the logic that needs no TensorRT (profile shapes, the import guard, the manifest record, the runner's
error), plus an engine test marked ``tensorrt`` that skips where TensorRT or a GPU is missing."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch

from markup2image.config import ConfigError, Params
from markup2image.export.tensorrt import ENGINE_FILE, export_tensorrt, profile_shapes
from markup2image.runtime import tensorrt_runner
from markup2image.runtime.tensorrt_runner import (
    TENSORRT_INSTALL_HINT,
    TensorRTDenoiser,
    TensorRTUnavailableError,
    import_tensorrt,
    tensorrt_status,
)


def _params(**export: object) -> Params:
    p = Params()
    return dataclasses.replace(p, export=dataclasses.replace(p.export, **export))


MANIFEST = {
    "image": {"height": 64, "width": 320, "channels": 1},
    "max_text_length": 128,
    "unet": {"file": "unet.onnx", "inputs": {"encoder_hidden_states": {"shape": ["batch", "text_len", 768]}}},
}


def test_profile_shapes_follow_params() -> None:
    shapes = profile_shapes(_params(trt_batch_sizes=(1, 4, 32)), image=(1, 64, 320), text_dim=768, max_text_length=128)
    assert shapes["sample"] == ((1, 1, 64, 320), (4, 1, 64, 320), (32, 1, 64, 320))
    assert shapes["timestep"] == ((1,), (4,), (32,))
    assert shapes["encoder_hidden_states"] == ((1, 1, 768), (4, 64, 768), (32, 128, 768))
    assert shapes["encoder_attention_mask"] == ((1, 1), (4, 64), (32, 128))
    rgb = profile_shapes(Params(), image=(3, 128, 128), text_dim=64, max_text_length=1)
    assert rgb["sample"][2] == (16, 3, 128, 128) and rgb["encoder_attention_mask"] == ((1, 1), (8, 1), (16, 1))


@pytest.mark.parametrize("sizes", [(1, 8), (0, 1, 2), (4, 2, 8), (1, 8, 4)])
def test_profile_rejects_bad_batch_sizes(sizes: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="export.trt_batch_sizes"):
        profile_shapes(_params(trt_batch_sizes=sizes), image=(1, 8, 8), text_dim=8, max_text_length=8)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_guard_names_what_to_install(no_tensorrt: None) -> None:
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not importable") as info:
        import_tensorrt()
    assert TENSORRT_INSTALL_HINT in str(info.value) and "tensorrt-cu12" in str(info.value)
    ok, reason = tensorrt_status()
    assert not ok and "install TensorRT >= 10" in reason


def test_guard_rejects_tensorrt_older_than_10(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(TensorRTUnavailableError, match=r"TensorRT 8\.6\.1 is too old \(need >= 10\)"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0"))
    assert import_tensorrt().__version__ == "10.13.0"


def test_manifest_records_why_no_engine(no_tensorrt: None, tmp_path: Path) -> None:
    record = export_tensorrt(torch.nn.Identity(), tmp_path, MANIFEST, Params())
    assert isinstance(record, str) and record.startswith("skipped: TensorRT is not importable")
    assert "install TensorRT" in record
    assert export_tensorrt(torch.nn.Identity(), tmp_path, MANIFEST, _params(tensorrt=False)) == (
        "skipped: export.tensorrt is false"
    )
    assert list(tmp_path.iterdir()) == []  # nothing half-built


def test_engine_build_needs_a_gpu_even_with_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TensorRT importable (faked) but no CUDA device: skipped with that reason, not a crash."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setattr(tensorrt_runner, "import_cudart", lambda: types.SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = export_tensorrt(torch.nn.Identity(), tmp_path, MANIFEST, Params())
    assert record.startswith("skipped: no CUDA GPU")


def test_runner_explains_a_missing_engine(tmp_path: Path, no_tensorrt: None) -> None:
    with pytest.raises(TensorRTUnavailableError, match="has no TensorRT engine") as info:
        TensorRTDenoiser(tmp_path, {"tensorrt": "skipped: TensorRT is not importable"})
    assert "skipped: TensorRT is not importable" in str(info.value) and TENSORRT_INSTALL_HINT in str(info.value)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not importable"):
        TensorRTDenoiser(tmp_path, {"tensorrt": {"engine": ENGINE_FILE}})


def _have_tensorrt_gpu() -> tuple[bool, str]:
    ok, reason = tensorrt_status()
    if not ok:
        return False, reason
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, ""


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _have_tensorrt_gpu()[0], reason=f"needs TensorRT and a GPU: {_have_tensorrt_gpu()[1]}")
def test_engine_matches_onnxruntime(tmp_path: Path) -> None:  # pragma: no cover - no TensorRT on CI machines
    import numpy as np

    from markup2image.config import DomainConfig, ModelConfig
    from markup2image.export.onnx_export import export_model
    from markup2image.models.model import MarkupToImageModel
    from markup2image.runtime.sampler import ExportedModel
    from markup2image.text.tokenizer import TOKENIZER_FILE, train_bpe

    tok = train_bpe(["x ^ { 2 }", "a + b"] * 8, vocab_size=40, min_frequency=1)
    cfg = ModelConfig(block_out_channels=(16, 32), cross_attention_levels=(False, True), encoder_dim=32)
    model = MarkupToImageModel(model_cfg=cfg, image=DomainConfig(height=16, width=32), vocab_size=tok.get_vocab_size())
    model.save(tmp_path / "model")
    (tmp_path / "model" / TOKENIZER_FILE).write_text(tok.to_str())
    manifest = export_model(_params(trt_precision="fp32"), tmp_path / "model", tmp_path / "math", progress=False)
    assert manifest["tensorrt"]["engine"] == ENGINE_FILE
    ids, mask = ExportedModel(tmp_path / "math").tokenize(["x ^ { 2 }", "a + b"])
    ort_img = ExportedModel(tmp_path / "math").sample(ids, mask, sampler="ddim", steps=5, seed=0)
    trt_img = ExportedModel(tmp_path / "math", backend="tensorrt").sample(ids, mask, sampler="ddim", steps=5, seed=0)
    assert np.abs(ort_img - trt_img).max() < 1e-2
