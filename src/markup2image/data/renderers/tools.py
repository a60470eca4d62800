"""Running external renderers (TeX Live, LilyPond): presence checks, time limits, bisecting failed batches."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from markup2image.data.renderers.base import RenderError, RenderResult

# What a batch runner returns: results it could attribute, and the items it could not (to be retried smaller).
BatchOutcome = tuple[list[RenderResult], list[tuple[str, str]]]


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

    ``run_batch`` renders a list in one external call and returns what it could attribute plus the items left over
    (e.g. everything after a fatal error), which are run again. A call that times out is split in halves until the
    hanging item is alone; that one is rejected as ``timeout``. Results are yielded as soon as each call returns.
    """
    stack: list[list[tuple[str, str]]] = [list(items)] if items else []
    while stack:
        chunk = stack.pop()
        try:
            results, leftover = run_batch(chunk)
        except subprocess.TimeoutExpired:
            if len(chunk) == 1:
                yield RenderResult(chunk[0][0], reason="timeout", detail=f"the renderer ran over {timeout:.0f} s")
            else:
                half = len(chunk) // 2
                stack += [chunk[half:], chunk[:half]]
            continue
        yield from results
        if leftover:
            if len(chunk) == 1:
                detail = "the renderer gave no result for this item"
                yield RenderResult(chunk[0][0], reason="crash", detail=detail)
            elif len(leftover) == len(chunk):  # no progress at all: go item by item so this cannot loop
                stack += [[it] for it in reversed(leftover)]
            else:
                stack.append(leftover)
