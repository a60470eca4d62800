"""diffusion.prediction_type: the model turns v / y0 predictions into eps; the loss weights train each in its space."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import TINY_IMAGE, TINY_MODEL

from markup2image.config import DiffusionConfig, Params, params_from_dict
from markup2image.diffusion.losses import prediction_loss_weights
from markup2image.diffusion.objectives import TrainBatch, ddpm_loss, noise_scheduler
from markup2image.models.model import MarkupToImageModel, load_model
from markup2image.models.parameterization import EpsilonFromPrediction, alphas_cumprod

SCHED = noise_scheduler(DiffusionConfig())


def test_alphas_cumprod_is_the_diffusers_schedule():
    assert torch.allclose(alphas_cumprod(DiffusionConfig()), SCHED.alphas_cumprod, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_conversion_recovers_the_true_noise_from_the_true_target(kind):
    g = torch.Generator().manual_seed(0)
    y0, eps = torch.rand(4, 1, 8, 16, generator=g) * 2 - 1, torch.randn(4, 1, 8, 16, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    y_t = SCHED.add_noise(y0, eps, t)
    ab = SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = ab.sqrt() * eps - (1 - ab).sqrt() * y0 if kind == "v_prediction" else y0  # what diffusers trains on
    if kind == "v_prediction":
        assert torch.allclose(target, SCHED.get_velocity(y0, eps, t), atol=1e-6)
    got = EpsilonFromPrediction(DiffusionConfig(prediction_type=kind))(target, y_t, t)
    assert torch.allclose(got, eps, atol=2e-3 if kind == "sample" else 1e-5)  # y0 -> eps divides by sqrt(1-ab)


def test_weights_turn_the_noise_error_into_the_error_of_the_prediction():
    t = torch.tensor([5, 300, 990])
    ab = SCHED.alphas_cumprod[t]
    snr = ab / (1 - ab)
    assert torch.equal(prediction_loss_weights(ab, "epsilon"), torch.ones(3))
    assert torch.allclose(prediction_loss_weights(ab, "sample"), 1 / snr)
    assert torch.allclose(prediction_loss_weights(ab, "v_prediction"), (1 + snr) / snr)
    assert torch.allclose(prediction_loss_weights(ab, "sample", snr_gamma=5.0), snr.clamp(max=5) / snr)
    # numerically: ||v - v_hat||^2 equals the weighted ||eps - eps_hat||^2 for the converted prediction
    g = torch.Generator().manual_seed(1)
    y0, eps, v_hat = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    y_t = SCHED.add_noise(y0, eps, t)
    eps_hat = EpsilonFromPrediction(DiffusionConfig(prediction_type="v_prediction"))(v_hat, y_t, t)
    v_err = ((v_hat - SCHED.get_velocity(y0, eps, t)) ** 2).flatten(1).mean(1)
    eps_err = ((eps_hat - eps) ** 2).flatten(1).mean(1) * prediction_loss_weights(ab, "v_prediction")
    assert torch.allclose(v_err, eps_err, rtol=1e-4)


def test_v_model_trains_saves_and_reloads_with_its_parameterisation(tmp_path):
    diffusion = DiffusionConfig(prediction_type="v_prediction")
    torch.manual_seed(0)
    model = MarkupToImageModel(model_cfg=TINY_MODEL, image=TINY_IMAGE, vocab_size=30, diffusion=diffusion)
    plain = MarkupToImageModel(model_cfg=TINY_MODEL, image=TINY_IMAGE, vocab_size=30)
    assert set(model.state_dict()) == set(plain.state_dict())  # no stored parameters or buffers added
    params = dataclasses.replace(Params(), diffusion=diffusion)
    g = torch.Generator().manual_seed(2)
    batch = TrainBatch(
        images=torch.rand(2, 1, 8, 16, generator=g) * 2 - 1,
        input_ids=torch.randint(1, 30, (2, 5), generator=g),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        markup_keys=torch.arange(2),
        noise=torch.randn(2, 1, 8, 16, generator=g),
        timesteps=torch.tensor([3, 900]),
    )
    loss, terms = ddpm_loss(model, batch, SCHED, params, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.diffusion.prediction_type == "v_prediction" and again.to_epsilon is not None
    x, tt = torch.randn(2, 1, 8, 16), torch.tensor([1, 700])
    hidden = model.encode(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        a = model.eval().denoise(x, tt, hidden, batch.attention_mask)
        b = again.denoise(x, tt, again.encode(batch.input_ids, batch.attention_mask), batch.attention_mask)
    assert torch.allclose(a, b, atol=1e-6)


def test_params_refuse_an_unknown_prediction_type_and_a_negative_gamma():
    from markup2image.config import ConfigError

    with pytest.raises(ConfigError, match="diffusion.prediction_type"):
        params_from_dict({"diffusion": {"prediction_type": "x0"}})
    with pytest.raises(ConfigError, match="diffusion.snr_gamma"):
        params_from_dict({"diffusion": {"snr_gamma": -1}})
