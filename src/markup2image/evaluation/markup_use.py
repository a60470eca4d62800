"""Markup use: how much the denoiser's loss rises when it is given another item's markup.

For the test items ``y0`` with their markup, at a fixed ``t``: ``y_t = sqrt(ab_t) y0 + sqrt(1 - ab_t) eps`` with
seeded noise, and the noise-prediction MSE once with each item's own markup and once with the markup of the next
item (a roll of the batch by one). ``markup_use = loss_shuffled / loss_own``: 1 means the markup is ignored, and a
model that draws what the markup says has a ratio well above 1. The overfit test of FSA-CDM's contrast-augmented
objective asserts on this same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from markup2image.diffusion.sampling import from_uint8
from markup2image.models.parameterization import alphas_cumprod
from markup2image.text.tokenizer import encode_batch

DEFAULT_T = 300  # ab ~ 0.4 on the linear schedule: the image is half hidden, so the markup decides much of it


@torch.no_grad()
def markup_use_losses(
    model: torch.nn.Module,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    t: int = DEFAULT_T,
    seed: int = 123,
    batch_size: int = 32,
) -> tuple[float, float]:
    """(own, shuffled) mean noise MSE at ``t``. ``images [B, C, H, W]`` in [-1, 1], ``input_ids``/mask ``[B, N]``;
    ``model`` has ``encode`` / ``denoise`` and its ``diffusion`` config. Needs ``B >= 2``."""
    if images.shape[0] < 2:
        raise ValueError("markup use needs at least two items (one's markup is given to another)")
    device = input_ids.device
    ab = alphas_cumprod(model.diffusion)[t]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    y_t = (ab.sqrt() * images + (1 - ab).sqrt() * noise).to(device)
    noise = noise.to(device)
    n = images.shape[0]
    hidden = model.encode(input_ids, attention_mask)  # (B, N, D)
    rolled = torch.roll(torch.arange(n, device=device), -1)  # item i gets the markup of item i + 1
    totals = {"own": 0.0, "shuffled": 0.0}
    for lo in range(0, n, batch_size):
        rows = torch.arange(lo, min(lo + batch_size, n), device=device)
        tt = torch.full((len(rows),), t, dtype=torch.long, device=device)
        for key, text in (("own", rows), ("shuffled", rolled[rows])):
            eps = model.denoise(y_t[rows], tt, hidden[text], attention_mask[text])
            totals[key] += ((eps.float() - noise[rows]) ** 2).flatten(1).mean(1).sum().item()
    return totals["own"] / n, totals["shuffled"] / n


def markup_use_metrics(own: float, shuffled: float) -> dict[str, float]:
    """Flat keys for ``metrics.json``."""
    return {"markup_use": shuffled / max(own, 1e-12), "markup_use_loss_own": own, "markup_use_loss_shuffled": shuffled}


def markup_use_from_arrays(
    model: torch.nn.Module,
    golds: Sequence[np.ndarray],
    tokenizer: Tokenizer,
    markups: Sequence[str],
    t: int = DEFAULT_T,
) -> dict[str, float]:
    """:func:`markup_use_metrics` for uint8 gold images and their markup strings (the evaluate stage)."""
    device = next(model.parameters()).device
    ids, mask = encode_batch(tokenizer, list(markups), model.model_cfg.max_text_length)
    images = from_uint8(np.stack(golds))
    ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    return markup_use_metrics(*markup_use_losses(model, images, ids_t, mask_t, t=t))
