"""Math with real TeX: ``latex`` + ``dvipng`` on the im2latex template, many formulas per document.

Each formula is one page of one document (``article`` 12 pt, ``amsmath``, ``displaymath``, ``\\pagestyle{empty}``),
so TeX starts once per batch instead of once per formula. TeX runs with ``-halt-on-error``: pages before the first
error are kept, the formula that raised it (found from a ``\\typeout`` marker before each formula, with a
fresh random tag per document so that markup cannot forge one) is rejected as ``parse_error`` with TeX's message,
and the rest of the batch runs again. A batch that runs over the time limit names its suspect by the pages TeX
shipped before it was killed: the suspect runs alone and the formulas around it run again, so one hanging formula
costs about two time limits instead of one per halving; where no page count names one, the batch is split in
halves until the hanging formula is alone. dvipng renders the pages at 100 dpi, which makes glyphs the
size they have in the im2latex-100k golds (a 12 pt parenthesis is 15 px tall; whole formulas match to a pixel),
with a gamma that gives strokes the golds' weight.
TeX may read and write files only inside its work folder (``openin_any=p``, ``openout_any=p``, no shell escape).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.renderers.base import RenderError, RenderResult, place_top_left
from markup2image.data.renderers.tools import BatchOutcome, ExternalToolEngine, run_tool

DEFAULT_DPI = 100.0
# The golds (pdflatex + a raster converter) have ~1.7x the ink mass of dvipng's default anti-aliasing; gamma 4
# matches both their ink mass and their count of dark pixels on the same formula while keeping strokes crisp.
DVIPNG_GAMMA = 4.0
DEBIAN_PACKAGES = "texlive-latex-base dvipng"
MARKER = "M2I-ITEM"
# A formula that ends its environment or the document would typeset something other than itself.
DOCUMENT_LEVEL = re.compile(
    r"\\(documentclass|usepackage|(begin|end)\s*\{\s*(document|displaymath)\s*\}|dump|batchmode|errorstopmode)(?![A-Za-z])"
)
TEX_ENV = {"openin_any": "p", "openout_any": "p", "shell_escape": "f", "max_print_line": "1000"}

PREAMBLE = r"""\documentclass[{size}pt]{{article}}
\pagestyle{{empty}}
\usepackage{{amsmath}}
\begin{{document}}
"""
FORMULA = "\\typeout{{{marker} {index}}}\n\\begin{{displaymath}}\n{formula}\n\\end{{displaymath}}\n\\newpage\n"


def latex_document(formulas: Sequence[str], font_size: float, marker: str = MARKER) -> str:
    """The im2latex template with one formula per page, each announced by ``marker`` and its index."""
    size = int(round(font_size))
    if size not in (10, 11, 12):
        raise ValueError(f"domain.math.font_size: LaTeX's article class takes 10, 11 or 12 pt, got {font_size}")
    body = "".join(FORMULA.format(marker=marker, index=i, formula=" ".join(f.split())) for i, f in enumerate(formulas))
    return PREAMBLE.format(size=size) + body + "\\end{document}\n"


def first_error(log: str, marker: str = MARKER) -> tuple[int | None, str]:
    """(index of the formula being typeset at TeX's first error or None if before any formula, message)."""
    index: int | None = None
    lines = log.splitlines()
    for n, line in enumerate(lines):
        if line.startswith(marker + " "):
            index = int(line.split()[1])
        elif line.startswith("! "):
            context = next((ln.strip() for ln in lines[n + 1 : n + 8] if re.match(r"l\.\d+", ln)), "")
            return index, " ".join(f"{line[2:]} {context}".split())[:300]
    return index, ""


def hang_suspect(chunk: list[tuple[str, str]], exc: subprocess.TimeoutExpired) -> list[list[tuple[str, str]]]:
    """Chunks to run again after ``chunk`` timed out: the formula after the last page TeX shipped, alone, and the
    formulas before and after it. Re-raises when there is nothing to split (one formula) or no page count."""
    out = exc.stdout.decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    shipped = len(re.findall(r"\[\d+", out))  # TeX prints [n] to the terminal as it ships page n (flushed)
    if len(chunk) == 1 or not 0 <= shipped < len(chunk):
        raise exc
    return [chunk[:shipped], [chunk[shipped]], chunk[shipped + 1 :]]


class LatexEngine(ExternalToolEngine):
    """``engine: latex`` — batch-capable."""

    name = "latex"
    tools = ("latex", "dvipng")
    debian_packages = DEBIAN_PACKAGES
    single_timeout = 60.0

    def precheck(self, markup: str) -> None:
        if not markup.strip():
            raise RenderError("empty", "the markup is empty")
        found = DOCUMENT_LEVEL.search(markup)
        if found:
            raise RenderError("parse_error", f"{found.group(0)!r} is document markup, not part of a formula")

    def _run(self, chunk: list[tuple[str, str]], cfg: DomainConfig, timeout: float) -> BatchOutcome:
        """One latex + dvipng call over ``chunk``; raises TimeoutExpired when either runs over ``timeout``."""
        with tempfile.TemporaryDirectory(prefix="m2i-latex-") as tmp:
            work = Path(tmp)
            marker = f"{MARKER}-{secrets.token_hex(8)}"
            (work / "doc.tex").write_text(latex_document([m for _, m in chunk], cfg.font_size, marker))
            try:
                run_tool(["latex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], work, timeout, TEX_ENV)
            except subprocess.TimeoutExpired as exc:
                return [], hang_suspect(chunk, exc)
            log = (work / "doc.log").read_text(errors="replace") if (work / "doc.log").exists() else ""
            failed, message = first_error(log, marker)
            if message and failed is None:  # an error before the first formula: the installation, not the markup
                missing = re.search(r"File `([^']+)' not found", message)
                reason = "renderer_missing" if missing else "crash"
                detail = f"LaTeX failed before the first formula: {message}"
                if missing:
                    detail += (
                        f"; install the Debian package(s) providing it (texlive-latex-recommended, {DEBIAN_PACKAGES})"
                    )
                return [RenderResult(i, reason=reason, detail=detail) for i, _ in chunk], []
            n_ok = failed if message else len(chunk)
            pages = self._pages(work, cfg, timeout) if (work / "doc.dvi").exists() else []
            if len(pages) != n_ok:  # pages do not line up with formulas: retry item by item
                if len(chunk) == 1:
                    detail = f"the formula typeset to {len(pages)} pages instead of 1"
                    return [RenderResult(chunk[0][0], reason="parse_error", detail=detail)], []
                return [], [[it] for it in chunk]
            results = [
                self._result(item_id, page, cfg) for (item_id, _), page in zip(chunk[:n_ok], pages, strict=True)
            ]
            if message:
                assert failed is not None
                results.append(RenderResult(chunk[failed][0], reason="parse_error", detail=f"LaTeX: {message}"))
                return results, [chunk[failed + 1 :]]
            return results, []

    def _pages(self, work: Path, cfg: DomainConfig, timeout: float) -> list[np.ndarray]:
        from PIL import Image

        dpi = cfg.dpi or DEFAULT_DPI
        run_tool(
            [
                "dvipng",
                "-q",
                "-D",
                f"{dpi:g}",
                "--gamma",
                f"{DVIPNG_GAMMA:g}",
                "-T",
                "tight",
                "-bg",
                "White",
                "-fg",
                "Black",
                "-z",
                "0",
            ]
            + ["-o", "page%d.png", "doc.dvi"],
            work,
            timeout,
        )
        pages = []
        for n in range(1, 1_000_000):
            path = work / f"page{n}.png"
            if not path.exists():
                break
            with Image.open(path) as im:
                pages.append(np.asarray(im.convert("L"), dtype=np.uint8))
        return pages

    @staticmethod
    def _result(item_id: str, page: np.ndarray, cfg: DomainConfig) -> RenderResult:
        try:
            return RenderResult(item_id, image=place_top_left(page, cfg))
        except RenderError as exc:
            return RenderResult(item_id, reason=exc.reason, detail=exc.detail)
