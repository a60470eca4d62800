"""Markup encoders: markup token ids ``[B, N]`` -> token features ``t [B, N, D]`` (design §4).

Padding is masked everywhere: the mask is batch-major ``[B, N]`` and is passed as a key-padding mask, never
repeated head-major (SS-DM's mask bug).
"""

from __future__ import annotations

import torch
from torch import nn


class TransformerMarkupEncoder(nn.Module):
    """A trainable transformer over BPE tokens with learned 1-D position embeddings.

    Args:
        vocab_size: tokenizer vocabulary size.
        dim: feature size ``D``.
        num_layers / num_heads: encoder depth and heads.
        max_length: longest token sequence (position table size).
        pad_id: id of ``[PAD]``.
    """

    def __init__(
        self, *, vocab_size: int, dim: int, num_layers: int, num_heads: int, max_length: int, pad_id: int = 0
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position_embedding = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        # enable_nested_tensor=False keeps the graph static (ONNX export) and the padded outputs defined.
        self.layers = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids, attention_mask [B, N]`` -> ``[B, N, D]``; padded positions are zeroed."""
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(pos)[None]  # (B, N, D)
        h = self.layers(h, src_key_padding_mask=attention_mask == 0)
        return self.norm(h) * attention_mask[..., None].to(h.dtype)


class PretrainedMarkupEncoder(nn.Module):
    """A frozen pretrained LM (``from_pretrained(path_or_id)``) followed by a trainable adapter to ``dim``.

    The paper uses GPT-Neo-125M (math, tables, music) and ChemBERTa-77M-MLM (molecules). The LM's own tokenizer
    must be used with it (``tokenize.pretrained`` = the same path or id). The LM stays frozen and in eval mode
    (``requires_grad=False``, no dropout); the adapter (``Linear(H, D)`` + ``num_adapter_layers`` transformer
    layers + LayerNorm) is trained. ``num_adapter_layers=0``: no adapter, the LM's last hidden states go to the
    U-Net as they are (SS-DM), through ``Linear(H, D)`` only where ``D != H``. Padded positions are zeroed.

    Args:
        path_or_id: a local folder or hub id for ``transformers.AutoModel.from_pretrained``.
        dim: output feature size ``D``; num_heads: heads of the adapter layers.
        load_weights: False builds the LM from its config only (no weights read; for parameter counts).
    """

    def __init__(
        self, *, path_or_id: str, dim: int, num_adapter_layers: int = 1, num_heads: int = 4, load_weights: bool = True
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if load_weights:
            self.lm = AutoModel.from_pretrained(path_or_id)
        else:  # architecture only (parameter counts on the meta device)
            self.lm = AutoModel.from_config(AutoConfig.from_pretrained(path_or_id))
        self.lm.requires_grad_(False)
        self.lm.eval()
        hidden = self.lm.config.hidden_size
        self.dim = dim
        self.adapter: nn.Module | None = None
        if num_adapter_layers == 0:
            self.proj: nn.Module = nn.Identity() if dim == hidden else nn.Linear(hidden, dim)
            self.norm: nn.Module = nn.Identity()
            return
        self.proj = nn.Linear(hidden, dim)
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.adapter = nn.TransformerEncoder(layer, num_layers=num_adapter_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def train(self, mode: bool = True) -> PretrainedMarkupEncoder:
        super().train(mode)
        self.lm.eval()  # frozen: no dropout
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.lm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, N, H)
        h = self.proj(h)
        if self.adapter is not None:
            h = self.adapter(h, src_key_padding_mask=attention_mask == 0)
        return self.norm(h) * attention_mask[..., None].to(h.dtype)
