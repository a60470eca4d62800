"""Markup use: 1 for a denoiser that ignores the markup, above 1 for one that reads it."""

from __future__ import annotations

import pytest
import torch

from markup2image.config import DiffusionConfig
from markup2image.evaluation.markup_use import markup_use_losses, markup_use_metrics


class _Toy(torch.nn.Module):
    """eps_hat = (y_t - sqrt(ab) * image the markup names) / sqrt(1 - ab): perfect with the right markup."""

    def __init__(self, images: torch.Tensor, reads_markup: bool) -> None:
        super().__init__()
        self.diffusion = DiffusionConfig()
        self.images, self.reads = images, reads_markup
        from markup2image.models.parameterization import alphas_cumprod

        self.ab = alphas_cumprod(self.diffusion)

    def encode(self, ids, mask):
        return ids[:, :1].float()[..., None]  # (B, 1, 1): the item's index

    def denoise(self, x, t, hidden, mask):
        ab = self.ab[t].view(-1, 1, 1, 1)
        y0 = self.images[hidden[:, 0, 0].long()] if self.reads else torch.zeros_like(x)
        return (x - ab.sqrt() * y0) / (1 - ab).sqrt()


@pytest.mark.parametrize("reads", [True, False])
def test_ratio_separates_a_markup_reader_from_a_markup_ignorer(reads):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 4, 6, generator=g) * 2 - 1
    ids = torch.arange(5)[:, None].repeat(1, 3)
    own, shuffled = markup_use_losses(
        _Toy(images, reads), images, ids, torch.ones(5, 3, dtype=torch.long), batch_size=2
    )
    ratio = markup_use_metrics(own, shuffled)["markup_use"]
    if reads:
        assert own < 1e-8 and shuffled > 0.1 and ratio > 1e3
    else:
        assert ratio == pytest.approx(1.0)


def test_needs_two_items():
    with pytest.raises(ValueError, match="at least two"):
        markup_use_losses(_Toy(torch.zeros(1, 1, 2, 2), True), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1).long(),
                          torch.ones(1, 1).long())  # fmt: skip
