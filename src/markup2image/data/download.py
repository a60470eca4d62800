"""The download stage: markup corpora with stable ids and ``train/val/test`` splits.

``download_corpus(domain, params, out_dir)`` writes ``out_dir/{train,val,test}.jsonl`` with rows
``{"id": str, "markup": str}`` (atomically) and returns the counts per split. Sources (``params.data.source``):

- ``synthetic``: the seeded generators of :mod:`markup2image.data.generators` (``data.seed``, ``data.*_size``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from markup2image.config import ConfigError, Params
from markup2image.data.generators import SPLITS, synthetic_splits
from markup2image.io import write_jsonl

log = logging.getLogger(__name__)


def split_sizes(params: Params) -> dict[str, int]:
    d = params.data
    return {"train": d.train_size, "val": d.val_size, "test": d.test_size}


def download_corpus(domain: str, params: Params, out_dir: Path) -> dict:
    """Write ``out_dir/{split}.jsonl`` for ``domain``; return ``{"source", "domain", split: count, ...}``."""
    out_dir = Path(out_dir)
    source = params.data.source
    if source == "synthetic":
        splits = synthetic_splits(domain, params.data.seed, split_sizes(params))
    else:
        raise ConfigError(f"data.source: {source!r} is not implemented yet; use 'synthetic'")
    counts = {"domain": domain, "source": source}
    for split in SPLITS:
        counts[split] = write_jsonl(out_dir / f"{split}.jsonl", splits[split])
    log.info("download %s (%s): %s -> %s", domain, source, {s: counts[s] for s in SPLITS}, out_dir)
    return counts
