"""HTML tables with WeasyPrint (HTML -> PDF) and pypdfium2 (PDF -> pixels).

Many tables go into one document, one per page, so WeasyPrint's set-up is paid once per batch; a batch whose pages
do not line up with its items is rendered item by item. Presentation is fixed here, not in the markup: DejaVu Sans
at ``cfg.font_size`` CSS px (default 6 px for the 64x64 canvas) with HTML presentational hints on (``border``,
``cellpadding``, ``align``), rendered at 96 dpi so one CSS px is one pixel. Markup whose tags do not balance is a
``parse_error`` (browsers would guess; a gold image must not depend on guessing). No external resource is fetched.

Layout boxes (the format: :mod:`markup2image.data.layouts`): one box per ``<td>``/``<th>``: the border box of the
``k``-th table cell of the page's layout tree is paired with the ``k``-th cell start tag of the markup (both in
document order); the segment runs from ``<td`` to its ``</td>`` (or to the tag that closes it implicitly). A count
mismatch gives no layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from typing import Any

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.layouts import XYXY, LayoutBox, make_box, nonempty
from markup2image.data.renderers.base import RenderError, RenderResult, place_top_left_with_offset
from markup2image.data.renderers.tools import BatchOutcome, bisect_batches

log = logging.getLogger(__name__)

DEFAULT_DPI = 96.0
PAGE_PX = 600  # an item that spills past one 600x600 px page is far beyond any canvas: overflow
VOID = {"br", "hr", "img", "col", "wbr", "meta", "link", "input", "area", "base", "source"}
# HTML lets these close themselves when a sibling or the parent closes
OPTIONAL_CLOSE = {"td", "th", "tr", "thead", "tbody", "tfoot", "p", "li", "colgroup", "option", "caption"}
# Tags that run code, fetch resources or style the whole document (a batch's document holds many items, so a
# <style> or a fixed position would reach the neighbours' pages).
FORBIDDEN = {
    "script", "iframe", "object", "embed", "frame", "frameset", "svg", "math", "img", "link", "form", "style",
    "base", "meta", "video", "audio", "source", "picture", "canvas", "applet", "input", "button", "textarea",
    "select", "template", "slot", "portal",
}  # fmt: skip
# Inline CSS that fetches (url(), @import, image-set) or leaves the item's own box (position, float off the page).
UNSAFE_STYLE = re.compile(r"url\s*\(|@import|image-set|expression\s*\(|position|content\s*:", re.IGNORECASE)
CSS = """@page {{ size: {page}px {page}px; margin: 0 }}
html, body {{ margin: 0; padding: 0; background: white; color: black }}
.m2i-item {{ page-break-after: always; font-family: 'DejaVu Sans', sans-serif; font-size: {size}px }}
table {{ font-size: inherit }}
"""


# HTML's own limits (browsers clamp to them); WeasyPrint spends minutes on a colspan of 10^5.
SPAN_LIMITS = {"colspan": 1000, "rowspan": 65534}


def _span_ok(value: str | None, limit: int) -> bool:
    try:
        return 1 <= int((value or "1").strip()) <= limit
    except ValueError:
        return False


class _TagChecker(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.error = ""
        self.text = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in FORBIDDEN and not self.error:
            self.error = f"<{tag}> is not allowed in table markup"
        for name, value in attrs:
            if self.error:
                break
            if name in SPAN_LIMITS and not _span_ok(value, SPAN_LIMITS[name]):
                self.error = f"<{tag} {name}={value!r}>: HTML allows 1 to {SPAN_LIMITS[name]}"
            elif name.startswith("on"):
                self.error = f"<{tag} {name}=...>: event handlers are not allowed in table markup"
            elif (
                name in ("style", "background", "src", "href")
                and value
                and (name != "style" or UNSAFE_STYLE.search(value))
            ):
                self.error = f"<{tag} {name}={value[:60]!r}>: external resources and positioning are not rendered"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if tag not in self.stack:
            self.error = self.error or f"</{tag}> closes nothing"
            return
        while self.stack and self.stack[-1] != tag:
            inner = self.stack.pop()
            if inner not in OPTIONAL_CLOSE:
                self.error = self.error or f"<{inner}> is not closed before </{tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text = self.text or bool(data.strip())


def check_html(markup: str) -> None:
    """Raise ``RenderError("parse_error")`` if tags do not balance or are not allowed, ``empty`` if nothing shows."""
    checker = _TagChecker()
    checker.feed(markup)
    checker.close()
    if checker.error:
        raise RenderError("parse_error", checker.error)
    unclosed = [t for t in checker.stack if t not in OPTIONAL_CLOSE]
    if unclosed:
        raise RenderError("parse_error", f"<{unclosed[-1]}> is never closed")
    if not markup.strip():
        raise RenderError("empty", "the markup is empty")


def refusing_fetcher(weasyprint: Any) -> Any:
    """A WeasyPrint URL fetcher that fetches nothing (no network, no file:, no data:): a second wall behind
    :func:`check_html`, which rejects markup that names resources before WeasyPrint sees it."""

    class RefusingFetcher(weasyprint.urls.URLFetcher):
        def fetch(self, url: str, headers: object = None) -> Any:
            raise ValueError(f"external resource {url[:80]!r} is not fetched when rendering")

    return RefusingFetcher()


class WeasyprintEngine:
    """``engine: weasyprint`` — batch-capable."""

    name = "weasyprint"

    def __init__(self) -> None:
        try:
            import pypdfium2
            import weasyprint
        except ImportError as exc:  # pragma: no cover - both are project dependencies
            raise RenderError("renderer_missing", f"{exc}; pip install weasyprint pypdfium2") from exc
        self._weasyprint, self._pdfium = weasyprint, pypdfium2
        self._fetcher = refusing_fetcher(weasyprint)
        logging.getLogger("weasyprint").setLevel(logging.ERROR)  # it warns about every unknown CSS hint
        logging.getLogger("fontTools").setLevel(logging.ERROR)

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray:
        check_html(markup)
        (result,), _ = self._run([("item", markup)], cfg)
        if result.image is None:
            raise RenderError(result.reason or "crash", result.detail)  # type: ignore[arg-type]
        return result.image

    def iter_batch(
        self, items: Sequence[tuple[str, str]], cfg: DomainConfig, timeout: float
    ) -> Iterator[RenderResult]:
        todo = []
        for item_id, markup in items:
            try:
                check_html(markup)
            except RenderError as exc:
                yield RenderResult(item_id, reason=exc.reason, detail=exc.detail)
                continue
            todo.append((item_id, markup))
        yield from bisect_batches(todo, lambda chunk: self._run(chunk, cfg), timeout)

    def _run(self, chunk: list[tuple[str, str]], cfg: DomainConfig) -> BatchOutcome:
        """One WeasyPrint document over ``chunk``; items whose pages cannot be attributed are returned as left over."""
        body = "".join(f'<div class="m2i-item">{markup}</div>' for _, markup in chunk)
        style = CSS.format(page=PAGE_PX, size=cfg.font_size)
        html = f"<html><head><style>{style}</style></head><body>{body}</body></html>"
        document = self._weasyprint.HTML(string=html, url_fetcher=self._fetcher).render(presentational_hints=True)
        doc = self._pdfium.PdfDocument(document.write_pdf())
        try:
            if len(doc) != len(chunk):
                if len(chunk) == 1:
                    detail = f"the table spills over {len(doc)} pages of {PAGE_PX}x{PAGE_PX} px"
                    return [RenderResult(chunk[0][0], reason="overflow", detail=detail)], []
                return [], [[it] for it in chunk]
            scale = (cfg.dpi or DEFAULT_DPI) / 72.0
            results = []
            for (item_id, markup), page, layout_page in zip(chunk, doc, document.pages, strict=True):
                gray = page.render(scale=scale, grayscale=True).to_numpy()
                gray = gray[..., 0] if gray.ndim == 3 else gray
                try:
                    image, offset = place_top_left_with_offset(np.ascontiguousarray(gray), cfg)
                    # cell boxes from the page's layout tree; CSS px -> pixels at the render scale (dpi / 96)
                    cells = weasyprint_cell_boxes(layout_page._page_box, scale * 72.0 / 96.0)
                    layout = table_boxes(markup, cells, offset, (cfg.height, cfg.width))
                    results.append(RenderResult(item_id, image=image, layout=layout))
                except RenderError as exc:
                    results.append(RenderResult(item_id, reason=exc.reason, detail=exc.detail))
            return results, []
        finally:
            doc.close()


# ----------------------------------------------------------------------------------------------------------------
# layout boxes


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
