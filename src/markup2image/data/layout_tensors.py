"""Layout boxes as tensors: each box's coordinates and the markup token positions of its segment (HCMA, design §8).

Segments -> markup tokens. A box names its segment by character offsets ``chars`` (or whitespace tokens ``span``).
The BPE tokenizer's ids are not 1:1 with whitespace tokens (it merges within words, splits a SMILES into pieces and
adds ``[BOS]``/``[EOS]``), so :func:`layout_batch` maps characters to token positions through the tokenizer's
``offsets``: token ``n`` belongs to box ``k`` when its character range overlaps the segment's, special tokens never
do. A segment whose tokens were all truncated away is masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from markup2image.data.layouts import LayoutBox, whitespace_token_chars


@dataclass
class LayoutBatch:
    """Layout boxes of a batch.

    boxes: ``[B, K, 4]`` float (x0, y0, x1, y1) as fractions of the image width/height;
    box_mask: ``[B, K]`` bool, True for a real box with at least one markup token;
    segment_mask: ``[B, K, N]`` bool, True where markup token ``n`` belongs to box ``k``'s segment.
    """

    boxes: torch.Tensor
    box_mask: torch.Tensor
    segment_mask: torch.Tensor

    def to(self, device: torch.device | str) -> LayoutBatch:
        return LayoutBatch(self.boxes.to(device), self.box_mask.to(device), self.segment_mask.to(device))


def _pair(box: LayoutBox, key: str) -> tuple[int, int]:
    value = box[key]  # type: ignore[literal-required]
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ValueError(f"layout {key!r} must be two integers [start, end], got {value!r}")
    return value[0], value[1]


def _segment_chars(markup: str, box: LayoutBox) -> tuple[int, int]:
    if "chars" in box:
        return _pair(box, "chars")
    toks = whitespace_token_chars(markup)
    w0, w1 = _pair(box, "span")
    if not 0 <= w0 < w1 <= len(toks):
        raise ValueError(f"layout span {[w0, w1]} is outside the {len(toks)} whitespace tokens of {markup[:60]!r}")
    return toks[w0][0], toks[w1 - 1][1]


@dataclass
class ItemLayout:
    """One item's layout over its own ``n`` token positions: ``boxes [k, 4]`` (fractions), ``box_mask [k]``,
    ``segment_mask [k, n]`` (see :class:`LayoutBatch`)."""

    boxes: torch.Tensor
    box_mask: torch.Tensor
    segment_mask: torch.Tensor


def item_layout(
    layout: Sequence[LayoutBox], markup: str, encoding: Any, image_size: tuple[int, int], max_boxes: int
) -> ItemLayout:
    """The first ``max_boxes`` boxes of one item mapped onto the token positions of ``encoding`` (the
    ``tokenizers.Encoding`` of ``markup``, possibly truncated): token ``n`` belongs to box ``k`` when its character
    range overlaps the segment's; special tokens never do. ``image_size = (height, width)`` in pixels."""
    h, w = image_size
    offsets = torch.tensor(encoding.offsets, dtype=torch.long).reshape(-1, 2)  # (n, 2) characters
    plain = torch.tensor(encoding.special_tokens_mask, dtype=torch.long).reshape(-1) == 0  # (n,)
    chosen = list(layout[:max_boxes])
    boxes = torch.zeros(len(chosen), 4)
    segment_mask = torch.zeros(len(chosen), offsets.shape[0], dtype=torch.bool)
    box_mask = torch.zeros(len(chosen), dtype=torch.bool)
    for k, box in enumerate(chosen):
        c0, c1 = _segment_chars(markup, box)
        x0, y0, x1, y1 = box["box"]
        boxes[k] = torch.tensor([x0 / w, y0 / h, x1 / w, y1 / h], dtype=torch.float32)
        segment_mask[k] = plain & (offsets[:, 0] < c1) & (offsets[:, 1] > c0)
        box_mask[k] = bool(segment_mask[k].any()) and x1 > x0 and y1 > y0
    return ItemLayout(boxes, box_mask, segment_mask)


def stack_layouts(items: Sequence[ItemLayout | None], num_tokens: int) -> LayoutBatch:
    """Per-item layouts (None = no layout) -> a :class:`LayoutBatch` padded to the batch's most boxes (at least
    one, so an all-empty batch still has a ``[B, 1, ...]`` layout with every box off) and to ``num_tokens``."""
    k_size = max(1, max((it.boxes.shape[0] for it in items if it is not None), default=0))
    boxes = torch.zeros(len(items), k_size, 4)
    box_mask = torch.zeros(len(items), k_size, dtype=torch.bool)
    segment_mask = torch.zeros(len(items), k_size, num_tokens, dtype=torch.bool)
    for i, it in enumerate(items):
        if it is None:
            continue
        k, n = it.boxes.shape[0], min(it.segment_mask.shape[1], num_tokens)
        boxes[i, :k] = it.boxes
        segment_mask[i, :k, :n] = it.segment_mask[:, :n]
        box_mask[i, :k] = it.box_mask & segment_mask[i, :k].any(-1)  # a segment truncated away is off
    return LayoutBatch(boxes, box_mask, segment_mask)


def layout_batch(
    layouts: Sequence[Sequence[LayoutBox] | None],
    markups: Sequence[str],
    tokenizer: Any,
    num_tokens: int,
    image_size: tuple[int, int],
    max_boxes: int,
) -> LayoutBatch:
    """Boxes of each item (None or [] = no layout) -> a :class:`LayoutBatch` over ``num_tokens`` token positions.

    ``tokenizer`` is the ``tokenizers.Tokenizer`` that made the ids (``encode(markup)`` must give the same ids,
    truncated to ``num_tokens``); ``image_size = (height, width)`` in pixels. At most ``max_boxes`` per item.
    """
    items = [
        item_layout(layout, markup, tokenizer.encode(markup), image_size, max_boxes) if layout else None
        for layout, markup in zip(layouts, markups, strict=True)
    ]
    return stack_layouts(items, num_tokens)


@dataclass
class HcmaBatch:
    """What a training forward needs for the HCMA loss besides ``y_t`` and the markup: the batch's layouts
    (None: no local term) and the generator of the ``hcma.translate`` offsets."""

    layout: LayoutBatch | None
    generator: torch.Generator | None = None

    def to(self, device: torch.device | str) -> HcmaBatch:
        return HcmaBatch(self.layout.to(device) if self.layout is not None else None, self.generator)
