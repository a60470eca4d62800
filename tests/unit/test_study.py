"""The Tables 1-3 study: its runs' params, the queued dvc commands, and the report read back from dvc exp show."""

import json
import math
from pathlib import Path

import pytest

from markup2image import study
from markup2image.cli import main
from markup2image.config import ConfigError
from markup2image.evaluation.evaluate import training_facts

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"

SWITCHES = {  # config -> (objective, fsa, con_aug, ccam)
    "ddpm": ("ddpm", False, False, False),
    "ss_dm": ("ss_dm", False, False, False),
    "cdcd": ("cdcd", False, False, False),
    "fsa": ("fsa_cdm", True, False, False),
    "con_aug": ("fsa_cdm", False, True, False),
    "con_aug_nce0": ("fsa_cdm", False, True, False),
    "ccam": ("fsa_cdm", False, False, True),
    "fsa_con_aug": ("fsa_cdm", True, True, False),
    "fsa_con_aug_nce0": ("fsa_cdm", True, True, False),
    "all": ("fsa_cdm", True, True, True),
    "fsa_ccam": ("fsa_cdm", True, False, True),
}


@pytest.mark.parametrize("key", study.CONFIG_KEYS)
def test_every_run_trains_what_its_row_says(key):
    p = study.study_params(key, 1, PARAMS)
    objective, fsa, con_aug, ccam = SWITCHES.get(key, ("fsa_cdm", True, True, True))  # the lambda sweep: all on
    assert (p.train.objective, p.model.fsa, p.model.con_aug, p.model.ccam) == (objective, fsa, con_aug, ccam)
    assert p.train.seed == 1 and p.train.num_processes == 1
    # con_aug's positive without EUBO, with no InfoNCE or a tenth of eq. 10's weight (diagnoses), and the all row
    # read without InfoNCE (con_aug = its positive plus EUBO): (InfoNCE weight, lambda)
    other = {"positive_only": (0.0, 0.0), "infonce0p1": (0.1, 0.0), "all_nce0": (0.0, 0.005)}
    for row in ("con_aug", "fsa_con_aug"):  # the Table 2 rows at InfoNCE 0 keep their row's lambda
        other[f"{row}_nce0"] = (0.0, study.study_params(row, 1, PARAMS).lambda_)
    if key in other:
        assert (p.infonce_weight, p.lambda_) == other[key]
    else:
        assert p.infonce_weight == (1.0 if con_aug else 0.0)  # eq. 10's InfoNCE (weight 1) wherever con_aug is
    base = study.study_params("ddpm", 0, PARAMS)
    assert (p.train.steps, p.train.batch_size, p.data, p.evaluate) == (
        base.train.steps,
        base.train.batch_size,
        base.data,
        base.evaluate,
    )  # equal budget and corpus for every row


def test_the_lambda_sweep_changes_only_lambda():
    lams = {k: study.study_params(k, 0, PARAMS).lambda_ for k in study.CONFIG_KEYS if k.startswith("all")}
    assert lams == {
        "all": 0.005, "all_lam0p0": 0.0, "all_lam0p002": 0.002, "all_lam0p01": 0.01, "all_lam0p02": 0.02,
        "all_nce0": 0.005,
    }  # fmt: skip
    assert {ln.config for ln in study.LINES} <= set(study.CONFIG_KEYS)
    assert {ln.reference for ln in study.LINES if ln.reference} <= set(study.CONFIG_KEYS)


def test_queue_command_is_a_named_dvc_exp_up_to_evaluate():
    cmd = study.queue_command("ccam", 1)
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "t23-ccam-s1"]
    assert cmd[-1] == "evaluate@math"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    assert "model.ccam=true" in sets and "model.fsa=false" in sets and "train.seed=1" in sets
    assert 'train.objective="fsa_cdm"' in sets  # JSON-quoted: DVC's parser keeps it a string
    temp = study.queue_command("ccam", 1, mode="--temp")
    assert temp[:6] == ["dvc", "--wait-for-lock", "exp", "run", "--temp", "-n"]  # two at a time share one lock


def test_queue_checks_params_before_queueing_anything(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(PARAMS.read_text().replace("lr: 0.002", "lr: fast"))
    with pytest.raises(ConfigError, match="train.lr"):
        study.queue(["ddpm"], [0], "math", bad)
    assert capsys.readouterr().out == ""  # nothing printed, nothing queued
    with pytest.raises(ValueError, match="unknown row 'nope'"):
        study.rows_arg(["ddpm", "nope"])
    cmds = study.queue(["ddpm", "fsa"], [0, 1], "math", PARAMS, dry_run=True)
    assert [c[5] for c in cmds] == ["t23-ddpm-s0", "t23-ddpm-s1", "t23-fsa-s0", "t23-fsa-s1"]


def _rev(name, dtw, seed, blank=20.0, train_s=600.0):
    metrics = {"dtw": dtw, "blank_dtw": blank, "dtw_ti": dtw - 1, "rmse": 40.0, "ssim": 0.5, "edit_accuracy": 0.6}
    metrics |= {"edit_accuracy_nonblank": 0.03, "markup_use": 1.2, "train_seconds": train_s}
    metrics |= {"seconds_per_image": 0.5, "num_samples": 10}
    data = {"params": {"params.yaml": {"data": {"train": {"seed": seed}}}}}
    data["metrics"] = {"eval/math/metrics.json": {"data": metrics}}
    return {"rev": "x" * 40, "name": name, "data": data}


def _show(runs):
    revs = [{"revs": [_rev(n, d, int(n.rsplit("-s", 1)[1]))], "name": n} for n, d in runs.items()]
    failed = {"revs": [{"rev": "y" * 40, "name": "t23-cdcd-s0", "data": {"metrics": {}}}], "name": "t23-cdcd-s0"}
    other = {"revs": [_rev("probe-s0", 1.0, 0)], "name": "probe-s0"}
    running = {"revs": [_rev("t23-fsa_ccam-s0", 1.0, 0)], "name": "t23-fsa_ccam-s0", "executor": {"state": "running"}}
    revs[0]["executor"] = {"state": "success", "name": "dvc-task"}
    exps = [*revs, failed, other, running]  # a running row carries its baseline's metrics: not a result
    return [{"rev": "workspace", "experiments": None}, {"rev": "a" * 40, "experiments": exps}]


RUNS = {
    "t23-ddpm-s0": 10.0, "t23-ddpm-s1": 10.2,
    "t23-fsa-s0": 9.0, "t23-fsa-s1": 9.1,  # clearly lower: the paper's direction
    "t23-ccam-s0": 10.05, "t23-ccam-s1": 10.0,  # within the seeds' noise
    "t23-ss_dm-s0": 11.0, "t23-ss_dm-s1": 11.2,  # clearly higher: the paper has it lower
    "t23-all-s0": 9.5,  # one seed
}  # fmt: skip


def test_report_means_spreads_and_verdicts(tmp_path):
    result = study.report(_show(RUNS), tmp_path)
    rows = {r["label"]: r for r in result["rows"]}
    ddpm = rows["baseline (DDPM)"]["metrics"]["dtw"]
    assert ddpm["mean"] == pytest.approx(10.1) and ddpm["sd"] == pytest.approx(0.1414, abs=1e-3) and ddpm["n"] == 2
    fsa = rows["+ FSA"]
    assert fsa["change"] == pytest.approx((9.05 - 10.1) / 10.1)
    assert fsa["paper_change"] == pytest.approx((18.54 - 19.12) / 19.12)
    assert fsa["verdict"] == "reproduces"
    assert fsa["per_seed_change"] == pytest.approx({0: -0.1, 1: (9.1 - 10.2) / 10.2})  # against the same seed
    assert rows["+ CCAM"]["verdict"] == "within seed noise (same sign)"
    assert rows["SS-DM"]["verdict"] == "reversed"
    assert rows["FSA + con_aug + CCAM (all)"]["verdict"] == "one seed: no spread"
    assert rows["CDCD"]["verdict"] == "not run"  # its only run failed: no metrics, not a zero
    assert rows["FSA + CCAM (our default; not a paper row)"]["verdict"] == "not run"  # still running
    assert rows["+ con_aug"]["verdict"] == "not run" and rows["lambda 0.002"]["verdict"] == "not run"
    assert rows["lambda 0.005"]["verdict"] == "its reference row not run"  # the "all" run, lambda 0 missing
    assert rows["lambda 0"]["verdict"] == "reference, not run"
    assert sorted(result["runs"]) == sorted(RUNS)  # the probe and the failed run are not study results
    assert result["cpu_seconds_train_and_sample"] == pytest.approx(len(RUNS) * (600 + 5))
    assert rows["+ FSA"]["metrics"]["dtw_over_blank"]["mean"] == pytest.approx(9.05 / 20)
    md = (tmp_path / "results.md").read_text()
    assert "| Table 2 | + FSA | 0,1 | 9.05 ± 0.07 |" in md and "18.54" in md
    assert md.startswith(f"# The paper's Tables 1-3 at CPU scale: {len(RUNS)} runs, 1.5 core-hours")
    summary = md.split("## Every metric")[0]
    fsa_line = next(line for line in summary.splitlines() if "| + FSA |" in line)
    assert fsa_line.startswith("| Table 2 | + FSA | 0,1 | 0.453 ± 0.004 |")
    assert "| -3.0 % | -10.4 % ± 1.1 |" in fsa_line
    assert fsa_line.endswith("| -10.0 / -10.8 | reproduces |")
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["verdict"] == "reproduces"
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_change_is_taken_over_the_seeds_the_row_shares_with_its_reference(tmp_path):
    # DDPM's seed 2 run is ~6 % above its others; CDCD (seeds 0, 1) is 1 % above DDPM on both of its seeds, so
    # against DDPM's three-seed mean it would look 1.3 % lower, the wrong sign
    runs = {"t23-ddpm-s0": 10.0, "t23-ddpm-s1": 10.2, "t23-ddpm-s2": 10.8, "t23-cdcd-s0": 10.1, "t23-cdcd-s1": 10.302}
    rows = {r["label"]: r for r in study.report(_show(runs), tmp_path)["rows"]}
    cdcd = rows["CDCD"]
    assert cdcd["change"] == pytest.approx((10.201 - 10.1) / 10.1)
    assert cdcd["per_seed_change"] == pytest.approx({0: 0.01, 1: 0.01})
    assert cdcd["se"] == pytest.approx(math.sqrt(0.1428**2 / 2 + 0.1414**2 / 2) / 10.1, rel=1e-3)
    assert cdcd["verdict"] == "within seed noise (opposite sign)"
    assert rows["baseline (DDPM)"]["metrics"]["dtw"]["n"] == 3  # the row's own figures keep all its seeds


def test_the_infonce0_reading_is_compared_to_ddpm_and_to_its_own_lambda_0(tmp_path):
    # all at InfoNCE weight 0 stands for the paper's all row (against DDPM) and, against the positive alone
    # (lambda 0 at InfoNCE 0), for Table 3's lambda 0.005 against lambda 0: the paper's 15.76 vs 16.34 there
    runs = {"t23-ddpm-s0": 10.0, "t23-ddpm-s1": 10.2, "t23-positive_only-s0": 9.5, "t23-positive_only-s1": 9.9}
    runs |= {"t23-all_nce0-s0": 9.4, "t23-all_nce0-s1": 9.5}
    result = study.report(_show(runs), tmp_path)
    rows = {r["label"]: r for r in result["rows"]}
    t2, t3 = rows["all, InfoNCE weight 0"], rows["lambda 0.005 vs 0, InfoNCE weight 0"]
    assert t2["paper_change"] == pytest.approx((15.76 - 19.12) / 19.12)
    assert t2["change"] == pytest.approx((9.45 - 10.1) / 10.1) and t2["verdict"] == "reproduces"
    assert t3["paper_change"] == pytest.approx((15.76 - 16.34) / 16.34)
    assert t3["change"] == pytest.approx((9.45 - 9.7) / 9.7)
    assert t3["per_seed_change"] == pytest.approx({0: -0.1 / 9.5, 1: -0.4 / 9.9})
    assert t3["verdict"] == "within seed noise (same sign)"  # -2.6 % against a 2 SE of 4.2 %
    assert rows["lambda 0.005"]["verdict"] == "not run"  # the eq. 10 rows are untouched
    con_aug = rows["+ con_aug, InfoNCE weight 0"]  # the same reading of + con_aug, against DDPM as well
    assert con_aug["reference"] == "ddpm" and con_aug["paper_change"] == pytest.approx((16.82 - 19.12) / 19.12)
    assert con_aug["verdict"] == "not run"


def test_report_cli_reads_a_saved_exp_show(tmp_path, capsys):
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(_show(RUNS)))
    assert main(["--params", str(PARAMS), "study", "report", "--exp-json", str(saved), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "+ FSA" in out and "reproduces" in out and f"{len(RUNS)} runs" in out


def test_evaluate_reports_the_models_training_time(tmp_path):
    (tmp_path / "model_config.json").write_text(json.dumps({"train_seconds": 61.5, "steps_trained": 1000, "a": 1}))
    assert training_facts(tmp_path) == {"train_seconds": 61.5, "steps_trained": 1000}
    assert training_facts(tmp_path / "missing") == {}


def test_samples_montage_reads_each_rows_sample_from_its_experiment(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    rendered = tmp_path / "rendered"
    (rendered / "images").mkdir(parents=True)
    rows = []
    for i in range(3):
        Image.fromarray(np.full((32, 128), 255, np.uint8)).save(rendered / "images" / f"t{i}.png")
        rows.append({"id": f"t{i}", "markup": "x", "image": f"images/t{i}.png"})
    (rendered / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked = []

    def reader(path, rev):
        asked.append((path, rev))
        buf = io.BytesIO()
        Image.fromarray(np.zeros((32, 128), np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    result = study.report(_show(RUNS), tmp_path / "out", rendered=rendered, reader=reader)
    assert result["samples_columns"] == ["gold", "ddpm", "ss_dm", "fsa", "ccam", "all"]  # seed 0 of each row run
    assert result["samples_missing"] == []
    assert len(asked) == 3 * 5 and {rev for _, rev in asked} == {"x" * 40}
    assert {p for p, _ in asked} == {f"eval/math/samples/t{i}.png" for i in range(3)}
    assert (tmp_path / "out" / "samples.png").stat().st_size > 5_000
    kept = tmp_path / "out" / "samples"
    assert sorted(p.name for p in (kept / "t23-fsa-s0").iterdir()) == ["t0.png", "t1.png", "t2.png"]

    # another session: the experiments' outputs are gone, the kept samples still draw the montage; a run whose
    # samples were never kept is left out and named, not drawn blank
    (kept / "t23-ss_dm-s0").rename(tmp_path / "gone")

    def nothing(path, rev):
        raise FileNotFoundError(path)

    again = study.report(
        [{"rev": "workspace", "experiments": None}], tmp_path / "out", rendered=rendered, reader=nothing
    )
    assert again["samples_columns"] == ["gold", "ddpm", "fsa", "ccam", "all"]
    assert again["samples_missing"] == ["ss_dm"]


def test_run_skips_finished_runs_names_failures_and_goes_on(tmp_path, caplog):
    import sys

    def command(key, seed, domain):  # a stand-in for `dvc exp run --temp`: ss_dm fails, the rest succeed
        code = 3 if key == "ss_dm" else 0
        return [sys.executable, "-c", f"print('{key} {seed} {domain}'); raise SystemExit({code})"]

    done = {"t23-ddpm-s0"}
    result = study.run(["ddpm", "ss_dm", "fsa"], [0, 1], "math", PARAMS, jobs=2, done=done, logs=tmp_path,
                       command=command, poll=0.05)  # fmt: skip
    assert result["skipped"] == ["t23-ddpm-s0"]
    assert sorted(result["ran"]) == ["t23-ddpm-s1", "t23-fsa-s0", "t23-fsa-s1"]
    assert sorted(result["failed"]) == ["t23-ss_dm-s0", "t23-ss_dm-s1"]
    assert len(result["ran"]) + len(result["failed"]) + len(result["skipped"]) == 6  # counts add up
    assert (tmp_path / "t23-fsa-s1.log").read_text().strip() == "fsa 1 math"
    failed_lines = [r.getMessage() for r in caplog.records if "t23-ss_dm-s0" in r.getMessage()]
    assert len(failed_lines) == 1 and "exit 3" in failed_lines[0] and "t23-ss_dm-s0.log" in failed_lines[0]


def test_finished_reuses_only_runs_of_the_current_params(tmp_path):
    import yaml

    raw = yaml.safe_load(PARAMS.read_text())
    current = study.apply_overrides(raw, study.overrides("ddpm", 0))
    older = study.apply_overrides(current, {"train.steps": 17})  # an earlier study's budget
    exps = {
        "t23-ddpm-s0": {"params": current, "metrics": {}, "rev": "a"},
        "t23-ddpm-s1": {"params": older, "metrics": {}, "rev": "b"},
        "t23-fsa-s0": {"params": {"train": {"lr": "fast"}}, "metrics": {}, "rev": "c"},
    }
    assert study.finished(exps, PARAMS) == {"t23-ddpm-s0"}


def test_a_later_report_keeps_the_runs_of_an_earlier_one(tmp_path):
    first = study.report(_show(RUNS), tmp_path)
    later = study.report([{"rev": "workspace", "experiments": None}], tmp_path)  # another machine: no live runs
    assert later["runs"] == first["runs"] and later["rows"][1]["verdict"] == "reproduces"
    newer = {"t23-ddpm-s0": 10.0, "t23-ddpm-s1": 10.2, "t23-fsa-s0": 10.1, "t23-fsa-s1": 10.1}
    again = study.report(_show(newer), tmp_path)  # live experiments replace saved runs of the same name
    rows = {r["config"]: r for r in again["rows"]}
    assert rows["fsa"]["metrics"]["dtw"]["mean"] == pytest.approx(10.1) and rows["ss_dm"]["seeds"] == [0, 1]
    (tmp_path / "runs.json").write_text("{not json")
    with pytest.raises(ValueError, match="runs.json: not a runs file"):
        study.report(_show(newer), tmp_path)
