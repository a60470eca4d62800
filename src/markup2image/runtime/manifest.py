"""The exported folder's ``manifest.json``: reading it and checking its files (torch-free).

The export stage writes ``manifest.json`` last, after parity passed, so a folder without one is an export that did
not finish or failed parity. The manifest records the ONNX inputs/outputs, the image geometry, the noise schedule,
the longest markup, library versions and a sha256 per file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from markup2image.io import read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(folder: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for every file under ``folder`` except ``exclude``, sorted."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in exclude and not p.name.startswith("."):
            out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def load_manifest(folder: str | Path, verify: bool = False) -> dict[str, Any]:
    """Read ``folder/manifest.json``; check that every listed file exists with its size (and sha256 if ``verify``).

    Raises:
        FileNotFoundError: no manifest (unfinished or failed export) or a listed file is missing.
        ValueError: a file's size or checksum differs from the manifest.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        hint = " (parity.json is there: the export failed parity, see it)" if (folder / "parity.json").exists() else ""
        raise FileNotFoundError(
            f"{folder}: no {MANIFEST}{hint}; point --model at a folder written by the export stage (export/<domain>)"
        )
    manifest = read_json(path, fix="copy the exported folder again or re-export")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} is newer than this runtime reads")
    for rel, rec in manifest.get("files", {}).items():
        p = folder / rel
        if not p.exists():
            raise FileNotFoundError(f"{p}: listed in {MANIFEST} but missing; copy the whole exported folder")
        if p.stat().st_size != rec["bytes"]:
            raise ValueError(f"{p}: {p.stat().st_size} bytes, the manifest says {rec['bytes']}; re-copy the folder")
        if verify and sha256_file(p) != rec["sha256"]:
            raise ValueError(f"{p}: sha256 differs from {MANIFEST}; the file is corrupt or was changed, re-export")
    return manifest
