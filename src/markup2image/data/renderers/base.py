"""What every renderer shares: the error type, the result record, the engine protocol and canvas placement.

Every image is black ink on white with the content cropped to its ink and placed at the TOP-LEFT of the HxW
canvas behind a fixed margin (the im2latex golds have their ink start at pixel (4, 4)). Content that does not fit
is an ``overflow`` reject, never scaled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np

from markup2image.config import DomainConfig

# too_long and invalid_id are decided by the render stage before any engine runs (render.max_chars, io.SAFE_ID).
RejectReason = Literal[
    "parse_error", "overflow", "timeout", "renderer_missing", "empty", "crash", "too_long", "invalid_id"
]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)

# Ink starts at (MARGIN, MARGIN) as in the im2latex-100k golds.
MARGIN = 4
# A pixel darker than this counts as ink when cropping (anti-aliasing fringes above it are kept inside the box).
INK_THRESHOLD = 250


class RenderError(Exception):
    """A markup that cannot become an image, with a machine-readable ``reason`` and a human ``detail``."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; choose from {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: RejectReason = reason
        self.detail = detail


@dataclass
class RenderResult:
    """The outcome of one item: ``image`` (uint8 [H,W] or [H,W,3]) or a ``reason`` with ``detail``."""

    id: str
    image: np.ndarray | None = None
    reason: str | None = None
    detail: str = ""
    layout: list[dict] | None = None  # boxes of markup segments (markup2image.data.layouts) where the engine has them

    @property
    def ok(self) -> bool:
        return self.image is not None


class Engine(Protocol):
    """A renderer. ``render`` draws one markup; ``iter_batch`` yields one result per item, in any order, as soon
    as each is known (batch-capable engines run many items per external call). Engines that can say where each
    markup segment landed also have ``render_with_layout(markup, cfg) -> (image, boxes | None)`` (single-item) or
    fill :attr:`RenderResult.layout` (batch); see :mod:`markup2image.data.layouts`."""

    name: str

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray: ...

    def iter_batch(
        self, items: Sequence[tuple[str, str]], cfg: DomainConfig, timeout: float
    ) -> Iterator[RenderResult]: ...


class SingleItemEngine:
    """Base for in-process engines: ``iter_batch`` renders item by item and turns errors into results."""

    name = "single"

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_batch(
        self, items: Sequence[tuple[str, str]], cfg: DomainConfig, timeout: float
    ) -> Iterator[RenderResult]:
        for item_id, markup in items:
            yield safe_render(self, item_id, markup, cfg)


def safe_render(engine: Engine, item_id: str, markup: str, cfg: DomainConfig) -> RenderResult:
    """``engine.render`` with every failure turned into a :class:`RenderResult` (unexpected ones as ``crash``)."""
    try:
        with_layout = getattr(engine, "render_with_layout", None)
        if with_layout is None:
            return RenderResult(item_id, image=engine.render(markup, cfg))
        image, layout = with_layout(markup, cfg)
        return RenderResult(item_id, image=image, layout=layout)
    except RenderError as exc:
        return RenderResult(item_id, reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # noqa: BLE001 - a renderer bug must cost one item, not the corpus
        return RenderResult(item_id, reason="crash", detail=f"{type(exc).__name__}: {exc}"[:500])


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 [H,W] luma of a gray or RGB(A) image (OpenCV/ITU-R 601 weights), alpha composited on white."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        return arr.astype(np.uint8)
    rgb = arr[..., :3].astype(np.float32)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def ink_box(image: np.ndarray, threshold: int = INK_THRESHOLD) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) half-open box of pixels with a channel below ``threshold``; None if no ink."""
    arr = np.asarray(image)
    darkest = arr if arr.ndim == 2 else arr[..., :3].min(axis=-1)  # colored ink (a yellow S) counts as ink
    if arr.ndim == 3 and arr.shape[-1] == 4:
        darkest = np.where(arr[..., 3] > 0, darkest, 255)
    ink = darkest < threshold
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(ink.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def place_top_left(image: np.ndarray, cfg: DomainConfig, margin: int = MARGIN) -> np.ndarray:
    """Crop ``image`` (white background) to its ink and paste it at (margin, margin) on a white HxW canvas.

    Returns uint8 [H,W] for ``cfg.channels == 1`` else [H,W,3]. Raises ``RenderError("empty")`` for an inkless
    render and ``RenderError("overflow")`` when the ink does not fit.
    """
    return place_top_left_with_offset(image, cfg, margin)[0]


def place_top_left_with_offset(
    image: np.ndarray, cfg: DomainConfig, margin: int = MARGIN
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`place_top_left` plus the ``(dx, dy)`` that moves a pixel of ``image`` to its place on the canvas
    (layout boxes are measured on the engine's raw drawing and shifted by it)."""
    box = ink_box(image)
    if box is None:
        raise RenderError("empty", "the render has no ink")
    top, left, bottom, right = box
    h, w = bottom - top, right - left
    if h + margin > cfg.height or w + margin > cfg.width:
        raise RenderError(
            "overflow", f"ink is {h}x{w} px, the canvas holds {cfg.height - margin}x{cfg.width - margin} after margin"
        )
    crop = np.asarray(image)[top:bottom, left:right]
    if cfg.channels == 1:
        crop = to_gray(crop)
        canvas = np.full((cfg.height, cfg.width), 255, dtype=np.uint8)
    else:
        crop = np.asarray(crop)
        if crop.ndim == 2:
            crop = np.repeat(crop[..., None], 3, axis=-1)
        elif crop.shape[-1] == 4:
            alpha = crop[..., 3:4].astype(np.float32) / 255.0
            crop = np.rint(crop[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        canvas = np.full((cfg.height, cfg.width, 3), 255, dtype=np.uint8)
    canvas[margin : margin + h, margin : margin + w] = crop
    return canvas, (margin - left, margin - top)
