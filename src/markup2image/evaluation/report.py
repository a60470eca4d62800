"""Image grids for evaluation reports: gold next to generated, and plain grids (Pillow, written atomically)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from markup2image.io import atomic_open

logger = logging.getLogger(__name__)

PAD = 4  # pixels between cells and around the grid
LABEL_HEIGHT = 14  # strip above each cell or row that holds its label
BACKGROUND = (200, 200, 200)  # light gray, so white image borders stay visible
TEXT_COLOR = (0, 0, 0)


def _as_rgb(img: np.ndarray) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def _save(canvas: Image.Image, out_path: str | Path) -> None:
    with atomic_open(out_path, "wb") as fh:
        canvas.save(fh, format="PNG")
    logger.info("wrote %s (%dx%d)", out_path, canvas.width, canvas.height)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """Shorten ``text`` with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_comparison_grid(
    golds: list[np.ndarray],
    preds: list[np.ndarray],
    out_path: str | Path,
    titles: list[str] | None = None,
    max_items: int = 16,
) -> None:
    """Write a PNG with one row per pair, gold | generated side by side, at most ``max_items`` rows.

    Images are uint8 ``[H, W]`` or ``[H, W, 3]``, shown at their own size. A header names the two columns; each
    row carries its title (e.g. the markup id and its DTW) in a label strip above it.
    """
    if len(golds) != len(preds):
        raise ValueError(f"golds ({len(golds)}) and preds ({len(preds)}) differ in length")
    if titles is not None and len(titles) != len(golds):
        raise ValueError(f"titles ({len(titles)}) and images ({len(golds)}) differ in length")
    n = min(len(golds), max_items)
    if n == 0:
        raise ValueError(f"no images to put in the comparison grid {out_path}")
    gold_imgs = [_as_rgb(g) for g in golds[:n]]
    pred_imgs = [_as_rgb(p) for p in preds[:n]]
    cell_w = max(im.width for im in gold_imgs + pred_imgs)
    row_heights = [max(g.height, p.height) for g, p in zip(gold_imgs, pred_imgs, strict=True)]
    width = PAD + 2 * (cell_w + PAD)
    height = LABEL_HEIGHT + PAD + sum(LABEL_HEIGHT + h + PAD for h in row_heights)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, header in enumerate(("gold", "generated")):
        draw.text((PAD + col * (cell_w + PAD), 1), header, fill=TEXT_COLOR, font=font)
    y = LABEL_HEIGHT + PAD
    for i, (gold, pred) in enumerate(zip(gold_imgs, pred_imgs, strict=True)):
        if titles is not None:
            draw.text((PAD, y + 1), _fit_text(draw, titles[i], width - 2 * PAD, font), fill=TEXT_COLOR, font=font)
        y += LABEL_HEIGHT
        canvas.paste(gold, (PAD, y))
        canvas.paste(pred, (PAD + cell_w + PAD, y))
        y += row_heights[i] + PAD
    _save(canvas, out_path)


def save_image_grid(
    images: list[np.ndarray], out_path: str | Path, ncols: int, titles: list[str] | None = None
) -> None:
    """Write a PNG grid of uint8 images ``[H, W]`` or ``[H, W, 3]``, ``ncols`` per row, each under its title.

    Cells are as large as the largest image; images sit at the cell's top-left at their own size.
    """
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    if not images:
        raise ValueError(f"no images to put in the grid {out_path}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles ({len(titles)}) and images ({len(images)}) differ in length")
    tiles = [_as_rgb(im) for im in images]
    label = LABEL_HEIGHT if titles is not None else 0
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles) + label
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    canvas = Image.new("RGB", (PAD + ncols * (cell_w + PAD), PAD + nrows * (cell_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, tile in enumerate(tiles):
        x = PAD + (i % ncols) * (cell_w + PAD)
        y = PAD + (i // ncols) * (cell_h + PAD)
        if titles is not None:
            draw.text((x, y + 1), _fit_text(draw, titles[i], cell_w, font), fill=TEXT_COLOR, font=font)
        canvas.paste(tile, (x, y + label))
    _save(canvas, out_path)
