"""Renderers (mathtext) and the render driver: shapes, placement, reject reasons, counts, timeouts, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from markup2image.config import DomainConfig, Params, RenderConfig
from markup2image.data import render as render_mod
from markup2image.data import renderers
from markup2image.data.renderers import MARGIN, RenderError, RenderResult, render_batch, render_markup
from markup2image.data.renderers.base import SingleItemEngine
from markup2image.io import load_image, write_jsonl

MATH = Params().domain_config("math")


def ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero((image < 250).any(axis=1))
    cols = np.flatnonzero((image < 250).any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def test_mathtext_renders_black_on_white_at_top_left() -> None:
    image = render_markup("math", r"x ^ { 2 } + \frac { a } { b } = \sqrt { y }", MATH)
    assert image.shape == (64, 320) and image.dtype == np.uint8
    assert image.min() < 40 and image.max() == 255
    top, left, bottom, right = ink_box(image)
    assert (top, left) == (MARGIN, MARGIN)
    assert bottom < 64 and right < 320
    assert (image[bottom:, :] == 255).all() and (image[:, right:] == 255).all()


def test_spaced_scripts_are_real_subscripts() -> None:
    # im2latex spacing ("x _ { i }") must render as TeX reads it: a lowered i, not "x i" on the baseline
    sub = ink_box(render_markup("math", "x _ { x }", MATH))
    flat = ink_box(render_markup("math", "x x", MATH))
    assert sub[2] > flat[2]  # the lowered x reaches further down
    assert sub[3] < flat[3]  # and is smaller, so narrower


def test_rgb_canvas_when_three_channels() -> None:
    cfg = dataclasses.replace(MATH, channels=3)
    image = render_markup("math", "a + b", cfg)
    assert image.shape == (64, 320, 3)
    assert (image[..., 0] == image[..., 1]).all()


@pytest.mark.parametrize(
    ("markup", "reason"),
    [
        (r"\frac {", "parse_error"),
        (r"\frac{", "parse_error"),
        (r"x ^ { 2", "parse_error"),
        ("", "empty"),
        (r"\,", "empty"),
        (" + ".join([r"\frac { a _ { i } } { b ^ { 2 } }"] * 20), "overflow"),
        (
            r"\frac { \frac { \frac { \frac { a } { b } } { c } } { d } } "
            r"{ \frac { e } { \frac { f } { \frac { g } { h } } } }",
            "overflow",
        ),
    ],
)
def test_bad_markup_gives_the_right_reason(markup: str, reason: str) -> None:
    with pytest.raises(RenderError) as info:
        render_markup("math", markup, MATH)
    assert info.value.reason == reason


def test_render_batch_keeps_input_order_and_mixes_results() -> None:
    items = [("a", "x + y"), ("b", r"\frac {"), ("c", r"\alpha")]
    results = render_batch("math", items, MATH, timeout=10)
    assert [r.id for r in results] == ["a", "b", "c"]
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "parse_error"


def test_unknown_or_mismatched_engine_names_the_key() -> None:
    with pytest.raises(ValueError, match="domain.math.engine"):
        render_markup("math", "x", dataclasses.replace(MATH, engine="nope"))
    with pytest.raises(ValueError, match="draws 'music'"):
        render_markup("math", "x", dataclasses.replace(MATH, engine="lilypond"))


# ----------------------------------------------------------------------------------------------------------------
# render_corpus


def make_corpus(in_dir: Path, rows_by_split: dict[str, list[tuple[str, str]]]) -> None:
    for split in ("train", "val", "test"):
        write_jsonl(in_dir / f"{split}.jsonl", [{"id": i, "markup": m} for i, m in rows_by_split.get(split, [])])


CORPUS = {
    "train": [("t0", "a + b"), ("t1", r"\frac {"), ("t2", r"x _ { i } ^ { 2 }"), ("t3", " + ".join(["a b c d"] * 40))],
    "val": [("v0", r"\alpha \beta"), ("v1", "")],
    "test": [("s0", r"\sqrt { 2 }"), ("s1", r"\sum _ { i = 1 } ^ { n } i")],
}


def params(workers: int = 1, batch_size: int = 3, timeout: float = 30.0, **domain: object) -> Params:
    math = dataclasses.replace(MATH, **domain)  # type: ignore[arg-type]
    return Params(domain={**Params().domain, "math": math}, render=RenderConfig(workers, timeout, batch_size))


@pytest.mark.parametrize("workers", [1, 2])
def test_render_corpus_counts_add_up_with_broken_items(tmp_path: Path, workers: int) -> None:
    make_corpus(tmp_path / "in", CORPUS)
    out = tmp_path / "out"
    report = render_mod.render_corpus(params(workers), "math", tmp_path / "in", out, progress=False)
    assert report["total"] == 8 == report["rendered"] + report["rejected"]
    assert report["reasons"] == {"parse_error": 1, "overflow": 1, "empty": 1}
    assert report["splits"]["train"] == {
        "total": 4, "rendered": 2, "rejected": 2, "gold": 0, "reasons": {"parse_error": 1, "overflow": 1}
    }  # fmt: skip
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in train] == ["t0", "t2"]
    assert train[0] == {"id": "t0", "markup": "a + b", "image": "images/t0.png"}
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert {i: (r["split"], r["reason"]) for i, r in rejects.items()} == {
        "t1": ("train", "parse_error"), "t3": ("train", "overflow"), "v1": ("val", "empty")
    }  # fmt: skip
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in "t0 t2 v0 s0 s1".split())
    assert load_image(out / "images" / "s1.png").shape == (64, 320)
    assert json.loads((out / "render_report.json").read_text())["total"] == 8


def test_resume_skips_done_items_and_redoes_a_corrupt_png(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", CORPUS)
    out = tmp_path / "out"
    first = render_mod.render_corpus(params(), "math", tmp_path / "in", out, progress=False)
    good = (out / "images" / "t0.png").read_bytes()
    (out / "images" / "t0.png").write_bytes(good[: len(good) // 2])  # a half-written file
    os.utime(out / "images" / "s0.png", (0, 0))
    second = render_mod.render_corpus(params(), "math", tmp_path / "in", out, progress=False)
    assert second["this_run"]["skipped_done"] == 7
    assert second["this_run"]["rendered"] == 1 and second["this_run"]["rejected"] == 0
    assert (out / "images" / "t0.png").read_bytes() == good
    assert os.stat(out / "images" / "s0.png").st_mtime == 0  # not rewritten
    assert {k: second[k] for k in ("total", "rendered", "rejected")} == {
        k: first[k] for k in ("total", "rendered", "rejected")
    }


def test_resume_ignores_a_cut_journal_line_and_a_changed_markup(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", CORPUS)
    out = tmp_path / "out"
    render_mod.render_corpus(params(), "math", tmp_path / "in", out, progress=False)
    with (out / render_mod.JOURNAL).open("a") as fh:
        fh.write('{"id": "t0", "status": "rej')  # killed mid-write
    changed = {**CORPUS, "val": [("v0", r"\gamma"), ("v1", "")]}
    make_corpus(tmp_path / "in", changed)
    report = render_mod.render_corpus(params(), "math", tmp_path / "in", out, progress=False)
    assert report["this_run"]["skipped_done"] == 7 and report["this_run"]["rendered"] == 1
    assert report["total"] == report["rendered"] + report["rejected"] == 8


def test_changed_renderer_settings_render_everything_again(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", CORPUS)
    out = tmp_path / "out"
    render_mod.render_corpus(params(), "math", tmp_path / "in", out, progress=False)
    report = render_mod.render_corpus(params(font_size=10.0), "math", tmp_path / "in", out, progress=False)
    assert report["this_run"]["skipped_done"] == 0


class FlakyEngine(SingleItemEngine):
    """Draws a square, hangs on HANG, kills its process on DIE."""

    name = "flaky"

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray:
        if markup == "HANG":
            time.sleep(60)
        if markup == "DIE":
            os._exit(3)
        image = np.full((cfg.height, cfg.width), 255, np.uint8)
        image[MARGIN : MARGIN + 5, MARGIN : MARGIN + 5] = 0
        return image


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(renderers.ENGINES, "flaky", ("unused", "unused", "math"))
    monkeypatch.setitem(renderers._instances, "flaky", FlakyEngine())
    monkeypatch.setattr(render_mod, "WATCHDOG_SLACK_S", 0.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hanging_or_dying_renderer_costs_only_its_item(tmp_path: Path, flaky: None, workers: int) -> None:
    rows = [("a", "ok"), ("b", "HANG"), ("c", "ok2"), ("d", "DIE"), ("e", "ok3"), ("f", "ok4")]
    if workers == 1:  # inline: a dying item would take the test process with it
        rows = [r for r in rows if r[1] != "DIE"]
    make_corpus(tmp_path / "in", {"train": rows})
    p = params(workers=workers, batch_size=6, timeout=0.5, engine="flaky")
    start = time.monotonic()
    report = render_mod.render_corpus(p, "math", tmp_path / "in", tmp_path / "out", progress=False)
    assert time.monotonic() - start < 20
    assert report["total"] == len(rows) == report["rendered"] + report["rejected"]
    expected = {"timeout": 1, "crash": 1} if workers == 2 else {"timeout": 1}
    assert report["reasons"] == expected
    assert report["rendered"] == 4


def test_render_result_ok_flag() -> None:
    assert RenderResult("x", image=np.zeros((1, 1), np.uint8)).ok and not RenderResult("y", reason="empty").ok


def test_watchdog_gives_self_timed_engines_room_to_bisect() -> None:
    # a latex batch of 64 may time out once per halving before the hanging formula is alone
    assert render_mod.watchdog_limit("latex", 60, 64) >= 60 * 7
    assert render_mod.watchdog_limit("mathtext", 60, 64) < 120


def test_auto_engine_prefers_latex_and_falls_back_to_mathtext_with_one_line(monkeypatch, caplog) -> None:
    import shutil

    cfg = DomainConfig(height=32, width=128, engine="auto")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert renderers.resolve_engine("math", cfg).engine == "latex"
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "latex" else real_which(name))
    with caplog.at_level("WARNING"):
        assert renderers.resolve_engine("math", cfg).engine == "mathtext"
    lines = [r.getMessage() for r in caplog.records if "engine auto" in r.getMessage()]
    assert len(lines) == 1 and "latex" in lines[0] and "mathtext" in lines[0]
    assert renderers.resolve_engine("math", dataclasses.replace(cfg, engine="mathtext")).engine == "mathtext"
    assert renderers.resolve_engine("molecules", DomainConfig(height=8, width=8, engine="auto")).engine == "rdkit"
