"""The runtime's numpy steppers against the diffusers schedulers that ``diffusion.sampling`` uses, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from markup2image.config import DiffusionConfig
from markup2image.diffusion.sampling import make_scheduler, scheduler_config
from markup2image.diffusion.sampling import to_uint8 as torch_to_uint8
from markup2image.models.parameterization import alphas_cumprod as model_alphas
from markup2image.runtime.sampler import to_uint8 as numpy_to_uint8
from markup2image.runtime.schedulers import alphas_cumprod, check_steps, cosine_betas, linear_betas, make_stepper

CFG = DiffusionConfig()
SHAPE = (2, 1, 8, 12)
ATOL = 2e-6  # float32 rounding of a few ops; any formula slip is orders of magnitude larger


def _fake_eps(x: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """A stand-in model output that depends on the sample and the step, so errors would propagate."""
    return (0.6 * x + 0.5 * rng.standard_normal(x.shape) + 0.1 * np.sin(t)).astype(np.float32)


def test_noise_schedule_is_diffusers_bit_for_bit() -> None:
    sched = make_scheduler("ddim", CFG)
    np.testing.assert_array_equal(alphas_cumprod(scheduler_config(CFG)), sched.alphas_cumprod.numpy())
    np.testing.assert_array_equal(linear_betas(1e-4, 0.02, 1000), sched.betas.numpy())
    other = DiffusionConfig(num_train_timesteps=37, beta_start=3e-4, beta_end=0.03)
    np.testing.assert_array_equal(linear_betas(3e-4, 0.03, 37), make_scheduler("ddim", other).betas.numpy())


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "scaled_linear"])
def test_other_schedules_are_diffusers_bit_for_bit(schedule: str) -> None:
    cfg = DiffusionConfig(beta_schedule=schedule)  # type: ignore[arg-type]
    want = make_scheduler("ddim", cfg).alphas_cumprod.numpy()
    np.testing.assert_array_equal(alphas_cumprod(scheduler_config(cfg)), want)
    assert not np.array_equal(want, make_scheduler("ddim", CFG).alphas_cumprod.numpy())  # not linear in disguise
    np.testing.assert_array_equal(
        cosine_betas(1000), make_scheduler("ddim", DiffusionConfig(beta_schedule="squaredcos_cap_v2")).betas.numpy()
    )


def test_model_conversion_follows_the_schedule() -> None:
    """The U-Net's v -> eps conversion reads the same alpha_bar as training and the samplers, for every schedule."""
    for schedule in ("linear", "squaredcos_cap_v2"):
        cfg = DiffusionConfig(beta_schedule=schedule, prediction_type="v_prediction")  # type: ignore[arg-type]
        torch.testing.assert_close(model_alphas(cfg), make_scheduler("ddim", cfg).alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 10), ("ddim", 1), ("ddim", 7), ("ddpm", 1000)])
def test_ddim_and_ddpm_match_diffusers_step_by_step(sampler: str, steps: int) -> None:
    eta = 1.0 if sampler == "ddpm" else 0.0
    ref = make_scheduler(sampler, CFG)
    ref.set_timesteps(steps)
    ours = make_stepper(sampler, scheduler_config(CFG), steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.needs_noise == (eta > 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * 1.5  # large enough that x0 clipping kicks in
    xt = torch.from_numpy(x.copy())
    worst = 0.0
    for t in ours.timesteps:
        eps = _fake_eps(x, int(t), rng)
        noise = rng.standard_normal(SHAPE, dtype=np.float32) if eta > 0 else None
        want = ref.step(
            torch.from_numpy(eps),
            int(t),
            xt,
            eta=eta,
            use_clipped_model_output=True,
            variance_noise=None if noise is None else torch.from_numpy(noise),
        ).prev_sample
        got = ours.step(eps, int(t), xt.numpy(), noise)  # same input as diffusers: compare one step's maths
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
        assert got.dtype == np.float32
        x, xt = got, want
    assert worst <= ATOL, f"{sampler}/{steps}: max step difference {worst}"


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 25])
def test_dpm_solver_matches_diffusers_step_by_step(steps: int) -> None:
    ref = make_scheduler("dpm_solver", CFG)
    ref.set_timesteps(steps)
    ours = make_stepper("dpm_solver", scheduler_config(CFG), steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # torch's float32 sqrt is not always correctly rounded (numpy's is): sigmas agree to 1 ulp
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-7, atol=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    xt = torch.from_numpy(x.copy())
    for i, t in enumerate(ours.timesteps):
        eps = _fake_eps(xt.numpy(), int(t), rng)
        want = ref.step(torch.from_numpy(eps), ref.timesteps[i], xt).prev_sample
        got = ours.step(eps, int(t), xt.numpy())  # the multistep history must match too, so feed diffusers' x
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=ATOL, err_msg=f"step {i} of {steps}")
        xt = want
    # the last step is first order onto sigma = 0: the sample equals the data prediction there
    assert ours.sigmas[-1] == 0.0


def test_dpm_solver_whole_chain_matches() -> None:
    """Run both chains independently (each on its own outputs) to catch drift through the multistep history."""
    steps = 12
    ref = make_scheduler("dpm_solver", CFG)
    ref.set_timesteps(steps)
    ours = make_stepper("dpm_solver", scheduler_config(CFG), steps)
    x = np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    a, b = x.copy(), torch.from_numpy(x.copy())
    for i, t in enumerate(ours.timesteps):
        eps_a = (0.7 * a + 0.05 * np.cos(t)).astype(np.float32)
        eps_b = (0.7 * b + 0.05 * float(np.cos(t))).float()
        a = ours.step(eps_a, int(t), a)
        b = ref.step(eps_b, ref.timesteps[i], b).prev_sample
    assert np.abs(a - b.numpy()).max() <= 1e-5


def test_steppers_reject_bad_use() -> None:
    with pytest.raises(ValueError, match="ddpm sampler runs all 1000"):
        make_stepper("ddpm", scheduler_config(CFG), 50)
    with pytest.raises(ValueError, match="unknown sampler"):
        check_steps("euler", 10, 1000)
    with pytest.raises(ValueError, match="outside"):
        make_stepper("ddim", scheduler_config(CFG), 0)
    stepper = make_stepper("ddpm", scheduler_config(CFG), 1000)
    with pytest.raises(ValueError, match="variance noise"):
        stepper.step(np.zeros(SHAPE, np.float32), 999, np.zeros(SHAPE, np.float32), None)
    dpm = make_stepper("dpm_solver", scheduler_config(CFG), 5)
    with pytest.raises(ValueError, match="expected timestep"):
        dpm.step(np.zeros(SHAPE, np.float32), 3, np.zeros(SHAPE, np.float32))


def test_to_uint8_matches_torch_including_ties() -> None:
    vals = np.array([-1.0, -0.9960784, 1.0, 0.0, 0.5, 1 / 255, 3 / 255, 2.0, -3.0], dtype=np.float32)
    images = np.tile(vals, (1, 1, 2, 1)).astype(np.float32)  # [1, 1, 2, 9]
    np.testing.assert_array_equal(numpy_to_uint8(images), torch_to_uint8(torch.from_numpy(images)))
    rgb = np.random.default_rng(0).uniform(-1.2, 1.2, (2, 3, 4, 5)).astype(np.float32)
    got = numpy_to_uint8(rgb)
    assert got.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(got, torch_to_uint8(torch.from_numpy(rgb)))


def test_ddim_scheduler_config_matches_sampling() -> None:
    """The runtime assumes sampling.py's DDIM settings; fail loudly if they change there."""
    sched = make_scheduler("ddim", CFG)
    assert isinstance(sched, DDIMScheduler)
    c = sched.config
    assert (c.clip_sample, c.clip_sample_range, c.set_alpha_to_one, c.steps_offset) == (True, 1.0, True, 0)
    assert c.timestep_spacing == "leading" and not c.thresholding
    d = make_scheduler("dpm_solver", CFG).config
    assert (d.algorithm_type, d.solver_order, d.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert (d.timestep_spacing, d.final_sigmas_type, d.lower_order_final) == ("linspace", "zero", True)
    assert not (d.use_karras_sigmas or d.thresholding or d.euler_at_final)


class _TorchStandIn(torch.nn.Module):
    """eps = 0.3 x + mean of the masked markup features: the interface ``sample_images`` needs."""

    class image:  # noqa: N801 - mimics MarkupToImageModel.image
        channels, height, width = 1, 6, 10

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (ids[..., None].float() * 0.01).expand(-1, -1, 4) * mask[..., None]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + hidden.mean(dim=(1, 2))[:, None, None, None] + 1e-4 * t[:, None, None, None]


class _NumpyStandIn:
    """The same stand-in in numpy, as a runtime backend."""

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to((ids[..., None] * np.float32(0.01)).astype(np.float32), (*ids.shape, 4)) * mask[
            ..., None
        ].astype(np.float32)

    def denoise(self, x: np.ndarray, t: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        bias = hidden.mean(axis=(1, 2), dtype=np.float32)[:, None, None, None]
        return (np.float32(0.3) * x + bias + np.float32(1e-4) * t[:, None, None, None]).astype(np.float32)


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 6), ("dpm_solver", 8), ("ddpm", 1000)])
def test_runtime_loop_reproduces_sample_images_for_the_same_seed(sampler: str, steps: int) -> None:
    """Same seed -> same image: noise order (x_T first, then one draw per ddpm step) and the steppers together."""
    from markup2image.diffusion.sampling import sample_images
    from markup2image.runtime.sampler import sample_numpy

    ids = np.array([[2, 5, 9, 3], [2, 7, 3, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    want = sample_images(
        _TorchStandIn(),
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        sampler=sampler,
        steps=steps,
        seed=11,
        diffusion=CFG,
    )
    got = sample_numpy(
        _NumpyStandIn(),
        ids,
        mask,
        image_shape=(1, 6, 10),
        scheduler_config=scheduler_config(CFG),
        sampler=sampler,
        steps=steps,
        seed=11,
    )
    assert np.abs(got - want.numpy()).max() <= 1e-5
    assert np.abs(numpy_to_uint8(got).astype(int) - torch_to_uint8(want).astype(int)).max() <= 1
    other = sample_numpy(
        _NumpyStandIn(),
        ids,
        mask,
        image_shape=(1, 6, 10),
        scheduler_config=scheduler_config(CFG),
        sampler=sampler,
        steps=steps,
        seed=12,
    )
    assert np.abs(other - got).max() > 0.1  # the seed matters
