"""Checkpoints and run fingerprints: what is saved, when a checkpoint may be resumed, and by which run.

A checkpoint is accelerate's full state (model, EMA, optimizer, LR scheduler, grad scaler, every RNG) with a copy
of the DVCLive folder, written under a temporary name with a COMPLETE marker (listing every file and its size) last
and renamed into place. A run resumes only the checkpoints of its own fingerprint: params, data and code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

import markup2image
from markup2image.config import Params, to_dict
from markup2image.data.layouts import LAYOUTS_JSONL
from markup2image.text.tokenizer import TOKENIZER_FILE

log = logging.getLogger(__name__)


COMPLETE = "COMPLETE"  # marker written into a checkpoint before it is renamed into place


TRAINER_STATE = "trainer_state.json"


LIVE_IN_CHECKPOINT = "live"  # a copy of the DVCLive folder as of the checkpoint's step


# settings that change how often things are written or where processes run, not what a step computes
_NOT_FINGERPRINTED = ("checkpoint_every", "log_every", "sample_every", "keep_checkpoints", "num_processes", "cpu")


_NOT_FINGERPRINTED += ("accelerate_config", "snapshot_steps")


DATA_FINGERPRINT_FILES = ("train.jsonl", TOKENIZER_FILE)  # in the tokenized folder: ids, markup, vocabulary


def data_fingerprint(rendered: Path, tokenized: Path) -> str:
    """A hash of the training data as the loop sees it: the tokenized train split (ids and markup), the tokenizer,
    the rendered train index (which items have images) and the layouts (HCMA boxes). Pixel contents are not read
    (at 100k images that would cost more than it saves): a re-render changes this index, the layouts or the ids in
    nearly every real case, and an identical index with identical ids is the same training set."""
    files = [tokenized / name for name in DATA_FINGERPRINT_FILES]
    files += [rendered / "train.jsonl", rendered / LAYOUTS_JSONL]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    return h.hexdigest()[:16]


def code_fingerprint() -> str:
    """A hash of this package's Python sources. DVC reruns the train stage when they change (they are its deps);
    resuming the finished run's checkpoints would then silently keep the model the old code trained."""
    root = Path(markup2image.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_fingerprint(params: Params, domain: str, data: str = "", code: str = "") -> str:
    """A hash of everything that defines what training computes; checkpoints of another run are never resumed.

    ``data`` is :func:`data_fingerprint` of the training set and ``code`` :func:`code_fingerprint`, so checkpoints
    of a run on other data or by other code are not resumed either. The process layout is left out: a run may
    resume on another process count with the same global batch.
    """
    top = ("lambda", "beta", "tau", "infonce_weight", "model", "diffusion", "train")
    keys = {k: v for k, v in to_dict(params).items() if k in top}
    keys["train"] = {k: v for k, v in keys["train"].items() if k not in _NOT_FINGERPRINTED}
    keys["domain"] = [domain, to_dict(params.domain_config(domain))]
    if params.hcma.global_weight > 0 or params.hcma.local_weight > 0:  # absent when off: old fingerprints hold
        keys["hcma"] = {k: v for k, v in to_dict(params.hcma).items() if not k.startswith("guidance_")}
    if data:
        keys["data"] = data
    if code:
        keys["code"] = code
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint folder ``step_<n>`` that was completely written (has the COMPLETE marker).

    ``.tmp_step_<n>`` folders (a save that was cut off) never match. A checkpoint whose files do not match its
    marker's list (a file deleted or cut short since) is skipped with one line naming it; the next older one is used.
    """
    if not folder.exists():
        return None
    done = [p for p in folder.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / COMPLETE).exists()]
    for ckpt in sorted(done, key=_step_of, reverse=True):
        problem = checkpoint_problem(ckpt)
        if not problem:
            return ckpt
        log.warning("checkpoint %s is damaged (%s); skipped, trying the one before it", ckpt, problem)
    return None


def checkpoint_problem(ckpt: Path) -> str:
    """'' when every file the checkpoint's COMPLETE marker lists is there with its size, else what is wrong."""
    try:
        listed = json.loads((ckpt / COMPLETE).read_text()).get("files", {})
        json.loads((ckpt / TRAINER_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"unreadable marker or {TRAINER_STATE}: {exc}"
    for rel, size in listed.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} when saved"
    return ""


def save_checkpoint(
    acc: Accelerator, folder: Path, step: int, fingerprint: str = "", keep: int = 0, live: Path | None = None
) -> None:
    """accelerate's full state (model, optimizer, LR scheduler, grad scaler, EMA, every RNG) into ``step_<n>``,
    with a copy of the DVCLive folder ``live`` as of this step (:func:`restore_live`).

    Written into ``.tmp_step_<n>`` with the COMPLETE marker last, then renamed, so :func:`newest_checkpoint`
    never picks up a half-written checkpoint. ``keep`` > 0 deletes all but the newest ``keep`` checkpoints.
    """
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp_step_{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "fingerprint": fingerprint, "processes": acc.num_processes}
        (tmp / TRAINER_STATE).write_text(json.dumps(state))
        if live is not None and live.is_dir():
            shutil.copytree(live, tmp / LIVE_IN_CHECKPOINT)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"files": files}))  # what checkpoint_intact checks on resume
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(folder, keep)
    acc.wait_for_everyone()


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Remove cut-off saves (``.tmp_step_*``, older ``step_*`` without marker) and all but the newest ``keep``."""
    for p in folder.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)
    complete = sorted((p for p in folder.glob("step_*") if (p / COMPLETE).exists()), key=_step_of)
    newest = _step_of(complete[-1]) if complete else -1
    for p in folder.glob("step_*"):
        if not (p / COMPLETE).exists() and _step_of(p) < newest:
            shutil.rmtree(p, ignore_errors=True)
    for p in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
