"""The download stage: markup corpora with stable ids and ``train/val/test`` splits.

``download_corpus(params, domain, out_dir)`` writes ``out_dir/{train,val,test}.jsonl`` with rows
``{"id": str, "markup": str}`` (atomically) and returns the counts. Sources (``params.data.source``):

- ``synthetic``: the seeded generators of :mod:`markup2image.data.generators` (``data.seed``, ``data.*_size``).
- ``hub``: ``datasets.load_dataset(data.hub_ids[domain])`` — a hub id such as ``yuntian-deng/im2latex-100k`` or a
  local folder of ``{train,val,test}.parquet`` with the same schema. The markup column is ``formula`` / ``html`` /
  ``source`` / ``smiles``; ids come from ``filename`` (without extension) when present. Images in an ``image``
  column are kept as gold: ``out_dir/gold/<id>.png``, which the render stage uses instead of rendering.
  The first ``data.*_size`` rows of each split are taken (a negative size takes them all).
- ``file``: a JSONL or CSV file ``data.files[domain]`` with a markup column (``markup`` or the domain's hub column
  name), and optional ``id`` and ``split`` columns. Without ``split`` the rows are shuffled with ``data.seed`` and cut
  into ``test_size``, ``val_size`` and up to ``train_size`` rows (negative: all the rest).

Ids are unique across splits; a repeated id keeps its first row and the drop is logged.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from markup2image.config import ConfigError, Params
from markup2image.data.generators import SPLITS, markup_id, synthetic_splits
from markup2image.io import save_png, write_jsonl

log = logging.getLogger(__name__)

MARKUP_COLUMNS = {"math": "formula", "tables": "html", "music": "source", "molecules": "smiles"}
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}


def split_sizes(params: Params) -> dict[str, int]:
    d = params.data
    return {"train": d.train_size, "val": d.val_size, "test": d.test_size}


def grammar_of(params: Params) -> dict[str, int | str]:
    """The synthetic generators' difficulty keys (``data.max_depth``, ``data.max_terms``, ``data.symbols``)."""
    d = params.data
    return {"max_depth": d.max_depth, "max_terms": d.max_terms, "symbols": d.symbols}


def download_corpus(params: Params, domain: str, out_dir: Path) -> dict:
    """Write ``out_dir/{split}.jsonl`` (and ``gold/`` for hub images) for ``domain``; return the counts."""
    out_dir = Path(out_dir)
    source = params.data.source
    gold = 0
    if source == "synthetic":
        splits = synthetic_splits(domain, params.data.seed, split_sizes(params), grammar_of(params))
    elif source == "hub":
        splits, gold = _hub_splits(domain, params, out_dir)
    elif source == "file":
        splits = _file_splits(domain, params)
    else:  # the typed loader already refuses this; kept for direct callers
        raise ConfigError(f"data.source: {source!r} is not one of synthetic, hub, file")
    counts: dict[str, Any] = {"domain": domain, "source": source}
    for split in SPLITS:
        counts[split] = write_jsonl(out_dir / f"{split}.jsonl", splits.get(split, []))
    counts["gold"] = gold
    log.info(
        "download %s (%s): %s, %d gold images -> %s", domain, source, {s: counts[s] for s in SPLITS}, gold, out_dir
    )
    return counts


def _unique(domain: str, rows: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """(split, row) pairs -> rows per split with ids unique across splits (first one wins)."""
    seen: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    dropped = 0
    for split, row in rows:
        if row["id"] in seen:
            dropped += 1
            continue
        seen.add(row["id"])
        out[split].append(row)
    if dropped:
        log.warning("download %s: %d row(s) repeat an id already taken and were dropped", domain, dropped)
    return out


# ----------------------------------------------------------------------------------------------------------------
# hub


def _hub_splits(domain: str, params: Params, out_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], int]:
    hub_id = params.data.hub_ids.get(domain)
    if not hub_id:
        raise ConfigError(f"data.hub_ids.{domain}: no dataset id for domain {domain!r}; add one or use data.source")
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing files: one clear line
        raise RuntimeError(
            f"data.hub_ids.{domain}: cannot load {hub_id!r} with datasets.load_dataset ({type(exc).__name__}: "
            f"{exc}); check the id and the network, or set data.source: synthetic"
        ) from exc
    column = MARKUP_COLUMNS[domain]
    sizes = split_sizes(params)
    channels = params.domain_config(domain).channels
    gold_dir = out_dir / "gold"
    gold = 0
    taken: set[str] = set()

    def rows() -> Iterable[tuple[str, dict[str, Any]]]:
        nonlocal gold
        for hub_split, table in dataset.items():
            split = SPLIT_ALIASES.get(hub_split)
            if split is None:
                log.info("download %s: ignoring hub split %r", domain, hub_split)
                continue
            if column not in table.column_names:
                raise ValueError(f"{hub_id} [{hub_split}]: no {column!r} column (has {table.column_names})")
            n = len(table) if sizes[split] < 0 else min(sizes[split], len(table))
            for record in tqdm(table.select(range(n)), desc=f"download {domain} {split}", unit="row"):
                markup = str(record[column])
                item_id = Path(str(record["filename"])).stem if record.get("filename") else markup_id(domain, markup)
                image = record.get("image")
                if item_id in taken:  # _unique drops it; its image must not overwrite the first one's gold
                    yield split, {"id": item_id, "markup": markup}
                    continue
                taken.add(item_id)
                if image is not None:
                    save_png(gold_dir / f"{item_id}.png", _to_array(image, channels))
                    gold += 1
                yield split, {"id": item_id, "markup": markup}

    splits = _unique(domain, rows())
    return splits, gold


def _to_array(image: Any, channels: int) -> np.ndarray:
    """A PIL image (datasets' Image feature) -> uint8 [H,W] or [H,W,3], transparency composited on white."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# file


def _read_table(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open() as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    raise ConfigError(f"data.files: {path} is neither .jsonl nor .csv")


def _file_splits(domain: str, params: Params) -> dict[str, list[dict[str, Any]]]:
    name = params.data.files.get(domain)
    if not name:
        raise ConfigError(f"data.files.{domain}: no file for domain {domain!r}; give a JSONL/CSV path")
    path = Path(name)
    if not path.exists():
        raise ConfigError(f"data.files.{domain}: {path} does not exist")
    records = _read_table(path)
    column = next((c for c in ("markup", MARKUP_COLUMNS[domain]) if records and c in records[0]), None)
    if column is None:
        raise ValueError(f"{path}: needs a 'markup' or {MARKUP_COLUMNS[domain]!r} column")
    rows = []
    for i, rec in enumerate(records, 1):
        markup = str(rec.get(column) or "")
        item_id = str(rec.get("id") or markup_id(domain, markup))
        split = rec.get("split")
        if split is not None and SPLIT_ALIASES.get(str(split)) is None:
            raise ValueError(f"{path}:{i}: split {split!r} is not one of train, val, test")
        rows.append((SPLIT_ALIASES[str(split)] if split is not None else None, {"id": item_id, "markup": markup}))
    if all(split is not None for split, _ in rows):
        return _unique(domain, rows)  # type: ignore[arg-type]
    if any(split is not None for split, _ in rows):
        raise ValueError(f"{path}: some rows have a split and some do not; give every row one or none")
    return _unique(domain, _assign_splits([r for _, r in rows], params))


def _assign_splits(rows: list[dict[str, Any]], params: Params) -> list[tuple[str, dict[str, Any]]]:
    order = list(range(len(rows)))
    random.Random(params.data.seed).shuffle(order)
    sizes = split_sizes(params)
    n_test, n_val = max(sizes["test"], 0), max(sizes["val"], 0)
    n_train = len(order) - n_test - n_val if sizes["train"] < 0 else sizes["train"]
    out = []
    for k, idx in enumerate(order):
        split = "test" if k < n_test else "val" if k < n_test + n_val else "train"
        if split == "train" and k >= n_test + n_val + n_train:
            break
        out.append((split, rows[idx]))
    return out
