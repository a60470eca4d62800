"""A tiny on-disk training set in the render + tokenize stages' layout, made without any renderer.

For tests and the process-count benchmark: they need real ``<rendered>/train.jsonl`` + images and
``<tokenized>/train.jsonl`` + ``tokenizer.json`` (what :class:`~markup2image.data.dataset.MarkupImageDataset`
reads), but not real LaTeX. Each item's markup is a short string of symbols and its image draws one black bar per
symbol on white, so equal markup gives equal images and the model has something to learn. ``layouts.jsonl`` gives
each drawn bar's box and its symbol's characters, as the render stage does for real engines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.layouts import LAYOUTS_JSONL, LayoutBox, make_box, whitespace_token_chars
from markup2image.io import atomic_open, save_png, write_jsonl
from markup2image.text.tokenizer import TOKENIZER_FILE, train_bpe

SYMBOLS = ("a", "b", "c", "x", "y", "+", "-", "=", "\\frac", "\\alpha")


def tiny_params_dict(**train: object) -> dict:
    """params.yaml content for the smallest model that runs every training code path (16x32 math images);
    ``train`` overrides keys of the ``train`` section."""
    return {
        "domains": ["math"],
        "domain": {"math": {"height": 16, "width": 32}},
        "model": {
            "block_out_channels": [8, 16],
            "cross_attention_levels": [False, True],
            "norm_num_groups": 4,
            "attention_head_dim": 4,
            "encoder_dim": 16,
            "encoder_layers": 1,
            "encoder_heads": 2,
        },
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, **train},
    }


def _boxes(markup: str, symbols: list[int], image: DomainConfig) -> list[LayoutBox]:
    """The box of each bar :func:`_draw` draws (columns ``x, x + 1``, rows ``1 .. 2 + s``), linked to its symbol."""
    boxes = []
    for i, ((c0, c1), s) in enumerate(zip(whitespace_token_chars(markup), symbols)):
        x = 1 + 3 * i
        if x + 2 > image.width:
            break
        boxes.append(
            make_box(markup, (x, 1, x + 2, min(image.height, 3 + s)), c0, c1, (0, 0), (image.height, image.width))
        )
    return boxes


def _draw(symbols: list[int], image: DomainConfig) -> np.ndarray:
    """Black bars on white: symbol ``s`` at position ``i`` is a bar at column ``3 i`` of height ``2 + s``."""
    arr = np.full((image.height, image.width), 255, dtype=np.uint8)
    for i, s in enumerate(symbols):
        x = 1 + 3 * i
        if x + 2 > image.width:
            break
        arr[1 : min(image.height, 3 + s), x : x + 2] = 0
    return arr if image.channels == 1 else np.repeat(arr[..., None], 3, axis=2)


def write_synthetic_training_set(
    rendered: str | Path, tokenized: str | Path, image: DomainConfig, n: int = 16, seed: int = 0
) -> list[str]:
    """Write ``n`` items (train split only) into ``rendered`` and ``tokenized``; returns their markup."""
    rendered, tokenized = Path(rendered), Path(tokenized)
    rng = np.random.default_rng(seed)
    rows, markups, layouts = [], [], []
    for i in range(n):
        symbols = rng.integers(0, len(SYMBOLS), size=int(rng.integers(2, 7))).tolist()
        markup = " ".join(SYMBOLS[s] for s in symbols)
        item_id = f"{i:05d}"
        save_png(rendered / "images" / f"{item_id}.png", _draw(symbols, image))
        rows.append({"id": item_id, "markup": markup, "image": f"images/{item_id}.png"})
        layouts.append({"id": item_id, "boxes": _boxes(markup, symbols, image)})
        markups.append(markup)
    write_jsonl(rendered / "train.jsonl", rows)
    write_jsonl(rendered / LAYOUTS_JSONL, layouts)
    tok = train_bpe(markups, vocab_size=64, min_frequency=1)
    tokenized.mkdir(parents=True, exist_ok=True)
    with atomic_open(tokenized / TOKENIZER_FILE) as fh:
        fh.write(tok.to_str())
    encs = tok.encode_batch(markups)
    write_jsonl(tokenized / "train.jsonl", ({"id": r["id"], "ids": e.ids} for r, e in zip(rows, encs)))
    return markups
