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


@pytest.mark.parametrize("domain", ["tables", "music", "molecules"])
def test_other_domains_are_deterministic_with_stable_ids(domain: str) -> None:
    sizes = {"train": 40, "val": 5, "test": 5}
    a = synthetic_splits(domain, 1, sizes)
    assert a == synthetic_splits(domain, 1, sizes)
    rows = [r for split in a.values() for r in split]
    assert len({r["id"] for r in rows}) == len({r["markup"] for r in rows}) == 50
    assert all(r["id"] == markup_id(domain, r["markup"]) for r in rows)


def test_tables_are_balanced_html_with_spans_headers_and_styles() -> None:
    from markup2image.data.renderers.tables_weasyprint import check_html

    rows = synthetic_splits("tables", 0, {"train": 300, "val": 0, "test": 0})["train"]
    text = " ".join(r["markup"] for r in rows)
    for needed in ("<th>", "colspan=", "rowspan=", "<b>", "<i>", 'border="1"', "cellpadding="):
        assert needed in text, needed
    for r in rows:
        check_html(r["markup"])  # raises on unbalanced tags
        assert r["markup"].startswith("<table") and r["markup"].endswith("</table>")


def test_music_bars_fill_their_time_signature() -> None:
    from markup2image.data.generators.music import DURATIONS

    rows = synthetic_splits("music", 0, {"train": 200, "val": 0, "test": 0})["train"]
    tokens = Counter(t for r in rows for t in r["markup"].split())
    assert tokens["~"] > 0 and tokens["\\key"] > 0 and any(t.startswith("r") for t in tokens)
    assert any("is" in t for t in tokens) and any(t.endswith("(") for t in tokens)
    for r in rows:
        toks = r["markup"].split()
        assert toks[:3] == ["\\relative", "c''", "{"] and toks[-1] == "}"
        num, den = map(int, toks[toks.index("\\time") + 1].split("/"))
        body = " ".join(toks[toks.index("\\time") + 2 : -1]).replace('\\bar "|."', "|")
        duration = "4"
        for bar in body.split("|")[:-1]:
            total = 0
            for tok in bar.split():
                if tok == "~":
                    continue
                m = re.fullmatch(r"([a-gr](?:is|es|s)?[',]*)(\d+\.?)?[()]?", tok)
                assert m, f"unexpected token {tok!r} in {r['markup']!r}"
                duration = m.group(2) or duration
                total += DURATIONS[duration]
            assert total == 16 * num // den, f"bar {bar!r} of {r['markup']!r}"


def test_molecules_are_valid_smiles() -> None:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    rows = synthetic_splits("molecules", 0, {"train": 50, "val": 0, "test": 0})["train"]
    assert all(Chem.MolFromSmiles(r["markup"]) is not None for r in rows)


def test_grammar_keys_make_shorter_shallower_math_and_still_cover_the_basics() -> None:
    easy = [
        r["markup"] for r in synthetic_splits("math", 0, {"train": 400}, {"max_depth": 1, "max_terms": 3})["train"]
    ]
    full = [r["markup"] for r in synthetic_splits("math", 0, {"train": 400})["train"]]
    assert statistics.mean(len(m.split()) for m in easy) < 0.8 * statistics.mean(len(m.split()) for m in full)
    tokens = Counter(t for m in easy for t in m.split())
    for needed in ("\\frac", "\\sqrt", "_", "^", "=", "+", "-", "\\sin", "\\alpha"):
        assert any(t == needed or t.startswith(needed) for t in tokens), needed
    assert any(t.isdigit() for t in tokens) and any(t.isalpha() and len(t) == 1 for t in tokens)
    # a fraction never holds another one at depth 1: every \frac's braces close before the next \frac opens
    for m in easy:
        depth = 0
        for t in m.split():
            depth += t.count("{") - t.count("\\{") - t.count("}") + t.count("\\}")
            assert not (t == "\\frac" and depth != 0), m


def test_grammar_keys_are_ignored_by_fixed_grammars() -> None:
    assert synthetic_splits("tables", 0, {"train": 5}, {"max_depth": 0, "max_terms": 1}) == synthetic_splits(
        "tables", 0, {"train": 5}
    )


def test_basic_symbols_keep_to_the_school_alphabet() -> None:
    from markup2image.data.generators.math import BASIC

    grammar = {"max_depth": 1, "max_terms": 2, "symbols": "basic"}
    rows = synthetic_splits("math", 0, {"train": 300}, grammar)["train"]
    allowed = set(BASIC.latin + BASIC.greek + BASIC.binary + BASIC.relations + BASIC.functions)
    allowed |= set("0123456789") | {"{", "}", "_", "^", "\\frac", "\\sqrt", "(", ")", "\\left(", "\\right)"}
    allowed |= {",", ".", "\\prime", "[", "]"}
    tokens = Counter(t for r in rows for t in r["markup"].split())
    assert set(tokens) <= allowed, set(tokens) - allowed
    for needed in ("\\frac", "\\sqrt", "_", "^", "=", "+", "\\sin", "\\alpha", "2"):
        assert tokens[needed] > 0, needed
    with pytest.raises(ValueError, match="data.symbols"):
        synthetic_splits("math", 0, {"train": 1}, {"symbols": "emoji"})
