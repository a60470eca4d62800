"""``bench robustness``: hostile and broken markup at volume through the real render stage, with its sandbox checked.

Per domain, :func:`~markup2image.data.hostile.hostile_corpus` items go through the render stage's own command line
(``python -m markup2image.data.render``) in a child process whose ``HOME``, ``TMPDIR`` and caches all point into one
scratch folder; the stage's raw and output folders sit in it too. Afterwards:

- every input id must end in exactly one of ``train.jsonl`` (rendered) or ``rejects.jsonl`` (with a reason): lost
  and duplicated ids are counted; ``crash`` rejects are counted (unexpected failures: must be 0);
- the stage must exit 0 and finish within ``stage_limit_s`` (else: a hang);
- the canary folder beside the scratch folder, which hostile items try to write into, must stay empty;
- with ``trace=True`` the child runs under ``strace -f`` (file and network system calls): every file it created,
  wrote, renamed or removed must lie inside the scratch folder (or be a device), and no internet socket
  (``AF_INET``/``AF_INET6``) may be opened.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from markup2image.config import Params, to_dict
from markup2image.data.hostile import hostile_corpus
from markup2image.io import read_json, read_jsonl, write_jsonl

# strace lines of calls that change the file system: the path is the first (or, for rename/link, also the second)
# quoted argument. openat counts when its flags write or create.
_WRITE_OPEN = re.compile(r'\bopen(?:at)?\((?:AT_FDCWD|\d+)?,?\s*"([^"]*)", ([A-Z_|]+)')
_CHANGE = re.compile(r'\b(mkdir(?:at)?|unlink(?:at)?|rmdir|rename(?:at2?)?|link(?:at)?|symlink(?:at)?|truncate|'
                     r'chmod|fchmodat|utimensat)\((?:AT_FDCWD, |\d+, )?"([^"]*)"')  # fmt: skip
_SOCKET = re.compile(r"\bsocket\((AF_[A-Z0-9]+)")
_FAILED = re.compile(r"= -1 ")
DEVICE_PREFIXES = ("/dev/", "/proc/")


def strace_available() -> str:
    """'' when ``strace -f`` can trace a child here, else why not."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.strip()[:200]}"
    return ""


def trace_violations(trace: Path, scratch: Path) -> tuple[list[str], list[str]]:
    """(file changes outside ``scratch``, internet sockets) in an ``strace -f`` output file."""
    root = str(scratch.resolve())
    outside, sockets = [], []
    for line in trace.read_text(errors="replace").splitlines():
        if _FAILED.search(line):
            continue  # refused calls (TeX's openout_any, a missing file) changed nothing
        paths = []
        m = _WRITE_OPEN.search(line)
        if m and re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", m.group(2)):
            paths.append(m.group(1))
        m = _CHANGE.search(line)
        if m:
            paths.append(m.group(2))
        for path in paths:
            if path.startswith(DEVICE_PREFIXES):
                continue
            if os.path.isabs(path):
                if not (path == root or path.startswith(root + os.sep)):
                    outside.append(line.strip()[:300])
            elif ".." in Path(path).parts:  # relative paths stay in the process's own (scratch) folder without ..
                outside.append(line.strip()[:300])
        m = _SOCKET.search(line)
        if m and m.group(1) in ("AF_INET", "AF_INET6"):
            sockets.append(line.strip()[:300])
    return outside, sockets


def _run_render_stage(
    domain: str, scratch: Path, tmp: Path, trace_file: Path | None, limit_s: float
) -> tuple[int | None, str, bool]:
    """``python -m markup2image.data.render`` on ``scratch/raw`` -> ``scratch/rendered`` with HOME, TMPDIR and the
    caches inside ``scratch`` (under ``strace -f`` into ``trace_file`` when given): (exit code, stderr, hung)."""
    env = dict(os.environ, HOME=str(scratch), TMPDIR=str(tmp), XDG_CACHE_HOME=str(scratch / "cache"))
    env.update(MPLCONFIGDIR=str(scratch / "mpl"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "markup2image.data.render", "--domain", domain, "--params", "params.yaml"]
    cmd += ["--raw", str(scratch / "raw"), "--out", str(scratch / "rendered")]
    if trace_file is not None:
        cmd = ["strace", "-f", "-qq", "-e", "trace=%file,%network", "-o", str(trace_file), *cmd]
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=limit_s)
        return proc.returncode, proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return None, stderr, True


def _outcomes(rendered: list[str], rejects: list[dict[str, Any]]) -> tuple[dict[str, str], int]:
    """Each id's outcome ("rendered" or its reject reason) and how many ids were reported more than once."""
    outcome: dict[str, str] = {}
    duplicated = 0
    for item_id, status in [(i, "rendered") for i in rendered] + [(r["id"], r["reason"]) for r in rejects]:
        duplicated += item_id in outcome
        outcome[item_id] = status
    return outcome, duplicated


def run_domain(
    domain: str, params: Params, n: int, work: Path, seed: int = 0, trace: bool = False, stage_limit_s: float = 3600
) -> dict[str, Any]:
    """One domain's hostile corpus through the render stage in ``work/<domain>``; the figures of the module doc."""
    scratch, canary = (work / domain).resolve(), (work / f"{domain}_canary").resolve()
    for folder in (scratch, canary):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rows = hostile_corpus(domain, n, seed, str(canary))
    kind_of = {r["id"]: r["kind"] for r in rows}
    raw, out, tmp = scratch / "raw", scratch / "rendered", scratch / "tmp"
    tmp.mkdir()
    write_jsonl(raw / "train.jsonl", ({"id": r["id"], "markup": r["markup"]} for r in rows))
    write_jsonl(raw / "val.jsonl", [])
    write_jsonl(raw / "test.jsonl", [])
    (scratch / "params.yaml").write_text(yaml.safe_dump(_params_dict(params, domain)))

    trace_file = work / f"{domain}.strace"
    start = time.monotonic()
    exit_code, stderr, hung = _run_render_stage(domain, scratch, tmp, trace_file if trace else None, stage_limit_s)
    seconds = time.monotonic() - start

    rendered = [r["id"] for r in read_jsonl(out / "train.jsonl")] if (out / "train.jsonl").exists() else []
    rejects = read_jsonl(out / "rejects.jsonl") if (out / "rejects.jsonl").exists() else []
    outcome, duplicated = _outcomes(rendered, rejects)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for item_id, kind in kind_of.items():
        kinds[kind][outcome.get(item_id, "lost")] += 1
    examples = {}  # one reject line per (kind, reason): what a user reads
    for r in rejects:
        examples.setdefault(f"{kind_of.get(r['id'], '?')}/{r['reason']}", f"{r['id'][:40]}: {r['detail'][:160]}")
    outside, sockets = trace_violations(trace_file, scratch) if trace and trace_file.exists() else ([], [])
    reasons = Counter(r["reason"] for r in rejects)
    result = {
        "domain": domain,
        "engine": _engine(out),
        "items": len(rows),
        "valid_items": sum(k == "valid" for k in kind_of.values()),
        "valid_rendered": kinds["valid"]["rendered"],
        "rendered": len(rendered),
        "rejected": len(rejects),
        "reasons": dict(sorted(reasons.items())),
        "crashes": reasons.get("crash", 0),
        "lost_ids": sum(i not in outcome for i in kind_of),
        "duplicated_ids": duplicated,
        "counts_add_up": len(rendered) + len(rejects) == len(rows) and all(i in outcome for i in kind_of),
        "timeouts": reasons.get("timeout", 0),
        "hung": hung,
        "exit_code": exit_code,
        "seconds": round(seconds, 1),
        "render_timeout_s": params.render.timeout,
        "canary_files": sorted(p.name for p in canary.rglob("*")),
        "traced": trace,
        "writes_outside_scratch": outside[:20],
        "inet_sockets": sockets[:20],
        "kinds": {k: dict(sorted(v.items())) for k, v in sorted(kinds.items())},
        "examples": dict(sorted(examples.items())),
    }
    if exit_code != 0:
        result["stderr_tail"] = stderr[-2000:]
    return result


def _engine(out: Path) -> str | None:
    report = out / "render_report.json"
    if not report.exists():
        return None
    return read_json(report).get("engine")


def _params_dict(params: Params, domain: str) -> dict[str, Any]:
    raw = to_dict(params)
    raw["domains"] = [domain]
    return raw


def bench_robustness(
    params: Params,
    domains: tuple[str, ...],
    n: int,
    work: Path,
    seed: int = 0,
    trace: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """:func:`run_domain` for each domain, with the machine's record; ``timeout`` replaces ``render.timeout``."""
    if timeout is not None:
        params = dataclasses.replace(params, render=dataclasses.replace(params.render, timeout=timeout))
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    why_not = strace_available() if trace else ""
    runs = [run_domain(d, params, n, work, seed, trace=trace and not why_not) for d in domains]
    return {
        "benchmark": "robustness",
        "items_per_domain": n,
        "seed": seed,
        "render": dataclasses.asdict(params.render),
        "trace_unavailable": why_not or None,
        "domains": runs,
        "all_accounted": all(r["counts_add_up"] and not r["lost_ids"] for r in runs),
        "total_crashes": sum(r["crashes"] for r in runs),
        "total_hangs": sum(r["hung"] for r in runs),
    }  # the machine's record is added by markup2image.bench.run (host)


def run(args: Any, params: Params) -> dict[str, Any]:
    """``markup2image bench robustness``."""
    domains = tuple(args.domains or params.domains)
    timeout = args.timeout if args.timeout > 0 else None
    return bench_robustness(params, domains, args.n, Path(args.work), trace=args.trace, timeout=timeout)
