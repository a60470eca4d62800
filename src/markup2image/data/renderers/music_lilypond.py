"""Sheet music with LilyPond (Debian package ``lilypond``), many snippets per call.

LilyPond's start-up (Guile, fonts) costs seconds, so a batch becomes ONE book: each snippet is a ``\\score`` on its
own line and its own page, typeset in one call and rasterized (gray PNG) in one Ghostscript pass. Errors are
attributed by the line number LilyPond reports; a batch with errors is run again without the suspects, and each
suspect alone, so an innocent neighbour of a bad snippet is never rejected. The page is as wide as the canvas
(systems wrap like sheet music) and tall enough that overflow shows up as ink, not as a lost page.

LilyPond has no safe mode any more (removed in 2.23.12), and ``#``/``$`` embed Scheme, so snippets containing them
or ``\\include`` (or ``\\book``/``\\bookOutputName``/``\\bookOutputSuffix``, which name output files) are rejected as
``parse_error`` rather than run unsandboxed; LilyPond runs in a scratch folder of its own.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.renderers.base import MARGIN, RenderError, RenderResult, place_top_left
from markup2image.data.renderers.tools import BatchOutcome, ExternalToolEngine, run_tool

DEFAULT_DPI = 100.0
DEBIAN_PACKAGES = "lilypond"
MM_PER_INCH = 25.4
HEADER = r"""\version "2.24.0"
#(set-global-staff-size {staff})
\header {{ tagline = ##f }}
\paper {{
  indent = 0 ragged-right = ##t ragged-bottom = ##t ragged-last-bottom = ##t print-page-number = ##f
  paper-width = {paper_width:.2f}\mm line-width = {line_width:.2f}\mm paper-height = {paper_height:.2f}\mm
  top-margin = 2\mm bottom-margin = 2\mm left-margin = 2\mm
  system-system-spacing = #'((basic-distance . 10) (minimum-distance . 8) (padding . 1) (stretchability . 0))
}}
"""
FIRST_SNIPPET_LINE = HEADER.count("\n") + 1
_ERROR = re.compile(r"^doc\.ly:(\d+):\d+: error: (.*)$", re.MULTILINE)
# Scheme (# and $), files read (\include) and output names that could point outside the work folder
_UNSAFE = re.compile(r"[#$]|\\(include|book|bookpart|bookOutputName|bookOutputSuffix)\b")


# ``\repeat unfold 30000 {...}`` keeps LilyPond busy for minutes; far fewer repeats already overflow any canvas.
_REPEAT = re.compile(r"\\repeat\s+[a-z-]+\s+(\d+)")
MAX_REPEATS = 64


def lilypond_document(snippets: Sequence[str], cfg: DomainConfig) -> str:
    """One book, one ``\\score`` per line and per page; line ``FIRST_SNIPPET_LINE + i`` holds snippet ``i``."""
    dpi = cfg.dpi or DEFAULT_DPI
    line_width = (cfg.width - 2 * MARGIN) / dpi * MM_PER_INCH
    header = HEADER.format(
        staff=f"{cfg.font_size:g}",
        paper_width=line_width + 4.0,
        line_width=line_width,
        paper_height=3 * cfg.height / dpi * MM_PER_INCH,
    )
    body = "".join(f"\\score {{ {' '.join(s.split())} \\layout {{ }} }} \\pageBreak\n" for s in snippets)
    return header + body


def check_snippet(markup: str) -> None:
    if not markup.strip():
        raise RenderError("empty", "the markup is empty")
    for count in _REPEAT.findall(markup):
        if int(count) > MAX_REPEATS:
            raise RenderError(
                "overflow",
                f"\\repeat {count} times: more than {MAX_REPEATS} cannot fit a canvas (LilyPond hangs)",
            )
    if _UNSAFE.search(markup):
        raise RenderError(
            "parse_error", "embedded Scheme (# or $), \\include and output-file commands are not rendered: no sandbox"
        )
    depth = 0
    for ch in re.sub(r'"[^"]*"', "", markup):  # braces inside strings do not count
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            raise RenderError("parse_error", "a '}' closes nothing")
    if depth:
        raise RenderError("parse_error", f"{depth} '{{' never closed")


class LilypondEngine(ExternalToolEngine):
    """``engine: lilypond`` — batch-capable."""

    name = "lilypond"
    tools = ("lilypond",)
    debian_packages = DEBIAN_PACKAGES
    single_timeout = 120.0

    def precheck(self, markup: str) -> None:
        check_snippet(markup)

    def _run(self, chunk: list[tuple[str, str]], cfg: DomainConfig, timeout: float) -> BatchOutcome:
        with tempfile.TemporaryDirectory(prefix="m2i-lilypond-") as tmp:
            work = Path(tmp)
            (work / "doc.ly").write_text(lilypond_document([m for _, m in chunk], cfg))
            dpi = cfg.dpi or DEFAULT_DPI
            log = run_tool(
                ["lilypond", "-dno-point-and-click", "--png", f"-dresolution={dpi:g}", "-dpixmap-format=pnggray"]
                + ["-lWARN", "doc.ly"],
                work,
                timeout,
            )
            errors: dict[int, str] = {}
            for m in _ERROR.finditer(log):
                index = int(m.group(1)) - FIRST_SNIPPET_LINE
                if 0 <= index < len(chunk):
                    errors.setdefault(index, m.group(2).strip())
            if errors:
                if len(chunk) == 1:
                    return [RenderResult(chunk[0][0], reason="parse_error", detail=f"LilyPond: {errors[0]}")], []
                clean = [it for i, it in enumerate(chunk) if i not in errors]
                return [], [clean, *([chunk[i]] for i in sorted(errors))]
            pages = self._pages(work)
            if len(pages) != len(chunk):  # pages do not line up with snippets (or an unattributed failure)
                if len(chunk) > 1:
                    return [], [[it] for it in chunk]
                if len(pages) > 1:
                    detail = f"the snippet spills over {len(pages)} pages of {3 * cfg.height} px"
                    return [RenderResult(chunk[0][0], reason="overflow", detail=detail)], []
                detail = "LilyPond made no page: " + " ".join(log.split())[-300:]
                return [RenderResult(chunk[0][0], reason="parse_error", detail=detail)], []
            results = []
            for (item_id, _), page in zip(chunk, pages, strict=True):
                try:
                    results.append(RenderResult(item_id, image=place_top_left(page, cfg)))
                except RenderError as exc:
                    results.append(RenderResult(item_id, reason=exc.reason, detail=exc.detail))
            return results, []

    @staticmethod
    def _pages(work: Path) -> list[np.ndarray]:
        """The pages LilyPond wrote, in order (``doc.png`` for one page, ``doc-pageN.png`` for several)."""
        from PIL import Image

        paths = sorted(work.glob("doc-page*.png"), key=lambda p: int(p.stem.removeprefix("doc-page")))
        if not paths and (work / "doc.png").exists():
            paths = [work / "doc.png"]
        pages = []
        for path in paths:
            with Image.open(path) as im:
                pages.append(np.asarray(im.convert("L"), dtype=np.uint8))
        return pages
