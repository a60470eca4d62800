"""Training objectives (design §5). Each maps a batch to ``(loss, terms)``.

``terms`` holds detached floats for logging (each loss term of the objective), plus ``per_item``, the ``[B]``
tensor of ``L_simple(y0)`` for per-timestep logging. The training loop draws the noise and timesteps for the
*global* batch from a generator seeded by ``(train.seed, step)`` and hands each process its slice, so a run on N
processes sees the same noise as a run on one. Further randomness (scheduled-sampling ``m``, augmentation,
negatives, their noise) is drawn from ``batch.generator``.

Objectives call the model once with gradients, through its ``forward`` (DDP-safe); the scheduled-sampling rollout
runs without gradients on the unwrapped model.

* ``ddpm``: ``L_simple``.
* ``ss_dm``: scheduled sampling (Deng et al. 2023, final code), :func:`scheduled_sampling_rollout`.
* ``cdcd``: ``L_simple(y0) + w L_cdcd``, CDCD's bounded contrastive diffusion term
  (:func:`~markup2image.diffusion.losses.contrastive_diffusion_loss`) over the item and its K negatives.
* ``fsa_cdm``: ``beta L_fa + L_simple(y0) + L_simple(y0') + lambda mean_k exp(-2 L_simple(negative_k))
  + infonce_weight L_infonce`` (FSA-CDM eq. 10 in L_simple form, where ``infonce_weight`` is 1); the terms whose
  switch (``model.fsa``, ``model.con_aug``) is off drop out.

InfoNCE negatives (``infonce_negatives``): ``other_items`` (default) scores each anchor against the OTHER items'
anchors and positives under their own markup (SimCLR same-batch sampling, which the paper cites); ``own_markup``
uses the item's K negatives, all under its own markup, which rewards a U-Net that ignores the markup. Measured
markup use at weight 1: docs/decisions.md §4. ``params.yaml`` keeps weight 0 only because its default has
``con_aug`` off; the paper recipes use 1.

HCMA (design §8): when the batch carries ``hcma`` (the model has an HCMA module), every objective adds
``hcma.global_weight L_global + hcma.local_weight L_local`` on the noisy images ``y_t`` its denoiser call sees
(for ``ss_dm`` the rolled-out ``y_t``), computed inside that same ``forward`` call; its terms are logged as
``hcma_global``, ``hcma_local`` and ``hcma_boxes``. Without it, the model calls are exactly those of before.

Negatives (``cdcd``, ``fsa_cdm``): for each item, ``train.num_negatives`` other images of the global micro-batch
(every process's share: ``TrainBatch.negative_pool``; on one process the batch itself) whose markup key differs,
each paired with the item's own markup, noised at the item's ``t`` with fresh noise. When an
item has fewer than K such images, :func:`choose_negatives` cycles through a random order of the valid ones
(sampling with replacement, spread evenly); an item with none gets its negatives masked out of every term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from markup2image.config import DiffusionConfig, Params
from markup2image.data.layout_tensors import HcmaBatch
from markup2image.diffusion.losses import (
    contrastive_diffusion_loss,
    eubo_term,
    info_nce_loss,
    prediction_loss_weights,
    same_batch_info_nce_loss,
    simple_loss,
)
from markup2image.diffusion.sampling import scheduler_config
from markup2image.models.model import DenoiserOutput, unwrap_model

__all__ = [
    "OBJECTIVES",
    "NegativePool",
    "TrainBatch",
    "augment_positive",
    "cdcd_loss",
    "choose_negatives",
    "ddpm_loss",
    "fsa_cdm_loss",
    "get_objective",
    "noise_scheduler",
    "scheduled_sampling_probability",
    "scheduled_sampling_rollout",
    "simple_loss",
    "ss_dm_loss",
]


@dataclass
class TrainBatch:
    """One process's share of a training batch.

    images: ``y0 [B, C, H, W]`` in [-1, 1]; input_ids / attention_mask: ``[B, N]``; markup_keys: one int per
    item identifying its markup (equal markup -> equal key), for choosing negatives; noise: ``eps [B, C, H, W]``;
    timesteps: ``[B]`` int64; generator: for any further randomness the objective needs; hcma: layouts and the
    translation generator for the HCMA loss (None: the model has no HCMA module); negative_pool: the images and
    markup keys of the whole global micro-batch (every process's share), where negatives are drawn from (None:
    this share itself, as on one process).
    """

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    markup_keys: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    generator: torch.Generator | None = None
    hcma: HcmaBatch | None = None
    negative_pool: NegativePool | None = None


@dataclass
class NegativePool:
    """Where negatives come from: ``images [G, C, H, W]`` and ``markup_keys [G]`` of the global micro-batch."""

    images: torch.Tensor
    markup_keys: torch.Tensor


def _hcma_kwargs(batch: TrainBatch) -> dict:
    """``forward`` keywords that add the HCMA loss (none when the batch has no HCMA part)."""
    return {} if batch.hcma is None else {"hcma_batch": batch.hcma}


def _eps_and_hcma(
    out: torch.Tensor | DenoiserOutput, loss_terms: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise prediction of a ``forward`` result and its HCMA loss (None without); HCMA terms go into
    ``loss_terms``."""
    if not isinstance(out, DenoiserOutput):
        return out, None
    loss_terms |= out.hcma_terms
    return out.sample, out.hcma_loss


def _plus(loss: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return loss if extra is None else loss + extra


def noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process q(y_t | y0): linear betas 1e-4..0.02 over 1000 steps, eps-prediction."""
    return DDPMScheduler(**scheduler_config(cfg), variance_type="fixed_small", clip_sample=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:

    return unwrap_model(model)


def _alpha_bar(sched: DDPMScheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alpha_bar_t`` as ``[B, 1, 1, 1]`` in ``like``'s dtype and device."""
    return sched.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, 1, 1, 1)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise from ``generator`` (drawn on the CPU, so any device reproduces it)."""
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def weighted_simple_loss(
    eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sched: DDPMScheduler, params: Params
) -> torch.Tensor:
    """``[B]`` denoising loss in the space of ``diffusion.prediction_type`` (or min-SNR-weighted): ``L_simple``
    times :func:`~markup2image.diffusion.losses.prediction_loss_weights` (1 for ``epsilon``, the DDPM loss)."""
    d = params.diffusion
    if d.prediction_type == "epsilon" and d.snr_gamma == 0:
        return simple_loss(eps_pred, eps)
    ab = sched.alphas_cumprod.to(t.device)[t]
    return simple_loss(eps_pred, eps) * prediction_loss_weights(ab, d.prediction_type, d.snr_gamma)


# -- ddpm -------------------------------------------------------------------------------------------------------


def ddpm_loss(
    model: torch.nn.Module, batch: TrainBatch, sched: DDPMScheduler, params: Params, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain DDPM: MSE between the true and predicted noise."""
    y_t = sched.add_noise(batch.images, batch.noise, batch.timesteps)  # DDPM eq. 4: q(y_t | y_0)
    terms: dict = {}
    out = model(y_t, batch.timesteps, batch.input_ids, batch.attention_mask, **_hcma_kwargs(batch))
    eps_pred, hcma = _eps_and_hcma(out, terms)
    per_item = weighted_simple_loss(eps_pred, batch.noise, batch.timesteps, sched, params)
    loss = per_item.mean()
    return _plus(loss, hcma), terms | {"loss_simple": loss.item(), "per_item": per_item.detach()}


# -- ss_dm ------------------------------------------------------------------------------------------------------


def scheduled_sampling_probability(step: int, total_steps: int, max_prob: float) -> float:
    """``P(m = 1)`` at optimizer step ``step``: linear from 0 (step 0) to ``max_prob`` (step ``total_steps``)."""
    return max_prob * min(max(step, 0) / max(total_steps, 1), 1.0)


@torch.no_grad()
def scheduled_sampling_rollout(
    model: torch.nn.Module, batch: TrainBatch, sched: DDPMScheduler, m: int
) -> torch.Tensor:
    """``y_t`` reached by ``m`` model steps from ``y_{t+m} ~ q(. | y0)`` (no gradients).

    For ``s = 0..m-1``: predict ``x̂0 = (y - sqrt(1 - ab) eps_theta) / sqrt(ab)`` at ``t + m - s`` (unclipped) and
    re-noise it to ``t + m - s - 1`` with fresh noise from ``batch.generator``. ``m = 0`` gives
    ``q(y_t | y0)`` with ``batch.noise``. ``model`` should be the unwrapped model. Returns ``[B, C, H, W]``.
    """
    y0, t = batch.images, batch.timesteps
    y = sched.add_noise(y0, batch.noise, t + m)
    for s in range(m):
        ts = t + m - s
        eps = model(y, ts, batch.input_ids, batch.attention_mask)
        ab = _alpha_bar(sched, ts, y)
        x0 = (y - (1 - ab).sqrt() * eps) / ab.sqrt()
        y = sched.add_noise(x0, _randn(tuple(y0.shape), batch.generator, y0), ts - 1)
    return y


def ss_dm_loss(
    model: torch.nn.Module, batch: TrainBatch, sched: DDPMScheduler, params: Params, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """SS-DM scheduled sampling (design §5).

    One ``m in {0, 1}`` per batch with ``P(m = 1)`` rising linearly over ``train.steps`` to ``train.ss_max_prob``;
    ``m`` shrinks while any ``t >= T - m``. The input ``y_t`` comes from :func:`scheduled_sampling_rollout`; the
    target is the noise that ``y_t`` implies with the TRUE ``y0``: ``eps = (y_t - sqrt(ab_t) y0) / sqrt(1 - ab_t)``.
    """
    prob = scheduled_sampling_probability(step, params.train.steps, params.train.ss_max_prob)
    m = int(float(_rand((), batch.generator)) < prob)
    num_steps = sched.config.num_train_timesteps
    while m > 0 and int(batch.timesteps.max()) >= num_steps - m:
        m -= 1
    y_t = scheduled_sampling_rollout(_unwrap(model), batch, sched, m)
    ab = _alpha_bar(sched, batch.timesteps, y_t)
    target = (y_t - ab.sqrt() * batch.images) / (1 - ab).sqrt()
    terms: dict = {}
    out = model(y_t, batch.timesteps, batch.input_ids, batch.attention_mask, **_hcma_kwargs(batch))
    eps_pred, hcma = _eps_and_hcma(out, terms)
    per_item = weighted_simple_loss(eps_pred, target, batch.timesteps, sched, params)
    loss = per_item.mean()
    terms |= {"loss_simple": loss.item(), "ss_m": float(m), "ss_prob": prob, "per_item": per_item.detach()}
    return _plus(loss, hcma), terms


# -- negatives and positives ------------------------------------------------------------------------------------


def choose_negatives(
    markup_keys: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    pool_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each item, ``k`` indices of the pool (default: the batch itself) whose markup key differs from the item's.

    Valid candidates are visited in a random order; with fewer than ``k`` of them the order repeats (sampling with
    replacement, spread evenly). An item without any valid candidate gets index 0 with mask False.

    Returns ``index [B, k]`` (long, into the pool) and ``valid [B, k]`` (bool), on ``markup_keys``' device.
    """
    keys = markup_keys.cpu()
    pool = keys if pool_keys is None else pool_keys.cpu()
    b, g = keys.shape[0], pool.shape[0]
    differ = keys[:, None] != pool[None, :]  # (B, G)
    scores = _rand((b, g), generator).masked_fill(~differ, -1.0)  # valid in [0, 1), invalid -1
    order = scores.argsort(dim=1, descending=True)  # valid candidates first, in random order
    count = differ.sum(1)  # (B,)
    pos = torch.arange(k)[None, :] % count.clamp(min=1)[:, None]  # (B, k)
    index = order.gather(1, pos)
    valid = (count > 0)[:, None].expand(b, k)
    fallback = torch.arange(b)[:, None].expand(b, k) if pool_keys is None else torch.zeros(b, k, dtype=torch.long)
    index = torch.where(valid, index, fallback)
    return index.to(markup_keys.device), valid.to(markup_keys.device)


def augment_positive(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A mild, meaning-preserving view ``y0'`` of ``y0 [B, C, H, W]`` in [-1, 1] (white = +1).

    Per item: a shift of 1-2 px left or right and 0-1 px up or down with white fill, a contrast change that keeps
    white white (``1 - c (1 - y)``, ``c`` in [0.9, 1]), and with probability 1/2 a 3x3 binomial blur blended in
    with weight up to 0.25. Even an isolated ink pixel stays below -0.45, well inside the evaluation's ink
    threshold (gray 150, i.e. +0.18), so no stroke disappears.
    """
    b, _, h, w = images.shape
    dx = torch.tensor([-2, -1, 1, 2])[torch.randint(0, 4, (b,), generator=generator)]
    dy = torch.randint(-1, 2, (b,), generator=generator)
    contrast = 0.9 + 0.1 * _rand((b,), generator)
    blur = (_rand((b,), generator) < 0.5).float() * 0.25 * _rand((b,), generator)
    padded = F.pad(images, (2, 2, 2, 2), value=1.0)
    shifted = torch.stack(
        [padded[i, :, 2 - int(dy[i]) : 2 - int(dy[i]) + h, 2 - int(dx[i]) : 2 - int(dx[i]) + w] for i in range(b)]
    )  # content moves by (dy, dx)
    to = dict(device=images.device, dtype=images.dtype)
    shifted = 1.0 - contrast.to(**to).view(-1, 1, 1, 1) * (1.0 - shifted)
    kernel = torch.tensor([1.0, 2.0, 1.0], **to)
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(images.shape[1], 1, 3, 3)
    blurred = F.conv2d(F.pad(shifted, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])
    a = blur.to(**to).view(-1, 1, 1, 1)
    return ((1 - a) * shifted + a * blurred).clamp(-1.0, 1.0)


# -- cdcd -------------------------------------------------------------------------------------------------------


def _negative_views(
    batch: TrainBatch, sched: DDPMScheduler, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy negatives ``[B*k, C, H, W]`` (item-major), noise, timesteps ``[B*k]``, text index, mask ``[B, k]``."""
    pool = batch.negative_pool
    if pool is None:
        index, valid = choose_negatives(batch.markup_keys, k, batch.generator)
        y0_neg = batch.images[index.flatten()]  # (B*k, C, H, W)
    else:
        index, valid = choose_negatives(batch.markup_keys, k, batch.generator, pool.markup_keys)
        y0_neg = pool.images[index.flatten()]
    b = batch.images.shape[0]
    eps_neg = _randn(tuple(y0_neg.shape), batch.generator, y0_neg)
    t_neg = batch.timesteps.repeat_interleave(k)
    text_index = torch.arange(b, device=batch.images.device).repeat_interleave(k)  # paired with the item's markup
    return sched.add_noise(y0_neg, eps_neg, t_neg), eps_neg, t_neg, text_index, valid


def cdcd_loss(
    model: torch.nn.Module, batch: TrainBatch, sched: DDPMScheduler, params: Params, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_simple(y0) + w L_cdcd``, ``w = train.cdcd_weight``; one U-Net call of ``(K+1)B``.

    ``L_cdcd`` (CDCD's contrastive diffusion loss, the intra-negative reading: the item's markup paired with other
    images) scores each pair by its unweighted ``L_simple`` summed over pixels, so it is bounded below by 0. CDCD
    adds it to an ELBO summed over dimensions; the per-pixel ``L_simple`` here is that sum over ``pixels``, so the
    term is divided by ``pixels`` too and ``w`` keeps CDCD's ratio of the two."""
    k, b = params.train.num_negatives, batch.images.shape[0]
    y_t = sched.add_noise(batch.images, batch.noise, batch.timesteps)
    y_neg, eps_neg, t_neg, idx_neg, valid = _negative_views(batch, sched, k)
    text_index = torch.cat([torch.arange(b, device=y_t.device), idx_neg])
    terms: dict = {}
    out = model(
        torch.cat([y_t, y_neg]),
        torch.cat([batch.timesteps, t_neg]),
        batch.input_ids,
        batch.attention_mask,
        text_index=text_index,
        **_hcma_kwargs(batch),
    )
    eps_pred, hcma = _eps_and_hcma(out, terms)
    per_item = weighted_simple_loss(eps_pred[:b], batch.noise, batch.timesteps, sched, params)
    neg = simple_loss(eps_pred[b:], eps_neg).view(b, k)
    pixels = batch.images[0].numel()
    contrast = contrastive_diffusion_loss(simple_loss(eps_pred[:b], batch.noise), neg, pixels, valid)
    w = valid.to(neg.dtype)
    neg_mean = ((neg * w).sum(1) / w.sum(1).clamp(min=1)).mean()
    loss = per_item.mean() + params.train.cdcd_weight * contrast / pixels
    return _plus(loss, hcma), terms | {
        "loss_simple": per_item.mean().item(),
        "loss_negative": neg_mean.item(),
        "loss_cdcd": contrast.item(),
        "per_item": per_item.detach(),
    }


# -- fsa_cdm ----------------------------------------------------------------------------------------------------


def negatives_are_read(params: Params) -> bool:
    """Whether ``fsa_cdm``'s K negatives reach its loss: through EUBO (``lambda`` > 0) or the ``own_markup`` InfoNCE.
    At ``lambda`` 0 with ``other_items`` negatives (Table 3's lambda 0) nothing reads them, so their K U-Net passes
    are not run: the same loss and gradients at 2/(K+2) of the U-Net work."""
    return params.lambda_ != 0 or params.infonce_negatives == "own_markup"


def fsa_cdm_loss(
    model: torch.nn.Module, batch: TrainBatch, sched: DDPMScheduler, params: Params, step: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """FSA-CDM (design §4): ``beta L_fa + L_simple(y0) + L_simple(y0') + lambda mean_k e^{-2 L_simple(neg_k)}
    + infonce_weight L_infonce(tau)``. Anchor, positive and K negatives share ``t`` and run as one U-Net call of
    ``(K+2)B`` (``2B`` when nothing reads the negatives: :func:`negatives_are_read`). ``L_infonce`` is computed and
    logged even at weight 0 (its head then gets zero gradients, so DDP sees every parameter used).

    ``model.con_aug`` off: ``L_simple(y0) + beta L_fa``; ``model.fsa`` off: no ``L_fa``.
    """
    cfg = _unwrap(model).model_cfg
    b = batch.images.shape[0]
    y_t = sched.add_noise(batch.images, batch.noise, batch.timesteps)
    align = batch.images if cfg.fsa else None
    terms: dict[str, float] = {}
    if not cfg.con_aug:
        out = model(
            y_t, batch.timesteps, batch.input_ids, batch.attention_mask, align_images=align, **_hcma_kwargs(batch)
        )
        eps_pred, hcma = _eps_and_hcma(out, terms)
        per_item = weighted_simple_loss(eps_pred, batch.noise, batch.timesteps, sched, params)
        loss = per_item.mean()
    else:
        k = params.train.num_negatives if negatives_are_read(params) else 0
        y0_pos = augment_positive(batch.images, batch.generator)
        eps_pos = _randn(tuple(y0_pos.shape), batch.generator, y0_pos)
        y_pos = sched.add_noise(y0_pos, eps_pos, batch.timesteps)
        own = torch.arange(b, device=y_t.device)
        views, times, text = [y_t, y_pos], [batch.timesteps, batch.timesteps], [own, own]
        if k:
            y_neg, eps_neg, t_neg, idx_neg, valid = _negative_views(batch, sched, k)
            views, times, text = [*views, y_neg], [*times, t_neg], [*text, idx_neg]
        out = model(
            torch.cat(views),
            torch.cat(times),
            batch.input_ids,
            batch.attention_mask,
            text_index=torch.cat(text),
            align_images=align,
            return_mid=True,
            **_hcma_kwargs(batch),
        )
        _, hcma = _eps_and_hcma(out, terms)
        two = torch.cat([batch.timesteps, batch.timesteps])
        pair = weighted_simple_loss(out.sample[: 2 * b], torch.cat([batch.noise, eps_pos]), two, sched, params)
        per_item, pos_simple = pair[:b], pair[b:]
        z = out.mid_projection
        if params.infonce_negatives == "other_items":
            nce = same_batch_info_nce_loss(z[:b], z[b : 2 * b], batch.markup_keys, params.tau)
        else:
            nce = info_nce_loss(z[:b], z[b : 2 * b], z[2 * b :].view(b, k, -1), params.tau, valid)
        loss = per_item.mean() + pos_simple.mean() + params.infonce_weight * nce
        terms |= {"loss_positive": pos_simple.mean().item(), "loss_infonce": nce.item()}
        if k:
            neg_simple = simple_loss(out.sample[2 * b :], eps_neg).view(b, k)  # EUBO: the plain L_simple of eq. 10
            eubo = eubo_term(neg_simple, valid)
            loss = loss + params.lambda_ * eubo
            terms |= {"loss_eubo": eubo.item(), "negatives_valid": valid.float().mean().item()}
    if cfg.fsa:
        loss = loss + params.beta * out.alignment_loss
        terms["loss_fa"] = out.alignment_loss.item()
    terms |= {"loss_simple": per_item.mean().item(), "per_item": per_item.detach()}
    return _plus(loss, hcma), terms


ObjectiveFn = Callable[[torch.nn.Module, TrainBatch, DDPMScheduler, Params, int], tuple[torch.Tensor, dict]]

OBJECTIVES: dict[str, ObjectiveFn] = {
    "ddpm": ddpm_loss,
    "ss_dm": ss_dm_loss,
    "cdcd": cdcd_loss,
    "fsa_cdm": fsa_cdm_loss,
}


def get_objective(name: str) -> ObjectiveFn:
    if name not in OBJECTIVES:
        raise ValueError(f"train.objective: unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
