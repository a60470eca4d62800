"""Layouts from the renderers: boxes hold their segment's ink, map to the right markup tokens, survive the render
stage (files, counts, resume)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from markup2image.config import Params, RenderConfig
from markup2image.data import layouts as L
from markup2image.data import render as render_mod
from markup2image.data.renderers import get_engine, render_batch
from markup2image.data.renderers.base import place_top_left_with_offset
from markup2image.data.renderers.molecules_rdkit import smiles_atom_chars
from markup2image.data.renderers.tables_weasyprint import html_cell_chars
from markup2image.io import write_jsonl

MATH = Params().domain_config("math")
MOLECULES = Params().domain_config("molecules")
TABLES = Params().domain_config("tables")


def box_mask(shape: tuple[int, ...], boxes: list[L.LayoutBox]) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=bool)
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        mask[y0:y1, x0:x1] = True
    return mask


def math_layout(markup: str) -> tuple[np.ndarray, list[L.LayoutBox]]:
    return get_engine("math", "mathtext").render_with_layout(markup, MATH)


# ----------------------------------------------------------------------------------------------------------------
# math


def test_x_plus_y_has_one_box_per_glyph_holding_all_the_ink() -> None:
    image, boxes = math_layout("x + y")
    assert np.array_equal(image, get_engine("math", "mathtext").render("x + y", MATH))  # same pixels as render()
    assert [(b["text"], b["span"], b["chars"]) for b in boxes] == [
        ("x", [0, 1], [0, 1]), ("+", [1, 2], [2, 3]), ("y", [2, 3], [4, 5])
    ]  # fmt: skip
    ink = image < 150
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        assert ink[y0:y1, x0:x1].sum() >= 10, b  # each glyph box holds that glyph's ink
    assert (ink & ~box_mask(image.shape, boxes)).sum() == 0  # no ink outside the boxes
    assert boxes[0]["box"][2] <= boxes[1]["box"][0] and boxes[1]["box"][2] <= boxes[2]["box"][0]  # left to right


def test_structures_map_to_the_token_that_draws_them() -> None:
    markup = r"\frac { a } { b } = \sqrt { y } \sin x _ { i }"
    image, boxes = math_layout(markup)
    by_text = {b["text"]: b for b in boxes}
    assert set(by_text) == {r"\frac", "a", "b", "=", r"\sqrt", "y", r"\sin", "x", "i"}  # braces, _ draw nothing
    assert (image < 250).sum() == ((image < 250) & box_mask(image.shape, boxes)).sum()  # even the faint fringe
    bar = by_text[r"\frac"]["box"]
    assert bar[3] - bar[1] <= 2 and bar[2] - bar[0] >= 8  # the fraction bar is a thin rule
    assert by_text["a"]["box"][3] <= bar[1] + 1 and by_text["b"]["box"][1] >= bar[3] - 1  # numerator above
    sqrt, y = by_text[r"\sqrt"]["box"], by_text["y"]["box"]
    assert sqrt[0] < y[0] and sqrt[1] < y[1]  # radical sign left of and overbar above the radicand
    sin = by_text[r"\sin"]["box"]
    assert sin[2] - sin[0] > 2 * (y[2] - y[0])  # three letters wide
    assert by_text["i"]["box"][3] > by_text["x"]["box"][3]  # the subscript hangs lower
    assert markup.split()[by_text["i"]["span"][0]] == "i" and by_text["i"]["span"] == [16, 17]


# ----------------------------------------------------------------------------------------------------------------
# molecules


def _bond_pixels(svg: str, shape: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """Pixels within 2 px of any bond stroke of an RDKit SVG (bond halves take their atom's colour too)."""
    near = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for d in re.findall(r"<path class='bond-[^']*' d='([^']*)'", svg):
        pts = np.array([float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]).reshape(-1, 2) + offset
        for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
            vx, vy = bx - ax, by - ay
            t = np.clip(((xx - ax) * vx + (yy - ay) * vy) / max(vx * vx + vy * vy, 1e-9), 0, 1)
            near |= np.hypot(xx - ax - t * vx, yy - ay - t * vy) <= 2.0
    return near


@pytest.mark.parametrize("smiles", ["O=C1CSc2ccc(NC(=O)c3ccc[nH]3)cc2N1", "CC(Cl)C(=O)N1CCOCC1"])
def test_atom_boxes_cover_the_heteroatom_labels(smiles: str) -> None:
    engine = get_engine("molecules", "rdkit")
    image, boxes = engine.render_with_layout(smiles, MOLECULES)
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    assert len(boxes) == mol.GetNumAtoms()
    assert [b["text"] for b in boxes] == [smiles[slice(*b["chars"])] for b in boxes]
    assert [re.sub(r"[\[\]H]", "", b["text"]).capitalize() for b in boxes] == [a.GetSymbol() for a in mol.GetAtoms()]
    # label pixels = coloured pixels that are not on a bond stroke
    rgb, _, _ = engine._depict(smiles, MOLECULES)
    _, offset = place_top_left_with_offset(rgb, MOLECULES)
    svg_drawer = engine._draw.MolDraw2DSVG(MOLECULES.width + 16, MOLECULES.height + 16)
    engine._options(svg_drawer)
    engine._draw.PrepareAndDrawMolecule(svg_drawer, mol)
    svg_drawer.FinishDrawing()
    coloured = (image.max(-1).astype(int) - image.min(-1)) > 60
    label = coloured & ~_bond_pixels(svg_drawer.GetDrawingText(), image.shape[:2], offset)
    assert label.sum() > 20
    assert (label & box_mask(image.shape, boxes)).sum() / label.sum() > 0.97
    for b in boxes:  # each O box holds red label ink, each N box blue
        x0, y0, x1, y1 = b["box"]
        crop = image[y0:y1, x0:x1].astype(int)
        if b["text"] == "O":
            assert ((crop[..., 0] > 150) & (crop[..., 1] < 100)).sum() >= 3
        if b["text"] == "N":
            assert ((crop[..., 2] > 150) & (crop[..., 0] < 100)).sum() >= 3


def test_smiles_atoms_pair_with_tokens_or_give_none() -> None:
    from rdkit import Chem

    smiles = "Clc1cc[nH]c1Br"
    spans = smiles_atom_chars(smiles, Chem.MolFromSmiles(smiles))
    assert [smiles[a:b] for a, b in spans] == ["Cl", "c", "c", "c", "[nH]", "c", "Br"]
    assert smiles_atom_chars("[H]OC", Chem.MolFromSmiles("[H]OC")) is None  # sanitizing drops the [H] atom


# ----------------------------------------------------------------------------------------------------------------
# tables


def test_cell_boxes_hold_their_cells_text() -> None:
    markup = '<table><tr><td>ab</td><td>7</td></tr><tr><td colspan="2">xyz</td></tr></table>'
    (result,) = render_batch("tables", [("t", markup)], TABLES, timeout=60)
    assert result.ok and result.layout is not None
    assert [b["text"] for b in result.layout] == ["<td>ab</td>", "<td>7</td>", '<td colspan="2">xyz</td>']
    ink = result.image < 150
    assert (ink & ~box_mask(ink.shape, result.layout)).sum() == 0  # no border: all ink is cell text
    first, second, wide = (b["box"] for b in result.layout)
    assert first[2] <= second[0] + 1 and wide[1] >= first[3] - 1  # side by side, then the spanning row below
    assert wide[2] - wide[0] >= second[2] - first[0] - 1  # the colspan cell spans both columns


def test_html_cells_close_implicitly_and_nest() -> None:
    markup = "<table><tr><td>a<td>b</tr><tr><th>c</th><td><table><tr><td>d</td></tr></table></td></tr></table>"
    cells = [markup[a:b] for a, b in html_cell_chars(markup)]
    assert cells == ["<td>a", "<td>b", "<th>c</th>", "<td><table><tr><td>d</td></tr></table></td>", "<td>d</td>"]


# ----------------------------------------------------------------------------------------------------------------
# format helpers


def test_chars_to_span_and_validation() -> None:
    assert L.chars_to_span("ab  cd ef", 4, 9) == [1, 3]
    assert L.chars_to_span("CCO", 2, 3) == [0, 1]
    with pytest.raises(ValueError, match="needs 'box'"):
        L.validate_layout([{"span": [0, 1]}], "my.json")
    with pytest.raises(ValueError, match="is empty"):
        L.validate_layout({"boxes": [{"box": [5, 5, 5, 9], "span": [0, 1]}]}, "my.json")
    with pytest.raises(ValueError, match="'chars'"):
        L.validate_layout([{"box": [0, 0, 4, 4]}], "my.json")
    assert len(L.validate_layout({"boxes": [{"box": [0, 0, 4, 4], "chars": [0, 1]}]})) == 1


# ----------------------------------------------------------------------------------------------------------------
# the render stage


def _corpus(in_dir: Path, train: list[tuple[str, str]]) -> None:
    for split in ("train", "val", "test"):
        rows = train if split == "train" else []
        write_jsonl(in_dir / f"{split}.jsonl", [{"id": i, "markup": m} for i, m in rows])


def test_render_stage_writes_layouts_and_counts_them(tmp_path: Path) -> None:
    params = Params(render=RenderConfig(workers=1, timeout=30, batch_size=2))
    _corpus(tmp_path / "in", [("a", "x + y"), ("b", r"\frac {"), ("c", r"\alpha ^ { 2 }")])
    out = tmp_path / "out"
    report = render_mod.render_corpus(params, "math", tmp_path / "in", out, progress=False)
    assert report["layouts"] == {"with": 2, "without": 0}
    rows = [json.loads(line) for line in (out / "layouts.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "c"]
    assert [b["text"] for b in rows[1]["boxes"]] == [r"\alpha", "2"]
    assert json.loads((out / "layouts" / "a.json").read_text())["boxes"] == rows[0]["boxes"]
    assert L.load_layouts(out)["a"] == rows[0]["boxes"]
    # resume: nothing redone, same counts; an item that becomes a reject loses its stale layout file
    _corpus(tmp_path / "in", [("a", "x + y"), ("b", r"\frac {"), ("c", r"\alpha ^ {")])
    again = render_mod.render_corpus(params, "math", tmp_path / "in", out, progress=False)
    assert again["this_run"]["skipped_done"] == 2
    assert again["layouts"] == {"with": 1, "without": 0}
    assert sorted(p.name for p in (out / "layouts").iterdir()) == ["a.json"]


def test_items_without_layouts_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = get_engine("math", "mathtext")
    monkeypatch.setattr(type(engine), "render_with_layout", lambda self, m, cfg: (self.render(m, cfg), None))
    params = Params(render=RenderConfig(workers=1, timeout=30, batch_size=4))
    _corpus(tmp_path / "in", [("a", "x + y"), ("b", "z")])
    report = render_mod.render_corpus(params, "math", tmp_path / "in", tmp_path / "out", progress=False)
    assert report["layouts"] == {"with": 0, "without": 2} and report["rendered"] == 2
    assert (tmp_path / "out" / "layouts.jsonl").read_text() == ""
