"""Synthetic corpora: deterministic, stable ids, disjoint splits, im2latex-like variety."""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from markup2image.data.generators import markup_id, synthetic_splits

SIZES = {"train": 200, "val": 30, "test": 30}


def test_same_seed_same_corpus_and_other_seed_differs() -> None:
    a = synthetic_splits("math", 7, SIZES)
    b = synthetic_splits("math", 7, SIZES)
    c = synthetic_splits("math", 8, SIZES)
    assert a == b
    assert [r["markup"] for r in a["train"]] != [r["markup"] for r in c["train"]]


def test_ids_are_stable_short_hashes_and_unique() -> None:
    splits = synthetic_splits("math", 0, SIZES)
    rows = [r for split in splits.values() for r in split]
    assert all(re.fullmatch(r"[0-9a-f]{10}", r["id"]) for r in rows)
    assert all(r["id"] == markup_id("math", r["markup"]) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_splits_have_requested_sizes_and_are_disjoint() -> None:
    splits = synthetic_splits("math", 0, SIZES)
    assert {s: len(rows) for s, rows in splits.items()} == SIZES
    markups = [{r["markup"] for r in splits[s]} for s in ("train", "val", "test")]
    assert not (markups[0] & markups[1]) and not (markups[0] & markups[2]) and not (markups[1] & markups[2])


def test_test_split_does_not_depend_on_train_size() -> None:
    small = synthetic_splits("math", 3, {"train": 10, "val": 5, "test": 20})
    big = synthetic_splits("math", 3, {"train": 300, "val": 5, "test": 20})
    assert small["test"] == big["test"]
    assert small["val"] == big["val"]


def test_formulas_are_im2latex_tokenized_and_varied() -> None:
    rows = synthetic_splits("math", 0, {"train": 400, "val": 0, "test": 0})["train"]
    tokens = Counter()
    lengths = []
    for r in rows:
        toks = r["markup"].split(" ")
        assert "" not in toks, f"double space in {r['markup']!r}"
        assert toks.count("{") == toks.count("}"), f"unbalanced braces in {r['markup']!r}"
        tokens.update(toks)
        lengths.append(len(toks))
    for needed in ["\\frac", "_", "^", "\\sqrt", "\\sum", "\\int", "\\alpha", "\\left(", "\\hat", "=", "+"]:
        assert tokens[needed] > 0, f"the generator never produced {needed}"
    assert len(tokens) > 100
    # short to medium, like the bulk of im2latex-100k
    assert 10 <= statistics.median(lengths) <= 60
    assert max(lengths) < 250


def test_unknown_domain_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="math"):
        synthetic_splits("poetry", 0, SIZES)
