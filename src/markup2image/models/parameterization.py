"""The U-Net's output parameterisation (``diffusion.prediction_type``), turned into the noise prediction.

The U-Net may predict the noise ``eps`` (DDPM), the velocity ``v = sqrt(ab) eps - sqrt(1 - ab) y0`` (Salimans & Ho
2022, eq. 9 of "Progressive distillation") or the clean image ``y0`` itself (``sample``). Everything downstream of
the model (samplers, scheduled-sampling rollout, HCMA guidance, the ONNX graph and the torch-free runtime) reads a
noise prediction, so the conversion lives here, once, inside the model and its exported graph:

* ``v_prediction``: ``eps = sqrt(ab) v + sqrt(1 - ab) y_t``;
* ``sample``: ``eps = (y_t - sqrt(ab) y0_hat) / sqrt(1 - ab)``.

Which loss weighting the objectives put on ``||eps - eps_hat||^2`` to train each parameterisation in its own space
is :func:`markup2image.diffusion.losses.prediction_loss_weights`.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from markup2image.config import DiffusionConfig
from markup2image.diffusion.sampling import scheduler_config

__all__ = ["EpsilonFromPrediction", "alphas_cumprod"]


def alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """``alpha_bar_t [T]`` (float32) of ``cfg.beta_schedule``, as diffusers' schedulers compute it (their own copy)."""
    return DDPMScheduler(**scheduler_config(cfg)).alphas_cumprod.clone()


class EpsilonFromPrediction(nn.Module):
    """``(prediction, y_t [B, C, H, W], t [B]) -> eps [B, C, H, W]`` for a ``v_prediction`` or ``sample`` U-Net.

    ``alpha_bar`` is a non-persistent buffer (rebuilt from the diffusion config, not stored in the weights); the
    indexing by ``t`` exports to ONNX as a Gather."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        if cfg.prediction_type == "epsilon":
            raise ValueError("diffusion.prediction_type: epsilon needs no conversion")
        self.prediction_type = cfg.prediction_type
        self.register_buffer("alpha_bar", alphas_cumprod(cfg), persistent=False)

    def forward(self, prediction: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[timestep.long()].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        pred, y_t = prediction.float(), sample.float()
        if self.prediction_type == "v_prediction":
            eps = ab.sqrt() * pred + (1.0 - ab).sqrt() * y_t
        else:  # sample: the U-Net predicts y0
            eps = (y_t - ab.sqrt() * pred) / (1.0 - ab).sqrt()
        return eps.to(prediction.dtype)
