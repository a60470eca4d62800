"""DTW against sampler steps (issue #6): the same test items sampled at each (sampler, steps) and scored.

``bench_steps`` follows the evaluate stage's protocol (design §6): the test split shuffled with seed 42, the first
``num_samples`` items, one noise generator per batch (``evaluate.seed + b``), HCMA guidance at the
``hcma.guidance_*`` scales where the model has the module, 8-bit images scored in grayscale, and the blank-image
baseline on the same golds. The markup of every batch is encoded once and, with the cross-attention
K/V cache, projected once per batch for every sampler run.

``ddpm`` (ancestral, the paper's sampler) runs only at all ``diffusion.num_train_timesteps`` steps; ``ddim`` and
``dpm_solver`` run at every requested step count. A (sampler, steps) pair the samplers do not allow is left out
and named in ``skipped``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from markup2image.config import DiffusionConfig, Params
from markup2image.data.layouts import load_layouts
from markup2image.diffusion.sampling import SAMPLERS, check_steps
from markup2image.evaluation.evaluate import device_name, guidance_scales, sample_items, select_test_items
from markup2image.evaluation.score import score_arrays
from markup2image.io import atomic_open, load_image, read_jsonl
from markup2image.models.model import load_model, trained_diffusion
from markup2image.text.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

TABLE_METRICS = ("dtw", "dtw_ti", "rmse", "ssim")


def step_grid(
    samplers: Sequence[str], steps: Sequence[int], diffusion: DiffusionConfig
) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """``(runs, skipped)``: the allowed (sampler, steps) pairs in the order given, and why the others are not."""
    runs, skipped = [], []
    for sampler in samplers:
        if sampler not in SAMPLERS:
            raise ValueError(f"samplers: unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
        for n in steps:
            try:
                runs.append((sampler, check_steps(sampler, n, diffusion)))
            except ValueError as exc:
                skipped.append({"sampler": sampler, "steps": n, "reason": str(exc)})
    return runs, skipped


def _row(
    sampler: str, n: int, preds: list, golds: list, names: list[str], seconds_per_image: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """One table row (the metrics of ``preds`` against ``golds``) and the blank page's scores on the same golds."""
    scores = score_arrays(preds, golds, names)
    row = {"sampler": sampler, "steps": n} | {
        k: round(float(scores["summary"][k]), 4) for k in (*TABLE_METRICS, "psnr")
    }  # fmt: skip
    row["seconds_per_image"] = round(seconds_per_image, 4)
    blank = {k: round(float(scores["blank_baseline"][k]), 4) for k in (*TABLE_METRICS, "psnr")}
    log.info(
        "%s %d steps: DTW %.2f (blank %.2f), %.3f s/image", sampler, n, row["dtw"], blank["dtw"], seconds_per_image
    )
    return row, blank


def bench_steps(
    model_dir: str | Path,
    rendered_dir: str | Path,
    *,
    samplers: Sequence[str] = SAMPLERS,
    steps: Sequence[int] = (1000, 250, 100, 50, 20),
    num_samples: int = 32,
    params: Params | None = None,
) -> dict[str, Any]:
    """Sample and score the same test items at each (sampler, steps); JSON-able rows plus the blank baseline.

    Args:
        model_dir: a trained model folder (``models/<domain>/model``).
        rendered_dir: the rendered data of its domain (``test.jsonl`` and the gold images).
        num_samples: the first N items of the shuffled test split (``<= 0``: all).
        params: ``evaluate.seed`` and ``evaluate.batch_size`` come from here (default: the built-in defaults).
    """
    params = params or Params()
    model_dir, rendered_dir = Path(model_dir), Path(rendered_dir)
    diffusion = trained_diffusion(model_dir)
    runs, skipped = step_grid(samplers, steps, diffusion)
    if not runs:
        raise ValueError(f"no (sampler, steps) pair to run: {[s['reason'] for s in skipped]}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, map_location=device).to(device)
    tok = load_tokenizer(model_dir)
    cfg = params.evaluate
    items = select_test_items(read_jsonl(rendered_dir / "test.jsonl"), num_samples, cfg.seed)
    if not items:
        raise ValueError(f"{rendered_dir}/test.jsonl: no rendered test items")
    names = [r["id"] for r in items]
    golds = [load_image(rendered_dir / r["image"], model.image.channels) for r in items]
    guidance, layouts = guidance_scales(params, model), load_layouts(rendered_dir)
    rows, blank = [], None
    for sampler, n in runs:
        t0 = time.perf_counter()
        preds = sample_items(
            model, tok, items, sampler=sampler, steps=n, seed=cfg.seed, batch_size=cfg.batch_size,
            diffusion=diffusion, guidance=guidance, layouts=layouts, desc=f"{sampler} x {n} steps",
        )  # fmt: skip
        row, blank = _row(sampler, n, preds, golds, names, (time.perf_counter() - t0) / len(items))
        rows.append(row)
    return {
        "model": str(model_dir),
        "rendered": str(rendered_dir),
        "num_samples": len(items),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": device_name(),
        **guidance,
        "rows": rows,
        "blank_baseline": blank,
        "skipped": skipped,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The rows of :func:`bench_steps` as a markdown table, the blank baseline last."""
    head = "| sampler | steps | DTW | DTW-TI | RMSE | SSIM | s/image |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['dtw']:.2f} | {r['dtw_ti']:.2f} | {r['rmse']:.2f} "
            f"| {r['ssim']:.4f} | {r['seconds_per_image']:.3f} |"
        )
    b = result["blank_baseline"]
    lines.append(
        f"| blank (all white) | – | {b['dtw']:.2f} | {b['dtw_ti']:.2f} | {b['rmse']:.2f} | {b['ssim']:.4f} | – |"
    )
    caption = (
        f"{result['num_samples']} test items (shuffled with seed {result['seed']}), batch {result['batch_size']}, "
        f"{result['parameters']:,} parameters, {result['device']}; model {result['model']}"
    )
    return "\n".join(lines) + f"\n\n{caption}\n"


def run(args: Any, params: Params) -> dict[str, Any]:
    """``markup2image bench steps``: the JSON result, with the markdown table beside ``--out`` and on stderr."""
    try:
        result = bench_steps(
            args.model, args.rendered, samplers=tuple(args.samplers), steps=tuple(args.steps),
            num_samples=args.n or params.evaluate.num_samples, params=params,
        )  # fmt: skip
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    table = markdown_table(result)
    if args.out is not None:
        with atomic_open(args.out.with_suffix(".md")) as fh:
            fh.write(table)
        print(f"wrote {args.out.with_suffix('.md')}")
    print(table, file=sys.stderr)
    return result
