"""The training loop, run under ``accelerate launch`` on 1 CPU process, N GPUs or several nodes.

Determinism by construction: the batch at optimizer step ``s`` is a fixed slice of a per-epoch permutation seeded
by ``(train.seed, epoch)``, and the noise and timesteps of the *global* batch are drawn from a generator seeded by
``(train.seed, s, micro_step)`` and then sliced per process. So a resumed run continues exactly as if never
stopped, and N processes see the same data and noise as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from markup2image.config import Params, to_dict
from markup2image.data.dataset import MarkupImageDataset, collate
from markup2image.diffusion.objectives import TrainBatch, get_objective, noise_scheduler
from markup2image.models.model import MarkupToImageModel
from markup2image.text.tokenizer import TOKENIZER_FILE, load_tokenizer, pad_id

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # marker written last into a finished checkpoint


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
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        return np.array([self._perm(int(p // self.n))[int(p % self.n)] for p in pos], dtype=np.int64)


def draw_noise(
    step: int, micro: int, seed: int, shape: tuple[int, ...], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Noise ``[B, C, H, W]`` and timesteps ``[B]`` for the global micro-batch, plus a generator for extras."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step * 1009 + micro)
    noise = torch.randn(shape, generator=g)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=g)
    return noise, timesteps, g


def run_fingerprint(params: Params, domain: str) -> str:
    """A hash of everything that defines a training run; checkpoints of another run are never resumed."""
    import hashlib

    keys = {k: v for k, v in to_dict(params).items() if k in ("lambda", "beta", "tau", "model", "diffusion", "train")}
    keys["train"] = {k: v for k, v in keys["train"].items() if k not in ("checkpoint_every", "log_every")}
    keys["domain"] = [domain, to_dict(params.domain_config(domain))]
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint folder that was completely written (has the COMPLETE marker)."""
    if not folder.exists():
        return None
    done = [p for p in folder.glob("step_*") if (p / COMPLETE).exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def build_model(params: Params, domain: str, tokenizer_dir: Path) -> MarkupToImageModel:
    """A fresh model sized to the tokenizer in ``tokenizer_dir``; initialised from ``train.seed``."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(params.train.seed)  # identical init on every process
    return MarkupToImageModel(
        model_cfg=params.model, image=params.domain_config(domain), vocab_size=tok.get_vocab_size(), pad_id=pad_id(tok)
    )


def train(params: Params, domain: str, paths: TrainPaths, max_steps: int | None = None) -> dict:
    """Train (or resume) and write ``paths.model`` with EMA weights. Returns a summary dict.

    ``max_steps`` stops early after that many optimizer steps in this call (used to simulate a kill in tests).
    """
    cfg = params.train
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision if torch.cuda.is_available() else "no",
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
    )
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"train.batch_size: {cfg.batch_size} must be divisible by processes x train.grad_accum "
            f"({world} x {cfg.grad_accum})"
        )
    if cfg.mixed_precision != "no" and not torch.cuda.is_available():
        log.warning("train.mixed_precision=%s needs a GPU; training in fp32 on the CPU", cfg.mixed_precision)
    model = build_model(params, domain, paths.tokenized)
    torch.manual_seed(cfg.seed + rank)  # per-rank offset for any implicit randomness (dropout)
    dataset = MarkupImageDataset(paths.rendered, paths.tokenized, "train", model.image.channels)
    if len(dataset) == 0:
        raise ValueError(f"{paths.rendered}/train.jsonl: no rendered training items; check the render stage report")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(trainable, decay=cfg.ema_decay)
    model, opt, lr_sched = acc.prepare(model, opt, lr_sched)
    acc.register_for_checkpointing(ema)
    sched = noise_scheduler(params.diffusion)
    objective = get_objective(cfg.objective)

    start = 0
    fingerprint = run_fingerprint(params, domain)
    ckpt = newest_checkpoint(paths.checkpoints)
    if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text()).get("fingerprint") != fingerprint:
        log.info("checkpoints in %s belong to other params; starting afresh", paths.checkpoints)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(paths.checkpoints)
            shutil.rmtree(paths.live, ignore_errors=True)
        acc.wait_for_everyone()
        ckpt = None
    if ckpt is not None:
        acc.load_state(str(ckpt))
        start = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        log.info("resuming from %s (step %d)", ckpt, start)
    ema.to(acc.device)

    live = _open_live(paths.live, resume=start > 0) if acc.is_main_process else None
    micro_global = cfg.batch_size // cfg.grad_accum
    local = micro_global // world
    net = acc.unwrap_model(model)
    img = net.image
    indices = BatchIndexer(len(dataset), cfg.seed)
    stop = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    bar = tqdm(
        range(start, stop), desc=f"train {domain}", disable=not acc.is_main_process, initial=start, total=cfg.steps
    )
    t_last, terms_acc = time.perf_counter(), {}
    for step in bar:
        model.train()
        gidx = indices(step, cfg.batch_size)
        for micro in range(cfg.grad_accum):
            mid = gidx[micro * micro_global : (micro + 1) * micro_global]
            shape = (micro_global, img.channels, img.height, img.width)
            noise, timesteps, gen = draw_noise(step, micro, cfg.seed, shape, params.diffusion.num_train_timesteps)
            sl = slice(rank * local, (rank + 1) * local)
            data = collate([dataset[int(i)] for i in mid[sl]], pad_id=net.pad_id)
            batch = TrainBatch(
                images=data["images"].to(acc.device),
                input_ids=data["input_ids"].to(acc.device),
                attention_mask=data["attention_mask"].to(acc.device),
                markup_keys=data["markup_keys"].to(acc.device),
                noise=noise[sl].to(acc.device),
                timesteps=timesteps[sl].to(acc.device),
                generator=gen,
            )
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss, terms = objective(model, batch, sched, params, step)
                acc.backward(loss / cfg.grad_accum)
            terms["loss"] = float(loss.detach())
            _accumulate_terms(terms_acc, terms, batch.timesteps, params.diffusion.num_train_timesteps)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step([p for p in net.parameters() if p.requires_grad])
        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            now = time.perf_counter()
            imgs_per_s = cfg.batch_size * cfg.log_every / max(now - t_last, 1e-9)
            t_last = now
            logged = _reduce_terms(acc, terms_acc)
            terms_acc = {}
            if live is not None:
                _log_live(live, logged, lr_sched.get_last_lr()[0], imgs_per_s, done)
                bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}")
        if done % cfg.checkpoint_every == 0 or done == stop:
            save_checkpoint(acc, paths.checkpoints, done, fingerprint)
    acc.wait_for_everyone()
    finished = stop >= cfg.steps
    if acc.is_main_process and finished:
        _save_final(acc, model, ema, params, domain, paths)
    if live is not None:
        live.end()
    acc.end_training()
    return {"steps": stop, "finished": finished, "processes": world}


def _accumulate_terms(acc_terms: dict, terms: dict, timesteps: torch.Tensor, num_timesteps: int) -> None:
    for k, v in terms.items():
        if k == "per_item":
            quart = (timesteps * 4 // num_timesteps).clamp(max=3)
            for q in range(4):
                sel = v[quart == q]
                if sel.numel():
                    s, c = acc_terms.get(f"loss_t_q{q + 1}", (0.0, 0))
                    acc_terms[f"loss_t_q{q + 1}"] = (s + float(sel.sum()), c + sel.numel())
            continue
        s, c = acc_terms.get(k, (0.0, 0))
        acc_terms[k] = (s + float(v), c + 1)


def _reduce_terms(acc: Accelerator, terms: dict) -> dict[str, float]:
    """Average logged terms over steps and processes."""
    keys = sorted(terms)
    if not keys:
        return {}
    vals = torch.tensor([[terms[k][0], terms[k][1]] for k in keys], dtype=torch.float64, device=acc.device)
    vals = acc.reduce(vals, reduction="sum") if acc.num_processes > 1 else vals
    return {k: float(vals[i, 0] / max(vals[i, 1], 1)) for i, k in enumerate(keys)}


def _open_live(folder: Path, resume: bool):
    from dvclive import Live

    # dvcyaml=False: DVCLive must not rewrite dvc.yaml; its files are declared there instead.
    return Live(str(folder), dvcyaml=False, save_dvc_exp=False, resume=resume)


def _log_live(live, terms: dict[str, float], lr: float, imgs_per_s: float, step: int) -> None:
    live.step = step
    for k, v in terms.items():
        if math.isfinite(v):
            live.log_metric(f"train/{k}", v)
    live.log_metric("train/lr", lr)
    live.log_metric("train/images_per_s", imgs_per_s)
    live.next_step()


def save_checkpoint(acc: Accelerator, folder: Path, step: int, fingerprint: str = "") -> None:
    """accelerate's full state (model, optimizer, LR scheduler, scaler, EMA, RNG) into ``step_<n>``.

    Written to a temporary folder and renamed; the COMPLETE marker is the last thing written, so a
    half-written checkpoint is never picked up by :func:`newest_checkpoint`.
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
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (final / COMPLETE).write_text("ok\n")
    acc.wait_for_everyone()


def _save_final(acc: Accelerator, model, ema: EMAModel, params: Params, domain: str, paths: TrainPaths) -> None:
    """Save EMA weights (what evaluation and export use) plus the tokenizer into ``paths.model``."""
    net = acc.unwrap_model(model)
    trainable = [p for p in net.parameters() if p.requires_grad]
    ema.store(trainable)
    ema.copy_to(trainable)
    tmp = paths.model.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save(tmp, extra={"domain": domain, "params": to_dict(params), "ema": True})
    shutil.copy(paths.tokenized / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    shutil.rmtree(paths.model, ignore_errors=True)
    tmp.rename(paths.model)
    ema.restore(trainable)
