"""Math with matplotlib mathtext (pip-only, the default engine).

Mathtext reads spaces that TeX ignores, so im2latex's tokens are joined first (:func:`compact_latex`). It has no
display style, so a ``\\frac`` at the top level of the formula is drawn as ``\\dfrac`` to match LaTeX displaymath
(what the im2latex golds use); nested fractions stay text-style as in LaTeX. The default resolution (105 dpi at
12 pt) was calibrated on the im2latex golds: a parenthesis is 15 px tall there.

Layout boxes (the format: :mod:`markup2image.data.layouts`): one box per whitespace token that draws ink, from
matplotlib's own layout. Every parse action of a private mathtext ``Parser`` is wrapped so that the nodes it creates
(``Char`` glyphs, ``Rule`` bars) remember the source position of the match; inner actions run first, so a glyph
keeps the position of the innermost match that made it (``x`` -> ``x``; the fraction bar -> ``\\frac``; the radical
sign and its overbar -> ``\\sqrt``; the letters of ``\\sin`` -> ``\\sin``; the accent of ``\\hat { y }`` ->
``\\hat``). The shipped box is then drawn glyph by glyph, each glyph and rule into its own layer at exactly the
place ``Output.to_raster`` draws it, so a box is the bounding box of that token's own pixels. The position is mapped
back through ``display_style`` and ``compact_latex`` (which drop the spaces) to the whitespace token. Tokens that
draw nothing (``{``, ``}``, ``^``, ``_``, ``\\mathrm``, ``\\,``) get no box.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.layouts import XYXY, LayoutBox, make_box, nonempty, whitespace_token_chars
from markup2image.data.renderers.base import (
    RenderError,
    SingleItemEngine,
    place_top_left,
    place_top_left_with_offset,
)

DEFAULT_DPI = 105.0
_lock = threading.Lock()  # rc_context is global state


_CONTROL_WORD_END = re.compile(r"\\[A-Za-z]+$")


def compact_latex(markup: str) -> str:
    """Join im2latex's space-separated tokens the way TeX reads them in math mode.

    TeX ignores spaces in math except as the end of a control word, but mathtext does not (``x _ { i }`` is not a
    subscript there), so spaces are dropped except between a control word and a following letter.
    """
    return compact_latex_with_starts(markup)[0]


def compact_latex_with_starts(markup: str) -> tuple[str, list[int]]:
    """:func:`compact_latex` and where each whitespace token of ``markup`` starts in its output (for layouts)."""
    out, starts = "", []
    for tok in markup.split():
        if out and _CONTROL_WORD_END.search(out) and tok[0].isalpha():
            out += " "
        starts.append(len(out))
        out += tok
    return out, starts


def display_style(markup: str) -> str:
    """Turn top-level ``\\frac`` tokens into ``\\dfrac`` (LaTeX displaymath's fraction size)."""
    out, depth = [], 0
    for tok in markup.split():
        if tok == "\\frac" and depth == 0:
            tok = "\\dfrac"
        depth += tok.count("{") - tok.count("\\{") - tok.count("}") + tok.count("\\}")
        out.append(tok)
    return " ".join(out)


class MathtextEngine(SingleItemEngine):
    name = "mathtext"

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.font_manager import FontProperties
        from matplotlib.mathtext import MathTextParser

        self._parser = MathTextParser("agg")
        self._locating = None  # a LocatingMathtextParser for layouts, built on first use
        self._font = FontProperties
        self._matplotlib = matplotlib

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray:
        """uint8 [H,W] (or [H,W,3]) image of ``$markup$``, black on white, top-left."""
        text = markup.strip()
        if not text:
            raise RenderError("empty", "the markup is empty")
        if "$" in text:
            raise RenderError("parse_error", "a '$' inside the formula would end math mode")
        dpi = getattr(cfg, "dpi", 0.0) or DEFAULT_DPI
        with _lock, self._matplotlib.rc_context({"mathtext.fontset": "cm"}):
            try:
                parsed = self._parser.parse(
                    f"${compact_latex(display_style(text))}$", dpi=dpi, prop=self._font(size=cfg.font_size)
                )
            except ValueError as exc:
                detail = " ".join(str(exc).split())
                raise RenderError("parse_error", detail[:300]) from exc
        coverage = np.asarray(parsed.image, dtype=np.uint8)  # [h, w], 255 = ink
        if coverage.size == 0 or not coverage.any():
            raise RenderError("empty", "the formula draws no ink")
        return place_top_left(255 - coverage, cfg)

    def render_with_layout(self, markup: str, cfg: DomainConfig) -> tuple[np.ndarray, list | None]:
        """:meth:`render` (the same pixels) and one box per whitespace token that draws ink
        (:mod:`markup2image.data.layouts`)."""

        text = markup.strip()
        if not text:
            raise RenderError("empty", "the markup is empty")
        if "$" in text:
            raise RenderError("parse_error", "a '$' inside the formula would end math mode")
        dpi = getattr(cfg, "dpi", 0.0) or DEFAULT_DPI
        formula, starts = compact_latex_with_starts(display_style(text))
        with _lock, self._matplotlib.rc_context({"mathtext.fontset": "cm"}):
            if self._locating is None:
                self._locating = LocatingMathtextParser()
            try:
                coverage, items = self._locating.render(formula, self._font(size=cfg.font_size), dpi)
            except ValueError as exc:
                raise RenderError("parse_error", " ".join(str(exc).split())[:300]) from exc
        if coverage.size == 0 or not coverage.any():
            raise RenderError("empty", "the formula draws no ink")
        image, offset = place_top_left_with_offset(255 - coverage, cfg)
        return image, math_boxes(markup, items, starts, offset, (cfg.height, cfg.width))


# ----------------------------------------------------------------------------------------------------------------
# layout boxes


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
