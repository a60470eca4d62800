"""Renderer registry: markup -> the exact image it renders to.

``render_markup(domain, markup, cfg)`` draws one item with the engine named by ``cfg.engine``;
``render_batch(domain, items, cfg, timeout)`` draws many (batch-capable engines such as ``latex`` and ``lilypond``
run many items per external call). Failures are :class:`RenderError` / :class:`RenderResult` with a reason in
``parse_error, overflow, timeout, renderer_missing, empty, crash``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.renderers.base import (
    MARGIN,
    REJECT_REASONS,
    Engine,
    RenderError,
    RenderResult,
    place_top_left,
    safe_render,
)

__all__ = [
    "ENGINES",
    "MARGIN",
    "REJECT_REASONS",
    "BATCH_ENGINES",
    "SELF_TIMED_ENGINES",
    "Engine",
    "check_engine",
    "resolve_engine",
    "RenderError",
    "RenderResult",
    "get_engine",
    "iter_render_batch",
    "place_top_left",
    "render_batch",
    "render_markup",
    "safe_render",
]

# engine name -> (module, class, domain it draws)
ENGINES: dict[str, tuple[str, str, str]] = {
    "mathtext": ("markup2image.data.renderers.math_mathtext", "MathtextEngine", "math"),
    "latex": ("markup2image.data.renderers.math_latex", "LatexEngine", "math"),
    "weasyprint": ("markup2image.data.renderers.tables_weasyprint", "WeasyprintEngine", "tables"),
    "lilypond": ("markup2image.data.renderers.music_lilypond", "LilypondEngine", "music"),
    "rdkit": ("markup2image.data.renderers.molecules_rdkit", "RdkitEngine", "molecules"),
}

# Engines whose every external call runs under ``timeout`` (and bisects a batch that runs over), so a batch can go
# quiet for several timeouts without hanging; the render driver's watchdog gives them more room.
SELF_TIMED_ENGINES = frozenset({"latex", "lilypond"})
# Engines that draw a whole chunk in one call: when one dies, any item of the chunk may be the culprit.
BATCH_ENGINES = frozenset({"latex", "lilypond", "weasyprint"})

_instances: dict[str, Engine] = {}
log = logging.getLogger(__name__)

# ``engine: auto``: the first engine of the domain's list whose tools are here. Math prefers TeX Live, the renderer
# im2latex-100k was made with (and the faster one here, batched); mathtext needs no system package.
AUTO_ENGINES: dict[str, tuple[str, ...]] = {
    "math": ("latex", "mathtext"),
    "tables": ("weasyprint",),
    "music": ("lilypond",),
    "molecules": ("rdkit",),
}


def resolve_engine(domain: str, cfg: DomainConfig) -> DomainConfig:
    """``cfg`` with ``engine: auto`` replaced by the engine that will draw (one logged line on a fallback)."""
    if cfg.engine != "auto":
        return cfg
    choices = AUTO_ENGINES.get(domain, ())
    for n, name in enumerate(choices):
        try:
            check_engine(domain, dataclasses.replace(cfg, engine=name))
        except RenderError as exc:
            if n + 1 < len(choices):
                log.warning(
                    "domain.%s.engine auto: %s cannot run here (%s); rendering with %s instead",
                    domain, name, exc.detail, choices[n + 1],
                )  # fmt: skip
            continue
        return dataclasses.replace(cfg, engine=name)
    return dataclasses.replace(cfg, engine=choices[-1] if choices else cfg.engine)  # its own error names the fix


def get_engine(domain: str, engine: str) -> Engine:
    """The (cached) engine instance named ``engine``; checks that it draws ``domain``."""
    if engine not in ENGINES:
        raise ValueError(f"domain.{domain}.engine: unknown engine {engine!r}; choose from {sorted(ENGINES)}")
    module, cls, engine_domain = ENGINES[engine]
    if engine_domain != domain:
        raise ValueError(f"domain.{domain}.engine: engine {engine!r} draws {engine_domain!r}, not {domain!r}")
    if engine not in _instances:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise RenderError("renderer_missing", f"engine {engine!r} is not available here ({exc})") from exc
        _instances[engine] = getattr(mod, cls)()
    return _instances[engine]


def check_engine(domain: str, cfg: DomainConfig) -> None:
    """Fail early, with one line naming what to install, if ``cfg.engine`` cannot run here.

    Raises ``RenderError("renderer_missing")`` (a tool or package is missing) or ``ValueError`` (a bad engine name).
    """
    engine = get_engine(domain, cfg.engine)
    check = getattr(engine, "check_available", None)
    if check is not None:
        check()


def render_markup(domain: str, markup: str, cfg: DomainConfig) -> np.ndarray:
    """uint8 [H,W] (channels=1) or [H,W,3] image of ``markup``; raises :class:`RenderError`."""
    return get_engine(domain, cfg.engine).render(markup, cfg)


def iter_render_batch(
    domain: str, items: Sequence[tuple[str, str]], cfg: DomainConfig, timeout: float
) -> Iterator[RenderResult]:
    """Yield one :class:`RenderResult` per ``(id, markup)`` as soon as it is known (order not guaranteed)."""
    try:
        engine = get_engine(domain, cfg.engine)
    except RenderError as exc:
        for item_id, _ in items:
            yield RenderResult(item_id, reason=exc.reason, detail=exc.detail)
        return
    yield from engine.iter_batch(items, cfg, timeout)


def render_batch(
    domain: str, items: Sequence[tuple[str, str]], cfg: DomainConfig, timeout: float
) -> list[RenderResult]:
    """Render ``(id, markup)`` pairs; one :class:`RenderResult` per item, in input order."""
    by_id = {r.id: r for r in iter_render_batch(domain, items, cfg, timeout)}
    return [by_id.get(i) or RenderResult(i, reason="crash", detail="the engine returned no result") for i, _ in items]
