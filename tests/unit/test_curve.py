"""bench curve: one constant-LR run to the largest budget, a snapshot at each budget, a table and a plot."""

from __future__ import annotations

import dataclasses

import pytest

from markup2image.bench.curve import curve_params, markdown_table, plot_curve
from markup2image.config import ConfigError, Params


def _params(schedule: str = "constant", steps: int = 100) -> Params:
    p = Params()
    return dataclasses.replace(p, train=dataclasses.replace(p.train, steps=steps, lr_schedule=schedule))


def test_one_run_to_the_largest_budget_with_a_snapshot_at_each():
    p = curve_params(_params(), (0.5, 1, 2, 4))
    assert p.train.steps == 400 and p.train.snapshot_steps == (50, 100, 200, 400)
    assert p.train.lr == Params().train.lr  # nothing else changes


def test_a_cosine_schedule_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        curve_params(_params("cosine"), (1, 2))
    with pytest.raises(ValueError, match="multiples"):
        curve_params(_params(), (0.001,))


def test_table_and_plot(tmp_path):
    row = dict(dtw=9.0, blank_dtw=12.0, dtw_ti=8.0, ssim=0.6, markup_use=1.4, edit_accuracy=0.7,
               edit_accuracy_nonblank=0.1, exact_match=0.2)  # fmt: skip
    rows = [row | {"multiple": 1, "steps": 10, "train_minutes": 1.0}]
    rows.append(row | {"multiple": 2, "steps": 20, "train_minutes": 2.0, "dtw": 8.0})
    result = {"domain": "math", "rows": rows}
    table = markdown_table(result)
    assert "| 2x | 20 | 2.0 | 8.00 | 12.00 | 0.667 |" in table
    plot_curve(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
