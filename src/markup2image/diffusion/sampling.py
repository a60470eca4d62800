"""Samplers (design §5): DDPM ancestral (the paper protocol), DDIM and DPM-Solver++ from diffusers.

* ``ddpm``: 1000 steps, ``fixed_small`` variance, x̂0 clipped to [-1, 1]. It runs as diffusers' ``DDIMScheduler``
  with ``eta = 1`` over every timestep and ``use_clipped_model_output``: that is algebraically the DDPM posterior
  step (sigma_t^2 = beta~_t, mean = mu~(x_t, clip(x̂0))), and unlike ``DDPMScheduler.step`` it takes its noise as
  an argument. ``tests/unit/test_sampling.py`` checks the equality against ``DDPMScheduler``.
* ``ddim``: deterministic (eta = 0), fewer steps.
* ``dpm_solver``: DPM-Solver++ (2nd order multistep), fewer steps.

All noise comes from ``numpy.random.default_rng(seed)`` (one generator per batch) so the torch-free runtime
reproduces the same images from the same seed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from markup2image.config import DiffusionConfig
from markup2image.models.position import cross_attention_kv_cache
from markup2image.modes import SAMPLERS, SamplerName
from markup2image.runtime.schedulers import check_steps as check_sampler_steps
from markup2image.runtime.schedulers import eta_for

__all__ = [
    "SAMPLERS",
    "SamplerName",
    "check_steps",
    "eta_for",
    "from_uint8",
    "make_scheduler",
    "sample_images",
    "scheduler_config",
    "to_uint8",
]


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """The noise schedule shared by training, every sampler and the exported manifest."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": "epsilon",
    }


def make_scheduler(name: str, cfg: DiffusionConfig) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A fresh diffusers scheduler for sampler ``name``."""
    base = scheduler_config(cfg)
    if name in ("ddpm", "ddim"):
        return DDIMScheduler(**base, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0)
    if name == "dpm_solver":
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"sampler: unknown sampler {name!r}; choose from {list(SAMPLERS)}")


def check_steps(name: str, steps: int, cfg: DiffusionConfig) -> int:
    """``steps`` if sampler ``name`` can run that many steps of ``cfg``'s schedule (the runtime's rules)."""
    return check_sampler_steps(name, steps, cfg.num_train_timesteps)


def _cross_attention_cache(model: Any, enabled: bool) -> contextlib.AbstractContextManager:
    """The K/V cache over ``model.unet`` (a U-Net or its compiled wrapper) where there is one, else a no-op."""
    unet = getattr(model, "unet", None)
    if not enabled or not isinstance(unet, torch.nn.Module):
        return contextlib.nullcontext()
    return cross_attention_kv_cache(unet)


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    seed: int,
    diffusion: DiffusionConfig,
    progress: bool = False,
    kv_cache: bool = True,
    guidance_scale: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample one batch. ``input_ids, attention_mask [B, N]`` -> images in [-1, 1], ``[B, C, H, W]`` float32.

    ``guidance_scale`` w > 1: classifier-free guidance (Ho & Salimans 2022, eq. 6),
    ``eps = eps(x, empty) + w (eps(x, markup) - eps(x, empty))``, with ``uncond`` the empty markup's ids and mask
    ``[B, N]`` (:func:`~markup2image.text.tokenizer.empty_markup_like`); both halves run as one ``2B`` batch.

    ``model`` must provide ``encode(ids, mask)`` and ``denoise(x, t, hidden, mask)`` and an ``image`` geometry.
    The markup is encoded once per batch, not once per step, and with ``kv_cache`` (and a ``model.unet`` built
    by this package) every cross-attention projects it to K/V once per batch too: the projections are made before
    the first step (outside any compiled region or CUDA graph) and read by every step.
    """
    check_steps(sampler, steps, diffusion)
    device = input_ids.device
    img = model.image
    shape = (input_ids.shape[0], img.channels, img.height, img.width)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(device)
    sched = make_scheduler(sampler, diffusion)
    sched.set_timesteps(steps)
    hidden = model.encode(input_ids, attention_mask)  # (B, N, D), once per batch
    guided = guidance_scale != 1.0
    if guided:
        if uncond is None:
            raise ValueError("evaluate.guidance_scale: classifier-free guidance needs the empty markup's ids")
        hidden = torch.cat([hidden, model.encode(*uncond)])  # (2B, N, D): markup, then empty markup
        attention_mask = torch.cat([attention_mask, uncond[1]])
    eta = eta_for(sampler)
    with _cross_attention_cache(model, kv_cache) as cache:
        if cache is not None:
            cache.prefill(hidden)
        for t in tqdm(sched.timesteps, desc=f"{sampler} sampling", disable=not progress, leave=False):
            tt = torch.full((hidden.shape[0],), int(t), device=device, dtype=torch.long)
            if guided:
                eps_markup, eps_empty = model.denoise(torch.cat([x, x]), tt, hidden, attention_mask).chunk(2)
                eps = eps_empty + guidance_scale * (eps_markup - eps_empty)
            else:
                eps = model.denoise(x, tt, hidden, attention_mask)
            if isinstance(sched, DDIMScheduler):
                noise = None
                if eta > 0:
                    noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(device)
                step = sched.step(eps, int(t), x, eta=eta, use_clipped_model_output=True, variance_noise=noise)
                x = step.prev_sample
            else:
                x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> uint8 ``[B, H, W]`` (C=1) or ``[B, H, W, 3]``."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W]`` or ``[B, H, W, 3]`` -> float ``[B, C, H, W]`` in [-1, 1]."""
    arr = images[..., None] if images.ndim == 3 else images
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
