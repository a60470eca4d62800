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

While sampling, the markup features are the same at every step: :func:`cross_attention_kv_cache` lets every
cross-attention project them to K/V once per batch (``sample_images`` uses it by default). Training and the ONNX
graphs compute K/V on every call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, C]`` -> ``[B, h, L, C/h]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, h, L, C/h]`` -> ``[B, L, C]``."""
    return x.transpose(1, 2).flatten(2)


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``q [B, L, C]``, ``k, v [B, S, C]``, ``bias [B, 1, 1, S]`` or None -> ``[B, L, C]``."""
    q, k, v = (split_heads(z, heads) for z in (q, k, v))  # (B, h, L|S, C/h)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


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


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]`` sin/cos position table (Vaswani et al. 2017, sec. 3.5), frequencies 1 .. 1/10000."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / max(dim, 1))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


@torch.no_grad()
def sinusoidal_init_(module: nn.Module) -> None:
    """Set every learned position table inside ``module`` to a sinusoid (``model.position_init: sinusoidal``).

    Image tables: rows on the first half of the channels, columns on the second (the 2-D sin/cos of ViT/MAE);
    text tables: 1-D. They stay trainable; only their starting point changes (from ``N(0, 0.02^2)``)."""
    for m in module.modules():
        if isinstance(m, ImagePositionEmbedding):
            c = m.row.shape[1]
            m.row.zero_()
            m.col.zero_()
            m.row[:, : c // 2] = sinusoid_table(m.height, c // 2)
            m.col[:, c // 2 :] = sinusoid_table(m.width, c - c // 2)
        elif isinstance(m, TextPositionEmbedding):
            m.weight.copy_(sinusoid_table(*m.weight.shape))


class TextCacheSlot:
    """What one cross-attention processor computed from one ``encoder_hidden_states`` tensor.

    The projections are reused while the processor keeps receiving that same tensor object, unmodified
    (``_version`` unchanged); any other tensor (a new batch) is projected afresh and replaces them.
    """

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.version = -1
        self.projections: tuple[torch.Tensor, ...] = ()

    def holds(self, t: torch.Tensor) -> bool:
        return self.source is t and self.version == t._version

    def store(self, t: torch.Tensor, projections: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.source, self.version, self.projections = t, t._version, projections
        return projections


class PositionalAttnProcessor(nn.Module):
    """Masked multi-head attention for a diffusers ``Attention``, with optional learned positions.

    Everything a cross-attention computes from the markup alone (:meth:`text_projections`: the text K/V) can be
    cached across the denoising steps of one batch: see :func:`cross_attention_kv_cache`. Without a cache (the
    default, training, ONNX export) it is computed on every call.

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
        self.text_cache: TextCacheSlot | None = None  # set by cross_attention_kv_cache

    def text_tokens(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Markup tokens ``[B, N, D]`` with their positions added (when this block has a table)."""
        return encoder_hidden_states if self.text_pos is None else self.text_pos(encoder_hidden_states)

    def text_projections(self, attn: nn.Module, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Markup tokens ``[B, N, D]`` -> the cross-attention's key and value, each ``[B, N, C]``."""
        t = self.text_tokens(encoder_hidden_states)
        return attn.to_k(t), attn.to_v(t)

    def cached_text_projections(
        self, attn: nn.Module, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`text_projections`, taken from the cache when it holds this very tensor (never while exporting)."""
        slot = self.text_cache
        if slot is None or _tracing():
            return self.text_projections(attn, encoder_hidden_states)
        if torch.compiler.is_compiling():
            # A compiled graph cannot guard on tensor identity or version counters (a graph break, which also ends
            # the CUDA graph of the step): it reads what CrossAttentionKVCache.prefill stored before the call, and
            # never stores (a CUDA graph's outputs are overwritten by its next replay).
            if slot.source is not None and slot.source.shape == encoder_hidden_states.shape:
                return slot.projections
            return self.text_projections(attn, encoder_hidden_states)
        if slot.holds(encoder_hidden_states):
            return slot.projections
        return slot.store(encoder_hidden_states, self.text_projections(attn, encoder_hidden_states))

    def attend(
        self, attn: nn.Module, x: torch.Tensor, text: tuple[torch.Tensor, ...] | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Image tokens ``x [B, HW, C]`` (positions added), the text projections or None (self-attention)."""
        k, v = (attn.to_k(x), attn.to_v(x)) if text is None else text
        if attn.norm_q is None and attn.norm_k is None:
            out = multi_head_attention(attn.to_q(x), k, v, attn.heads, bias)
        else:  # diffusers' qk_norm: on each head's queries and keys
            q, k, v = (split_heads(z, attn.heads) for z in (attn.to_q(x), k, v))  # (B, h, L|N, C/h)
            q = q if attn.norm_q is None else attn.norm_q(q)
            k = k if attn.norm_k is None else attn.norm_k(k)
            out = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``hidden_states [B, HW, C]`` (or ``[B, C, H, W]``), ``encoder_hidden_states [B, N, D]`` or None -> the
        same shape. Every option of a diffusers ``Attention`` is honoured as diffusers' ``AttnProcessor2_0`` does
        (spatial and group norm, cross norm, qk norm, residual, output rescale); the key-padding bias is broadcast
        as ``[B, 1, 1, N]`` instead of repeated per head, which also exports with a dynamic batch."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        x = hidden_states if self.image_pos is None else self.image_pos(hidden_states)
        text = None
        if encoder_hidden_states is not None:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            text = self.cached_text_projections(attn, encoder_hidden_states)
        out = self.attend(attn, x, text, attention_bias(attention_mask, x.dtype))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CrossAttentionKVCache:
    """The cross-attentions of a model whose markup projections are being cached (see the context manager)."""

    def __init__(self, sites: list[tuple[nn.Module, PositionalAttnProcessor]]) -> None:
        self.sites = sites

    def prefill(self, encoder_hidden_states: torch.Tensor) -> None:
        """Project ``encoder_hidden_states [B, N, D]`` for every cross-attention now, outside any compiled region.

        Needed before ``torch.compile`` / CUDA-graph capture of the U-Net: the cached K/V must exist as ordinary
        tensors before the graph is recorded (a graph's own outputs are overwritten by its next replay), so that
        the compiled steps only read them.
        """
        for attn, proc in self.sites:
            proc.text_cache.store(encoder_hidden_states, proc.text_projections(attn, encoder_hidden_states))

    def clear(self) -> None:
        for _, proc in self.sites:
            proc.text_cache = TextCacheSlot()


@contextlib.contextmanager
def cross_attention_kv_cache(module: nn.Module) -> Iterator[CrossAttentionKVCache]:
    """Compute the markup K/V of every cross-attention in ``module`` once per markup batch, not once per step.

    Inside the ``with`` block, each :class:`PositionalAttnProcessor` (and CCAM) keeps the projections of the
    ``encoder_hidden_states`` tensor it last saw and reuses them while it is given that same, unmodified tensor;
    a different tensor (the next batch) is projected afresh. Gives the same output as without the cache. Meant for
    sampling under ``torch.no_grad()`` (a cache built with gradients would keep the graph of its first step).
    ``module`` is a U-Net, a whole model or a ``torch.compile`` wrapper; ONNX export never uses a cache.
    """
    from diffusers.models.attention_processor import Attention

    sites = [
        (m, m.processor)
        for m in module.modules()
        if isinstance(m, Attention) and m.is_cross_attention and isinstance(m.processor, PositionalAttnProcessor)
    ]
    before = [proc.text_cache for _, proc in sites]
    cache = CrossAttentionKVCache(sites)
    cache.clear()
    try:
        yield cache
    finally:
        for (_, proc), slot in zip(sites, before):
            proc.text_cache = slot
