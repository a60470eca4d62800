"""Real renderers: LaTeX + dvipng, WeasyPrint, LilyPond, RDKit; placement, scale and reject reasons."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from markup2image.config import Params, RenderConfig
from markup2image.data.render import render_corpus
from markup2image.data.renderers import MARGIN, RenderError, render_batch, render_markup
from markup2image.io import write_jsonl

PARAMS = Params()
LATEX = dataclasses.replace(PARAMS.domain_config("math"), engine="latex")
TABLES = PARAMS.domain_config("tables")
MUSIC = PARAMS.domain_config("music")
MOLECULES = PARAMS.domain_config("molecules")

HAVE_LATEX = bool(shutil.which("latex") and shutil.which("dvipng"))
IN_CI = os.environ.get("CI", "").lower() == "true"  # CI installs the tools: there a missing one fails
latex_only = pytest.mark.skipif(
    not HAVE_LATEX and not IN_CI, reason="TeX Live not installed (apt-get install texlive-latex-base dvipng)"
)
lilypond_only = pytest.mark.skipif(
    not shutil.which("lilypond") and not IN_CI, reason="LilyPond not installed (apt-get install lilypond)"
)


def ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    dark = image if image.ndim == 2 else image.min(axis=-1)
    rows = np.flatnonzero((dark < 250).any(axis=1))
    cols = np.flatnonzero((dark < 250).any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def by_id(domain: str, items: list[tuple[str, str]], cfg, timeout: float = 120.0) -> dict:
    return {r.id: r for r in render_batch(domain, items, cfg, timeout)}


def hide_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


# ----------------------------------------------------------------------------------------------------------------
# math: latex + dvipng


@pytest.mark.latex
@latex_only
def test_latex_renders_at_im2latex_scale_top_left() -> None:
    image = render_markup("math", r"( x )", LATEX)
    assert image.shape == (64, 320) and image.dtype == np.uint8
    top, left, bottom, right = ink_box(image)
    assert (top, left) == (MARGIN, MARGIN)
    dark_rows = np.flatnonzero((image < 128).any(axis=1))
    assert 14 <= dark_rows[-1] + 1 - dark_rows[0] <= 16  # a 12 pt parenthesis is 15 px tall in the im2latex golds
    assert image.min() < 30 and (image[bottom:] == 255).all()


@pytest.mark.latex
@latex_only
def test_latex_batch_keeps_neighbours_of_bad_formulas() -> None:
    items = [
        ("ok1", r"\frac { a } { b }"),
        ("runaway", r"\frac { a"),  # swallows the rest of the document unless isolated
        ("ok2", r"x ^ { 2 }"),
        ("undefined", r"\notacommand x"),
        ("ok3", r"\sum _ { i = 1 } ^ { n } i"),
        ("wide", " + ".join(["a b c d e f"] * 30)),
        ("blank", r"\,"),
        ("nothing", "  "),
        ("file", r"\input { /etc/hostname }"),
    ]
    results = by_id("math", items, LATEX)
    assert [k for k, r in results.items() if r.ok] == ["ok1", "ok2", "ok3"]
    assert results["runaway"].reason == "parse_error"
    assert results["undefined"].reason == "parse_error" and "Undefined control sequence" in results["undefined"].detail
    assert results["wide"].reason == "overflow"
    assert results["blank"].reason == "empty" and results["nothing"].reason == "empty"
    assert results["file"].reason == "parse_error"  # TeX may not read outside its work folder
    # the same formula renders identically alone and inside a batch
    assert np.array_equal(results["ok2"].image, render_markup("math", r"x ^ { 2 }", LATEX))


def test_missing_latex_names_the_debian_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_tools(monkeypatch, tmp_path)
    with pytest.raises(RenderError) as info:
        render_markup("math", "x", LATEX)
    assert info.value.reason == "renderer_missing"
    assert "texlive-latex-base dvipng" in info.value.detail


# ----------------------------------------------------------------------------------------------------------------
# tables: weasyprint + pypdfium2


def test_weasyprint_table_has_borders_at_top_left() -> None:
    image = render_markup(
        "tables", '<table border="1"><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>', TABLES
    )
    assert image.shape == (64, 64)
    top, left, bottom, right = ink_box(image)
    assert (top, left) == (MARGIN, MARGIN) and bottom < 64 and right < 64
    assert (image[top, left:right] < 128).mean() > 0.9  # the table's top border is a dark line


def test_weasyprint_rejects_and_keeps_neighbours() -> None:
    items = [
        ("ok1", "<table><tr><td>1</td></tr></table>"),
        ("unclosed", "<table><tr><td>1</td>"),
        ("stray", "<table><tr><td>1</b></td></tr></table>"),
        ("script", "<table><tr><td><script>alert(1)</script></td></tr></table>"),
        ("big", '<table border="1">' + "<tr><td>long words here</td><td>and more</td></tr>" * 12 + "</table>"),
        ("spill", "<table><tr><td>" + "x<br>" * 300 + "</td></tr></table>"),  # more than one page
        ("blank", "<table><tr><td></td></tr></table>"),
        ("ok2", "<table><tr><td><b>2</b></td></tr></table>"),
    ]
    results = by_id("tables", items, TABLES)
    assert results["ok1"].ok and results["ok2"].ok
    assert {k: r.reason for k, r in results.items() if not r.ok} == {
        "unclosed": "parse_error", "stray": "parse_error", "script": "parse_error",
        "big": "overflow", "spill": "overflow", "blank": "empty",
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# music: lilypond


@pytest.mark.slow
@pytest.mark.lilypond
@lilypond_only
def test_lilypond_batch_renders_and_rejects_per_snippet() -> None:
    items = [
        ("ok1", r"\relative c'' { \time 4/4 c4 d e f | g1 \bar " + '"|." }'),
        ("unknown", r"\relative c'' { c4 \notacommand d }"),
        ("ok2", r"\relative c'' { \key g \major \time 3/4 g4 a b | c2. }"),
        ("unbalanced", r"\relative c'' { c4 d { e }"),
        ("scheme", r"\relative c'' { #(system " + '"true"' + ") c4 }"),
        ("long", r"\relative c'' { " + "c4 d e f | " * 60 + "}"),
        ("nothing", ""),
    ]
    results = by_id("music", items, MUSIC, timeout=300)
    for key in ("ok1", "ok2"):
        image = results[key].image
        assert image is not None and image.shape == (192, 448)
        top, left, _, _ = ink_box(image)
        assert (top, left) == (MARGIN, MARGIN)
        assert (image < 128).sum() > 500  # staff lines and notes
    assert {k: r.reason for k, r in results.items() if not r.ok} == {
        "unknown": "parse_error", "unbalanced": "parse_error", "scheme": "parse_error",
        "long": "overflow", "nothing": "empty",
    }  # fmt: skip
    assert "notacommand" in results["unknown"].detail


def test_missing_lilypond_names_the_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_tools(monkeypatch, tmp_path)
    (result,) = render_batch("music", [("x", r"\relative c'' { c4 }")], MUSIC, 10)
    assert result.reason == "renderer_missing" and "apt-get install lilypond" in result.detail


# ----------------------------------------------------------------------------------------------------------------
# molecules: rdkit


def test_rdkit_draws_nci_molecules_in_colour_at_one_scale() -> None:
    from markup2image.data.generators.molecules import nci_smiles

    smiles = nci_smiles()[:20]
    results = render_batch("molecules", list(enumerate(smiles)), MOLECULES, 30)  # type: ignore[arg-type]
    drawn = [r.image for r in results if r.ok]
    assert len(drawn) >= 15
    for image in drawn:
        assert image.shape == (128, 128, 3)
        assert ink_box(image)[:2] == (MARGIN, MARGIN)
    ethanol = render_markup("molecules", "CCO", MOLECULES)
    red = (ethanol[..., 0] > 180) & (ethanol[..., 1] < 80) & (ethanol[..., 2] < 80)
    assert red.any()  # the O label is drawn in RDKit's standard red
    # one scale: a longer chain is wider, not squeezed
    assert (
        ink_box(render_markup("molecules", "CCCCCC", MOLECULES))[3]
        > ink_box(render_markup("molecules", "CCC", MOLECULES))[3]
    )


def test_rdkit_reject_reasons() -> None:
    items = [
        ("bad", "C1CC"),
        ("words", "not a smiles"),
        ("valence", "C(C)(C)(C)(C)C"),
        ("huge", "C" * 80),
        ("blank", ""),
    ]
    results = by_id("molecules", items, MOLECULES)
    assert {k: r.reason for k, r in results.items()} == {
        "bad": "parse_error", "words": "parse_error", "valence": "parse_error", "huge": "overflow", "blank": "empty"
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the render stage end to end on broken corpora, per domain


BROKEN = {
    "tables": [("t-ok", "<table><tr><td>1</td></tr></table>"), ("t-bad", "<table><tr>"), ("t-empty", "")],
    "molecules": [("m-ok", "c1ccccc1O"), ("m-bad", "c1cccc"), ("m-empty", "")],
    "math": [("x-ok", r"\alpha + 1"), ("x-bad", r"\frac {"), ("x-wide", " + ".join(["a b c"] * 60))],
}
if HAVE_LATEX:
    BROKEN["math-latex"] = [("l-ok", r"\alpha + 1"), ("l-bad", r"\frac {"), ("l-wide", " + ".join(["a b c"] * 60))]
if shutil.which("lilypond"):
    BROKEN["music"] = [
        ("s-ok", r"\relative c'' { c4 d e f }"),
        ("s-bad", r"\relative c'' { c4 \nope }"),
        ("s-empty", ""),
    ]


@pytest.mark.parametrize("domain", sorted(BROKEN))
def test_render_corpus_counts_add_up_per_domain(tmp_path: Path, domain: str) -> None:
    rows = BROKEN[domain]
    params = PARAMS
    if domain == "math-latex":
        domain = "math"
        params = dataclasses.replace(PARAMS, domain={**PARAMS.domain, "math": LATEX})
    write_jsonl(tmp_path / "raw" / "train.jsonl", [{"id": i, "markup": m} for i, m in rows[:2]])
    write_jsonl(tmp_path / "raw" / "val.jsonl", [{"id": i, "markup": m} for i, m in rows[2:]])
    write_jsonl(tmp_path / "raw" / "test.jsonl", [])
    params = dataclasses.replace(params, render=RenderConfig(workers=2, timeout=120, batch_size=2))
    report = render_corpus(params, domain, tmp_path / "raw", tmp_path / "out", progress=False)
    assert report["total"] == 3 == report["rendered"] + report["rejected"]
    assert report["rendered"] == 1
    assert (tmp_path / "out" / "images" / f"{rows[0][0]}.png").exists()


def test_render_stage_fails_early_with_one_line_when_the_tool_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for split in ("train", "val", "test"):
        write_jsonl(tmp_path / "raw" / f"{split}.jsonl", [{"id": f"{split}1", "markup": "x"}])
    hide_tools(monkeypatch, tmp_path)
    params = dataclasses.replace(PARAMS, domain={**PARAMS.domain, "math": LATEX})
    with pytest.raises(RuntimeError, match=r"apt-get install texlive-latex-base dvipng.*mathtext"):
        render_corpus(params, "math", tmp_path / "raw", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "images").exists() or not any((tmp_path / "out" / "images").iterdir())
