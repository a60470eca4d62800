"""The render stage: every downloaded markup becomes a gold image or a reject with its reason.

Layout written under ``out_dir``::

    images/<id>.png        one gold image per rendered item (uint8, HxW gray or HxWx3 RGB)
    layouts/<id>.json      boxes of the item's markup segments, where the engine gives them (data/layouts.py)
    layouts.jsonl          {"id", "boxes"} of every rendered item with a layout, in split order
    {train,val,test}.jsonl {"id", "markup", "image": "images/<id>.png"} for rendered items, input order
    rejects.jsonl          {"id", "split", "reason", "detail"}
    render_report.json     counts per split and per reason; total == rendered + rejected;
                           "layouts": {"with", "without"} over rendered items (gold images have none)
    .render_journal.jsonl  one line per finished item (resume state, sorted by id when the run completes)
    .render_state.json     the renderer settings the journal belongs to

Items are rendered in batches of ``params.render.batch_size`` by ``params.render.workers`` long-lived child
processes (``workers=1`` runs inline). A watchdog gives each batch ``params.render.timeout`` (plus slack) between two
results (more for engines that time their own tool calls, see :func:`watchdog_limit`); a worker that hangs or dies
is killed, the item it was on is rejected (``timeout`` / ``crash``) and the
rest of its batch goes back to the queue, so a bad item costs only itself.

Resume: a killed run leaves images (written atomically) and the journal. A rerun trusts an item only if the
journal records it for the same markup and, for rendered items, its PNG decodes to the right shape; everything else
is redone. Items rejected as ``renderer_missing`` are retried, since the tool may have been installed since.
Hub downloads ship gold images (``in_dir/gold/<id>.png``): those are used instead of rendering and counted as
``gold`` in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from markup2image.config import DomainConfig, Params
from markup2image.data.layouts import LAYOUTS_DIR, LAYOUTS_JSONL, layout_path, write_layout
from markup2image.data.renderers import (
    BATCH_ENGINES,
    REJECT_REASONS,
    SELF_TIMED_ENGINES,
    RenderError,
    check_engine,
    iter_render_batch,
    place_top_left,
    resolve_engine,
)
from markup2image.io import (
    CorruptFileError,
    is_safe_id,
    load_image,
    read_json,
    read_jsonl,
    save_png,
    write_json,
    write_jsonl,
)
from markup2image.stage_args import parser, setup, user_errors

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
JOURNAL = ".render_journal.jsonl"
STATE = ".render_state.json"
STATE_VERSION = 2  # 2: layouts/ written beside images/ (older outputs are rendered again once)
# renderer_missing: the tool may be installed since; the stage's own rejects are decided again on every run
RETRY_REASONS = frozenset({"renderer_missing", "too_long", "invalid_id"})
# Between two results of one batch the watchdog allows timeout * WATCHDOG_FACTOR + WATCHDOG_SLACK_S seconds.
WATCHDOG_FACTOR = 1.5
WATCHDOG_SLACK_S = 10.0
# Markup with these is rejected before any engine (C libraries stop at NUL); tab, newline, carriage return are kept.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# (id, markup, gold path or "") — what a worker gets
Item = tuple[str, str, str]


# the messages from a batch's driver (a worker process or inline) to the scheduler: one per item, then one per batch
@dataclass(frozen=True)
class Rendered:
    id: str
    gold: bool  # copied from the hub's gold image, not rendered
    boxes: int  # layout boxes written (0: no layout)


@dataclass(frozen=True)
class Rejected:
    id: str
    reason: str  # one of REJECT_REASONS
    detail: str


@dataclass(frozen=True)
class BatchFailed:
    """The batch's driver raised (the worker lives on); the scheduler decides whom to blame (:func:`_failed_batch`)."""

    detail: str


@dataclass(frozen=True)
class BatchDone:
    pass


Message = Rendered | Rejected  # what the scheduler yields: one per item
WorkerMessage = Rendered | Rejected | BatchFailed | BatchDone


def watchdog_limit(engine: str, timeout: float, batch_size: int) -> float:
    """Seconds the watchdog waits between two results of one batch before it kills the worker.

    In-process engines report item by item, so one item's ``timeout`` (plus slack) is enough. Engines that time
    their own external calls (``SELF_TIMED_ENGINES``) may legitimately go quiet while they bisect a hanging batch:
    up to one ``timeout`` per halving, so the watchdog is only a backstop there.
    """
    if engine in SELF_TIMED_ENGINES:
        halvings = math.ceil(math.log2(max(batch_size, 2)))
        return timeout * (2 * halvings + 2) + WATCHDOG_SLACK_S
    return timeout * WATCHDOG_FACTOR + WATCHDOG_SLACK_S


def markup_hash(markup: str) -> str:
    return hashlib.sha1(markup.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# one batch, run in a worker process or inline


@dataclass(frozen=True)
class _Job:
    domain: str
    cfg: DomainConfig
    timeout: float
    images_dir: Path
    itemwise: bool  # the engine reports item by item (the first unreported item is the one it was on)


def _gold_image(path: str, cfg: DomainConfig) -> np.ndarray:
    """A shipped gold image, as is when it already has the canvas size, else cropped and placed top-left."""
    image = load_image(path, channels=cfg.channels)
    if image.shape[:2] == (cfg.height, cfg.width):
        return image
    return place_top_left(image, cfg)


def _check_shape(image: np.ndarray, cfg: DomainConfig) -> None:
    expected = (cfg.height, cfg.width) if cfg.channels == 1 else (cfg.height, cfg.width, 3)
    if image.shape != expected or image.dtype != np.uint8:
        raise RenderError("crash", f"the engine returned {image.dtype} {image.shape}, expected uint8 {expected}")


def _process_batch(job: _Job, items: list[Item]) -> Iterator[Message]:
    """Render (or copy gold for) ``items``, save PNGs atomically, yield one message per item."""
    to_render = []
    for item_id, markup, gold in items:
        if not gold:
            to_render.append((item_id, markup))
            continue
        try:
            image = _gold_image(gold, job.cfg)
            _check_shape(image, job.cfg)
        except RenderError as exc:
            yield Rejected(item_id, exc.reason, f"gold image {gold}: {exc.detail}")
            continue
        except Exception as exc:  # noqa: BLE001 - an unreadable gold file costs one item
            yield Rejected(item_id, "crash", f"gold image {gold}: {type(exc).__name__}: {exc}")
            continue
        save_png(job.images_dir / f"{item_id}.png", image)
        yield Rendered(item_id, True, write_layout(job.images_dir.parent, item_id, None))  # a gold image has none
    for res in iter_render_batch(job.domain, to_render, job.cfg, job.timeout):
        if res.image is None:
            yield Rejected(res.id, res.reason or "crash", res.detail)
            continue
        try:
            _check_shape(res.image, job.cfg)
        except RenderError as exc:
            yield Rejected(res.id, exc.reason, exc.detail)
            continue
        save_png(job.images_dir / f"{res.id}.png", res.image)
        yield Rendered(res.id, False, write_layout(job.images_dir.parent, res.id, res.layout))


def _worker_main(conn: Connection, job: _Job) -> None:
    """Child process: receive batches, send one message per item and :class:`BatchDone` per batch, until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    while True:
        items = conn.recv()
        if items is None:
            return
        try:
            for msg in _process_batch(job, items):
                conn.send(msg)
        except Exception as exc:  # noqa: BLE001 - the parent decides whom to blame (_failed_batch)
            conn.send(BatchFailed(f"{type(exc).__name__}: {exc}"[:500]))
        conn.send(BatchDone())


# ----------------------------------------------------------------------------------------------------------------
# the scheduler: a pool of watched workers (or inline), each batch's unreported items tracked


@dataclass
class _Batch:
    items: list[Item]
    reported: set[str] = field(default_factory=set)

    def unreported(self) -> list[Item]:
        return [it for it in self.items if it[0] not in self.reported]


class _Worker:
    def __init__(self, ctx: Any, job: _Job) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, job), daemon=True)
        self.proc.start()
        child.close()
        self.batch: _Batch | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class _Timeout(BaseException):
    """Raised by the inline watchdog; a BaseException so that renderers' ``except Exception`` cannot swallow it."""


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_Timeout` after ``seconds`` (main thread on POSIX only; elsewhere no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _failed_batch(batch: _Batch, reason: str, detail: str, queue: deque[_Batch], itemwise: bool) -> Rejected | None:
    """A batch whose worker died, hung or raised. An item-by-item engine was on the first unreported item: reject
    it and requeue the rest at the front. A batch engine draws its chunk in one call, so the culprit can be any
    unreported item: requeue the two halves (a batch of one item is that item's reject)."""
    left = batch.unreported()
    if not left:
        return None
    if itemwise or len(left) == 1:
        first, *rest = left
        if rest:
            queue.appendleft(_Batch(rest))
        return Rejected(first[0], reason, detail)
    half = len(left) // 2
    queue.extendleft([_Batch(left[half:]), _Batch(left[:half])])  # extendleft reverses: the first half runs first
    return None


def _run_inline(job: _Job, queue: deque[_Batch], limit: float) -> Iterator[Message]:
    while queue:
        batch = queue.popleft()
        gen = _process_batch(job, batch.items)
        while True:
            try:
                with _alarm(limit):
                    msg = next(gen)
            except StopIteration:
                break
            except _Timeout:
                gen.close()
                detail = f"no result within {limit:.0f} s; the renderer hung"
                failed = _failed_batch(batch, "timeout", detail, queue, job.itemwise)
            except Exception as exc:  # noqa: BLE001 - the batch driver itself failed; cost one item, go on
                detail = f"{type(exc).__name__}: {exc}"[:500]
                failed = _failed_batch(batch, "crash", detail, queue, job.itemwise)
            else:
                batch.reported.add(msg.id)
                yield msg
                continue
            if failed:
                yield failed
            break


def _start_pool(job: _Job, workers: int) -> tuple[Any, list[_Worker]]:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx, [_Worker(ctx, job) for _ in range(workers)]


def _run_pool(job: _Job, queue: deque[_Batch], ctx: Any, pool: list[_Worker], limit: float) -> Iterator[Message]:
    try:
        while queue or any(w.batch for w in pool):
            for i, w in enumerate(pool):
                if w.batch is None and queue:
                    if not w.proc.is_alive():
                        pool[i] = w = _Worker(ctx, job)
                    w.batch = queue.popleft()
                    w.conn.send(w.batch.items)
                    w.deadline = time.monotonic() + limit
            busy = [w for w in pool if w.batch is not None]
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for w in busy:
                assert w.batch is not None
                if w.conn in ready:
                    try:
                        while w.batch is not None and w.conn.poll():
                            msg: WorkerMessage = w.conn.recv()
                            w.deadline = time.monotonic() + limit
                            if isinstance(msg, BatchDone):
                                w.batch = None
                            elif isinstance(msg, BatchFailed):  # the batch raised; the worker lives on
                                failed = _failed_batch(w.batch, "crash", msg.detail, queue, job.itemwise)
                                w.batch.reported.update(it[0] for it in w.batch.items)  # the rest is requeued
                                if failed:
                                    yield failed
                            else:
                                w.batch.reported.add(msg.id)
                                yield msg
                        continue
                    except (EOFError, OSError):
                        w.proc.join(1)
                        detail = f"the renderer process died (exit code {w.proc.exitcode})"
                        failed = _failed_batch(w.batch, "crash", detail, queue, job.itemwise)
                elif time.monotonic() > w.deadline:
                    detail = f"no result within {limit:.0f} s; the renderer hung and was killed"
                    failed = _failed_batch(w.batch, "timeout", detail, queue, job.itemwise)
                else:
                    continue
                w.kill()
                w.batch = None
                if failed:
                    yield failed
    finally:
        for w in pool:
            if w.proc.is_alive() and w.batch is None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()


# ----------------------------------------------------------------------------------------------------------------
# resume state


def _fingerprint(domain: str, cfg: DomainConfig) -> dict[str, Any]:
    return {"version": STATE_VERSION, "domain": domain, "config": dataclasses.asdict(cfg)}


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """id -> last record; a line cut short by a kill is ignored (its item is redone)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with path.open() as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                records[rec["id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return records


def _image_ok(path: Path, cfg: DomainConfig) -> bool:
    """A PNG that decodes fully to the canvas shape (a half-written or foreign file does not)."""
    try:
        image = load_image(path, channels=cfg.channels)  # a missing, cut-short or foreign file raises
    except CorruptFileError:
        return False
    return image.shape[:2] == (cfg.height, cfg.width)


def _load_done(out_dir: Path, domain: str, cfg: DomainConfig, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The journal records of ``wanted`` items (id -> markup hash) that a rerun may trust."""
    state_path, journal_path = out_dir / STATE, out_dir / JOURNAL
    state = None
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError:
            state = None
    if state != _fingerprint(domain, cfg):
        if journal_path.exists():
            log.info("%s: renderer settings changed since the last run; rendering everything again", out_dir)
        journal_path.unlink(missing_ok=True)
        write_json(state_path, _fingerprint(domain, cfg))
        return {}
    done = {}
    for item_id, rec in _read_journal(journal_path).items():
        if wanted.get(item_id) != rec.get("markup_hash"):
            continue
        if rec["status"] == "rejected" and rec.get("reason") not in RETRY_REASONS:
            done[item_id] = rec
        elif rec["status"] == "rendered" and _image_ok(out_dir / "images" / f"{item_id}.png", cfg):
            done[item_id] = rec
    return done


def _write_layouts(out_dir: Path, splits: dict[str, list[dict[str, Any]]], done: dict[str, dict[str, Any]]) -> dict:
    """Gather ``layouts/<id>.json`` of rendered items into ``layouts.jsonl``, drop the others; count with/without."""
    rendered = [row["id"] for rows in splits.values() for row in rows if done[row["id"]]["status"] == "rendered"]
    rows = []
    for item_id in rendered:
        path = layout_path(out_dir, item_id)
        if path.exists():
            rows.append({"id": item_id, "boxes": read_json(path)["boxes"]})
    write_jsonl(out_dir / LAYOUTS_JSONL, rows)
    layouts_dir = out_dir / LAYOUTS_DIR
    if layouts_dir.exists():
        keep = set(rendered)
        for path in layouts_dir.iterdir():
            if path.name.startswith(".") or (path.suffix == ".json" and path.stem not in keep):
                path.unlink(missing_ok=True)
    return {"with": len(rows), "without": len(rendered) - len(rows)}


def _clean_images(images_dir: Path, keep: set[str]) -> None:
    """Drop temp files of killed writes and images of items that are no longer rendered."""
    for path in images_dir.iterdir():
        if path.name.startswith(".") or (path.suffix == ".png" and path.stem not in keep):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# the stage


def _read_splits(domain: str, in_dir: Path) -> dict[str, list[dict[str, Any]]]:
    splits: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        path = in_dir / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run the download stage for domain {domain!r} first")
        rows = read_jsonl(path)
        for i, row in enumerate(rows, 1):
            if not isinstance(row.get("id"), str) or not isinstance(row.get("markup"), str):
                raise ValueError(f"{path}:{i}: a row needs string 'id' and 'markup' fields")
            if row["id"] in seen:
                raise ValueError(f"{path}:{i}: id {row['id']!r} also appears in {seen[row['id']]}; ids must be unique")
            seen[row["id"]] = split
        splits[split] = rows
    return splits


def _prereject(splits: dict[str, list[dict[str, Any]]], max_chars: int, wanted: dict[str, str]) -> dict:
    """Records of items no engine gets: ids that cannot name a file, markup longer than ``render.max_chars``,
    markup with control characters (tab, newline and carriage return are kept)."""
    out = {}
    for rows in splits.values():
        for row in rows:
            item_id, markup = row["id"], row["markup"]
            if not is_safe_id(item_id):
                reason = "invalid_id"
                detail = f"id {item_id[:80]!r} cannot name a file (letters, digits, '.', '_', '-'; not starting '.')"
            elif len(markup) > max_chars:
                reason = "too_long"
                detail = f"{len(markup)} characters, more than render.max_chars ({max_chars}); raise it to render this"
            elif control := CONTROL_CHARS.search(markup):  # C libraries stop at NUL: RDKit drew "CCO\0X" as CCO
                reason = "parse_error"
                detail = f"control character U+{ord(control.group()):04X} at position {control.start()}; remove it"
            else:
                continue
            out[item_id] = {"id": item_id, "status": "rejected", "reason": reason, "detail": detail,
                            "markup_hash": wanted[item_id]}  # fmt: skip
    return out


def render_corpus(params: Params, domain: str, in_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Render ``in_dir/{split}.jsonl`` of ``domain`` into ``out_dir`` (layout in the module docstring).

    Returns the report that is also written to ``out_dir/render_report.json``.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    cfg = resolve_engine(domain, params.domain_config(domain))
    rcfg = params.render
    try:
        check_engine(domain, cfg)
    except RenderError as exc:
        raise RuntimeError(
            f"render {domain}: engine {cfg.engine!r} cannot run here: {exc.detail}"
            + (" (or set domain.math.engine: mathtext, which needs no system packages)" if domain == "math" else "")
        ) from exc
    splits = _read_splits(domain, in_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    wanted = {row["id"]: markup_hash(row["markup"]) for rows in splits.values() for row in rows}
    done = _load_done(out_dir, domain, cfg, wanted)
    done.update(_prereject(splits, rcfg.max_chars, wanted))

    gold_dir = in_dir / "gold"
    pending: list[Item] = []
    for rows in splits.values():
        for row in rows:
            if row["id"] not in done:
                gold = gold_dir / f"{row['id']}.png"
                pending.append((row["id"], row["markup"], str(gold) if gold.exists() else ""))
    log.info(
        "render %s (%s): %d items, %d already done, %d to render with %d worker(s)",
        domain, cfg.engine, len(wanted), len(done), len(pending), rcfg.workers,
    )  # fmt: skip

    queue = deque(_Batch(pending[i : i + rcfg.batch_size]) for i in range(0, len(pending), rcfg.batch_size))
    job = _Job(domain, cfg, rcfg.timeout, images_dir, cfg.engine not in BATCH_ENGINES)
    limit = watchdog_limit(cfg.engine, rcfg.timeout, rcfg.batch_size)
    markups = {it[0]: it[1] for it in pending}
    start = time.monotonic()
    this_run: Counter[str] = Counter()
    if rcfg.workers <= 1:
        messages = _run_inline(job, queue, limit)
    else:  # workers start before the progress bar's monitor thread, so nothing forks a threaded process
        ctx, pool = _start_pool(job, min(rcfg.workers, len(queue)))
        messages = _run_pool(job, queue, ctx, pool, limit)
    with (
        (out_dir / JOURNAL).open("a") as journal,
        tqdm(total=len(pending), disable=not progress, desc=f"render {domain}", unit="item", mininterval=1.0) as bar,
    ):
        for msg in messages:
            item_id = msg.id
            if isinstance(msg, Rendered):
                rec = {"id": item_id, "status": "rendered", "gold": msg.gold, "boxes": msg.boxes}
            else:
                rec = {"id": item_id, "status": "rejected", "reason": msg.reason, "detail": str(msg.detail)[:500]}
            rec["markup_hash"] = markup_hash(markups[item_id])
            journal.write(json.dumps(rec) + "\n")
            journal.flush()
            done[item_id] = rec
            this_run[rec["status"]] += 1
            bar.update(1)
    seconds = time.monotonic() - start
    return _write_outputs(domain, cfg, splits, done, out_dir, this_run, seconds, skipped=len(wanted) - len(pending))


def _write_outputs(
    domain: str,
    cfg: DomainConfig,
    splits: dict[str, list[dict[str, Any]]],
    done: dict[str, dict[str, Any]],
    out_dir: Path,
    this_run: Counter[str],
    seconds: float,
    skipped: int,
) -> dict:
    report: dict[str, Any] = {"domain": domain, "engine": cfg.engine, "shape": [cfg.height, cfg.width, cfg.channels]}
    rejects, totals, reasons_all = [], Counter(), Counter()
    report["splits"] = {}
    for split, rows in splits.items():
        kept, counts, reasons = [], Counter(), Counter()
        for row in rows:
            rec = done.get(row["id"])
            if rec is None:  # the scheduler guarantees a result per item; this would be a bug
                raise RuntimeError(f"render {domain}: item {row['id']!r} ({split}) has no result")
            counts["total"] += 1
            if rec["status"] == "rendered":
                counts["rendered"] += 1
                counts["gold"] += int(bool(rec.get("gold")))
                kept.append({"id": row["id"], "markup": row["markup"], "image": f"images/{row['id']}.png"})
            else:
                counts["rejected"] += 1
                reasons[rec["reason"]] += 1
                rejects.append({"id": row["id"], "split": split, "reason": rec["reason"], "detail": rec["detail"]})
        assert counts["total"] == counts["rendered"] + counts["rejected"], (split, counts)
        write_jsonl(out_dir / f"{split}.jsonl", kept)
        report["splits"][split] = {k: counts[k] for k in ("total", "rendered", "rejected", "gold")}
        report["splits"][split]["reasons"] = {r: reasons[r] for r in REJECT_REASONS if reasons[r]}
        totals.update(counts)
        reasons_all.update(reasons)
    assert totals["total"] == totals["rendered"] + totals["rejected"], totals
    report.update({k: totals[k] for k in ("total", "rendered", "rejected", "gold")})
    report["reasons"] = {r: reasons_all[r] for r in REJECT_REASONS if reasons_all[r]}
    rendered_now = this_run["rendered"] + this_run["rejected"]
    report["this_run"] = {
        "skipped_done": skipped,
        "rendered": this_run["rendered"],
        "rejected": this_run["rejected"],
        "seconds": round(seconds, 3),
        "items_per_s": round(rendered_now / seconds, 2) if seconds > 0 and rendered_now else None,
    }
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    report["layouts"] = _write_layouts(out_dir, splits, done)
    # compact the journal: only this corpus's items, sorted, so a finished output folder is deterministic
    wanted = {row["id"] for rows in splits.values() for row in rows}
    write_jsonl(out_dir / JOURNAL, (done[i] for i in sorted(wanted)))
    _clean_images(out_dir / "images", {i for i in wanted if done[i]["status"] == "rendered"})
    write_json(out_dir / "render_report.json", report)
    log.info(
        "render %s: %d rendered (%d gold, %d with layouts), %d rejected %s -> %s",
        domain, report["rendered"], report["gold"], report["layouts"]["with"], report["rejected"], report["reasons"],
        out_dir,
    )  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> None:
    """The render stage's command line (``stages/render.py``, ``python -m markup2image.data.render``)."""
    p = parser("render: gold images for every markup item, or a reject with its reason -> data/rendered/<domain>/.")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    params = setup(args)
    with user_errors():
        render_corpus(params, args.domain, args.raw, args.out)


if __name__ == "__main__":
    main()
