"""Export stage on a tiny model: ONNX graphs with dynamic batch/length, parity, manifest, runtime == torch."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from markup2image.config import DomainConfig, ExportConfig, ModelConfig, Params
from markup2image.diffusion.sampling import sample_images, scheduler_config, to_uint8
from markup2image.export import graphs, onnx_export
from markup2image.export.graphs import export_onnx
from markup2image.export.onnx_export import export_model
from markup2image.export.parity import ExportParityError, run_parity
from markup2image.models.model import MarkupToImageModel, load_model
from markup2image.runtime.manifest import MANIFEST, load_manifest, sha256_file
from markup2image.runtime.sampler import ExportedModel
from markup2image.text.tokenizer import TOKENIZER_FILE, encode_batch, load_tokenizer, train_bpe

PARAMS = Params()
MARKUP = ["x ^ { 2 } + y _ { i }", "\\frac { a } { b }", "a + b = c", "\\sqrt { x + 1 }"]
TINY = ModelConfig(
    block_out_channels=(16, 32),
    cross_attention_levels=(False, True),
    norm_num_groups=8,
    encoder_dim=32,
    encoder_layers=1,
    max_text_length=24,
    # every training-only part on: the export must leave the FSA image encoder and the contrastive head out,
    # and carry CCAM and the learned positions
    fsa=True,
    fsa_channels=(8, 16),
    fsa_hidden=16,
    ccam=True,
    ccam_blocks=1,
    ccam_rank=8,
    con_aug=True,
    contrastive_dim=16,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("export")
    model_dir, out_dir = root / "model", root / "math"
    tok = train_bpe(MARKUP * 8, vocab_size=60, min_frequency=1)
    torch.manual_seed(0)
    model = MarkupToImageModel(
        model_cfg=TINY, image=DomainConfig(height=16, width=32), vocab_size=tok.get_vocab_size()
    )
    model.save(model_dir)
    (model_dir / TOKENIZER_FILE).write_text(tok.to_str())
    manifest = export_model(PARAMS, model_dir, out_dir, progress=False)
    return model_dir, out_dir, manifest


def test_export_writes_graphs_tokenizer_parity_and_manifest(exported: tuple[Path, Path, dict]) -> None:
    model_dir, out_dir, manifest = exported
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["encoder.onnx", "unet.onnx", "tokenizer.json", "parity.json", MANIFEST]
    )
    assert json.loads((out_dir / MANIFEST).read_text()) == json.loads(json.dumps(manifest))
    assert set(manifest["files"]) == {"encoder.onnx", "unet.onnx", "tokenizer.json", "parity.json"}
    for name, rec in manifest["files"].items():
        assert rec["sha256"] == sha256_file(out_dir / name)
    load_manifest(out_dir, verify=True)
    assert manifest["domain"] == "math"
    assert manifest["image"] == {"height": 16, "width": 32, "channels": 1}
    assert manifest["max_text_length"] == 24
    assert manifest["scheduler"] == scheduler_config(PARAMS.diffusion)
    assert manifest["exported_modules"] == ["encoder", "unet"]
    assert set(manifest["versions"]) >= {"torch", "diffusers", "onnx", "onnxruntime"}
    assert manifest["source"]["weights_sha256"] == sha256_file(model_dir / "model.safetensors")
    assert manifest["unet"]["inputs"]["sample"] == {"shape": ["batch", 1, 16, 32], "dtype": "float32"}
    assert manifest["unet"]["inputs"]["encoder_attention_mask"] == {"shape": ["batch", "text_len"], "dtype": "int64"}
    assert manifest["encoder"]["outputs"]["hidden"]["shape"] == ["batch", "text_len", 32]
    assert manifest["tensorrt"].startswith("skipped: ") and "install TensorRT" in manifest["tensorrt"]
    assert 18 <= manifest["opset"] <= 20 and manifest["exporter"] == "dynamo"
    for name in ("encoder.onnx", "unet.onnx"):
        graph = onnx.load(str(out_dir / name)).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic, not traced at 2
        assert all(op.domain in ("", "ai.onnx") for op in onnx.load(str(out_dir / name)).opset_import)


def test_parity_report_is_within_tolerance(exported: tuple[Path, Path, dict]) -> None:
    _, out_dir, manifest = exported
    report = json.loads((out_dir / "parity.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert {(c["batch"], c["text_len"]) for c in report["calls"]} == {(3, 7), (1, 11)}  # not the traced (2, 5)
    for call in report["calls"]:
        assert 0 < call["encoder"] <= PARAMS.export.parity_atol
        assert 0 < call["unet"] <= PARAMS.export.parity_atol
    assert report["image"]["steps"] == PARAMS.export.parity_steps
    assert report["image"]["max_uint8_diff"] <= 1 and report["image"]["max_abs_diff"] < 1e-3
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] == report["max_abs_diff"]


@pytest.mark.parametrize(("batch", "length"), [(3, 7), (1, 1), (5, 24)])
def test_onnx_runs_at_other_batch_and_length_like_torch(exported: tuple[Path, Path, dict], batch: int, length: int):
    model_dir, out_dir, _ = exported
    model = load_model(model_dir)
    g = torch.Generator().manual_seed(batch * 100 + length)
    enc_in = graphs.encoder_inputs(batch, length, model.vocab_size, g)
    unet_in = graphs.unet_inputs(batch, length, (1, 16, 32), 32, 1000, g)
    with torch.no_grad():
        want_hidden = model.encode(*enc_in.values()).numpy()
        want_eps = model.denoise(*unet_in.values()).numpy()
    enc = ort.InferenceSession(str(out_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    unet = ort.InferenceSession(str(out_dir / "unet.onnx"), providers=["CPUExecutionProvider"])
    hidden = enc.run(None, {k: v.numpy() for k, v in enc_in.items()})[0]
    eps = unet.run(None, {k: v.numpy() for k, v in unet_in.items()})[0]
    assert hidden.shape == (batch, length, 32) and eps.shape == (batch, 1, 16, 32)
    assert np.abs(hidden - want_hidden).max() <= 1e-4
    assert np.abs(eps - want_eps).max() <= 1e-4
    # the mask matters in the graph: dropping the padding changes the output of a padded row
    if length > 1:
        unmasked = {k: v.numpy() for k, v in unet_in.items()} | {
            "encoder_attention_mask": np.ones((batch, length), np.int64)
        }
        changed = np.abs(unet.run(None, unmasked)[0] - eps).max(axis=(1, 2, 3))
        padded = (unet_in["encoder_attention_mask"].numpy() == 0).any(axis=1)
        assert (changed[padded] > 1e-6).all() and (changed[~padded] <= 1e-6).all()


def test_training_only_modules_are_not_exported(exported: tuple[Path, Path, dict]) -> None:
    model_dir, out_dir, _ = exported
    model = load_model(model_dir)
    stored = set()
    for name in ("encoder.onnx", "unet.onnx"):
        for init in onnx.load(str(out_dir / name)).graph.initializer:
            stored.add(numpy_helper.to_array(init).astype(np.float32).tobytes())

    def present(module: torch.nn.Module) -> list[bool]:
        random = [p.detach().numpy().astype(np.float32) for p in module.parameters() if p.numel() > 8 and p.std() > 0]
        return [w.tobytes() in stored for w in random]  # constant-initialized norms and biases would match anything

    assert all(present(model.unet.conv_in)) and all(present(model.unet.conv_out))  # the check can see weights
    assert present(model.alignment) and present(model.contrastive_head)
    assert not any(present(model.alignment)) and not any(present(model.contrastive_head))


@pytest.mark.parametrize(
    ("sampler", "steps"), [("ddim", 5), ("dpm_solver", 6), pytest.param("ddpm", 1000, marks=pytest.mark.slow)]
)
def test_runtime_sample_equals_torch_sample_for_the_same_seed(
    exported: tuple[Path, Path, dict], sampler: str, steps: int
) -> None:
    model_dir, out_dir, _ = exported
    model = load_model(model_dir)
    runtime = ExportedModel(out_dir, threads=1)
    ids, mask = encode_batch(load_tokenizer(model_dir), MARKUP[:3], TINY.max_text_length)
    assert (mask == 0).any()  # padding is exercised
    want = sample_images(
        model,
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        sampler=sampler,
        steps=steps,
        seed=5,
        diffusion=PARAMS.diffusion,
    )
    got = runtime.sample(ids, mask, sampler=sampler, steps=steps, seed=5)
    assert np.abs(got - want.numpy()).max() <= 1e-3
    diff = np.abs(runtime_uint8(got).astype(int) - to_uint8(want).astype(int))
    assert diff.max() <= 1


def runtime_uint8(images: np.ndarray) -> np.ndarray:
    from markup2image.runtime.sampler import to_uint8 as numpy_to_uint8

    return numpy_to_uint8(images)


def test_runtime_cli_writes_the_torch_images(exported: tuple[Path, Path, dict], tmp_path: Path) -> None:
    model_dir, out_dir, _ = exported
    args = [
        "--model",
        str(out_dir),
        "--out",
        str(tmp_path / "out"),
        "--sampler",
        "dpm_solver",
        "--steps",
        "5",
        "--seed",
        "9",
        "--batch-size",
        "2",
        "--quiet",
    ]
    for m in MARKUP[:3]:
        args += ["--markup", m]
    code = (
        "import runpy, sys; sys.argv = ['runtime'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('markup2image.runtime', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'runtime imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(tmp_path / "out"))
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    for b, start in enumerate((0, 2)):  # batch b is sampled with seed + b
        chunk = MARKUP[start : min(start + 2, 3)]
        ids, mask = encode_batch(tok, chunk, TINY.max_text_length)
        want = to_uint8(
            sample_images(
                model,
                torch.from_numpy(ids),
                torch.from_numpy(mask),
                sampler="dpm_solver",
                steps=5,
                seed=9 + b,
                diffusion=PARAMS.diffusion,
            )
        )
        for i, w in enumerate(want):
            got = np.asarray(Image.open(tmp_path / "out" / f"{start + i:04d}.png"))
            assert np.abs(got.astype(int) - w.astype(int)).max() <= 1


def test_tampered_weights_fail_the_export(
    exported: tuple[Path, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs that no longer match the torch model (a weight changed after export) fail parity and the stage."""
    model_dir, out_dir, manifest = exported

    def reuse_graphs_then_tamper(model: torch.nn.Module, stage: Path, params: Params) -> dict:
        for name in ("encoder.onnx", "unet.onnx"):
            shutil.copy2(out_dir / name, stage / name)  # the fixture's graphs: no second 30 s export
        with torch.no_grad():
            model.unet.conv_out.bias += 0.01  # torch reference drifts from the exported graph
        return {k: manifest[k] for k in ("encoder", "unet")}

    monkeypatch.setattr(onnx_export, "export_graphs", reuse_graphs_then_tamper)
    failed = tmp_path / "math"
    with pytest.raises(ExportParityError, match=r"unet at B=3, N=7: max \|Δ\| 0\.01 > 0\.0001") as info:
        export_model(PARAMS, model_dir, failed, progress=False)
    assert str(failed) in str(info.value) and "encoder at" not in str(info.value)
    assert not (failed / MANIFEST).exists()
    report = json.loads((failed / "parity.json").read_text())
    assert report["passed"] is False and report["calls"][0]["encoder"] <= 1e-4
    with pytest.raises(FileNotFoundError, match="failed parity"):
        ExportedModel(failed)


def test_zero_tolerance_fails_parity(exported: tuple[Path, Path, dict], tmp_path: Path) -> None:
    model_dir, out_dir, manifest = exported
    folder = tmp_path / "copy"
    shutil.copytree(out_dir, folder)
    strict = dataclasses.replace(PARAMS, export=dataclasses.replace(PARAMS.export, parity_atol=0.0))
    with pytest.raises(ExportParityError, match=r"max \|Δ\| [0-9.e-]+ > 0"):
        run_parity(load_model(model_dir), folder, manifest, strict)
    assert json.loads((folder / "parity.json").read_text())["passed"] is False
    run_parity(load_model(model_dir), folder, manifest, PARAMS)  # the same graphs pass at the real tolerance


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_big_graphs_keep_weights_in_one_external_data_file(
    exporter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 1000)  # this 132 kB MLP counts as big
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(2, 5, 64)
    rec = export_onnx(
        mlp,
        {"x": x},
        tmp_path / "mlp.onnx",
        output_names=("y",),
        dynamic={"x": {0: "batch"}},
        opset=18,
        exporter=exporter,
        max_text_length=8,
    )
    assert rec == {"file": "mlp.onnx", "external_data": "mlp.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    assert (tmp_path / "mlp.onnx").stat().st_size < 20_000 < (tmp_path / "mlp.onnx.data").stat().st_size
    x3 = torch.randn(3, 5, 64)
    sess = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(sess.run(None, {"x": x3.numpy()})[0] - mlp(x3).numpy()).max() <= 1e-5


def test_export_config_rejects_opset_outside_17_to_20() -> None:
    with pytest.raises(ValueError, match="export.opset: 23"):
        onnx_export.effective_opset(23, "dynamo")
    assert onnx_export.effective_opset(17, "dynamo") == 18 and onnx_export.effective_opset(17, "torchscript") == 17
    assert ExportConfig().exporter == "dynamo"


@pytest.mark.slow
def test_bench_sample_times_both_backends(exported: tuple[Path, Path, dict]) -> None:
    from markup2image.bench.sample import bench_sample

    _, out_dir, _ = exported
    report = bench_sample(
        out_dir,
        backends=("torch", "torch_fast", "torch_no_kv_cache", "onnxruntime"),
        batch_sizes=(1, 2),
        steps=(2, 3),
        warmup=1,
        repeats=2,
        threads=1,
    )
    json.dumps(report)  # JSON-able
    rows = {(r["backend"], r["batch"], r["steps"]): r for r in report["results"]}
    ran = ("torch", "torch_no_kv_cache", "onnxruntime")
    assert set(rows) == {(b, n, s) for b in ran for n in (1, 2) for s in (2, 3)}
    for (_, batch, steps), r in rows.items():
        assert len(r["runs"]) == 2 and r["seconds_per_run"] == pytest.approx(float(np.median(r["runs"])), abs=2e-4)
        assert r["seconds_per_step"] == pytest.approx(r["seconds_per_run"] / steps, rel=1e-2)
        assert r["images_per_second"] == pytest.approx(batch / r["seconds_per_run"], rel=1e-2)
    assert set(report["speedup"]) == {f"{b}_vs_torch/b{n}_s{s}" for b in ran[1:] for n in (1, 2) for s in (2, 3)}
    assert "CUDA" in report["skipped"]["torch_fast"] and report["device"] == "cpu"
    # the runtime never loads torch, so its sampling path stays far below torch's resident memory
    mem = report["peak_memory"]
    assert 0 < mem["onnxruntime"]["peak_rss_mb"] < mem["torch"]["peak_rss_mb"]
