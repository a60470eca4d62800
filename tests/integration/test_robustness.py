"""Hostile and broken markup through the real render stage: nothing lost, nothing crashes, nothing gets out.

The small-sample twin of ``markup2image bench robustness`` (1,000 items per domain, docs/robustness): every kind
of :mod:`markup2image.data.hostile` at least once per domain, with the stage in a child process whose HOME and
TMPDIR are its scratch folder, under strace where it can trace. A control run shows that the canary check would see
an escape: the same ``\\write18`` item with shell escape switched on does write its canary.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from markup2image.bench.robustness import run_domain, strace_available, trace_violations
from markup2image.config import Params, RenderConfig, to_dict
from markup2image.data.hostile import domain_kinds, hostile_corpus
from markup2image.data.renderers.math_latex import TEX_ENV, latex_document
from markup2image.io import read_json, read_jsonl, write_jsonl

TOOLS = {"math": "latex", "music": "lilypond"}
# small samples that still reach every hostile kind of the domain once (kinds cycle after the valid share)
SIZES = {"math": 40, "tables": 40, "molecules": 30, "music": 24}
# LilyPond needs seconds per call, more on a busy box; the others answer in well under a second per batch
TIMEOUTS = {"music": 30.0}
# no engine may ever render these: the stage or the renderer's own checks must refuse them
ALWAYS_REJECTED = {
    "huge": {"too_long"},
    "huge_repeat": {"overflow"},
    "bad_id": {"invalid_id"},
    "nul_bytes": {"parse_error"},
    "empty": {"empty"},
    "scheme_system": {"parse_error"},
    "include": {"parse_error"},
    "output_name": {"parse_error"},
    "script": {"parse_error"},
    "iframe": {"parse_error"},
    "img_http": {"parse_error"},
    "css_url": {"parse_error"},
    "css_file_url": {"parse_error"},
    "style_import": {"parse_error"},
    "openout": {"parse_error"},
}


def _params(domain: str) -> Params:
    p = Params()
    return dataclasses.replace(p, render=RenderConfig(workers=2, timeout=TIMEOUTS.get(domain, 5.0), batch_size=16))


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["math", "tables", "molecules", "music"])
def test_hostile_corpus_through_the_render_stage(tmp_path: Path, domain: str) -> None:
    if domain in TOOLS and shutil.which(TOOLS[domain]) is None:
        pytest.skip(f"{TOOLS[domain]} is not installed")
    traced = strace_available() == ""
    r = run_domain(domain, _params(domain), SIZES[domain], tmp_path, trace=traced)
    assert r["exit_code"] == 0 and not r["hung"], r.get("stderr_tail")
    assert r["counts_add_up"] and r["lost_ids"] == 0 and r["duplicated_ids"] == 0
    assert r["crashes"] == 0, r["examples"]
    assert r["canary_files"] == []
    if traced:
        assert r["writes_outside_scratch"] == [] and r["inet_sockets"] == []
    kinds = r["kinds"]
    assert set(kinds) >= set(domain_kinds(domain)) | {"valid"}  # every kind was tried
    for kind, wanted in ALWAYS_REJECTED.items():
        if kind in kinds:
            assert set(kinds[kind]) <= wanted, (kind, kinds[kind], r["examples"])
    # valid items are never blamed for their neighbours: rendered, or too big for the canvas
    assert set(kinds["valid"]) <= {"rendered", "overflow"}, kinds["valid"]
    assert kinds["valid"].get("rendered", 0) >= 0.6 * sum(kinds["valid"].values())


@pytest.mark.latex
@pytest.mark.skipif(shutil.which("latex") is None, reason="needs TeX Live latex")
def test_canary_sees_an_escape_when_shell_escape_is_on(tmp_path: Path) -> None:
    """The control: a write18 item writes its canary when TeX may run programs, and not under TEX_ENV."""
    canary = tmp_path / "canary"
    canary.mkdir()
    markup = next(r["markup"] for r in hostile_corpus("math", 60, 0, str(canary)) if r["kind"] == "write18")
    for name, env in (("sandboxed", TEX_ENV), ("open", {**TEX_ENV, "shell_escape": "t"})):
        work = tmp_path / name
        work.mkdir()
        (work / "doc.tex").write_text(latex_document([markup], 12))
        subprocess.run(["latex", "-interaction=nonstopmode", "doc.tex"], cwd=work, env={**os.environ, **env},
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)  # fmt: skip
        if name == "sandboxed":
            assert list(canary.iterdir()) == []
    assert len(list(canary.iterdir())) == 1  # the open run let markup out: the check can see it


def test_trace_parser_flags_writes_outside_and_inet_sockets(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    trace = tmp_path / "t.strace"
    trace.write_text(
        "\n".join(
            [
                f'12 openat(AT_FDCWD, "{scratch}/out/a.png", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3',
                '12 openat(AT_FDCWD, "/etc/passwd", O_RDONLY|O_CLOEXEC) = 3',  # reading is not a change
                '13 openat(AT_FDCWD, "/tmp/elsewhere/x", O_WRONLY|O_CREAT, 0666) = 4',
                '13 openat(AT_FDCWD, "../../escape.tex", O_WRONLY|O_CREAT, 0666) = 4',
                '13 openat(AT_FDCWD, "/tmp/refused", O_WRONLY|O_CREAT, 0666) = -1 EACCES (Permission denied)',
                '14 mkdir("/home/user/.cache/x", 0777) = 0',
                '14 openat(AT_FDCWD, "/dev/null", O_WRONLY) = 5',
                "15 socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, 0) = 6",
                "15 socket(AF_INET, SOCK_STREAM, IPPROTO_TCP) = 7",
            ]
        )
    )
    outside, sockets = trace_violations(trace, scratch)
    assert [line.split('"')[1] for line in outside] == ["/tmp/elsewhere/x", "../../escape.tex", "/home/user/.cache/x"]
    assert len(sockets) == 1 and "AF_INET" in sockets[0]


def test_kill_9_mid_render_then_rerun_gives_the_unbroken_result(tmp_path: Path) -> None:
    """SIGKILL the render stage once part of the corpus is journaled; the rerun ends with the same counts, the same
    ids and byte-identical images as a run that was never interrupted."""
    rows = hostile_corpus("math", 120, 1, str(tmp_path / "canary"))
    params = to_dict(Params())
    params["domain"]["math"].update(engine="mathtext")
    params["render"].update(workers=2, batch_size=4, timeout=10.0)
    params["domains"] = ["math"]
    raw = tmp_path / "raw"
    write_jsonl(raw / "train.jsonl", rows[:90])
    write_jsonl(raw / "val.jsonl", rows[90:100])
    write_jsonl(raw / "test.jsonl", rows[100:])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def stage(out: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "markup2image.data.render", "--domain", "math", "--params", "params.yaml"]
        return subprocess.Popen([*cmd, "--raw", str(raw), "--out", str(out)], cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    assert stage(tmp_path / "straight").wait(timeout=300) == 0
    broken = tmp_path / "broken"
    proc = stage(broken)
    journal = broken / ".render_journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed; give it more items"
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its render workers
    proc.wait(timeout=30)
    journaled = len(journal.read_text().splitlines())
    assert 30 <= journaled < len(rows)
    assert stage(broken).wait(timeout=300) == 0

    a, b = (read_json(d / "render_report.json") for d in (tmp_path / "straight", broken))
    assert {k: a[k] for k in ("total", "rendered", "rejected", "reasons", "splits")} == {
        k: b[k] for k in ("total", "rendered", "rejected", "reasons", "splits")
    }
    assert b["this_run"]["skipped_done"] >= journaled - 8  # the killed run's work was kept (less cut-off lines)
    print(f"killed after {journaled} journaled items of {len(rows)}; the rerun kept {b['this_run']['skipped_done']}"
          f", redid {b['this_run']['rendered'] + b['this_run']['rejected']}; counts {b['rendered']} rendered / "
          f"{b['rejected']} rejected as unbroken")  # fmt: skip
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "rejects.jsonl"):
        assert read_jsonl(tmp_path / "straight" / name) == read_jsonl(broken / name)
    images = sorted(p.name for p in (tmp_path / "straight" / "images").iterdir())
    assert images == sorted(p.name for p in (broken / "images").iterdir())
    for name in images:
        assert (tmp_path / "straight" / "images" / name).read_bytes() == (broken / "images" / name).read_bytes()
