"""Numpy samplers that reproduce diffusers' schedulers exactly as ``markup2image.diffusion.sampling`` uses them.

Torch-free: numpy only. Each stepper mirrors the float32 arithmetic of its diffusers counterpart, operation by
operation, so the same model outputs and the same noise give the same samples (to float32 rounding):

* ``ddpm`` / ``ddim``: ``DDIMScheduler(clip_sample=True, clip_sample_range=1, set_alpha_to_one=True,
  steps_offset=0, timestep_spacing="leading")`` stepped with ``use_clipped_model_output=True`` and ``eta`` 1 (ddpm,
  every one of the 1000 steps, noise passed in) or 0 (ddim).
* ``dpm_solver``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` with its defaults:
  ``timestep_spacing="linspace"``, ``final_sigmas_type="zero"``, ``lower_order_final=True`` (first-order first and
  last steps, second-order midpoint updates in between).

The noise order is the one of ``sample_images``: ``x_T`` is the first ``rng.standard_normal`` draw, then ddpm draws
one more per step, in step order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from markup2image.modes import SAMPLERS

F32 = np.float32


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """``torch.linspace(beta_start, beta_end, T, dtype=float32)`` bit for bit: ``[T]`` float32.

    torch computes ``start + step * i`` for the first half and ``end - step * (T - 1 - i)`` for the second, with a
    float32 ``step`` and a fused multiply-add (one rounding), which float64 arithmetic reproduces here.
    """
    n = num_train_timesteps
    start, end = F32(beta_start), F32(beta_end)
    if n == 1:
        return np.array([start], dtype=F32)
    step = np.float64((end - start) / F32(n - 1))
    i = np.arange(n, dtype=np.float64)
    first = np.float64(start) + step * i
    second = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, first, second).astype(F32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """``[T]`` float32 betas of diffusers' ``squaredcos_cap_v2`` (``betas_for_alpha_bar``, Nichol & Dhariwal 2021):
    ``beta_i = min(1 - f((i + 1) / T) / f(i / T), 0.999)`` with ``f(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2``,
    in Python floats, then rounded to float32 once, as diffusers does."""

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=F32)


def alphas_cumprod(scheduler_config: dict[str, Any]) -> np.ndarray:
    """``ᾱ_t`` for ``t = 0..T-1`` as diffusers holds it: ``[T]`` float32 (cumprod accumulated in float64)."""
    schedule = scheduler_config.get("beta_schedule", "linear")
    n = int(scheduler_config["num_train_timesteps"])
    start, end = float(scheduler_config["beta_start"]), float(scheduler_config["beta_end"])
    if schedule == "linear":
        betas = linear_betas(start, end, n)
    elif schedule == "scaled_linear":
        betas = (linear_betas(start**0.5, end**0.5, n) ** 2).astype(F32)
    elif schedule == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise ValueError(
            f"beta_schedule: {schedule!r} is not supported by the runtime; "
            "use linear, scaled_linear or squaredcos_cap_v2"
        )
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError("prediction_type: the runtime samplers implement epsilon prediction only")
    alphas = (F32(1.0) - betas).astype(np.float64)
    return np.cumprod(alphas).astype(F32)


def check_steps(sampler: str, steps: int, num_train_timesteps: int) -> int:
    """``steps`` if ``sampler`` can run that many steps of a ``num_train_timesteps`` schedule, else ``ValueError``.

    The one copy of these rules: the torch sampler (``diffusion.sampling.check_steps``) calls it too.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
    if sampler == "ddpm" and steps != num_train_timesteps:
        raise ValueError(
            f"steps: the ddpm sampler runs all {num_train_timesteps} steps (got {steps}); "
            "use --sampler ddim or dpm_solver for fewer"
        )
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps: {steps} is outside 1..{num_train_timesteps}")
    return steps


def eta_for(sampler: str) -> float:
    """DDIM's ``eta`` for ``sampler``: 1 for ddpm (ancestral, ``fixed_small`` variance), 0 for ddim."""
    return 1.0 if sampler == "ddpm" else 0.0


class DDIMStepper:
    """``DDIMScheduler.step(eps, t, x, eta, use_clipped_model_output=True, variance_noise=noise)`` in numpy.

    Args:
        scheduler_config: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``.
        steps: inference steps (``leading`` spacing, ``steps_offset`` 0).
        eta: 0 = DDIM, 1 = DDPM ancestral with ``fixed_small`` variance (over all steps).
    """

    def __init__(self, scheduler_config: dict[str, Any], steps: int, eta: float) -> None:
        self.num_train_timesteps = int(scheduler_config["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(scheduler_config)
        self.final_alpha_cumprod = F32(1.0)  # set_alpha_to_one
        self.eta = float(eta)
        self.step_ratio = self.num_train_timesteps // steps
        self.timesteps = (np.arange(0, steps) * self.step_ratio).round()[::-1].astype(np.int64)
        self.needs_noise = self.eta > 0

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """``eps, x [B, C, H, W]`` float32 at timestep ``t`` -> ``x_{t-Δ} [B, C, H, W]`` float32."""
        prev_t = int(t) - self.step_ratio
        a_t = self.alphas_cumprod[int(t)]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = F32(1) - a_t
        b_prev = F32(1) - a_prev
        sqrt_a_t, sqrt_b_t = np.sqrt(a_t), np.sqrt(b_t)
        x0 = (x - sqrt_b_t * eps) / sqrt_a_t  # DDIM (Song et al. 2021) eq. 9: the predicted x0
        x0 = np.clip(x0, F32(-1.0), F32(1.0))  # clip_sample
        variance = (b_prev / b_t) * (F32(1) - a_t / a_prev)
        std = F32(self.eta) * np.sqrt(variance)  # DDIM eq. 16: sigma_t(eta)
        eps = (x - sqrt_a_t * x0) / sqrt_b_t  # use_clipped_model_output
        direction = np.sqrt(F32(1) - a_prev - std**2) * eps
        prev = np.sqrt(a_prev) * x0 + direction  # DDIM eq. 12 (+ sigma_t noise below)
        if self.eta > 0:
            if noise is None:
                raise ValueError("DDIMStepper.step: eta > 0 needs the variance noise")
            prev = prev + std * noise
        return prev.astype(F32, copy=False)


class DPMSolverPlusPlus2M:
    """``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` in numpy.

    Call :meth:`step` once per timestep of :attr:`timesteps`, in order; it keeps the previous data prediction.
    """

    needs_noise = False

    def __init__(self, scheduler_config: dict[str, Any], steps: int) -> None:
        n = int(scheduler_config["num_train_timesteps"])
        ac = alphas_cumprod(scheduler_config)
        self.timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        all_sigmas = np.sqrt((F32(1) - ac) / ac)  # float32, as torch computes it
        sigmas = np.interp(self.timesteps, np.arange(0, len(all_sigmas)), all_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)  # final_sigmas_type="zero"
        self.num_steps = len(self.timesteps)
        self.step_index = 0
        self.prev_x0: np.ndarray | None = None
        self.lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
        return alpha, sigma * alpha

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):  # sigma = 0 at the final step: lambda = +inf, exp(-h) = 0
            return np.log(alpha) - np.log(sigma)

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """``eps, x [B, C, H, W]`` float32 at the current timestep -> the sample at the next one."""
        i = self.step_index
        if int(t) != int(self.timesteps[i]):
            raise ValueError(f"DPMSolverPlusPlus2M.step: expected timestep {self.timesteps[i]}, got {t}")
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        x0 = (x - sigma_s0 * eps) / alpha_s0  # data prediction (convert_model_output)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s0, sigma_s0)
        phi = alpha_t * (np.exp(-h) - F32(1.0))
        last = i == self.num_steps - 1  # final_sigmas_type="zero" -> first order at the end
        if self.lower_order_nums < 1 or last:
            prev = (sigma_t / sigma_s0) * x - phi * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            h_0 = self._lambda(alpha_s0, sigma_s0) - self._lambda(alpha_s1, sigma_s1)
            r0 = h_0 / h
            d1 = (F32(1.0) / r0) * (x0 - self.prev_x0)
            prev = (sigma_t / sigma_s0) * x - phi * x0 - F32(0.5) * phi * d1
        self.prev_x0 = x0
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.step_index += 1
        return prev.astype(F32, copy=False)


def make_stepper(sampler: str, scheduler_config: dict[str, Any], steps: int) -> DDIMStepper | DPMSolverPlusPlus2M:
    """A fresh numpy stepper for ``sampler`` (``ddpm``, ``ddim`` or ``dpm_solver``) over ``steps`` steps."""
    check_steps(sampler, steps, int(scheduler_config["num_train_timesteps"]))
    if sampler in ("ddpm", "ddim"):
        return DDIMStepper(scheduler_config, steps, eta=eta_for(sampler))
    return DPMSolverPlusPlus2M(scheduler_config, steps)
