"""Running external renderers (TeX Live, LilyPond): presence checks, time limits, bisecting failed batches."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from markup2image.data.renderers.base import RenderError, RenderResult

# What a batch runner returns: results it could attribute, and chunks of the items it could not (to run again).
BatchOutcome = tuple[list[RenderResult], list[list[tuple[str, str]]]]


def require_tools(names: Sequence[str], debian_packages: str) -> None:
    """Raise ``RenderError("renderer_missing")`` naming the Debian packages if any tool is not on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RenderError(
            "renderer_missing",
            f"{', '.join(missing)} not found on PATH; install the Debian packages: apt-get install {debian_packages}",
        )


def run_tool(cmd: Sequence[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` in ``cwd``; return its combined output. Raises ``subprocess.TimeoutExpired`` (child killed)."""
    proc = subprocess.run(
        list(cmd),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return proc.stdout.decode("utf-8", errors="replace")


def bisect_batches(
    items: Sequence[tuple[str, str]],
    run_batch: Callable[[list[tuple[str, str]]], BatchOutcome],
    timeout: float,
) -> Iterator[RenderResult]:
    """Drive ``run_batch`` over ``items`` so that a bad item cannot sink its neighbours.

    ``run_batch`` renders a list in one external call and returns what it could attribute plus chunks of items to
    run again (e.g. everything after a fatal error, or suspects one by one). A call that times out is split in
    halves until the hanging item is alone; that one is rejected as ``timeout``. Results are yielded as soon as each
    call returns. Every item gets exactly one result: a call that makes no progress is retried item by item, and a
    single item that still gets no result is a ``crash``.
    """
    stack: list[list[tuple[str, str]]] = [list(items)] if items else []
    while stack:
        chunk = stack.pop()
        try:
            results, retry = run_batch(chunk)
        except subprocess.TimeoutExpired:
            if len(chunk) == 1:
                yield RenderResult(chunk[0][0], reason="timeout", detail=f"the renderer ran over {timeout:.0f} s")
            else:
                half = len(chunk) // 2
                stack += [chunk[half:], chunk[:half]]
            continue
        yield from results
        retry = [sub for sub in retry if sub]
        if not retry:
            continue
        if len(chunk) == 1:
            yield RenderResult(chunk[0][0], reason="crash", detail="the renderer gave no result for this item")
        elif not results and len(retry) == 1 and len(retry[0]) == len(chunk):  # no progress: go item by item
            stack += [[it] for it in reversed(chunk)]
        else:
            stack += list(reversed(retry))
