"""Math with matplotlib mathtext (pip-only, the default engine).

Mathtext reads spaces that TeX ignores, so im2latex's tokens are joined first (:func:`compact_latex`). It has no
display style, so a ``\\frac`` at the top level of the formula is drawn as ``\\dfrac`` to match LaTeX displaymath
(what the im2latex golds use); nested fractions stay text-style as in LaTeX. The default resolution (105 dpi at
12 pt) was calibrated on the im2latex golds: a parenthesis is 15 px tall there.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.layouts import LocatingMathtextParser, math_boxes
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
