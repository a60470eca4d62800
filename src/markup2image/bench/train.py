"""Training-step benchmark: seconds per optimizer step and images per second per objective and model size.

Random images, markup and noise; a real AdamW step (forward, backward, optimizer). ``ddpm``, ``ss_dm`` and
``cdcd`` run on the baseline model (all FSA-CDM switches off); ``fsa_cdm`` on the full FSA-CDM (``fsa``,
``con_aug`` and ``ccam`` on), so the ratio ``fsa_cdm / ddpm`` is the cost of the whole method. ``ss_dm`` is
timed in its steady state (``P(m = 1) = train.ss_max_prob``). Sizes are those of
:func:`markup2image.models.summary.sized_model_config`. Speed targets live here, never in timed tests.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from markup2image.bench.train_processes import bench_train_processes
from markup2image.config import Params
from markup2image.diffusion.objectives import TrainBatch, get_objective, noise_scheduler
from markup2image.models.model import MarkupToImageModel
from markup2image.models.summary import count_parameters, sized_model_config, with_switches
from markup2image.modes import OBJECTIVE_NAMES

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"tiny": 8, "params": 8, "paper": 2}
BENCH_VOCAB = 512
BENCH_TEXT_LENGTH = 48


def _random_batch(model: MarkupToImageModel, batch_size: int, seed: int, step: int, device: str) -> TrainBatch:
    img = model.image
    g = torch.Generator().manual_seed(seed * 1009 + step)
    shape = (batch_size, img.channels, img.height, img.width)
    n = min(BENCH_TEXT_LENGTH, model.model_cfg.max_text_length)
    mask = torch.ones(batch_size, n, dtype=torch.long)
    lengths = torch.randint(n // 2, n + 1, (batch_size,), generator=g)
    mask[torch.arange(n)[None, :] >= lengths[:, None]] = 0
    return TrainBatch(
        images=(torch.rand(shape, generator=g) * 2 - 1).to(device),
        input_ids=(torch.randint(1, BENCH_VOCAB, (batch_size, n), generator=g) * mask).to(device),
        attention_mask=mask.to(device),
        markup_keys=torch.arange(batch_size, device=device),
        noise=torch.randn(shape, generator=g).to(device),
        timesteps=torch.randint(0, 1000, (batch_size,), generator=g).to(device),
        generator=g,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_objective(
    params: Params, domain: str, size: str, objective: str, batch_size: int, steps: int, warmup: int, device: str
) -> dict:
    full = objective == "fsa_cdm"
    cfg = with_switches(sized_model_config(params.model, size), fsa=full, con_aug=full, ccam=full)
    torch.manual_seed(params.train.seed)
    model = MarkupToImageModel(model_cfg=cfg, image=params.domain_config(domain), vocab_size=BENCH_VOCAB)
    model = model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    run_params = dataclasses.replace(params, model=cfg, train=dataclasses.replace(params.train, objective=objective))
    fn, sched = get_objective(objective), noise_scheduler(params.diffusion)
    times = []
    for step in range(warmup + steps):
        batch = _random_batch(model, batch_size, params.train.seed, step, device)
        _sync(device)
        start = time.perf_counter()
        loss, _ = fn(model, batch, sched, run_params, run_params.train.steps)  # last step: steady-state ss_dm
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    sec = sum(times) / len(times)
    return {
        "seconds_per_step": sec,
        "images_per_second": batch_size / sec,
        "batch_size": batch_size,
        "steps": steps,
        "parameters": count_parameters(model)["total"],
    }


def bench_train(
    params: Params,
    objectives: Sequence[str] = OBJECTIVE_NAMES,
    sizes: Sequence[str] = ("tiny", "paper"),
    steps: int = 3,
    warmup: int = 1,
    batch_size: int | None = None,
    domain: str = "math",
    device: str = "cpu",
) -> dict:
    """Time ``steps`` training steps (after ``warmup``) per objective and size on random data; JSON-able.

    ``batch_size`` None uses 8 for ``tiny``/``params`` and 2 for ``paper`` (a CPU can hold it); ``device`` is a
    torch device string (``"cuda"`` synchronises around each timed step). Returns
    ``{"results": {size: {objective: {...}}}, "ratios": {size: fsa_cdm / ddpm seconds}, "device": ...}``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError("bench: steps must be at least 1 and warmup at least 0")
    results: dict[str, dict] = {}
    ratios: dict[str, float] = {}
    for size in sizes:
        bs = batch_size or DEFAULT_BATCH.get(size, 2)
        results[size] = {}
        for objective in objectives:
            log.info("bench train: size=%s objective=%s batch=%d", size, objective, bs)
            results[size][objective] = _time_objective(params, domain, size, objective, bs, steps, warmup, device)
            log.info("  %.3f s/step", results[size][objective]["seconds_per_step"])
        if "ddpm" in results[size] and "fsa_cdm" in results[size]:
            ratios[size] = results[size]["fsa_cdm"]["seconds_per_step"] / results[size]["ddpm"]["seconds_per_step"]
    return {
        "results": results,
        "ratios_fsa_cdm_over_ddpm": ratios,
        "num_negatives": params.train.num_negatives,
        "domain": domain,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
    }


def run(args: Any, params: Params) -> dict[str, Any]:
    """``markup2image bench train``: per objective and size, or (``--processes``) the real train stage."""
    if args.processes:
        return bench_train_processes(params, processes=tuple(args.processes), steps=args.steps, domain=args.domain)
    return bench_train(
        params, objectives=tuple(args.objectives), sizes=tuple(args.sizes), steps=args.steps,
        batch_size=args.batch, domain=args.domain or params.domains[0],
        device="cuda" if torch.cuda.is_available() else "cpu",
    )  # fmt: skip
