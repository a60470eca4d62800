"""The training loop, run under ``accelerate launch`` on 1 CPU process, N CPU/GPU processes or several nodes.

Determinism by construction: the global batch at optimizer step ``s`` is a fixed slice of a per-epoch permutation
seeded by ``(train.seed, epoch)``, and the noise and timestep of the item at position ``j`` of that global batch
come from a generator seeded by ``(train.seed, s, j)``. Each process takes its positions of each micro-step. So:

* ``train.batch_size`` is the global batch at any process count: each of W processes runs
  ``batch_size / (W * grad_accum)`` items per micro-step, and DDP averages the gradients;
* for ``ddpm`` a run on W processes with A accumulation micro-steps computes the same gradients as 1 process with
  1 micro-step (same items, same noise; up to float summation order);
* a resumed run continues exactly as if never stopped: the batch and noise of a step depend on nothing but the
  step, and the checkpoint holds model, EMA, optimizer, LR scheduler, grad scaler and every RNG state.

Randomness an objective draws itself (negatives, augmentation, scheduled-sampling ``m`` and its noise) comes from a
generator seeded by ``(train.seed, s, micro_step, rank)``: independent per process, so with W > 1 those objectives
match a 1-process run in distribution, not bit for bit (negatives are also chosen within a process's shard).

With an HCMA module (``hcma.global_weight`` or ``hcma.local_weight`` > 0) the model owns it as ``model.hcma`` (so
DDP, the optimizer, EMA, checkpoints and the saved model carry it), the dataset returns each item's layout, and every
objective adds the HCMA loss; the ``hcma.translate`` offsets come from a generator seeded by
``(train.seed, s, micro_step, rank, 2)``. With both weights 0 none of this exists and a step computes what it did
without HCMA.

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
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
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
from markup2image.data.layouts import LAYOUTS_JSONL
from markup2image.diffusion.objectives import NegativePool, ObjectiveFn, TrainBatch, get_objective, noise_scheduler
from markup2image.diffusion.sampling import sample_images, to_uint8
from markup2image.evaluation.report import save_comparison_grid
from markup2image.io import read_jsonl
from markup2image.models.hcma import HcmaBatch
from markup2image.models.model import MarkupToImageModel
from markup2image.text.tokenizer import TOKENIZER_FILE, load_tokenizer, pad_id
from markup2image.training.launch import effective_mixed_precision

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # marker written into a checkpoint before it is renamed into place
TRAINER_STATE = "trainer_state.json"
DUMP_RANK_WEIGHTS_ENV = "MARKUP2IMAGE_DUMP_RANK_WEIGHTS"  # test hook: every rank writes its final weights here
SAMPLE_ITEMS = 4  # train markups in the sample grid
SAMPLE_STEPS = 20  # DDIM steps for the sample grid
# settings that change how often things are written or where processes run, not what a step computes
_NOT_FINGERPRINTED = ("checkpoint_every", "log_every", "sample_every", "keep_checkpoints", "num_processes", "cpu")
_NOT_FINGERPRINTED += ("accelerate_config", "snapshot_steps")


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


class BatchIndexer:
    """Dataset indices of the global batch at optimizer step ``s``: consecutive slices of per-epoch
    permutations seeded by ``(seed, epoch)``. Stateless in ``s``, so resuming needs no sampler state."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, step: int, batch_size: int) -> np.ndarray:
        """Indices ``[batch_size]`` (int64) of the global batch at optimizer step ``step``."""
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        return np.array([self._perm(int(p // self.n))[int(p % self.n)] for p in pos], dtype=np.int64)


def _seed(*keys: int) -> int:
    """A 64-bit seed mixed from ``keys`` (distinct keys never collide the way ``a * K + b`` sums do)."""
    entropy = [int(k) % 2**64 for k in keys]  # SeedSequence takes non-negative ints only
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def draw_noise(
    step: int, seed: int, positions: np.ndarray, image_shape: tuple[int, int, int], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``eps [b, C, H, W]`` and timesteps ``[b]`` of the global-batch ``positions [b]`` at step ``step``.

    Position ``j`` draws from its own generator seeded by ``(seed, step, j)``, so however the global batch is split
    over processes and micro-steps, every item gets the same noise; a process draws only its own items.
    """
    noise = torch.empty((len(positions), *image_shape))
    timesteps = torch.empty(len(positions), dtype=torch.long)
    for i, j in enumerate(positions):
        g = torch.Generator().manual_seed(_seed(seed, step, j))
        timesteps[i] = torch.randint(0, num_timesteps, (1,), generator=g)[0]
        noise[i] = torch.randn(image_shape, generator=g)
    return noise, timesteps


def extras_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator an objective draws its own randomness from: one per (seed, step, micro-step, rank)."""
    return torch.Generator().manual_seed(_seed(seed, step, micro, rank, 1))


def hcma_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of the ``hcma.translate`` offsets: one per (seed, step, micro-step, rank), apart from the
    objective's, so switching HCMA on leaves every draw of the objective as it was."""
    return torch.Generator().manual_seed(_seed(seed, step, micro, rank, 2))


@dataclass(frozen=True)
class MicroBatchShare:
    """One process's share of one global micro-batch: dataset indices ``[b]``, noise ``eps [b, C, H, W]`` and
    timesteps ``[b]``, with ``b = train.batch_size / (train.grad_accum * world)``."""

    indices: np.ndarray
    noise: torch.Tensor
    timesteps: torch.Tensor
    positions: np.ndarray  # (b,) positions in the global batch


def condition_dropout(seed: int, step: int, positions: np.ndarray, p: float) -> torch.Tensor:
    """``[b]`` bool: which global-batch ``positions`` train without their markup at ``step`` (``train.cond_dropout``).

    Drawn per position from its own generator (like :func:`draw_noise`), so any process split drops the same items.
    """
    if p <= 0:
        return torch.zeros(len(positions), dtype=torch.bool)
    draws = [
        torch.rand(1, generator=torch.Generator().manual_seed(_seed(seed, step, int(j), 7)))[0] for j in positions
    ]
    return torch.stack(draws) < p


def drop_markup(ids: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, null: Sequence[int], pad: int):
    """``ids, mask [B, N]`` with the rows in ``drop`` replaced by the empty markup ``null`` (e.g. [BOS, EOS])."""
    if not bool(drop.any()):
        return ids, mask
    ids, mask = ids.clone(), mask.clone()
    n = min(len(null), ids.shape[1])
    ids[drop] = pad
    ids[drop, :n] = torch.tensor(list(null[:n]), dtype=ids.dtype)
    mask[drop] = 0
    mask[drop, :n] = 1
    return ids, mask


def micro_batch_share(
    cfg: TrainConfig,
    batch_indices: np.ndarray,
    step: int,
    micro: int,
    rank: int,
    world: int,
    image_shape: tuple[int, int, int],
    num_timesteps: int,
) -> MicroBatchShare:
    """Micro-step ``micro`` of optimizer step ``step`` for process ``rank`` of ``world``.

    ``batch_indices [train.batch_size]`` is the global batch (:class:`BatchIndexer`); ``image_shape`` is (C, H, W).
    The global batch is cut into ``grad_accum`` micro-batches, each into ``world`` equal shares, in that order.
    """
    local = cfg.batch_size // (cfg.grad_accum * world)
    first = (micro * world + rank) * local
    positions = np.arange(first, first + local)  # (b,) positions in the global batch
    noise, timesteps = draw_noise(step, cfg.seed, positions, image_shape, num_timesteps)
    return MicroBatchShare(batch_indices[positions], noise, timesteps, positions)


DATA_FINGERPRINT_FILES = ("train.jsonl", TOKENIZER_FILE)  # in the tokenized folder: ids, markup, vocabulary
LIVE_IN_CHECKPOINT = "live"  # a copy of the DVCLive folder as of the checkpoint's step


def data_fingerprint(paths: TrainPaths) -> str:
    """A hash of the training data as the loop sees it: the tokenized train split (ids and markup), the tokenizer,
    the rendered train index (which items have images) and the layouts (HCMA boxes). Pixel contents are not read
    (at 100k images that would cost more than it saves): a re-render changes this index, the layouts or the ids in
    nearly every real case, and an identical index with identical ids is the same training set."""
    import hashlib

    rendered = [paths.rendered / "train.jsonl", paths.rendered / LAYOUTS_JSONL]
    h = hashlib.sha256()
    for path in [paths.tokenized / name for name in DATA_FINGERPRINT_FILES] + rendered:
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    return h.hexdigest()[:16]


def code_fingerprint() -> str:
    """A hash of this package's Python sources. DVC reruns the train stage when they change (they are its deps);
    resuming the finished run's checkpoints would then silently keep the model the old code trained."""
    import hashlib

    import markup2image

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
    import hashlib

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
    fingerprint = run_fingerprint(params, domain, data_fingerprint(paths), code_fingerprint())
    start = _resume(run, paths, fingerprint)
    stop = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    live = _open_live(paths.live, start) if acc.is_main_process else None
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
                _log_live(live, logged, run.lr_sched.get_last_lr()[0], cfg.batch_size * steps_timed / seconds, done)
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
    chw, num_t = (net.image.channels, net.image.height, net.image.width), params.diffusion.num_train_timesteps
    for micro in range(cfg.grad_accum):
        share = micro_batch_share(cfg, gidx, step, micro, rank, world, chw, num_t)
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
        _accumulate_terms(terms_acc, terms, batch.timesteps, num_t)
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


def _open_live(folder: Path, start: int):
    """DVCLive on rank 0; on a resume, rows and images logged after the checkpoint (then lost) are dropped."""
    from dvclive import Live

    if start > 0:
        prune_live_after(folder, start)
    # dvcyaml=False: DVCLive must not rewrite dvc.yaml; its files are declared there instead.
    live = Live(str(folder), dvcyaml=False, save_dvc_exp=False, resume=start > 0)
    (folder / "plots" / "images").mkdir(parents=True, exist_ok=True)  # a declared output, also with no samples
    return live


def prune_live_after(folder: Path, step: int) -> None:
    """Drop DVCLive metric rows and sample images of steps after ``step`` (written by a run that was then killed)."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        col = lines[0].rstrip("\n").split("\t").index("step") if lines else 0
        kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        if len(kept) != len(lines):
            tsv.write_text("".join(kept))
    for png in (folder / "plots" / "images" / "samples").glob("step_*.png"):
        if int(png.stem.split("_")[1]) > step:
            png.unlink()


def _log_live(live, terms: dict[str, float], lr: float, imgs_per_s: float, step: int) -> None:
    live.step = step
    for k, v in terms.items():
        if math.isfinite(v):
            live.log_metric(f"train/{k}", v)
    live.log_metric("train/lr", lr)
    live.log_metric("train/images_per_s", imgs_per_s)  # global batch x steps / training seconds (no I/O)
    live.next_step()


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


def restore_live(saved: Path, live: Path) -> None:
    """Put the checkpoint's copy of the DVCLive folder back where DVC expects it.

    DVC deletes a stage's outputs (``models/<d>/live``, ``models/<d>/model``) before it reruns the stage, but not the
    persisted checkpoints; without this a rerun that resumes (an upstream stage reran with identical data, or a
    killed run) would log nothing for the steps before the checkpoint, and with nothing left to train, DVC would
    fail on the missing ``live/plots/metrics``. Rows after the checkpoint are pruned by :func:`_open_live`.
    """
    if not saved.is_dir():
        return
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(saved, live)


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
        _prune_checkpoints(folder, keep)
    acc.wait_for_everyone()


def _prune_checkpoints(folder: Path, keep: int) -> None:
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
