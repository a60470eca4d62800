"""The training loop, run under ``accelerate launch`` on 1 CPU process, N CPU/GPU processes or several nodes.

Which items, noise and timesteps a step uses: :mod:`markup2image.training.determinism` (the same on any process
layout, and on a resume). Checkpoints and run fingerprints: :mod:`markup2image.training.checkpoints`. Logging:
:mod:`markup2image.training.live`.

With an HCMA module (``hcma.global_weight`` or ``hcma.local_weight`` > 0) the model owns it as ``model.hcma`` (so
DDP, the optimizer, EMA, checkpoints and the saved model carry it), the dataset returns each item's layout, and every
objective adds the HCMA loss. With both weights 0 none of this exists and a step computes what it did without HCMA.

Rank 0 alone logs to DVCLive (``<out>/live``): each loss term, the loss per timestep quartile, lr, images/s, and
every ``train.sample_every`` steps a grid of EMA samples of a few train markups (``plots/images/samples/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from markup2image.config import Params, TrainConfig, check_batch_split, draws_negatives, to_dict
from markup2image.data.dataset import MarkupImageDataset, collate
from markup2image.data.layout_tensors import HcmaBatch
from markup2image.diffusion.objectives import NegativePool, ObjectiveFn, TrainBatch, get_objective, noise_scheduler
from markup2image.diffusion.sampling import sample_images, to_uint8
from markup2image.evaluation.report import save_comparison_grid
from markup2image.io import read_jsonl
from markup2image.models.model import MarkupToImageModel
from markup2image.text.tokenizer import TOKENIZER_FILE, load_tokenizer, pad_id
from markup2image.training.checkpoints import (
    LIVE_IN_CHECKPOINT,
    TRAINER_STATE,
    code_fingerprint,
    data_fingerprint,
    newest_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from markup2image.training.determinism import (
    BatchIndexer,
    condition_dropout,
    drop_markup,
    extras_generator,
    hcma_generator,
    micro_batch_share,
)
from markup2image.training.launch import effective_mixed_precision
from markup2image.training.live import log_terms, open_live, restore_live

log = logging.getLogger(__name__)

DUMP_RANK_WEIGHTS_ENV = "MARKUP2IMAGE_DUMP_RANK_WEIGHTS"  # test hook: every rank writes its final weights here
SAMPLE_ITEMS = 4  # train markups in the sample grid
SAMPLE_STEPS = 20  # DDIM steps for the sample grid


@dataclass(frozen=True)
class TrainPaths:
    rendered: Path
    tokenized: Path
    out: Path  # models/<domain>: checkpoints/, model/ (EMA weights), live/

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def live(self) -> Path:
        return self.out / "live"

    def snapshot(self, step: int) -> Path:
        """The EMA model folder written at ``step`` (``train.snapshot_steps``)."""
        return self.out / "snapshots" / f"step_{step:08d}"


def build_model(params: Params, domain: str, tokenizer_dir: Path) -> MarkupToImageModel:
    """A fresh model sized to the tokenizer in ``tokenizer_dir`` (with the HCMA module when ``params.hcma`` asks
    for one); initialised from ``train.seed``."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(params.train.seed)  # identical init on every process
    return MarkupToImageModel(
        model_cfg=params.model,
        image=params.domain_config(domain),
        vocab_size=tok.get_vocab_size(),
        pad_id=pad_id(tok),
        hcma=params.hcma,
        diffusion=params.diffusion,
    )


def lr_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_schedule`` after ``train.warmup_steps`` of linear warm-up: ``cosine`` decays to 0 at
    ``train.steps``; ``constant`` holds ``train.lr``, so a run of N steps is exactly the first N steps of a longer
    one (what the learning curve reads from one run's checkpoints)."""
    if cfg.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    return get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)


@dataclass
class _Run:
    """What a training run holds while it steps. ``model`` is the prepared (DDP-wrapped) module, ``net`` inside it."""

    acc: Accelerator
    model: torch.nn.Module
    net: MarkupToImageModel
    opt: Any
    lr_sched: Any
    ema: EMAModel
    dataset: MarkupImageDataset
    indices: BatchIndexer
    sched: DDPMScheduler  # the forward process q(y_t | y0)
    objective: ObjectiveFn
    null_ids: list[int]  # the empty markup's ids ([BOS, EOS]): what train.cond_dropout conditions on

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]


def _accelerator(params: Params) -> Accelerator:
    """An Accelerator for this process; fails before any work on settings this machine cannot run."""
    cfg = params.train
    cpu = cfg.cpu or not torch.cuda.is_available()
    bf16 = not cpu and torch.cuda.is_bf16_supported()
    precision = effective_mixed_precision(cfg.mixed_precision, cpu, bf16)
    acc = Accelerator(mixed_precision=precision, cpu=cpu, step_scheduler_with_optimizer=False)
    check_batch_split(params, acc.num_processes)
    if acc.is_main_process and precision != cfg.mixed_precision:
        log.warning("train.mixed_precision=%s needs a GPU; training in fp32 on the CPU", cfg.mixed_precision)
    return acc


def _prepare(params: Params, domain: str, paths: TrainPaths, acc: Accelerator) -> _Run:
    cfg = params.train
    model = build_model(params, domain, paths.tokenized)
    torch.manual_seed(cfg.seed + acc.process_index)  # per-rank offset for any implicit randomness (dropout)
    with_layouts = model.hcma is not None and model.hcma.local_head is not None
    dataset = MarkupImageDataset(
        paths.rendered,
        paths.tokenized,
        "train",
        model.image.channels,
        layouts=with_layouts,
        max_boxes=params.hcma.max_boxes,
    )
    if len(dataset) == 0:
        raise ValueError(f"{paths.rendered}/train.jsonl: no rendered training items; check the render stage report")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = lr_schedule(cfg, opt)
    # ema_warmup: decay 1 - (1 + step)^(-2/3) capped at ema_decay (diffusers' warm-up), so a short run's EMA is not
    # dominated by its first, untrained steps
    ema = EMAModel(trainable, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, inv_gamma=1.0, power=2 / 3)
    prepared, opt, lr_sched = acc.prepare(model, opt, lr_sched)
    acc.register_for_checkpointing(ema)
    net = acc.unwrap_model(prepared)
    indices = BatchIndexer(len(dataset), cfg.seed)
    sched, objective = noise_scheduler(params.diffusion), get_objective(cfg.objective)
    null_ids = load_tokenizer(paths.tokenized).encode("").ids
    return _Run(acc, prepared, net, opt, lr_sched, ema, dataset, indices, sched, objective, null_ids)


def _resume(run: _Run, paths: TrainPaths, fingerprint: str) -> int:
    """Load the newest complete checkpoint of this run; returns the step to continue from (0: fresh start)."""
    acc = run.acc
    ckpt = newest_checkpoint(paths.checkpoints)
    if ckpt is not None and json.loads((ckpt / TRAINER_STATE).read_text()).get("fingerprint") != fingerprint:
        log.info("checkpoints in %s belong to other params; starting afresh", paths.checkpoints)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(paths.checkpoints)
            shutil.rmtree(paths.live, ignore_errors=True)
        acc.wait_for_everyone()
        ckpt = None
    start = 0
    if ckpt is not None:
        acc.load_state(str(ckpt))
        start = json.loads((ckpt / TRAINER_STATE).read_text())["step"]
        log.info("resuming from %s (step %d)", ckpt, start)
        if acc.is_main_process:
            restore_live(ckpt / LIVE_IN_CHECKPOINT, paths.live)
        acc.wait_for_everyone()
    run.ema.to(acc.device)
    return start


def steps_for_epochs(params: Params, num_items: int) -> Params:
    """``params`` with ``train.steps = ceil(train.epochs * num_items / train.batch_size)`` where ``train.epochs > 0``
    (the epochs take precedence); unchanged otherwise. ``train.batch_size`` is the global batch."""
    cfg = params.train
    if cfg.epochs <= 0:
        return params
    steps = max(1, math.ceil(cfg.epochs * num_items / cfg.batch_size))
    log.info(
        "train.epochs %g x %d training items / global batch %d = %d optimizer steps (train.steps %d not used)",
        cfg.epochs, num_items, cfg.batch_size, steps, cfg.steps,
    )  # fmt: skip
    return dataclasses.replace(params, train=dataclasses.replace(cfg, steps=steps))


def train(params: Params, domain: str, paths: TrainPaths, max_steps: int | None = None) -> dict:
    """Train (or resume) and write ``paths.model`` with the EMA weights. Returns a summary dict.

    ``max_steps`` stops after that many optimizer steps in this call (a checkpoint is written at the stop).
    With ``train.epochs > 0`` the number of steps comes from the epochs (:func:`steps_for_epochs`).
    """
    params = steps_for_epochs(params, len(read_jsonl(paths.rendered / "train.jsonl")))
    cfg = params.train
    acc = _accelerator(params)
    run = _prepare(params, domain, paths, acc)
    data = data_fingerprint(paths.rendered, paths.tokenized)
    fingerprint = run_fingerprint(params, domain, data, code_fingerprint())
    start = _resume(run, paths, fingerprint)
    stop = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    live = open_live(paths.live, start) if acc.is_main_process else None
    bar = tqdm(
        range(start, stop), desc=f"train {domain}", disable=not acc.is_main_process, initial=start, total=cfg.steps
    )
    terms_acc: dict[str, tuple[float, int]] = {}
    seconds, steps_timed = 0.0, 0
    started = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        _train_step(run, params, step, terms_acc)
        seconds, steps_timed = seconds + time.perf_counter() - t0, steps_timed + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            logged = _reduce_terms(acc, terms_acc)
            terms_acc = {}
            if live is not None:
                log_terms(live, logged, run.lr_sched.get_last_lr()[0], cfg.batch_size * steps_timed / seconds, done)
                bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}")
            seconds, steps_timed = 0.0, 0
        if live is not None and cfg.sample_every and done % cfg.sample_every == 0:
            _log_sample_grid(live, run, params, done)
        if done % cfg.checkpoint_every == 0 or done == stop:
            save_checkpoint(acc, paths.checkpoints, done, fingerprint, keep=cfg.keep_checkpoints, live=paths.live)
        if done in cfg.snapshot_steps and acc.is_main_process:
            save_ema_model(run, params, domain, paths, paths.snapshot(done), done, time.perf_counter() - started)
    acc.wait_for_everyone()
    finished = stop >= cfg.steps
    if acc.is_main_process and finished:
        save_ema_model(run, params, domain, paths, paths.model, stop, time.perf_counter() - started)
    if os.environ.get(DUMP_RANK_WEIGHTS_ENV):
        dump_rank_weights(run, Path(os.environ[DUMP_RANK_WEIGHTS_ENV]))
    if live is not None:
        live.end()
    acc.end_training()
    return {
        "steps": stop,
        "resumed_from": start,
        "finished": finished,
        "processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
    }


def _train_step(run: _Run, params: Params, step: int, terms_acc: dict[str, tuple[float, int]]) -> None:
    """One optimizer step over ``train.grad_accum`` micro-batches of this process's shard of the global batch."""
    cfg, acc, net = params.train, run.acc, run.net
    world, rank = acc.num_processes, acc.process_index
    run.model.train()
    gidx = run.indices(step, cfg.batch_size)  # (batch_size,) global
    chw = (net.image.channels, net.image.height, net.image.width)
    for micro in range(cfg.grad_accum):
        share = micro_batch_share(cfg, gidx, step, micro, rank, world, chw, params.diffusion)
        data = collate([run.dataset[int(i)] for i in share.indices], pad_id=net.pad_id)
        drop = condition_dropout(cfg.seed, step, share.positions, cfg.cond_dropout)
        ids, mask = drop_markup(data["input_ids"], data["attention_mask"], drop, run.null_ids, net.pad_id)
        batch = TrainBatch(
            images=data["images"].to(acc.device),
            input_ids=ids.to(acc.device),
            attention_mask=mask.to(acc.device),
            markup_keys=data["markup_keys"].to(acc.device),
            noise=share.noise.to(acc.device),  # (b, C, H, W): this rank's slice of the global draw
            timesteps=share.timesteps.to(acc.device),
            generator=extras_generator(cfg.seed, step, micro, rank),
            hcma=_hcma_batch(net, data, hcma_generator(cfg.seed, step, micro, rank), acc.device),
            negative_pool=_negative_pool(run, params, gidx, micro, world, acc.device),
        )
        # DDP all-reduces gradients in the backward of the last micro-step only (no_sync is a no-op without DDP)
        sync = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.model):
            with acc.autocast():
                loss, terms = run.objective(run.model, batch, run.sched, params, step)
            acc.backward(loss / cfg.grad_accum)
        terms["loss"] = float(loss.detach())
        _accumulate_terms(terms_acc, terms, batch.timesteps, params.diffusion.num_train_timesteps)
    if cfg.grad_clip > 0:
        _clip_gradients(run, cfg.grad_clip)
    run.opt.step()
    run.lr_sched.step()  # accelerate skips it when an fp16 step was skipped for inf/nan gradients
    run.opt.zero_grad(set_to_none=True)
    if not acc.optimizer_step_was_skipped:
        run.ema.step(run.trainable)


def _negative_pool(
    run: _Run, params: Params, gidx: np.ndarray, micro: int, world: int, device: Any
) -> NegativePool | None:
    """The images and markup keys of the whole global micro-batch ``micro`` (every process's share, read by each
    process from the dataset: no communication), so negatives and K do not depend on the process count. None on
    one process (the share is the micro-batch) or for objectives without negatives."""
    if world == 1 or not draws_negatives(params):
        return None
    size = params.train.batch_size // params.train.grad_accum
    items = [run.dataset[int(i)] for i in gidx[micro * size : (micro + 1) * size]]
    data = collate(items, pad_id=run.net.pad_id)
    return NegativePool(data["images"].to(device), data["markup_keys"].to(device))


def _clip_gradients(run: _Run, max_norm: float) -> None:
    """Clip the gradient norm to ``max_norm``: the denoiser's and (if any) the HCMA module's each on its own, so
    neither scales the other's step (the denoiser's clipping is what it is without HCMA)."""
    if run.net.hcma is None:
        run.acc.clip_grad_norm_(run.model.parameters(), max_norm)
        return
    own = [p for n, p in run.net.named_parameters() if not n.startswith("hcma.")]
    run.acc.clip_grad_norm_(own, max_norm)  # unscales every gradient of the optimizer (fp16) first
    torch.nn.utils.clip_grad_norm_(list(run.net.hcma.parameters()), max_norm)


def _hcma_batch(net: MarkupToImageModel, data: dict, generator: torch.Generator, device: Any) -> HcmaBatch | None:
    """The HCMA part of a training batch (None for a model without an HCMA module). A model with a local module
    always gets a layout (all boxes off for items without one), so every HCMA parameter is in every step's graph
    (DDP needs that)."""
    if net.hcma is None:
        return None
    return HcmaBatch(data.get("layout"), generator).to(device)


def _accumulate_terms(
    acc_terms: dict[str, tuple[float, int]], terms: dict, timesteps: torch.Tensor, num_timesteps: int
) -> None:
    """Add one micro-step's terms as (sum, count); ``per_item [B]`` goes into the four timestep quartiles.

    Every rank gets the same keys (all four quartiles even when empty), so the cross-process reduction lines up.
    """
    for k, v in terms.items():
        if k == "per_item":
            quart = (timesteps * 4 // num_timesteps).clamp(max=3)  # (B,) in 0..3
            for q in range(4):
                sel = v[quart == q]
                s, c = acc_terms.get(f"loss_t_q{q + 1}", (0.0, 0))
                acc_terms[f"loss_t_q{q + 1}"] = (s + float(sel.sum()), c + sel.numel())
            continue
        s, c = acc_terms.get(k, (0.0, 0))
        acc_terms[k] = (s + float(v), c + 1)


def _reduce_terms(acc: Accelerator, terms: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Average logged terms over steps and processes (a term no item fell into is NaN)."""
    keys = sorted(terms)
    if not keys:
        return {}
    vals = torch.tensor([[terms[k][0], terms[k][1]] for k in keys], dtype=torch.float64, device=acc.device)
    vals = acc.reduce(vals, reduction="sum") if acc.num_processes > 1 else vals  # (K, 2): sums, counts
    return {k: float(vals[i, 0] / vals[i, 1]) if vals[i, 1] > 0 else math.nan for i, k in enumerate(keys)}


@torch.no_grad()
def _log_sample_grid(live, run: _Run, params: Params, step: int) -> None:
    """Sample the first train markups with the EMA weights (short DDIM run) and log gold | generated to DVCLive."""

    items = [run.dataset[i] for i in range(min(SAMPLE_ITEMS, len(run.dataset)))]
    data = collate(items, pad_id=run.net.pad_id)
    device = run.acc.device
    run.ema.store(run.trainable)
    run.ema.copy_to(run.trainable)
    run.net.eval()
    try:
        images = sample_images(
            run.net,
            data["input_ids"].to(device),
            data["attention_mask"].to(device),
            sampler="ddim",
            steps=min(SAMPLE_STEPS, params.diffusion.num_train_timesteps),
            seed=params.train.seed,
            diffusion=params.diffusion,
        )  # (B, C, H, W) in [-1, 1]
    finally:
        run.ema.restore(run.trainable)
        run.net.train()
    golds, preds = to_uint8(data["images"]), to_uint8(images)
    titles = [run.dataset.rows[i]["id"] for i in range(len(items))]
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.png"
        save_comparison_grid(list(golds), list(preds), grid, titles=titles, max_items=SAMPLE_ITEMS)
        live.log_image(f"samples/step_{step:08d}.png", grid)


def save_ema_model(
    run: _Run, params: Params, domain: str, paths: TrainPaths, folder: Path, step: int, seconds: float
) -> None:
    """Save the EMA weights (what evaluation and export use) plus the tokenizer into ``folder`` (atomically);
    ``seconds``: wall time of this call's training loop so far (not counting a resumed run's earlier part)."""
    run.ema.store(run.trainable)
    run.ema.copy_to(run.trainable)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {
        "domain": domain,
        "params": to_dict(params),
        "ema": True,
        "steps_trained": step,
        "train_seconds": round(seconds, 1),
        "mixed_precision": run.acc.mixed_precision,
        "processes": run.acc.num_processes,
    }
    run.net.save(tmp, extra=extra)
    shutil.copy(paths.tokenized / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    run.ema.restore(run.trainable)


def dump_rank_weights(run: _Run, folder: Path) -> Path:
    """Test hook (``MARKUP2IMAGE_DUMP_RANK_WEIGHTS``): this rank's raw weights (``model.*``) and EMA weights
    (``ema.*``) as ``rank_<r>.safetensors``, so a test can check that every rank holds the same model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n, p in run.net.named_parameters() if p.requires_grad]
    state = {f"model.{n}": p.detach().cpu().contiguous() for n, p in run.net.named_parameters()}
    state |= {f"ema.{n}": s.detach().cpu().contiguous() for n, s in zip(names, run.ema.shadow_params)}
    path = folder / f"rank_{run.acc.process_index}.safetensors"
    save_file(state, str(path))
    return path
