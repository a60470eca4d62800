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
from markup2image.data.renderers.base import RenderError, SingleItemEngine, place_top_left

DEFAULT_DPI = 105.0
_lock = threading.Lock()  # rc_context is global state


_CONTROL_WORD_END = re.compile(r"\\[A-Za-z]+$")


def compact_latex(markup: str) -> str:
    """Join im2latex's space-separated tokens the way TeX reads them in math mode.

    TeX ignores spaces in math except as the end of a control word, but mathtext does not (``x _ { i }`` is not a
    subscript there), so spaces are dropped except between a control word and a following letter.
    """
    out = ""
    for tok in markup.split():
        if out and _CONTROL_WORD_END.search(out) and tok[0].isalpha():
            out += " "
        out += tok
    return out


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
