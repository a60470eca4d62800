"""Classifier-free guidance: markup dropout in training, the guided noise prediction when sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_IMAGE, TINY_MODEL

from markup2image.config import DiffusionConfig
from markup2image.diffusion.sampling import sample_images
from markup2image.models.model import MarkupToImageModel
from markup2image.text.tokenizer import empty_markup_like, train_tokenizer
from markup2image.training.determinism import condition_dropout, drop_markup


def test_dropout_is_the_same_whatever_the_process_split():
    positions = np.arange(64)
    whole = condition_dropout(0, 5, positions, 0.25)
    halves = torch.cat([condition_dropout(0, 5, positions[:32], 0.25), condition_dropout(0, 5, positions[32:], 0.25)])
    assert torch.equal(whole, halves) and 5 < int(whole.sum()) < 30
    assert not condition_dropout(0, 5, positions, 0.0).any() and condition_dropout(0, 5, positions, 1.0).all()
    assert not torch.equal(whole, condition_dropout(0, 6, positions, 0.25))  # another step, other items


def test_dropped_rows_become_the_empty_markup():
    ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out_ids, out_mask = drop_markup(ids, mask, torch.tensor([False, True]), [2, 3], pad=0)
    assert out_ids.tolist() == [[2, 7, 8, 3], [2, 3, 0, 0]] and out_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert ids.tolist()[1] == [2, 9, 3, 0]  # the input is not modified


def test_guidance_scale_zero_is_the_empty_markup_and_one_is_plain_sampling():
    tok = train_tokenizer("char", ["x + y", "a ^ { 2 }"] * 3, vocab_size=40)
    torch.manual_seed(0)
    model = MarkupToImageModel(model_cfg=TINY_MODEL, image=TINY_IMAGE, vocab_size=tok.get_vocab_size()).eval()
    enc = tok.encode_batch(["x + y", "a ^ { 2 }"])
    n = max(len(e.ids) for e in enc)
    ids = np.zeros((2, n), dtype=np.int64)
    mask = np.zeros((2, n), dtype=np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
    u_ids, u_mask = (torch.from_numpy(a) for a in empty_markup_like(tok, ids))
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    kw = dict(sampler="ddim", steps=3, seed=1, diffusion=DiffusionConfig())
    plain = sample_images(model, ids, mask, **kw)
    assert torch.equal(sample_images(model, ids, mask, guidance_scale=1.0, uncond=(u_ids, u_mask), **kw), plain)
    empty = sample_images(model, u_ids, u_mask, **kw)
    zero = sample_images(model, ids, mask, guidance_scale=0.0, uncond=(u_ids, u_mask), **kw)
    assert torch.allclose(zero, empty, atol=1e-5)
    strong = sample_images(model, ids, mask, guidance_scale=3.0, uncond=(u_ids, u_mask), **kw)
    assert not torch.allclose(strong, plain, atol=1e-3)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_images(model, ids, mask, guidance_scale=2.0, **kw)
