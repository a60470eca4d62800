"""Running external renderers (TeX Live, LilyPond): presence checks, time limits, bisecting failed batches."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from markup2image.config import DomainConfig
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


class ExternalToolEngine:
    """Base for batch engines that run external tools (``latex`` + ``dvipng``, ``lilypond``).

    Subclasses set ``tools`` (executables that must be on PATH), ``debian_packages`` (what to install),
    ``single_timeout`` (seconds for one item via :meth:`render`), and implement :meth:`precheck` (raise
    ``RenderError`` for markup that must not reach the tool) and ``_run(chunk, cfg, timeout) -> BatchOutcome``.
    A missing tool rejects every item of the batch as ``renderer_missing`` with one line naming the packages.
    """

    name = "external"
    tools: tuple[str, ...] = ()
    debian_packages = ""
    single_timeout = 60.0

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray:
        (result,) = list(self.iter_batch([("item", markup)], cfg, timeout=self.single_timeout))
        if result.image is None:
            raise RenderError(result.reason or "crash", result.detail)  # type: ignore[arg-type]
        return result.image

    def check_available(self) -> None:
        """Raise ``RenderError("renderer_missing")`` naming the Debian packages if the tools are not installed."""
        require_tools(self.tools, self.debian_packages)

    def precheck(self, markup: str) -> None:  # pragma: no cover - overridden
        """Raise ``RenderError`` for markup that is rejected before any tool runs."""

    def iter_batch(
        self, items: Sequence[tuple[str, str]], cfg: DomainConfig, timeout: float
    ) -> Iterator[RenderResult]:
        try:
            self.check_available()
        except RenderError as exc:
            for item_id, _ in items:
                yield RenderResult(item_id, reason=exc.reason, detail=exc.detail)
            return
        todo = []
        for item_id, markup in items:
            try:
                self.precheck(markup)
            except RenderError as exc:
                yield RenderResult(item_id, reason=exc.reason, detail=exc.detail)
                continue
            todo.append((item_id, markup))
        yield from bisect_batches(todo, lambda chunk: self._run(chunk, cfg, timeout), timeout)

    def _run(self, chunk: list[tuple[str, str]], cfg: DomainConfig, timeout: float) -> BatchOutcome:
        raise NotImplementedError
