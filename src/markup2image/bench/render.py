"""Render throughput benchmark: items per second for ONE worker, as JSON-able data.

``bench_render(domain, engine, num_items, params)`` draws ``num_items`` synthetic items (``params.data.seed``),
renders them in batches of ``params.render.batch_size`` in this process (the work one render worker does) and
reports the rate, the reject counts and the engine's one-off start-up separately. Multiply by
``params.render.workers`` for a machine estimate when the cores are free.

On a shared machine the wall-clock rate understates what one worker does on a free core, so the CPU time of this
process AND of the tools it ran (``latex``, ``dvipng``, ``lilypond``: ``RUSAGE_CHILDREN``) is reported too, as
``items_per_cpu_s``: the rate of one worker that has a core to itself (I/O waits excluded).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections import Counter
from typing import Any

from markup2image.config import Params
from markup2image.data.download import grammar_of
from markup2image.data.generators import synthetic_splits
from markup2image.data.renderers import get_engine, render_batch, resolve_engine


def bench_render(domain: str, engine: str | None, num_items: int, params: Params) -> dict:
    """Render ``num_items`` synthetic ``domain`` items with ``engine`` (None: the configured one); return figures."""
    cfg = params.domain_config(domain)
    if engine:
        cfg = dataclasses.replace(cfg, engine=engine)
    cfg = resolve_engine(domain, cfg)
    items = synthetic_splits(domain, params.data.seed, {"train": num_items, "val": 0, "test": 0}, grammar_of(params))[
        "train"
    ]
    pairs = [(row["id"], row["markup"]) for row in items]

    start = time.perf_counter()
    get_engine(domain, cfg.engine)  # import + set-up, reported apart from the rate
    startup = time.perf_counter() - start

    batch = params.render.batch_size
    reasons: Counter[str] = Counter()
    start = time.perf_counter()
    cpu_start = time.process_time()
    child_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    for i in range(0, len(pairs), batch):
        for result in render_batch(domain, pairs[i : i + batch], cfg, params.render.timeout):
            reasons[result.reason or "rendered"] += 1
    seconds = time.perf_counter() - start
    parent_cpu = time.process_time() - cpu_start
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (child.ru_utime - child_start.ru_utime) + (child.ru_stime - child_start.ru_stime)
    rendered = reasons.pop("rendered", 0)
    return {
        "benchmark": "render",
        "domain": domain,
        "engine": cfg.engine,
        "num_items": len(pairs),
        "batch_size": batch,
        "seconds": round(seconds, 3),
        "items_per_s_per_worker": round(len(pairs) / seconds, 2) if seconds > 0 else None,
        "ms_per_item": round(1000 * seconds / max(len(pairs), 1), 2),
        "parent_cpu_s": round(parent_cpu, 3),
        "child_cpu_s": round(child_cpu, 3),  # latex / dvipng / lilypond processes (waited for)
        "items_per_cpu_s": round(len(pairs) / (parent_cpu + child_cpu), 2) if parent_cpu + child_cpu > 0 else None,
        "startup_s": round(startup, 3),
        "rendered": rendered,
        "rejected": sum(reasons.values()),
        "reasons": dict(sorted(reasons.items())),
        "shape": [cfg.height, cfg.width, cfg.channels],
    }


def run(args: Any, params: Params) -> dict:
    """``markup2image bench render``."""
    return bench_render(args.domain or params.domains[0], args.engine, args.n, params)
