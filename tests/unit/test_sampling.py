"""Samplers: the ddpm path equals diffusers' DDPMScheduler; seeds reproduce; uint8 round trips."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from markup2image.config import DiffusionConfig
from markup2image.diffusion.sampling import (
    check_steps,
    from_uint8,
    make_scheduler,
    sample_images,
    scheduler_config,
    to_uint8,
)


def test_ddpm_path_equals_ddpm_scheduler_posterior_step():
    """DDIM(eta=1, all steps, clipped x0, use_clipped_model_output) is the DDPM fixed_small ancestral step."""
    cfg = DiffusionConfig()
    ddpm = DDPMScheduler(**scheduler_config(cfg), variance_type="fixed_small", clip_sample=True)
    ddpm.set_timesteps(1000)
    ours = make_scheduler("ddpm", cfg)
    ours.set_timesteps(1000)
    assert torch.equal(ours.timesteps, ddpm.timesteps)
    g = torch.Generator().manual_seed(0)
    for t in (999, 700, 321, 50, 1, 0):
        x = torch.randn(2, 1, 4, 6, generator=g)
        eps = torch.randn(2, 1, 4, 6, generator=g) * 1.5  # large enough that x0 gets clipped
        # DDPMScheduler draws its variance noise from the generator: replay the same draw
        gen = torch.Generator().manual_seed(123)
        want = ddpm.step(eps, t, x, generator=gen).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))
        got = ours.step(eps, t, x, eta=1.0, use_clipped_model_output=True, variance_noise=z).prev_sample
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


class _ZeroModel(torch.nn.Module):
    """eps = 0.1 * x: a stand-in denoiser with the model interface sample_images needs."""

    class image:  # noqa: N801 - mimics MarkupToImageModel.image
        channels, height, width = 1, 4, 8

    def encode(self, ids, mask):
        return torch.zeros(ids.shape[0], ids.shape[1], 4)

    def denoise(self, x, t, hidden, mask):
        return 0.1 * x


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("dpm_solver", 5), ("ddpm", 1000)])
def test_same_seed_same_images_other_seed_differs(sampler, steps):
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.long)
    kw = dict(sampler=sampler, steps=steps, diffusion=DiffusionConfig())
    a = sample_images(_ZeroModel(), ids, mask, seed=7, **kw)
    b = sample_images(_ZeroModel(), ids, mask, seed=7, **kw)
    c = sample_images(_ZeroModel(), ids, mask, seed=8, **kw)
    assert a.shape == (2, 1, 4, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_ddpm_refuses_fewer_steps():
    with pytest.raises(ValueError, match="ddpm sampler runs all 1000"):
        check_steps("ddpm", 50, DiffusionConfig())
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler", DiffusionConfig())


def test_uint8_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(arr)), arr)
    rgb = np.random.default_rng(1).integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(rgb)), rgb)
