"""The on-disk training set: rendered images joined with their token ids.

Layout (written by the render and tokenize stages):
``<rendered>/<split>.jsonl`` rows ``{"id", "markup", "image"}`` (image path relative to ``<rendered>``) and
``<tokenized>/<split>.jsonl`` rows ``{"id", "ids"}``; with ``layouts=True`` also ``<rendered>/layouts.jsonl``
(:func:`markup2image.data.layouts.load_layouts`) and ``<tokenized>/tokenizer.json``.

Layouts (HCMA, design §8): each box names its markup segment by characters; the tokenizer's character offsets map
it onto the item's token ids (:func:`markup2image.data.layout_tensors.item_layout`). An item without a layout, or whose
stored ids are not what the tokenizer gives for its markup (then the offsets would not belong to those ids), gets
no boxes.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from markup2image.data.layout_tensors import item_layout, stack_layouts
from markup2image.data.layouts import load_layouts
from markup2image.io import CorruptFileError, load_image, png_complete, read_jsonl
from markup2image.text.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def check_images(root: Path, images: list[str], listed_in: str) -> None:
    """Raise :class:`CorruptFileError` naming the missing or truncated PNGs among ``images`` (paths under
    ``root``) before any training or sampling starts. Reads 12 bytes per file."""
    bad = [name for name in images if not png_complete(root / name)]
    if bad:
        few = ", ".join(str(root / b) for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise CorruptFileError(
            f"{len(bad)} image(s) listed in {listed_in} are missing or truncated ({few}); run `dvc repro` "
            "(the render stage redoes exactly those) or the render stage by hand"
        )


def markup_key(markup: str) -> int:
    """A stable integer per markup string (equal markup -> equal key), used to pick negatives."""
    return zlib.crc32(" ".join(markup.split()).encode())


class MarkupImageDataset(torch.utils.data.Dataset):
    """Items ``(image [C, H, W] float in [-1, 1], ids [N] int64, markup_key int)``; with ``layouts=True`` a fourth
    element, the item's :class:`~markup2image.models.hcma.ItemLayout` over its ``N`` ids (None: no boxes), at most
    ``max_boxes`` boxes."""

    def __init__(
        self,
        rendered_dir: str | Path,
        tokenized_dir: str | Path,
        split: str,
        channels: int,
        *,
        layouts: bool = False,
        max_boxes: int = 32,
    ) -> None:
        self.root = Path(rendered_dir)
        self.channels = channels
        self.max_boxes = max_boxes
        rows = read_jsonl(self.root / f"{split}.jsonl")
        ids = {r["id"]: r["ids"] for r in read_jsonl(Path(tokenized_dir) / f"{split}.jsonl")}
        missing = [r["id"] for r in rows if r["id"] not in ids]
        if missing:
            raise ValueError(
                f"{tokenized_dir}/{split}.jsonl: {len(missing)} rendered item(s) have no token ids "
                f"(e.g. {missing[:3]}); rerun the tokenize stage"
            )
        check_images(self.root, [r["image"] for r in rows], f"{self.root}/{split}.jsonl")
        self.rows = rows
        self.token_ids = [ids[r["id"]] for r in rows]
        self.layouts: dict[str, list] | None = None
        self._tokenizer: Any = None
        self._item_layouts: dict[int, Any] = {}  # item index -> ItemLayout or None, built on first use
        if layouts:
            self.layouts = load_layouts(self.root)
            self._tokenizer = load_tokenizer(tokenized_dir)
            with_layout = sum(r["id"] in self.layouts for r in rows)
            log.info("%s/%s: %d of %d items have a layout", rendered_dir, split, with_layout, len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> np.ndarray:
        return load_image(self.root / self.rows[i]["image"], self.channels)

    def layout(self, i: int, image_size: tuple[int, int]) -> Any:
        """Item ``i``'s :class:`~markup2image.models.hcma.ItemLayout` (None: no boxes); ``image_size = (H, W)``.

        Built once per item (tokenizing the markup for its character offsets) and reused every epoch."""
        if i not in self._item_layouts:
            self._item_layouts[i] = self._build_layout(i, image_size)
        return self._item_layouts[i]

    def _build_layout(self, i: int, image_size: tuple[int, int]) -> Any:

        row = self.rows[i]
        boxes = self.layouts.get(row["id"]) if self.layouts is not None else None
        if not boxes:
            return None
        enc = self._tokenizer.encode(row["markup"])
        if enc.ids != self.token_ids[i]:
            log.warning("%s: stored token ids differ from the tokenizer's; its layout is not used", row["id"])
            return None
        return item_layout(boxes, row["markup"], enc, image_size, self.max_boxes)

    def __getitem__(self, i: int) -> tuple:
        arr = self.image(i)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
        img = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
        item = (img, torch.tensor(self.token_ids[i], dtype=torch.long), markup_key(self.rows[i]["markup"]))
        if self.layouts is None:
            return item
        return (*item, self.layout(i, (arr.shape[1], arr.shape[2])))


def collate(items: list[tuple], pad_id: int = 0) -> dict[str, Any]:
    """Stack images; pad token ids to the longest item; mask ``[B, N]``; items with a layout (4-tuples) also give
    ``layout``, a :class:`~markup2image.data.layout_tensors.LayoutBatch` over the same ``N`` positions."""
    images = torch.stack([it[0] for it in items])
    n = max(len(it[1]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it[1])] = it[1]
        mask[i, : len(it[1])] = 1
    keys = torch.tensor([it[2] for it in items], dtype=torch.long)
    out: dict[str, Any] = {"images": images, "input_ids": ids, "attention_mask": mask, "markup_keys": keys}
    if len(items[0]) > 3:
        out["layout"] = stack_layouts([it[3] for it in items], n)
    return out
