"""The on-disk training set: rendered images joined with their token ids.

Layout (written by the render and tokenize stages):
``<rendered>/<split>.jsonl`` rows ``{"id", "markup", "image"}`` (image path relative to ``<rendered>``) and
``<tokenized>/<split>.jsonl`` rows ``{"id", "ids"}``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from markup2image.io import load_image, read_jsonl


def markup_key(markup: str) -> int:
    """A stable integer per markup string (equal markup -> equal key), used to pick negatives."""
    return zlib.crc32(" ".join(markup.split()).encode())


class MarkupImageDataset(torch.utils.data.Dataset):
    """Items ``(image [C, H, W] float in [-1, 1], ids [N] int64, markup_key int)``."""

    def __init__(self, rendered_dir: str | Path, tokenized_dir: str | Path, split: str, channels: int) -> None:
        self.root = Path(rendered_dir)
        self.channels = channels
        rows = read_jsonl(self.root / f"{split}.jsonl")
        ids = {r["id"]: r["ids"] for r in read_jsonl(Path(tokenized_dir) / f"{split}.jsonl")}
        missing = [r["id"] for r in rows if r["id"] not in ids]
        if missing:
            raise ValueError(
                f"{tokenized_dir}/{split}.jsonl: {len(missing)} rendered item(s) have no token ids "
                f"(e.g. {missing[:3]}); rerun the tokenize stage"
            )
        self.rows = rows
        self.token_ids = [ids[r["id"]] for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> np.ndarray:
        return load_image(self.root / self.rows[i]["image"], self.channels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        arr = self.image(i)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
        img = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
        return img, torch.tensor(self.token_ids[i], dtype=torch.long), markup_key(self.rows[i]["markup"])


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack images; pad token ids to the longest item; mask ``[B, N]``."""
    images = torch.stack([it[0] for it in items])
    n = max(len(it[1]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it[1])] = it[1]
        mask[i, : len(it[1])] = 1
    keys = torch.tensor([it[2] for it in items], dtype=torch.long)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "markup_keys": keys}
