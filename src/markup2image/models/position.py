"""Learned position embeddings and the masked attention processor used by every U-Net attention block.

SS-DM adds learned row/column position embeddings to the image features and learned 1-D position embeddings to the
markup features in every attention block (design §4). Here each diffusers ``Attention`` of the U-Net gets a
:class:`PositionalAttnProcessor` that owns its own tables:

* self-attention (``attn1``): ``x + row[r] + col[c]`` feeds the query, key and value projections;
* cross-attention (``attn2``): ``x + row[r] + col[c]`` feeds the query, ``t + pos[n]`` the key and value.

The residual path of the transformer block is untouched (the embeddings only enter the attention inputs). The
padding mask arrives as diffusers' additive bias ``[B, 1, N]`` and is broadcast to ``[B, 1, 1, N]`` over heads and
queries, batch-major (never repeated head-major, SS-DM's mask bug). Attention runs through
``scaled_dot_product_attention`` with no Python branch on tensor values, so the U-Net exports to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_BIAS = -10000.0  # the additive bias diffusers uses for padded keys


def attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Key-padding mask -> additive bias ``[B, 1, 1, N]`` broadcast over heads and queries.

    Accepts a 0/1 mask ``[B, N]`` (1 = keep), diffusers' additive bias ``[B, 1, N]`` (what ``UNet2DConditionModel``
    hands its attention blocks) or a ready ``[B, 1, 1, N]`` bias. Only the rank is inspected, never the values.
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        return ((1.0 - mask.to(dtype)) * MASK_BIAS)[:, None, None, :]
    if mask.ndim == 3:
        return mask.to(dtype)[:, None]
    if mask.ndim == 4:
        return mask.to(dtype)
    raise ValueError(f"attention mask: expected [B, N], [B, 1, N] or [B, 1, 1, N], got shape {tuple(mask.shape)}")


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``q [B, L, C]``, ``k, v [B, S, C]``, ``bias [B, 1, 1, S]`` or None -> ``[B, L, C]``."""
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, L, C/h)
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, S, C/h)
    v = v.unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, L, C/h)
    return out.transpose(1, 2).flatten(2)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class ImagePositionEmbedding(nn.Module):
    """Learned row and column embeddings for a ``height x width`` feature map with ``channels`` channels.

    ``forward(x [B, H*W, C]) -> x + row[r] + col[c]`` (row-major flattening, as diffusers' ``Transformer2DModel``).
    """

    def __init__(self, height: int, width: int, channels: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.row = nn.Parameter(torch.randn(height, channels) * 0.02)  # (H, C)
        self.col = nn.Parameter(torch.randn(width, channels) * 0.02)  # (W, C)

    def table(self) -> torch.Tensor:
        return (self.row[:, None, :] + self.col[None, :, :]).flatten(0, 1)  # (H*W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _tracing() and x.shape[1] != self.height * self.width:
            raise ValueError(
                f"image position embedding built for a {self.height}x{self.width} feature map got {x.shape[1]} "
                "tokens; the model's image size (domain height/width) must match the images it is given"
            )
        return x + self.table().to(x.dtype)


class TextPositionEmbedding(nn.Module):
    """Learned 1-D embeddings for up to ``max_length`` markup tokens: ``t [B, N, D] -> t + pos[:N]``."""

    def __init__(self, max_length: int, dim: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.weight = nn.Parameter(torch.randn(max_length, dim) * 0.02)  # (L, D)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not _tracing() and t.shape[1] > self.max_length:
            raise ValueError(
                f"markup of {t.shape[1]} tokens is longer than model.max_text_length={self.max_length}; "
                "raise model.max_text_length or truncate at tokenize.max_length"
            )
        return t + self.weight[: t.shape[1]].to(t.dtype)


class PositionalAttnProcessor(nn.Module):
    """Masked multi-head attention for a diffusers ``Attention``, with optional learned positions.

    Args:
        height / width / channels: the feature map this attention runs on; ``height=0`` means no image positions.
        text_length / text_dim: size of the text position table for cross-attention; ``0`` means none.
    """

    def __init__(
        self, *, height: int = 0, width: int = 0, channels: int = 0, text_length: int = 0, text_dim: int = 0
    ) -> None:
        super().__init__()
        self.image_pos = ImagePositionEmbedding(height, width, channels) if height else None
        self.text_pos = TextPositionEmbedding(text_length, text_dim) if text_length else None

    def add_positions(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image tokens ``[B, HW, C]`` and text tokens ``[B, N, D]`` (or None) with their positions added."""
        x = hidden_states if self.image_pos is None else self.image_pos(hidden_states)
        t = encoder_hidden_states
        if t is not None and self.text_pos is not None:
            t = self.text_pos(t)
        return x, t

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``hidden_states [B, HW, C]``, ``encoder_hidden_states [B, N, D]`` or None -> ``[B, HW, C]``."""
        x, t = self.add_positions(hidden_states, encoder_hidden_states)
        ctx = x if t is None else t
        bias = attention_bias(attention_mask, x.dtype)
        out = multi_head_attention(attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx), attn.heads, bias)
        return attn.to_out[1](attn.to_out[0](out))
