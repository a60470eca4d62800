"""FSA: fine-grained sequence alignment between markup tokens and the rendered image (FSA-CDM, design §4).

* :class:`ImageSequenceEncoder`: a lightweight ResNet (one stride-2 residual stage per ``model.fsa_channels``
  entry, GroupNorm so there are no running buffers) -> a convolution that spans the remaining height and maps the
  feature map to a sequence along the width (``M = ceil(W / 2^S)`` tokens) -> BiLSTM; the refined tokens are
  ``vs = Linear([vs ; BiLSTM states])``.
* :class:`FineGrainedSequenceAlignment`: the cross-attention module ``c = CAM(q=t, k=vs, v=vs)`` and the loss
  :func:`~markup2image.diffusion.losses.fine_grained_alignment_loss` over the valid markup tokens.

Training only: it shapes the markup features ``t`` that the U-Net attends to; sampling never runs it.

Interpretation (the paper gives no code): in ``L_fa`` the markup tokens ``t`` are the TARGET side of the cosines
under a stop-gradient, and ``L_fa`` reaches the markup encoder only through the CAM query ``q = t``. With the
gradient also flowing into ``t`` the tokens collapse to what ``c`` can reproduce from any image and the U-Net
ignores the markup: docs/decisions.md §7 (the measurement and the test that shows it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from markup2image.config import DomainConfig, ModelConfig
from markup2image.diffusion.losses import fine_grained_alignment_loss


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResidualStage(nn.Module):
    """A stride-2 basic residual block ``[B, C_in, H, W] -> [B, C_out, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.GroupNorm(_groups(c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


class ImageSequenceEncoder(nn.Module):
    """``y0 [B, C, H, W] -> vs [B, M, D]``: ResNet -> conv + map-to-sequence (width) -> BiLSTM -> projection."""

    def __init__(self, *, image: DomainConfig, channels: tuple[int, ...], dim: int, hidden: int) -> None:
        super().__init__()
        if not channels:
            raise ValueError("model.fsa_channels: give at least one stage width")
        self.stem = nn.Sequential(
            nn.Conv2d(image.channels, channels[0], 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels[0]), channels[0]),
            nn.SiLU(),
        )
        widths = (channels[0], *channels)
        self.stages = nn.Sequential(*(ResidualStage(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        height = image.height
        for _ in channels:
            height = (height + 1) // 2
        self.to_sequence = nn.Conv2d(channels[-1], dim, kernel_size=(height, 1))  # collapses the height
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.refine = nn.Linear(dim + 2 * hidden, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.stages(self.stem(images))  # (B, C_S, H', M)
        seq = self.to_sequence(f).squeeze(2).transpose(1, 2)  # (B, M, D)
        states, _ = self.lstm(seq)  # (B, M, 2 * hidden)
        return self.refine(torch.cat([seq, states], dim=-1))  # (B, M, D)


class FineGrainedSequenceAlignment(nn.Module):
    """Image encoder + CAM; ``forward(images, t, mask)`` returns the scalar ``L_fa``.

    Args:
        cfg: the model section (``encoder_dim``, ``encoder_heads``, ``fsa_channels``, ``fsa_hidden``).
        image: the domain's image geometry.
    """

    def __init__(self, cfg: ModelConfig, image: DomainConfig) -> None:
        super().__init__()
        self.image_encoder = ImageSequenceEncoder(
            image=image, channels=tuple(cfg.fsa_channels), dim=cfg.encoder_dim, hidden=cfg.fsa_hidden
        )
        self.cam = nn.MultiheadAttention(cfg.encoder_dim, cfg.encoder_heads, batch_first=True)

    def align(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``c = CAM(q=t, k=vs, v=vs)``: images ``[B, C, H, W]``, ``t [B, N, D]`` -> ``c [B, N, D]``."""
        vs = self.image_encoder(images)  # (B, M, D); every image token is valid
        c, _ = self.cam(t, vs, vs, need_weights=False)
        return c

    def forward(self, images: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``L_fa`` of ``c = CAM(q=t, k=vs, v=vs)`` against the stop-gradient targets ``t`` (module docstring)."""
        return fine_grained_alignment_loss(self.align(images, t), t.detach(), attention_mask)
