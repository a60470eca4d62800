"""The paper's Tables 1-3 as a series of named ``dvc exp`` runs, and the report that reads them back.

``markup2image study run -j 2`` runs one experiment ``t23-<row>-s<seed>`` per row and seed on the corpus and
budget of ``params.yaml`` (every row trains the same optimizer steps; only the method switches and, for Table 3,
``lambda`` differ), each as ``dvc exp run --temp ... evaluate@<domain>`` on one process, two at a time;
``study queue`` puts the same runs on DVC's task queue instead. ``markup2image study report`` reads ``dvc exp show
--json`` (and the runs an earlier report kept in ``runs.json``) and writes ``results.json``, ``results.md`` and
``results.png``: per row the mean and spread over seeds of DTW, DTW-TI, RMSE, SSIM, im2markup edit accuracy and
markup use, the training time, the paper's DTW beside it and a verdict on whether the paper's direction (the row
against its reference row) reproduces.

The verdict compares signs of the change against the reference row, ours (``mean - mean_ref`` over the training
seeds both rows have) and the paper's; it calls a change resolved when it exceeds twice its standard error over
those seeds (``sqrt(s^2/n + s_ref^2/n)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from markup2image.config import ConfigError, Params, params_from_dict, to_dict
from markup2image.evaluation.evaluate import select_test_items
from markup2image.io import read_jsonl, write_json
from markup2image.recipes import _value, apply_overrides

log = logging.getLogger(__name__)

PREFIX = "t23"
# every study run: one process, so two side by side (`study run -j 2`) keep two cores busy
COMMON = {"train.num_processes": 1}
PARTS_OFF = {"model.fsa": False, "model.con_aug": False, "model.ccam": False}
# eq. 10 as printed: the InfoNCE term at weight 1 wherever con_aug exists (the paper recipes do the same)
CON_AUG = {"model.con_aug": True, "infonce_weight": 1.0}
METRIC_KEYS = ("dtw", "dtw_ti", "rmse", "ssim", "edit_accuracy", "edit_accuracy_nonblank", "markup_use")
METRIC_KEYS += ("blank_dtw", "train_seconds")


@dataclasses.dataclass(frozen=True)
class Config:
    """One trained configuration of the study: ``key`` names its experiments, ``set`` its ``-S`` overrides."""

    key: str
    set: dict[str, Any]


def _fsa_cdm(**switches: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"train.objective": "fsa_cdm", **PARTS_OFF}
    for part, on in switches.items():
        out |= CON_AUG if part == "con_aug" and on else {f"model.{part}": on}
    return out


ALL_PARTS = _fsa_cdm(fsa=True, con_aug=True, ccam=True)

_CONFIGS = (
    Config("ddpm", {"train.objective": "ddpm", **PARTS_OFF}),
    Config("ss_dm", {"train.objective": "ss_dm", **PARTS_OFF}),
    Config("cdcd", {"train.objective": "cdcd", **PARTS_OFF}),
    Config("fsa", _fsa_cdm(fsa=True)),
    Config("con_aug", _fsa_cdm(con_aug=True)),
    Config("ccam", _fsa_cdm(ccam=True)),
    Config("fsa_con_aug", _fsa_cdm(fsa=True, con_aug=True)),
    Config("all", ALL_PARTS | {"lambda": 0.005}),
    Config("fsa_ccam", _fsa_cdm(fsa=True, ccam=True)),
    *(Config(f"all_lam{str(lam).replace('.', 'p')}", ALL_PARTS | {"lambda": lam}) for lam in (0.0, 0.002, 0.01, 0.02)),
    # diagnoses, not paper rows (decisions §11): Table 3's lambda 0 with InfoNCE off (con_aug's positive view alone:
    # L_simple(y0')) or at a tenth of eq. 10's weight
    Config("positive_only", ALL_PARTS | {"lambda": 0.0, "infonce_weight": 0.0}),
    Config("infonce0p1", ALL_PARTS | {"lambda": 0.0, "infonce_weight": 0.1}),
)
# the paper's rows with con_aug under the other reading of eq. 10 (its positive view plus EUBO, no InfoNCE): each is
# its weight-1 row with the term off, so the two readings differ in nothing else
CONFIGS = _CONFIGS + tuple(
    Config(f"{c.key}_nce0", c.set | {"infonce_weight": 0.0})
    for c in _CONFIGS
    if c.key in ("con_aug", "fsa_con_aug", "all")
)
CONFIG_KEYS = tuple(c.key for c in CONFIGS)


@dataclasses.dataclass(frozen=True)
class Line:
    """A line of the paper's tables: the configuration it reads, the paper's math DTW, the line it is compared to."""

    table: str
    label: str
    config: str
    paper_dtw: float | None
    reference: str | None
    # the paper's DTW for the reference, where the reference is not itself a paper line (InfoNCE 0's lambda 0 is
    # the positive_only run, which stands for the paper's lambda 0 under that reading)
    paper_reference_dtw: float | None = None


LINES = (
    Line("Table 2", "baseline (DDPM)", "ddpm", 19.12, None),
    Line("Table 2", "+ FSA", "fsa", 18.54, "ddpm"),
    Line("Table 2", "+ con_aug", "con_aug", 16.82, "ddpm"),
    Line("Table 2", "+ CCAM", "ccam", 17.79, "ddpm"),
    Line("Table 2", "FSA + con_aug", "fsa_con_aug", 16.23, "ddpm"),
    Line("Table 2", "FSA + con_aug + CCAM (all)", "all", 15.76, "ddpm"),
    Line("Table 2", "FSA + CCAM (our default; not a paper row)", "fsa_ccam", None, "ddpm"),
    Line("Table 1", "SS-DM", "ss_dm", 18.81, "ddpm"),
    Line("Table 1", "CDCD", "cdcd", 17.98, "ddpm"),
    Line("Table 3", "lambda 0", "all_lam0p0", 16.34, None),
    Line("Table 3", "lambda 0.002", "all_lam0p002", 16.07, "all_lam0p0"),
    Line("Table 3", "lambda 0.005", "all", 15.76, "all_lam0p0"),
    Line("Table 3", "lambda 0.01", "all_lam0p01", 15.94, "all_lam0p0"),
    Line("Table 3", "lambda 0.02", "all_lam0p02", 16.29, "all_lam0p0"),
    Line("Diagnosis", "lambda 0 without InfoNCE (the positive alone)", "positive_only", None, "all_lam0p0"),
    Line("Diagnosis", "lambda 0, InfoNCE weight 0.1", "infonce0p1", None, "all_lam0p0"),
    Line("Table 2, InfoNCE 0", "+ con_aug, InfoNCE weight 0", "con_aug_nce0", 16.82, "ddpm"),
    Line("Table 2, InfoNCE 0", "FSA + con_aug, InfoNCE weight 0", "fsa_con_aug_nce0", 16.23, "ddpm"),
    Line("Table 2, InfoNCE 0", "all, InfoNCE weight 0", "all_nce0", 15.76, "ddpm"),
    Line("Table 3, InfoNCE 0", "lambda 0.005 vs 0, InfoNCE weight 0", "all_nce0", 15.76, "positive_only", 16.34),
)


def config(key: str) -> Config:
    for c in CONFIGS:
        if c.key == key:
            return c
    raise ValueError(f"study: unknown row {key!r}; rows: {', '.join(CONFIG_KEYS)}")


def exp_name(key: str, seed: int) -> str:
    return f"{PREFIX}-{key}-s{seed}"


def parse_name(name: str) -> tuple[str, int] | None:
    """``(row, seed)`` of a study experiment's name ``t23-<row>-s<seed>``; None for any other name."""
    head, sep, seed = name.rpartition("-s")
    key = head.removeprefix(f"{PREFIX}-")
    if not sep or key == head or key not in CONFIG_KEYS or not seed.isdigit():
        return None
    return key, int(seed)


def overrides(key: str, seed: int) -> dict[str, Any]:
    """The dotted ``params.yaml`` overrides of one study run."""
    return {**COMMON, **config(key).set, "train.seed": seed}


def study_params(key: str, seed: int, params_file: str | Path = "params.yaml") -> Params:
    """The validated :class:`Params` the run would train with (a misspelt key or a bad value fails here)."""
    path = Path(params_file)
    base = yaml.safe_load(path.read_text()) if path.exists() else {}
    return params_from_dict(apply_overrides(base or {}, overrides(key, seed)))


def queue_command(key: str, seed: int, domain: str = "math", mode: str = "--queue") -> list[str]:
    """``dvc exp run --queue -n t23-<key>-s<seed> -S k=v ... evaluate@<domain>`` (export is not part of the study);
    ``mode="--temp"``: the same run in a temporary folder, in the foreground, waiting for DVC's repository lock
    (two runs that start or finish together both need it: without the wait one fails "Unable to acquire lock")."""
    dvc = ["dvc", "--wait-for-lock"] if mode == "--temp" else ["dvc"]
    cmd = [*dvc, "exp", "run", mode, "-n", exp_name(key, seed)]
    for k, v in overrides(key, seed).items():
        cmd += ["-S", f"{k}={_value(v)}"]
    return [*cmd, f"evaluate@{domain}"]


def finished(exps: dict[str, dict[str, Any]], params_file: str | Path = "params.yaml") -> set[str]:
    """Names of the finished study experiments whose params are exactly what the run would train with now (a run
    of an older params.yaml is not reused)."""
    names = set()
    for name, exp in exps.items():
        parsed = parse_name(name)
        if parsed is None:
            continue
        try:
            same = to_dict(params_from_dict(exp["params"])) == to_dict(study_params(*parsed, params_file))
        except (ConfigError, TypeError, ValueError):
            same = False
        if same:
            names.add(name)
    return names


def _checked_runs(keys: Sequence[str], seeds: Sequence[int], params_file: str | Path) -> list[tuple[str, int]]:
    runs = [(k, s) for k in keys for s in seeds]
    for k, s in runs:
        study_params(k, s, params_file)  # every run's params before any work
    return runs


def queue(
    keys: Sequence[str], seeds: Sequence[int], domain: str, params_file: str | Path, dry_run: bool = False
) -> list[list[str]]:
    """Check every run's params, then queue them (``dry_run``: print the commands only)."""
    runs = _checked_runs(keys, seeds, params_file)
    cmds = [queue_command(k, s, domain) for k, s in runs]
    for (key, seed), cmd in zip(runs, cmds):
        print(shlex.join(cmd))
        if not dry_run:
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"error: {exp_name(key, seed)}: dvc exp run --queue failed (exit {proc.returncode})")
    if not dry_run:
        print(f"queued {len(cmds)} runs; start them with: dvc queue start -j 2 (then markup2image study report)")
    return cmds


def run(
    keys: Sequence[str],
    seeds: Sequence[int],
    domain: str,
    params_file: str | Path,
    jobs: int = 2,
    done: Iterable[str] = (),
    logs: Path = Path(".dvc") / "tmp" / "study",
    command: Callable[[str, int, str], list[str]] = lambda k, s, d: queue_command(k, s, d, "--temp"),
    poll: float = 2.0,
) -> dict[str, Any]:
    """Run the study's experiments ``jobs`` at a time, each ``dvc exp run --temp`` (no task queue: DVC's celery
    workers can die on a half-written broker message and leave the queue waiting, treeverse/dvc#10428).

    Runs named in ``done`` (finished experiments) are skipped, so an interrupted study resumes where it stopped. A
    failed run gets one line naming it and its log (``logs/<name>.log``); the others go on. Returns the names
    that ran, failed and were skipped."""
    if jobs < 1:
        raise ValueError(f"study run: -j needs at least one job, got {jobs}")
    done = set(done)
    runs = _checked_runs(keys, seeds, params_file)
    todo = [(k, s) for k, s in runs if exp_name(k, s) not in done]
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "ran": [],
        "failed": [],
        "skipped": [exp_name(k, s) for k, s in runs if (k, s) not in todo],
    }
    active: dict[str, tuple[subprocess.Popen, Any]] = {}
    with tqdm(total=len(todo), desc="study runs", unit="run") as bar:
        while todo or active:
            while todo and len(active) < jobs:
                key, seed = todo.pop(0)
                name = exp_name(key, seed)
                fh = open(logs / f"{name}.log", "w")  # closed when the run ends
                active[name] = (subprocess.Popen(command(key, seed, domain), stdout=fh, stderr=subprocess.STDOUT), fh)
                log.info("study: started %s (log: %s)", name, logs / f"{name}.log")
            time.sleep(poll)
            for name, (proc, fh) in list(active.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del active[name]
                bar.update(1)
                if proc.returncode == 0:
                    result["ran"].append(name)
                else:
                    result["failed"].append(name)
                    log.error(
                        "%s: dvc exp run failed (exit %d); see %s, fix it and run `markup2image study run` again "
                        "(finished runs are skipped)", name, proc.returncode, logs / f"{name}.log",
                    )  # fmt: skip
    return result


# -- report ---------------------------------------------------------------------------------------------------------


def experiments(show: list[dict], domain: str = "math") -> dict[str, dict[str, Any]]:
    """``{name: {"params", "metrics", "rev"}}`` of every finished study experiment in ``dvc exp show --json``."""
    out: dict[str, dict[str, Any]] = {}
    for commit in show:
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue  # queued / running rows show their baseline's metrics; failed ones have none of their own
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or ""
                data = rev.get("data") or {}
                metrics = ((data.get("metrics") or {}).get(f"eval/{domain}/metrics.json") or {}).get("data")
                if not name.startswith(f"{PREFIX}-") or not metrics:
                    continue
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                out.setdefault(name, {"params": params, "metrics": metrics, "rev": rev.get("rev")})  # newest first
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n, "values": values}


def summarize(exps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: the seeds found and mean / sd / n of each metric over them."""
    out: dict[str, dict[str, Any]] = {}
    for key in CONFIG_KEYS:
        runs = dict(sorted((p[1], e) for n, e in exps.items() if (p := parse_name(n)) and p[0] == key))  # by seed
        if not runs:
            continue
        seeds = sorted(runs)
        stats = {}
        for m in METRIC_KEYS:
            vals = [float(e["metrics"][m]) for e in runs.values() if isinstance(e["metrics"].get(m), (int, float))]
            if vals:
                stats[m] = _stats(vals)
        ratio = [float(e["metrics"]["dtw"]) / float(e["metrics"]["blank_dtw"]) for e in runs.values()]
        stats["dtw_over_blank"] = _stats(ratio)
        dtw_by_seed = {seed: float(e["metrics"]["dtw"]) for seed, e in runs.items()}
        out[key] = {"seeds": seeds, "metrics": stats, "dtw_by_seed": dtw_by_seed}
    return out


def per_seed_change(ours: dict, ref: dict) -> dict[int, float]:
    """DTW change against the reference run of the same training seed (same initialisation, batches and noise):
    shown beside the verdict, whose spread stays the unpaired one (two seeds give a paired spread of one degree
    of freedom)."""
    a, b = ours.get("dtw_by_seed", {}), ref.get("dtw_by_seed", {})
    return {s: (a[s] - b[s]) / b[s] for s in sorted(set(a) & set(b))}


def matched_dtw(ours: dict, ref: dict) -> tuple[dict, dict]:
    """DTW stats of the row and of its reference over the training seeds both have: a reference run on a seed the
    row lacks would move the reference mean by that seed's offset (most rows share it), not by the method. Rows
    with no seed in common are compared over all their seeds."""
    a, b = ours.get("dtw_by_seed", {}), ref.get("dtw_by_seed", {})
    common = sorted(set(a) & set(b))
    if not common:
        return ours["metrics"]["dtw"], ref["metrics"]["dtw"]
    return _stats([a[s] for s in common]), _stats([b[s] for s in common])


def verdict(ours: dict | None, ref: dict | None, paper: float | None, paper_ref: float | None) -> dict[str, Any]:
    """Our DTW change against the reference row beside the paper's, and whether the paper's direction holds."""
    if paper is None or paper_ref is None:
        paper_delta = None
    else:
        paper_delta = (paper - paper_ref) / paper_ref
    if ours is None or ref is None:
        text = "not run" if ours is None else "its reference row not run"
        return {"paper_change": paper_delta, "change": None, "se": None, "verdict": text}
    a, b = matched_dtw(ours, ref)
    change = (a["mean"] - b["mean"]) / b["mean"]
    if a["sd"] is None or b["sd"] is None:
        return {"paper_change": paper_delta, "change": change, "se": None, "verdict": "one seed: no spread"}
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]) / b["mean"]
    if paper_delta is None:
        word = "lower DTW" if change < 0 else "higher DTW"
        text = f"{word} than the reference" if abs(change) > 2 * se else "within seed noise of the reference"
        return {"paper_change": None, "change": change, "se": se, "verdict": text}
    same = (change < 0) == (paper_delta < 0)
    if abs(change) <= 2 * se:
        text = f"within seed noise ({'same' if same else 'opposite'} sign)"
    else:
        text = "reproduces" if same else "reversed"
    return {"paper_change": paper_delta, "change": change, "se": se, "verdict": text}


def report_rows(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ln in LINES:
        ours = summary.get(ln.config)
        ref = summary.get(ln.reference) if ln.reference else None
        paper_ref = ln.paper_reference_dtw or next(
            (x.paper_dtw for x in LINES if x.config == ln.reference and x.reference is None), None
        )
        row = {"table": ln.table, "label": ln.label, "config": ln.config, "reference": ln.reference}
        row |= {"paper_dtw": ln.paper_dtw, "seeds": ours["seeds"] if ours else []}
        row["metrics"] = ours["metrics"] if ours else {}
        if ln.reference:
            row |= verdict(ours, ref, ln.paper_dtw, paper_ref)
            row["per_seed_change"] = per_seed_change(ours, ref) if ours and ref else {}
        else:
            row["verdict"] = "reference" if ours else "reference, not run"
        rows.append(row)
    return rows


def _ms(stat: dict | None, fmt: str = "{:.2f}") -> str:
    if not stat:
        return "-"
    text = fmt.format(stat["mean"])
    return text + (" ± " + fmt.format(stat["sd"]) if stat["sd"] is not None else "")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} %"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| table | row | seeds | DTW | DTW / blank | DTW-TI | RMSE | SSIM | edit acc | edit acc (ink cols) |"
    head += " markup use | train min | paper DTW | paper change | our change (± SE) | per seed | verdict |"
    lines = [head, "|" + " --- |" * 17]
    for r in rows:
        m = r["metrics"]
        train = m.get("train_seconds")
        train_min = {**train, "mean": train["mean"] / 60, "sd": None} if train else None
        cells = [
            r["table"], r["label"], ",".join(map(str, r["seeds"])) or "-", _ms(m.get("dtw")),
            _ms(m.get("dtw_over_blank"), "{:.3f}"), _ms(m.get("dtw_ti")), _ms(m.get("rmse"), "{:.1f}"),
            _ms(m.get("ssim"), "{:.3f}"), _ms(m.get("edit_accuracy"), "{:.3f}"),
            _ms(m.get("edit_accuracy_nonblank"), "{:.3f}"), _ms(m.get("markup_use")),
            _ms(train_min, "{:.1f}"), "-" if r["paper_dtw"] is None else f"{r['paper_dtw']:.2f}",
            _pct(r.get("paper_change")), _change(r),
            " / ".join(f"{100 * v:+.1f}" for v in (r.get("per_seed_change") or {}).values()) or "-", r["verdict"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _change(r: dict[str, Any]) -> str:
    if r.get("change") is None:
        return "-"
    return _pct(r["change"]) + (f" ± {100 * r['se']:.1f}" if r.get("se") is not None else "")


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The short table (the README's): per row DTW / blank, SSIM, markup use and training minutes (means ± sd over
    seeds), the paper's change beside ours (± SE), the per-seed changes and the verdict."""
    head = "| table | row | seeds | DTW / blank | SSIM | markup use | train min | paper change | our change (± SE) |"
    lines = [head + " per seed (%) | verdict |", "|" + " --- |" * 11]
    for r in rows:
        m = r["metrics"]
        train = m.get("train_seconds")
        cells = [
            r["table"], r["label"], ",".join(map(str, r["seeds"])) or "-", _ms(m.get("dtw_over_blank"), "{:.3f}"),
            _ms(m.get("ssim"), "{:.2f}"), _ms(m.get("markup_use")),
            "-" if not train else f"{train['mean'] / 60:.0f}", _pct(r.get("paper_change")), _change(r),
            " / ".join(f"{100 * v:+.1f}" for v in (r.get("per_seed_change") or {}).values()) or "-", r["verdict"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: each row's DTW change against its reference, ours (mean, seeds as dots, ±2 SE) beside the paper's.
    Right: Table 3's lambda sweep relative to lambda 0, ours and the paper's, and the InfoNCE-0 reading's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    t12 = [r for r in rows if r["table"].split(",")[0] in ("Table 1", "Table 2") and r["reference"]]
    xs = range(len(t12))
    paper = [100 * r["paper_change"] if r.get("paper_change") is not None else math.nan for r in t12]
    ours = [100 * r["change"] if r.get("change") is not None else math.nan for r in t12]
    err = [200 * r["se"] if r.get("se") is not None else 0 for r in t12]
    ax1.bar([x - 0.2 for x in xs], paper, 0.4, color="#bbbbbb", label="paper (64x320, full budget)")
    ax1.bar([x + 0.2 for x in xs], ours, 0.4, yerr=err, color="#3b6ea8", capsize=3, label="ours (mean, ±2 SE)")
    for x, r in zip(xs, t12):
        if r["metrics"] and r.get("change") is not None:
            for v in (r.get("per_seed_change") or {}).values():  # each seed against its reference run
                ax1.plot(x + 0.2, 100 * v, "k.", ms=5)
        else:
            ax1.text(x + 0.2, 0.3, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_xticks(list(xs), [r["label"].split(" (")[0] for r in t12], rotation=25, ha="right", fontsize=8)
    ax1.set_ylabel("DTW change vs DDPM baseline (%)  (lower is better)")
    ax1.set_title("Tables 1-2: each row against the DDPM baseline")
    ax1.legend(fontsize=8)
    t3 = [r for r in rows if r["table"] == "Table 3"]
    lams = [float(r["label"].split()[-1]) for r in t3]
    base = t3[0]
    paper3 = [100 * (r["paper_dtw"] - base["paper_dtw"]) / base["paper_dtw"] for r in t3]
    ax2.plot(lams, paper3, "o-", color="#888888", label="paper")
    if base["metrics"]:
        pts = [(lam, r) for lam, r in zip(lams, t3) if r["metrics"]]
        ax2.errorbar(
            [p[0] for p in pts], [100 * (r.get("change") or 0.0) for _, r in pts],
            yerr=[200 * r["se"] if r.get("se") else 0 for _, r in pts], fmt="s-", color="#3b6ea8", capsize=3,
            label="ours",
        )  # fmt: skip
    else:
        ax2.text(0.5, 0.5, "ours: not run", transform=ax2.transAxes, ha="center")
    for r in rows:  # eq. 10 read without InfoNCE: lambda > 0 against the positive alone (its lambda 0)
        if r["table"] == "Table 3, InfoNCE 0" and r.get("change") is not None:
            ax2.errorbar(
                [config(r["config"]).set["lambda"] + 0.0004], [100 * r["change"]],  # beside eq. 10's point
                yerr=[200 * r["se"] if r.get("se") else 0],
                fmt="^", color="#c0602a", capsize=3, label="ours, InfoNCE weight 0 (vs its lambda 0)",
            )  # fmt: skip
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("lambda (EUBO weight)")
    ax2.set_ylabel("DTW change vs lambda 0 (%)")
    ax2.set_title("Table 3: the lambda sweep (all parts on)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dvc_read(path: str, rev: str) -> bytes:
    """A file of an experiment's DVC outputs (e.g. ``eval/math/samples/<id>.png``) from the local cache."""
    import dvc.api

    return dvc.api.read(path, rev=rev, mode="rb")


def _sample_bytes(
    name: str, exp: dict[str, Any], path: str, kept: Path | None, reader: Callable[[str, str], bytes]
) -> bytes | None:
    """One evaluated sample of experiment ``name``: from ``kept/<name>/`` (samples a report saved, so a later
    session or machine can still draw them), else from the experiment's DVC outputs (then saved into ``kept``)."""
    copy = kept / name / Path(path).name if kept is not None else None
    if copy is not None and copy.exists():
        return copy.read_bytes()
    try:
        data = reader(path, exp["rev"])
    except Exception as exc:  # noqa: BLE001 (a run from another machine: its outputs are not in this cache)
        log.warning("samples.png: %s of %s not readable here (%s)", Path(path).name, name, exc)
        return None
    if copy is not None:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(data)
    return data


def samples_montage(
    exps: dict[str, dict[str, Any]],
    rendered: Path,
    out: Path,
    domain: str = "math",
    items: int = 8,
    seed: int = 0,
    reader: Callable[[str, str], bytes] = dvc_read,
    kept: Path | None = None,
) -> dict[str, list[str]]:
    """One picture: the first ``items`` evaluated test items (rows), gold then each configuration's sample for
    training seed ``seed`` (columns), read from ``kept`` or each experiment's DVC outputs (:func:`_sample_bytes`).
    A configuration none of whose samples can be read is left out and named in the title. Returns the column labels
    (``columns``) and the configurations left out (``missing``)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    runs = [(k, exp_name(k, seed)) for k in CONFIG_KEYS if exp_name(k, seed) in exps]
    if not runs:
        return {"columns": [], "missing": []}
    evaluate_params = exps[runs[0][1]]["params"].get("evaluate", {})
    test = read_jsonl(Path(rendered) / "test.jsonl")
    chosen = select_test_items(test, evaluate_params.get("num_samples", 64), evaluate_params.get("seed", 42))[:items]
    cols, missing = [], []
    for key, name in runs:
        data = [_sample_bytes(name, exps[name], f"eval/{domain}/samples/{r['id']}.png", kept, reader) for r in chosen]
        if any(d is not None for d in data):
            cols.append((key, data))
        else:
            missing.append(key)
    fig, axes = plt.subplots(len(chosen), len(cols) + 1, figsize=(1.9 * (len(cols) + 1), 0.62 * len(chosen) + 0.9))
    axes = np.atleast_2d(axes)
    for i, row in enumerate(chosen):
        gold = Image.open(Path(rendered) / row["image"]).convert("L")
        panels = [("gold", gold)]
        for key, data in cols:
            img = Image.open(io.BytesIO(data[i])).convert("L") if data[i] else Image.new("L", gold.size, 255)
            panels.append((key, img))
        for j, (label, img) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(np.asarray(img), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=8)
    title = f"gold, then each row's sample (training seed {seed})"
    if missing:
        title += f"\nsamples not kept (runs from before samples were saved): {', '.join(missing)}"
    # wrapped to the figure's width: a montage of one or two rows is narrower than the title
    width = max(30, int(fig.get_figwidth() * 13))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"columns": ["gold", *(k for k, _ in cols)], "missing": missing}


def exp_show(cwd: str | Path = ".") -> list[dict]:
    # --all-commits: the runs hang off the commit they were queued on, which need not be HEAD any more
    proc = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: dvc exp show --json failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


RUNS_FILE = "runs.json"
SAMPLES_DIR = "samples"  # out/samples/<experiment>/<test id>.png: the montage's samples, kept with the results


def saved_runs(out: Path) -> dict[str, dict[str, Any]]:
    """The runs an earlier report kept in ``out/runs.json`` (committed with the results, so a study can be finished
    on another machine or session: their params and metrics count, their samples stay where they ran)."""
    path = Path(out) / RUNS_FILE
    if not path.exists():
        return {}
    try:
        runs = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a runs file ({exc}); move it away to report the live experiments only") from exc
    return {n: r for n, r in runs.items() if isinstance(r, dict) and {"params", "metrics"} <= set(r)}


def report(
    show: list[dict],
    out: Path,
    domain: str = "math",
    rendered: Path | None = None,
    reader: Callable[[str, str], bytes] = dvc_read,
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md``, ``results.png`` and ``runs.json`` into ``out`` (with ``rendered``, the
    test split's folder, also ``samples.png``: gold beside every row's sample); return the JSON. Runs kept in
    ``out/runs.json`` by an earlier report count too; a live experiment of the same name replaces its saved run."""
    exps = saved_runs(out) | experiments(show, domain)
    summary = summarize(exps)
    rows = report_rows(summary)
    core_s = 0.0
    for e in exps.values():
        m = e["metrics"]
        core_s += float(m.get("train_seconds", 0)) + float(m.get("seconds_per_image", 0)) * m.get("num_samples", 0)
    result = {
        "domain": domain,
        "runs": sorted(exps),
        "rows": rows,
        "cpu_seconds_train_and_sample": round(core_s, 1),
        "rule": "verdict: sign of our DTW change vs the paper's, over the seeds both rows have; resolved when"
        " |change| > 2 SE",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUNS_FILE, dict(sorted(exps.items())))
    hours = core_s / 3600
    (out / "results.md").write_text(
        f"# The paper's Tables 1-3 at CPU scale: {len(exps)} runs, {hours:.1f} core-hours of training and sampling\n\n"
        f"## Summary\n\n{summary_markdown(rows)}\n## Every metric (mean ± sd over seeds)\n\n{markdown(rows)}"
    )
    plot(rows, out / "results.png")
    if rendered is not None:
        montage = samples_montage(exps, rendered, out / "samples.png", domain, reader=reader, kept=out / SAMPLES_DIR)
        result["samples_columns"], result["samples_missing"] = montage["columns"], montage["missing"]
    write_json(out / "results.json", result)
    log.info("study: %d runs of %d rows -> %s", len(exps), len(summary), out)
    return result


def rows_arg(values: Iterable[str] | None) -> list[str]:
    keys = list(values or CONFIG_KEYS)
    for k in keys:
        config(k)
    return keys
