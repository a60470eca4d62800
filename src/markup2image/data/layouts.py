"""Layouts: where each markup segment lands in its rendered image (HCMA's grounding boxes, design §8).

A layout is a list of boxes, one per markup segment that draws ink::

    {"box": [x0, y0, x1, y1],   # pixels of the FINAL placed image (after the crop to ink and the (4, 4) margin);
                                # half-open: columns x0 <= x < x1, rows y0 <= y < y1; clipped to the canvas
     "span": [w0, w1],          # whitespace-token indices of the markup, half-open (markup.split()[w0:w1])
     "chars": [c0, c1],         # character offsets of the segment in the markup, half-open
     "text": markup[c0:c1]}

``chars`` is the exact anchor; ``span`` is the coarser whitespace-token view (a SMILES string is ONE whitespace
token, so every atom of a molecule has ``span == [0, 1]``; use ``chars`` there). Models map ``chars`` onto their
own (BPE) tokens through the tokenizer's character offsets (:func:`markup2image.data.layout_tensors.layout_batch`).

Where the boxes come from: each engine's extractor sits in its renderer module, with its description
(:mod:`~markup2image.data.renderers.math_mathtext`, :mod:`~markup2image.data.renderers.molecules_rdkit`,
:mod:`~markup2image.data.renderers.tables_weasyprint`); ``latex`` (math) and ``lilypond`` (music) make no layouts.

Layouts are written by the render stage as ``layouts/<id>.json`` (atomically, beside ``images/``) and gathered into
``layouts.jsonl`` (``{"id", "boxes"}``, rendered items with at least one box, in split order).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from markup2image.io import read_jsonl, write_json

LAYOUTS_DIR = "layouts"
LAYOUTS_JSONL = "layouts.jsonl"


class LayoutBox(TypedDict):
    box: list[int]
    span: list[int]
    chars: list[int]
    text: str


XYXY = tuple[float, float, float, float]


# ----------------------------------------------------------------------------------------------------------------
# common


def whitespace_token_chars(markup: str) -> list[tuple[int, int]]:
    """Half-open character ranges of ``markup.split()``'s tokens."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", markup)]


def chars_to_span(markup: str, c0: int, c1: int) -> list[int]:
    """Half-open whitespace-token range covering characters ``[c0, c1)`` of ``markup``."""
    toks = whitespace_token_chars(markup)
    inside = [i for i, (a, b) in enumerate(toks) if a < c1 and b > c0]
    if not inside:
        raise ValueError(f"characters [{c0}, {c1}) of {markup[:60]!r} cover no token")
    return [inside[0], inside[-1] + 1]


def make_box(markup: str, xyxy: XYXY, c0: int, c1: int, offset: tuple[int, int], size: tuple[int, int]) -> LayoutBox:
    """A :class:`LayoutBox` from a box on the engine's drawing (float pixels, half-open), shifted by the placement
    ``offset = (dx, dy)`` and clipped to the canvas ``size = (height, width)``."""
    dx, dy = offset
    h, w = size
    x0, y0, x1, y1 = xyxy
    box = [
        min(max(math.floor(x0 + dx), 0), w),
        min(max(math.floor(y0 + dy), 0), h),
        min(max(math.ceil(x1 + dx), 0), w),
        min(max(math.ceil(y1 + dy), 0), h),
    ]
    return {"box": box, "span": chars_to_span(markup, c0, c1), "chars": [c0, c1], "text": markup[c0:c1]}


def nonempty(boxes: Iterable[LayoutBox]) -> list[LayoutBox]:
    """Boxes with positive area (a box clipped away by the canvas is dropped)."""
    return [b for b in boxes if b["box"][2] > b["box"][0] and b["box"][3] > b["box"][1]]


def validate_layout(boxes: Any, source: str = "layout") -> list[LayoutBox]:
    """Check a user's layout (a list of boxes, or ``{"boxes": [...]}``); raise ``ValueError`` naming ``source``."""
    if isinstance(boxes, dict):
        boxes = boxes.get("boxes")
    if not isinstance(boxes, list):
        raise ValueError(f"{source}: expected a list of boxes or {{'boxes': [...]}}")
    out: list[LayoutBox] = []
    for i, b in enumerate(boxes):
        xyxy = b.get("box") if isinstance(b, dict) else None
        if not (isinstance(xyxy, list) and len(xyxy) == 4 and all(isinstance(v, (int, float)) for v in xyxy)):
            raise ValueError(f"{source}: box {i} needs 'box': [x0, y0, x1, y1] in pixels")
        if not (xyxy[2] > xyxy[0] and xyxy[3] > xyxy[1]):
            raise ValueError(f"{source}: box {i} {xyxy} is empty (needs x1 > x0 and y1 > y0)")
        if "chars" not in b and "span" not in b:
            raise ValueError(f"{source}: box {i} needs 'chars': [c0, c1] or 'span': [w0, w1] to name its segment")
        out.append(b)
    return out


# ----------------------------------------------------------------------------------------------------------------
# storage


def layout_path(out_dir: str | Path, item_id: str) -> Path:
    return Path(out_dir) / LAYOUTS_DIR / f"{item_id}.json"


def write_layout(out_dir: str | Path, item_id: str, boxes: list[LayoutBox] | None) -> int:
    """Write ``layouts/<id>.json`` atomically (or remove a stale one when there are no boxes); the box count."""
    path = layout_path(out_dir, item_id)
    if not boxes:
        path.unlink(missing_ok=True)
        return 0
    write_json(path, {"id": item_id, "boxes": boxes}, indent=None)  # type: ignore[arg-type]
    return len(boxes)


def read_layout_file(path: str | Path) -> list[LayoutBox]:
    """A layout JSON (``layouts/<id>.json``, or a user's grounding file: a list of boxes or ``{"boxes": [...]}``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such layout file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
    return validate_layout(raw, str(path))


def load_layouts(render_dir: str | Path) -> dict[str, list[LayoutBox]]:
    """``id -> boxes`` of a render output folder (``layouts.jsonl``; empty when the engine gives no layouts)."""
    path = Path(render_dir) / LAYOUTS_JSONL
    if not path.exists():
        return {}
    return {row["id"]: row["boxes"] for row in read_jsonl(path)}


# ----------------------------------------------------------------------------------------------------------------
# pictures


def draw_boxes(image: np.ndarray, boxes: Sequence[LayoutBox], scale: int = 1) -> np.ndarray:
    """RGB uint8 ``[H*scale, W*scale, 3]`` copy of ``image`` (``[H, W]`` or ``[H, W, 3]``) with each box outlined in
    a colour of its own (cycling through 6)."""
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3].copy()
    rgb = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else rgb.copy()
    colours = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (0, 170, 170)]
    h, w = rgb.shape[:2]
    for k, b in enumerate(boxes):
        x0, y0, x1, y1 = (int(v) * scale for v in b["box"])
        x1, y1 = min(x1, w) - 1, min(y1, h) - 1
        if x1 < x0 or y1 < y0:
            continue
        c = colours[k % len(colours)]
        rgb[y0, x0 : x1 + 1] = rgb[y1, x0 : x1 + 1] = c
        rgb[y0 : y1 + 1, x0] = rgb[y0 : y1 + 1, x1] = c
    return rgb
