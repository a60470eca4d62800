"""CCAM: context-aware cross attention (FSA-CDM, design §4).

CCAM replaces the cross-attention (``attn2``) of a U-Net transformer block. Its input ``v [B, HW, C]`` is the
normalised image feature after self-attention; ``t [B, N, D]`` are the markup tokens with their padding mask.
Two branches run in parallel:

* ChA = MHA(q=v, k=t, v=t) with the text mask: the block's own cross-attention projections (``attn.to_q`` ...);
* CoA: a relation between image positions ``R = softmax((v W_a)(v W_b)^T / sqrt(r))`` with low-rank ``W_a, W_b``
  (rank ``r``), context queries ``Q = Psi(R)`` (FSA-CDM eq. 12: each position's row of relations, ``HW`` numbers,
  mapped to ``C``; ``model.ccam_query: relation``) or ``Q = Psi(R v W_c)`` (the relation-weighted features;
  ``relation_value``), a memory ``M = [v ; t W_t]`` of ``HW + N`` tokens, ``K = M W_k``, ``V = M W_v`` and
  CoA = MHA(Q, K, V) with the padded text keys masked.

Output = ``W_f [ChA ; CoA]``, a linear fusion. With ``relation_value``, ``R v W_c`` is one
``scaled_dot_product_attention`` call (query and key dim ``r``, value dim ``C``), so ``R [HW, HW]`` is never built;
``relation`` builds ``R`` (CCAMs sit at the lowest resolutions, where ``HW`` is small) and its ``Psi`` is tied to the
site's ``HW``. Both export to ONNX: no data-dependent Python control flow, the memory mask is the text bias padded
with zeros for the image keys.

Everything that depends on the markup alone (ChA's K/V, the text rows ``t W_t W_k``, ``t W_t W_v`` of CoA's memory) is
:meth:`ContextAwareCrossAttention.text_projections`, computed once per markup batch while sampling
(:func:`markup2image.models.position.cross_attention_kv_cache`).

Interpretations (the paper gives no code): ``Psi`` is a learned linear map; the relation is single-head; learned
positions (``model.position_embeddings``) enter both branches exactly as in a plain cross-attention block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from markup2image.models.position import PositionalAttnProcessor, multi_head_attention


class ContextAwareCrossAttention(PositionalAttnProcessor):
    """A diffusers attention processor that turns the ``Attention`` it is set on into a CCAM.

    Args:
        channels: image feature size ``C`` (the attention's query dim).
        text_dim: markup feature size ``D``.
        rank: rank ``r`` of ``W_a, W_b`` (clamped to ``C``).
        height / width / text_length: position tables as in :class:`PositionalAttnProcessor` (0 = none).
        query: ``relation`` (``Psi(R)``, eq. 12) or ``relation_value`` (``Psi(R v W_c)``).
        positions: ``HW`` of the site (needed by ``relation``: ``Psi`` maps a row of ``R`` to ``C``).
    """

    def __init__(
        self,
        *,
        channels: int,
        text_dim: int,
        rank: int,
        height: int = 0,
        width: int = 0,
        text_length: int = 0,
        query: str = "relation_value",
        positions: int = 0,
    ) -> None:
        super().__init__(height=height, width=width, channels=channels, text_length=text_length, text_dim=text_dim)
        if query not in ("relation", "relation_value"):
            raise ValueError(f"model.ccam_query: {query!r} is not relation or relation_value")
        if query == "relation" and positions < 1:
            raise ValueError("model.ccam_query relation: the site's HW (positions) is needed to size Psi")
        rank = max(1, min(rank, channels))
        self.query = query
        self.relation_a = nn.Linear(channels, rank, bias=False)  # W_a
        self.relation_b = nn.Linear(channels, rank, bias=False)  # W_b
        if query == "relation_value":
            self.relation_value = nn.Linear(channels, channels, bias=False)  # W_c
            self.psi = nn.Linear(channels, channels)  # Psi: context queries from R v W_c
        else:
            self.psi = nn.Linear(positions, channels)  # Psi: context queries from R's rows (eq. 12)
        self.text_to_memory = nn.Linear(text_dim, channels)  # W_t
        self.memory_key = nn.Linear(channels, channels, bias=False)  # W_k
        self.memory_value = nn.Linear(channels, channels, bias=False)  # W_v
        self.context_out = nn.Linear(channels, channels)
        self.fusion = nn.Linear(2 * channels, channels)  # W_f over [ChA ; CoA]

    def text_projections(self, attn: nn.Module, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything CCAM computes from the markup alone, each ``[B, N, C]``: ChA's key and value, and the text rows
        of CoA's memory keys and values, ``t W_t W_k`` and ``t W_t W_v`` (cacheable across denoising steps)."""
        t = self.text_tokens(encoder_hidden_states)
        memory = self.text_to_memory(t)  # t W_t, (B, N, C)
        return attn.to_k(t), attn.to_v(t), self.memory_key(memory), self.memory_value(memory)

    def context_attention(
        self,
        v: torch.Tensor,
        text_keys: torch.Tensor,
        text_values: torch.Tensor,
        bias: torch.Tensor | None,
        heads: int,
    ) -> torch.Tensor:
        """CoA = MHA(Psi(R v W_c), M W_k, M W_v) with ``M = [v ; t W_t]``: ``[B, HW, C]``.

        ``W_k, W_v`` have no bias, so ``M W_k = [v W_k ; t W_t W_k]`` row by row: the text rows come in precomputed.
        """
        if self.query == "relation":
            a, b = self.relation_a(v), self.relation_b(v)  # (B, HW, r)
            relation = torch.softmax(a @ b.transpose(1, 2) / a.shape[-1] ** 0.5, dim=-1)  # R, (B, HW, HW)
            query = self.psi(relation)  # eq. 12: Q = Psi(R)
        else:
            a = self.relation_a(v)[:, None]  # (B, 1, HW, r)
            b = self.relation_b(v)[:, None]  # (B, 1, HW, r)
            c = self.relation_value(v)[:, None]  # (B, 1, HW, C)
            context = F.scaled_dot_product_attention(a, b, c).squeeze(1)  # R v W_c, (B, HW, C); scale 1/sqrt(r)
            query = self.psi(context)
        keys = torch.cat([self.memory_key(v), text_keys], dim=1)  # (B, HW + N, C)
        values = torch.cat([self.memory_value(v), text_values], dim=1)
        memory_bias = None if bias is None else F.pad(bias, (v.shape[1], 0))  # image keys never masked
        return self.context_out(multi_head_attention(query, keys, values, heads, memory_bias))

    def attend(
        self, attn: nn.Module, x: torch.Tensor, text: tuple[torch.Tensor, ...] | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``W_f [ChA ; CoA]`` for image tokens ``x [B, HW, C]`` (positions added) and the text projections."""
        if text is None:
            raise ValueError("ContextAwareCrossAttention replaces a cross-attention; it needs encoder_hidden_states")
        k, v, memory_keys, memory_values = text
        cha = super().attend(attn, x, (k, v), bias)  # ChA = MHA(q=x, k=t, v=t)
        coa = self.context_attention(x, memory_keys, memory_values, bias, attn.heads)
        return self.fusion(torch.cat([cha, coa], dim=-1))
