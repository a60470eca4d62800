"""`bench render`: counts add up, and the CPU time of the external tools is counted for the per-CPU rate."""

from __future__ import annotations

import json
import shutil

import pytest

from markup2image.bench.render import bench_render
from markup2image.config import load_params


def _check(result: dict, n: int) -> None:
    assert result["num_items"] == n
    assert result["rendered"] + result["rejected"] == n
    assert sum(result["reasons"].values()) == result["rejected"]
    assert result["items_per_cpu_s"] == pytest.approx(n / (result["parent_cpu_s"] + result["child_cpu_s"]), rel=0.02)
    json.dumps(result)


def test_bench_render_mathtext_in_process() -> None:
    params = load_params("params.yaml")
    result = bench_render("math", "mathtext", 12, params)
    _check(result, 12)
    assert result["engine"] == "mathtext"
    assert result["rendered"] > 0


@pytest.mark.skipif(shutil.which("latex") is None, reason="TeX Live (latex) is not installed")
def test_bench_render_latex_counts_the_tools_cpu() -> None:
    params = load_params("params.yaml")
    result = bench_render("math", "latex", 12, params)
    _check(result, 12)
    assert result["child_cpu_s"] > 0  # latex + dvipng ran as child processes and their CPU is counted
