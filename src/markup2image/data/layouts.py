"""Layouts: where each markup segment lands in its rendered image (HCMA's grounding boxes, design §8).

A layout is a list of boxes, one per markup segment that draws ink::

    {"box": [x0, y0, x1, y1],   # pixels of the FINAL placed image (after the crop to ink and the (4, 4) margin);
                                # half-open: columns x0 <= x < x1, rows y0 <= y < y1; clipped to the canvas
     "span": [w0, w1],          # whitespace-token indices of the markup, half-open (markup.split()[w0:w1])
     "chars": [c0, c1],         # character offsets of the segment in the markup, half-open
     "text": markup[c0:c1]}

``chars`` is the exact anchor; ``span`` is the coarser whitespace-token view (a SMILES string is ONE whitespace
token, so every atom of a molecule has ``span == [0, 1]``; use ``chars`` there). Models map ``chars`` onto their
own (BPE) tokens through the tokenizer's character offsets (:func:`markup2image.models.hcma.layout_batch`).

Where the boxes come from, per engine:

* ``mathtext`` (math): one box per whitespace token that draws ink, from matplotlib's own layout. Every parse action
  of a private mathtext ``Parser`` is wrapped so that the nodes it creates (``Char`` glyphs, ``Rule`` bars) remember
  the source position of the match; inner actions run first, so a glyph keeps the position of the innermost match
  that made it (``x`` -> ``x``; the fraction bar -> ``\\frac``; the radical sign and its overbar -> ``\\sqrt``; the
  letters of ``\\sin`` -> ``\\sin``; the accent of ``\\hat { y }`` -> ``\\hat``). The shipped box is then drawn
  glyph by glyph, each glyph and rule into its own layer at exactly the place ``Output.to_raster`` draws it, so a
  box is the bounding box of that token's own pixels. The position is mapped back through ``display_style`` and
  ``compact_latex`` (which drop the spaces) to the whitespace token. Tokens that draw nothing (``{``, ``}``,
  ``^``, ``_``, ``\\mathrm``, ``\\,``) get no box.
* ``rdkit`` (molecules): one box per atom. The SMILES is split into tokens (Schwaller et al.'s regex); RDKit numbers
  atoms in the order they appear, so atom ``i`` is the ``i``-th atom token. Labelled atoms (heteroatoms, charged
  or isotopic ones) get the extent of their label, read from the ``atom-i`` paths of an SVG drawing made with the
  same drawer settings (same coordinates as the Cairo drawing); every atom also gets a square of half-side
  ``0.3 x bond length`` around ``MolDraw2D.GetDrawCoords(i)``. A SMILES whose atom tokens do not match RDKit's
  atoms one to one (explicit ``[H]`` removed by sanitization) gets no layout.
* ``weasyprint`` (tables): one box per ``<td>``/``<th>``: the border box of the ``k``-th table cell of the page's
  layout tree is paired with the ``k``-th cell start tag of the markup (both in document order); the segment runs
  from ``<td`` to its ``</td>`` (or to the tag that closes it implicitly). A count mismatch gives no layout.
* ``latex`` (math) and ``lilypond`` (music): no layouts.

Layouts are written by the render stage as ``layouts/<id>.json`` (atomically, beside ``images/``) and gathered into
``layouts.jsonl`` (``{"id", "boxes"}``, rendered items with at least one box, in split order).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from markup2image.io import read_jsonl, write_json

log = logging.getLogger(__name__)

LAYOUTS_DIR = "layouts"
LAYOUTS_JSONL = "layouts.jsonl"
ATOM_BOX_HALF_BONDS = 0.3  # half-side of the square around an atom centre, in bond lengths


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
# math: mathtext glyphs -> whitespace tokens


class LocatingMathtextParser:
    """A private mathtext ``Parser`` whose nodes remember where in the formula they were made (``node._m2i_loc``).

    Wrapping the parse actions of this instance only leaves matplotlib's shared parser untouched.
    """

    def __init__(self) -> None:
        from matplotlib import _mathtext
        from pyparsing import ParserElement

        self._mt = _mathtext
        self.parser = _mathtext.Parser()
        seen: set[int] = set()
        stack: list[Any] = [self.parser._expression, self.parser._math_expression]
        while stack:
            el = stack.pop()
            if id(el) in seen:
                continue
            seen.add(id(el))
            el.parseAction = [self._locating(fn) for fn in el.parseAction]
            sub = getattr(el, "expr", None)
            if isinstance(sub, ParserElement):
                stack.append(sub)
            stack.extend(getattr(el, "exprs", None) or [])

    def _locating(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def action(s: str, loc: int, toks: Any) -> Any:
            result = fn(s, loc, toks)
            self._tag(toks if result is None else result, loc)
            return result

        return action

    def _tag(self, obj: Any, loc: int) -> None:
        if isinstance(obj, self._mt.Node):
            if not hasattr(obj, "_m2i_loc"):
                obj._m2i_loc = loc
            for child in getattr(obj, "children", None) or []:
                self._tag(child, loc)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                self._tag(o, loc)
        elif hasattr(obj, "as_list"):
            self._tag(obj.as_list(), loc)

    def render(self, formula: str, prop: Any, dpi: float) -> tuple[np.ndarray, list[tuple[int | None, XYXY]]]:
        """Coverage image ``[h, w]`` uint8 (255 = ink) of ``$formula$``, identical to
        ``MathTextParser("agg").parse(...).image``, and ``(loc, pixel box)`` of every glyph and rule drawn.

        Call it under the same ``rc_context`` as the engine (fontset, antialiasing).
        """
        import matplotlib as mpl
        from matplotlib.backends import backend_agg
        from matplotlib.mathtext import MathTextParser

        mt = self._mt
        antialiased = bool(mpl.rcParams["text.antialiased"])
        fontset = MathTextParser._font_type_mapping[prop.get_math_fontfamily()](prop, backend_agg.get_hinting_flag())
        box = self.parser.parse(f"${formula}$", fontset, prop.get_size_in_points(), dpi)
        output = mt.ship(box)
        image = output.to_raster(antialiased=antialiased).image
        # the shift Output.to_raster applies before drawing (same formula)
        xmin = min([*[ox + i.metrics.xmin for ox, _, i in output.glyphs], *[x for x, _, _, _ in output.rects], 0]) - 1
        ymin = min([*[oy - i.metrics.ymax for _, oy, i in output.glyphs], *[y for _, y, _, _ in output.rects], 0]) - 1
        drawn: list[tuple[Any, int, int]] = []  # (node, first glyph, first rect) per rendered node, in ship order
        nodes = self._nodes(box)
        for node in nodes:
            node.render = self._recording(node, drawn)
        try:
            shifted = mt.ship(box, (-xmin, -ymin))
        finally:
            for node in nodes:
                del node.render
        items = []
        ends = [*[(g, r) for _, g, r in drawn[1:]], (len(shifted.glyphs), len(shifted.rects))]
        for (node, g0, r0), (g1, r1) in zip(drawn, ends, strict=True):
            layer = np.zeros_like(image)
            for ox, oy, info in shifted.glyphs[g0:g1]:
                info.font.draw_glyph_to_bitmap(
                    layer, int(ox), int(oy - info.metrics.iceberg), info.glyph, antialiased=antialiased
                )
            for x, y, bw, bh in shifted.rects[r0:r1]:  # as Output.to_raster fills rules
                height = max(int(bh) - 1, 0)
                y = int(y + bh / 2 - (height + 1) / 2) if height == 0 else int(y)
                layer[y : y + height + 1, math.floor(x) : math.ceil(x + bw) + 1] = 0xFF
            rows, cols = np.flatnonzero(layer.any(axis=1)), np.flatnonzero(layer.any(axis=0))
            if rows.size:
                xyxy = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
                items.append((getattr(node, "_m2i_loc", None), xyxy))
        return image, items

    def _nodes(self, box: Any) -> list[Any]:
        """Every ``Char`` and ``Rule`` in the box tree."""
        out, stack = [], [box]
        while stack:
            node = stack.pop()
            if isinstance(node, (self._mt.Char, self._mt.Rule)):
                out.append(node)
            stack.extend(getattr(node, "children", None) or [])
        return out

    @staticmethod
    def _recording(node: Any, drawn: list[tuple[Any, int, int]]) -> Callable[..., None]:
        def render(output: Any, *args: float) -> None:
            drawn.append((node, len(output.glyphs), len(output.rects)))
            type(node).render(node, output, *args)

        return render


def math_boxes(
    markup: str,
    items: Sequence[tuple[int | None, XYXY]],
    token_starts: Sequence[int],
    offset: tuple[int, int],
    size: tuple[int, int],
) -> list[LayoutBox]:
    """One box per whitespace token of ``markup``: the union of the boxes of the glyphs/rules made at its position.

    ``items``: ``(loc, box)`` from :meth:`LocatingMathtextParser.render`, ``loc`` a position in the compacted
    formula whose whitespace tokens start at ``token_starts``.
    """
    chars = whitespace_token_chars(markup)
    union: dict[int, list[float]] = {}
    for loc, (x0, y0, x1, y1) in items:
        if loc is None:
            continue
        i = bisect.bisect_right(token_starts, loc) - 1
        if not 0 <= i < len(chars):
            continue
        u = union.setdefault(i, [x0, y0, x1, y1])
        union[i] = [min(u[0], x0), min(u[1], y0), max(u[2], x1), max(u[3], y1)]
    return nonempty(
        make_box(markup, tuple(union[i]), *chars[i], offset=offset, size=size)  # type: ignore[arg-type]
        for i in sorted(union)
    )


# ----------------------------------------------------------------------------------------------------------------
# molecules: RDKit atoms -> SMILES atom tokens

# Schwaller et al.'s SMILES tokens; the first group is the atoms
_ATOMS = r"\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\*"
_SMILES_TOKEN = re.compile(rf"({_ATOMS}|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\$|%\d{{2}}|\d)")
_ATOM_TOKEN = re.compile(rf"^({_ATOMS})$")


def smiles_atom_chars(smiles: str, mol: Any) -> list[tuple[int, int]] | None:
    """Character range of each atom's token, indexed like ``mol``'s atoms; None where they do not pair up."""
    spans = [(m.start(), m.end()) for m in _SMILES_TOKEN.finditer(smiles) if _ATOM_TOKEN.match(m.group())]
    if len(spans) != mol.GetNumAtoms():
        return None
    for (c0, c1), atom in zip(spans, mol.GetAtoms(), strict=True):
        tok = smiles[c0:c1]
        bracket = re.match(r"\[\d*([A-Z][a-z]?|[a-z][a-z]?|\*)", tok)
        symbol = bracket.group(1) if bracket else tok
        if symbol.capitalize() != atom.GetSymbol():
            return None
    return spans


def svg_atom_label_extents(svg: str) -> dict[int, XYXY]:
    """Extent of each atom's label in an RDKit SVG (paths of class ``atom-i``; control points bound the curves)."""
    extents: dict[int, XYXY] = {}
    for m in re.finditer(r"<path class='atom-(\d+)' d='([^']*)'", svg):
        nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", m.group(2))]
        if len(nums) < 2:
            continue
        xs, ys = nums[0::2], nums[1::2]
        i = int(m.group(1))
        old = extents.get(i, (math.inf, math.inf, -math.inf, -math.inf))
        extents[i] = (min(old[0], *xs), min(old[1], *ys), max(old[2], *xs), max(old[3], *ys))
    return extents


def molecule_boxes(
    smiles: str,
    mol: Any,
    centres: Sequence[tuple[float, float]],
    labels: dict[int, XYXY],
    bond_px: float,
    offset: tuple[int, int],
    size: tuple[int, int],
) -> list[LayoutBox] | None:
    """One box per atom (drawing coordinates -> placed image); None when atoms and SMILES tokens do not pair up."""
    spans = smiles_atom_chars(smiles, mol)
    if spans is None:
        return None
    half = ATOM_BOX_HALF_BONDS * bond_px
    boxes = []
    for i, ((cx, cy), (c0, c1)) in enumerate(zip(centres, spans, strict=True)):
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        if i in labels:
            lx0, ly0, lx1, ly1 = labels[i]
            x0, y0, x1, y1 = min(x0, lx0), min(y0, ly0), max(x1, lx1), max(y1, ly1)
        boxes.append(make_box(smiles, (x0, y0, x1, y1), c0, c1, offset=offset, size=size))
    return nonempty(boxes)


# ----------------------------------------------------------------------------------------------------------------
# tables: WeasyPrint cell boxes -> <td>/<th> elements


class _CellFinder(HTMLParser):
    """Start/end offsets of every ``<td>``/``<th>`` in document order, nested tables included."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.markup = markup
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", markup)]
        self.cells: list[list[int]] = []  # [start, end]; end -1 while open
        self.stack: list[int] = []  # open tables (-1) and cells (their index)

    def _pos(self) -> int:
        line, col = self.getpos()
        return self.line_starts[line - 1] + col

    def _close_cell(self, end: int) -> None:
        if self.stack and self.stack[-1] >= 0:  # the innermost open thing is a cell
            self.cells[self.stack.pop()][1] = end

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("td", "th", "tr", "thead", "tbody", "tfoot"):
            self._close_cell(self._pos())  # a new cell or row closes an open cell implicitly
        if tag in ("td", "th"):
            self.stack.append(len(self.cells))
            self.cells.append([self._pos(), -1])
        elif tag == "table":
            self.stack.append(-1)

    def handle_endtag(self, tag: str) -> None:
        pos = self._pos()
        if tag in ("td", "th"):
            self._close_cell(self.markup.find(">", pos) + 1 or len(self.markup))
        elif tag in ("tr", "thead", "tbody", "tfoot", "table"):
            self._close_cell(pos)
            if tag == "table" and self.stack and self.stack[-1] == -1:
                self.stack.pop()


def html_cell_chars(markup: str) -> list[tuple[int, int]]:
    """Character range of each ``<td>``/``<th>`` element in document order (implicitly closed cells end where the
    next cell, row or table tag starts)."""
    finder = _CellFinder(markup)
    finder.feed(markup)
    finder.close()
    return [(a, b if b >= 0 else len(markup)) for a, b in finder.cells]


def weasyprint_cell_boxes(page_box: Any, scale: float) -> list[XYXY]:
    """Border boxes of the table cells of one WeasyPrint page, document order, in pixels (``scale`` px per CSS px)."""
    from weasyprint.formatting_structure.boxes import TableCellBox

    out: list[XYXY] = []
    stack = [page_box]
    while stack:
        b = stack.pop()
        if isinstance(b, TableCellBox) and getattr(b, "element_tag", None) in ("td", "th"):
            x, y = b.border_box_x(), b.border_box_y()
            out.append((x * scale, y * scale, (x + b.border_width()) * scale, (y + b.border_height()) * scale))
        stack.extend(reversed(getattr(b, "children", None) or []))
    return out


def table_boxes(
    markup: str, cells: Sequence[XYXY], offset: tuple[int, int], size: tuple[int, int]
) -> list[LayoutBox] | None:
    """One box per cell; None when the page's cells and the markup's cells do not pair up."""
    spans = html_cell_chars(markup)
    if len(spans) != len(cells):
        return None
    return nonempty(
        make_box(markup, xyxy, c0, c1, offset=offset, size=size) for xyxy, (c0, c1) in zip(cells, spans, strict=True)
    )


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
