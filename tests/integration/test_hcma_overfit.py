"""HCMA at overfit scale: on real rendered formulas and their renderer layouts, the alignment modules learn, and
the local module learns WHERE each segment is (the right box beats the same segments in swapped boxes).

The targets are centred markup features (``hcma.center_text``): uncentred, every pooled feature of this encoder
points the same way and ``L_global`` is ~0.07 before any training, from any image. Centred, the global module learns
slowly at this budget (measured: 1.09 -> 0.92 in 600 steps) while the local one learns fast and grounded (0.98 ->
0.34 in its own boxes, 0.95 swapped); about 35 s on the shared 2-core CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from markup2image.config import DiffusionConfig, DomainConfig, HcmaConfig
from markup2image.data.layout_tensors import LayoutBatch, layout_batch
from markup2image.data.renderers import get_engine
from markup2image.diffusion.objectives import noise_scheduler
from markup2image.models.encoder import TransformerMarkupEncoder
from markup2image.models.hcma import build_hcma, hcma_loss
from markup2image.text.tokenizer import encode_batch, train_bpe

IMAGE = DomainConfig(height=24, width=96, channels=1, engine="mathtext", font_size=8.0)
MARKUPS = [r"x + y", r"a - b", r"\alpha = 2", r"b + 1", r"\beta - y", r"2 = a"]


def _swapped(layout: LayoutBatch) -> LayoutBatch:
    """Each item's segments moved to other boxes (segment k -> box k + 1, cyclically among the valid boxes)."""
    boxes = layout.boxes.clone()
    for i in range(boxes.shape[0]):
        valid = torch.nonzero(layout.box_mask[i]).flatten()
        boxes[i, valid] = layout.boxes[i, valid.roll(1)]
    return LayoutBatch(boxes, layout.box_mask, layout.segment_mask)


@pytest.mark.slow
def test_hcma_modules_learn_global_and_grounded_local_alignment() -> None:
    torch.manual_seed(0)
    engine = get_engine("math", "mathtext")
    images, layouts = zip(*(engine.render_with_layout(m, IMAGE) for m in MARKUPS), strict=True)
    assert all(len(lay) == 3 for lay in layouts)  # three ink-drawing tokens each
    tok = train_bpe(MARKUPS * 3, vocab_size=40, min_frequency=1)
    ids, mask = (torch.from_numpy(a) for a in encode_batch(tok, MARKUPS, 16))
    layout = layout_batch(layouts, MARKUPS, tok, ids.shape[1], (IMAGE.height, IMAGE.width), max_boxes=8)
    assert int(layout.box_mask.sum()) == 3 * len(MARKUPS)
    vocab = tok.get_vocab_size()
    encoder = TransformerMarkupEncoder(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, max_length=16)
    with torch.no_grad():
        hidden = encoder(ids, mask)  # a fixed markup representation to align to
    cfg = HcmaConfig(global_weight=1.0, local_weight=1.0, patch_size=4, dim=48, layers=2, heads=4, fourier_bands=4)
    hcma = build_hcma(cfg, image=IMAGE, text_dim=32)
    assert hcma is not None
    optimizer = torch.optim.AdamW(hcma.parameters(), lr=2e-3)
    y0 = torch.from_numpy(np.stack(images)[:, None].astype(np.float32) / 127.5 - 1.0)  # (B, 1, H, W)
    alphas = noise_scheduler(DiffusionConfig()).alphas_cumprod
    g = torch.Generator().manual_seed(0)

    def noisy(t: torch.Tensor) -> torch.Tensor:
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * y0 + (1 - a).sqrt() * torch.randn(y0.shape, generator=g)

    t_eval = torch.full((len(MARKUPS),), 200)
    x_eval = noisy(t_eval)
    with torch.no_grad():
        _, before = hcma_loss(hcma.eval(), x_eval, t_eval, hidden, mask, layout)
    hcma.train()
    for _ in range(600):
        t = torch.randint(0, 400, (len(MARKUPS),), generator=g)
        loss, _ = hcma_loss(hcma, noisy(t), t, hidden, mask, layout)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hcma.eval()
    with torch.no_grad():
        _, after = hcma_loss(hcma, x_eval, t_eval, hidden, mask, layout)
        _, swapped = hcma_loss(hcma, x_eval, t_eval, hidden, mask, _swapped(layout))
    assert after["hcma_global"] < 0.9 * before["hcma_global"], (before, after)
    assert after["hcma_local"] < 0.5 * before["hcma_local"], (before, after)
    # grounded: the same segments in the wrong boxes align much worse than in their own boxes
    assert swapped["hcma_local"] > max(2 * after["hcma_local"], after["hcma_local"] + 0.3), (after, swapped)
