"""The runtime is torch-free: it samples an exported folder with torch and diffusers made unimportable.

The exported folder here is built by hand (two small ONNX graphs written with ``onnx.helper``, a BPE tokenizer and
a manifest), so the test needs no exporter and runs in seconds; ``tests/integration/test_export.py`` runs the
runtime on a real export.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from markup2image.runtime.manifest import MANIFEST, file_records, load_manifest
from markup2image.text.tokenizer import TOKENIZER_FILE, train_bpe

RUNTIME_DIR = Path(__file__).resolve().parents[2] / "src" / "markup2image" / "runtime"
H, W, D = 6, 10, 4

# Run the runtime CLI with torch and diffusers unimportable; report what got imported.
GUARDED_RUN = """
import importlib.abc, json, runpy, sys
BLOCKED = ("torch", "diffusers", "torchvision", "transformers", "accelerate")
attempts = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"blocked import of {name} in the torch-free runtime")
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["markup2image.runtime"] + json.loads(sys.argv[1])
code = 0
try:
    runpy.run_module("markup2image.runtime", run_name="__main__")
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("REPORT" + json.dumps({"code": code, "attempts": attempts, "loaded": loaded}))
"""


def _encoder_graph() -> onnx.ModelProto:
    """``hidden [B, N, D] = embedding[input_ids] * mask``."""
    emb = np.linspace(-1, 1, 64 * D, dtype=np.float32).reshape(64, D)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["gathered"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask_3d"]),
        helper.make_node("Mul", ["gathered", "mask_3d"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "text_len"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "text_len"]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "text_len", D])],
        initializer=[
            helper.make_tensor("embedding", TensorProto.FLOAT, emb.shape, emb.ravel()),
            helper.make_tensor("axis_last", TensorProto.INT64, [1], [2]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _unet_graph() -> onnx.ModelProto:
    """``noise_pred = 0.5 * sample + mean(hidden)`` (per item): uses the sample and the markup."""
    nodes = [
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["mean"], axes=[1, 2], keepdims=1),
        helper.make_node("Unsqueeze", ["mean", "axis_last"], ["mean_4d"]),
        helper.make_node("Add", ["scaled", "mean_4d"], ["noise_pred"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 1, H, W]),
            helper.make_tensor_value_info("timestep", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", "text_len", D]),
            helper.make_tensor_value_info("encoder_attention_mask", TensorProto.INT64, ["batch", "text_len"]),
        ],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", 1, H, W])],
        initializer=[
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("axis_last", TensorProto.INT64, [1], [3]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def fake_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "math"
    folder.mkdir()
    onnx.save(_encoder_graph(), str(folder / "encoder.onnx"))
    onnx.save(_unet_graph(), str(folder / "unet.onnx"))
    tok = train_bpe(["x ^ { 2 }", "a + b", "\\frac { 1 } { 2 }"] * 4, vocab_size=50, min_frequency=1)
    (folder / TOKENIZER_FILE).write_text(tok.to_str())
    manifest = {
        "format_version": 1,
        "domain": "math",
        "image": {"height": H, "width": W, "channels": 1},
        "max_text_length": 16,
        "tokenizer": TOKENIZER_FILE,
        "encoder": {"file": "encoder.onnx"},
        "unet": {"file": "unet.onnx"},
        "scheduler": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"},
        "defaults": {"sampler": "ddim", "steps": 5},
        "tensorrt": "skipped: test",
        "files": file_records(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _run_guarded(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", GUARDED_RUN, json.dumps(args)], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT")]
    assert lines, f"runtime crashed: {proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("REPORT") :]) | {"stdout": proc.stdout, "stderr": proc.stderr}


def test_runtime_cli_samples_without_torch(fake_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    args = [
        "--model",
        str(fake_export),
        "--markup",
        "x ^ { 2 }",
        "--markup",
        "a + b",
        "--markup",
        "\\frac { 1 } { 2 }",
    ]
    report = _run_guarded(args + ["--out", str(out), "--steps", "4", "--batch-size", "2", "--seed", "3", "--verify"])
    assert report["code"] in (0, None), report["stderr"][-2000:]
    assert report["attempts"] == [] and report["loaded"] == []
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png"]

    from PIL import Image

    from markup2image.runtime.sampler import ExportedModel

    model = ExportedModel(fake_export)
    want = model.generate(["x ^ { 2 }", "a + b", "\\frac { 1 } { 2 }"], sampler="ddim", steps=4, seed=3, batch_size=2)
    for p, w in zip(pngs, want):
        img = np.asarray(Image.open(p))
        assert img.shape == (H, W) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, w)
    assert not np.array_equal(want[0], want[1])  # different markup (and seeds) give different images


def test_blocked_import_is_really_blocked(tmp_path: Path) -> None:
    """The guard itself works: a module that imports torch is refused and reported."""
    bad = tmp_path / "uses_torch.py"
    bad.write_text("import torch\n")
    code = GUARDED_RUN.replace('runpy.run_module("markup2image.runtime", run_name="__main__")', "import uses_torch")
    proc = subprocess.run(
        [sys.executable, "-c", code, "[]"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert "blocked import of torch" in proc.stderr


def test_runtime_sources_import_nothing_torch_bound() -> None:
    """Static check of every runtime module: no torch, diffusers, or project modules that pull torch in."""
    forbidden = (
        "torch",
        "diffusers",
        "markup2image.config",
        "markup2image.models",
        "markup2image.diffusion",
        "markup2image.training",
        "markup2image.export",
        "markup2image.evaluation",
        "markup2image.cli",
    )
    files = sorted(RUNTIME_DIR.glob("*.py"))
    assert {"__main__.py", "sampler.py", "schedulers.py"} <= {f.name for f in files}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == x or name.startswith(x + ".") for x in forbidden), f"{f.name} imports {name}"


def test_cli_errors_are_one_clear_line(fake_export: Path, tmp_path: Path) -> None:
    report = _run_guarded(["--model", str(tmp_path), "--markup", "x", "--out", str(tmp_path / "a.png")])
    assert report["code"] == 1
    assert "no manifest.json" in report["stderr"] and "Traceback" not in report["stderr"]
    report = _run_guarded(
        ["--model", str(fake_export), "--markup", "x", "--markup", "y", "--out", str(tmp_path / "a.png")]
    )
    assert report["code"] == 2 and "pass a folder" in report["stderr"]
    report = _run_guarded(
        [
            "--model",
            str(fake_export),
            "--markup",
            "x",
            "--out",
            str(tmp_path / "a.png"),
            "--sampler",
            "ddpm",
            "--steps",
            "10",
        ]
    )
    assert report["code"] == 1 and "runs all 1000 steps" in report["stderr"]
    report = _run_guarded(
        ["--model", str(fake_export), "--markup", "x", "--out", str(tmp_path / "b.png"), "--backend", "tensorrt"]
    )
    assert report["code"] == 1 and "no TensorRT engine" in report["stderr"] and "install TensorRT" in report["stderr"]


def test_manifest_checks_sizes_and_checksums(fake_export: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fake_export, copy)
    assert load_manifest(copy, verify=True)["domain"] == "math"
    data = bytearray((copy / "unet.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (copy / "unet.onnx").write_bytes(bytes(data))
    load_manifest(copy)  # sizes only: passes
    with pytest.raises(ValueError, match="sha256 differs"):
        load_manifest(copy, verify=True)
    (copy / "unet.onnx").write_bytes(bytes(data[:-1]))
    with pytest.raises(ValueError, match="bytes, the manifest says"):
        load_manifest(copy)
    (copy / "unet.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_manifest(copy)


def test_runtime_refuses_a_graph_with_one_flipped_byte_by_default(fake_export: Path, tmp_path: Path) -> None:
    """The checksum check is on by default: a same-size corrupt ONNX file is named in one line, not sampled from."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fake_export, copy)
    data = bytearray((copy / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "unet.onnx").write_bytes(bytes(data))
    report = _run_guarded(["--model", str(copy), "--markup", "x", "--out", str(tmp_path / "a.png")])
    assert report["code"] == 1 and "sha256 differs" in report["stderr"] and "Traceback" not in report["stderr"]


def test_runtime_import_graph_stays_off_the_training_config() -> None:
    """Importing the runtime CLI loads neither torch nor the typed config (nor PyYAML): its mode lists come from the
    standard-library leaf ``markup2image.modes``."""
    loaded = "sorted({'torch', 'markup2image.config', 'yaml'} & set(sys.modules))"
    code = f"import sys, markup2image.runtime.__main__; print({loaded})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
