"""Overfit: a tiny model trained on four rendered formulas reproduces them far better than a blank image.

Four short formulas are rendered with matplotlib mathtext onto a 16 x 64 canvas (top-left, black on white, as
the datasets); a tiny U-Net with learned positions trains on them with the ``ddpm`` objective, and the paper's
sampler (DDPM ancestral, 1000 steps, clipped x̂0) draws one image per formula. The mean DTW to the golds
must beat the blank-image baseline by a clear margin.

Why these settings: a short-trained U-Net passes the spatial mean of its input to its noise prediction poorly
(every block normalises it away), so at high ``t`` the background brightness of a sample follows the mean of the
initial noise. ``norm_num_groups=1`` roughly triples that gain after a few hundred steps, and the stochastic
1000-step sampler corrects the rest; deterministic DDIM from such a young model still gives gray backgrounds for
some seeds. Measured on this project's shared 2-core CPU: 160 s at a load average of ~2 (model DTW 3.9 against
7.9 for blank), about 6.5 minutes at a load average of ~6.
"""

from __future__ import annotations

import copy
import io
import logging
import math

import numpy as np
import pytest
import torch

from markup2image.config import DiffusionConfig, DomainConfig, ModelConfig, Params, TrainConfig
from markup2image.diffusion.objectives import TrainBatch, get_objective, noise_scheduler
from markup2image.diffusion.sampling import sample_images, to_uint8
from markup2image.evaluation.markup_use import markup_use_losses
from markup2image.evaluation.metrics import dtw_distance
from markup2image.models.model import MarkupToImageModel

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

FORMULAS = [r"$x^2+1$", r"$\frac{a}{b}$", r"$\sqrt{y}-3$", r"$\sum_i z_i$"]
HEIGHT, WIDTH = 16, 64
STEPS = 700
REPEAT = 2  # each formula twice per batch, with its own t and noise
FSA_CDM_SWITCHES = {"fsa": True, "ccam": True, "ccam_blocks": 1, "con_aug": False}


def _render(formula: str) -> np.ndarray:
    """uint8 ``[H, W]``: the formula at 12 pt, 72 dpi, top-left on a white canvas (cropped if larger)."""
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties
    from PIL import Image

    buf = io.BytesIO()
    mathtext.math_to_image(formula, buf, prop=FontProperties(size=12), dpi=72, format="png")
    img = np.asarray(Image.open(buf).convert("L"))
    canvas = np.full((HEIGHT, WIDTH), 255, np.uint8)
    h, w = min(HEIGHT, img.shape[0]), min(WIDTH, img.shape[1])
    canvas[:h, :w] = img[:h, :w]
    return canvas


def _tokens(formulas: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Character ids ``[B, N]`` (0 = padding), mask ``[B, N]`` and the vocabulary size."""
    vocab = sorted(set("".join(formulas)))
    n = max(map(len, formulas))
    ids = torch.zeros(len(formulas), n, dtype=torch.long)
    mask = torch.zeros(len(formulas), n, dtype=torch.long)
    for i, f in enumerate(formulas):
        ids[i, : len(f)] = torch.tensor([vocab.index(c) + 1 for c in f])
        mask[i, : len(f)] = 1
    return ids, mask, len(vocab) + 1


def _train(
    objective: str,
    switches: dict,
    num_negatives: int,
    infonce_weight: float,
    seed: int = 0,
    infonce_negatives: str = "other_items",
):
    """Train on the four formulas; returns (EMA model, params, scheduler, golds, ids, mask, images, last terms).

    ``seed`` changes the initialisation and every step's noise, timesteps and negatives (seed 0: the runs quoted).
    """
    torch.set_num_threads(1)
    golds = np.stack([_render(f) for f in FORMULAS])  # (4, H, W) uint8
    assert (golds < 150).sum(axis=(1, 2)).min() > 10  # every formula has ink
    input_ids, mask, vocab_size = _tokens(FORMULAS)
    cfg = ModelConfig(
        block_out_channels=(16, 32, 32),
        cross_attention_levels=(False, False, True),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=1,
        encoder_dim=32,
        encoder_layers=1,
        encoder_heads=4,
        max_text_length=input_ids.shape[1],
        **switches,
    )
    train = TrainConfig(steps=STEPS, objective=objective, num_negatives=num_negatives)
    params = Params(
        model=cfg,
        diffusion=DiffusionConfig(),
        train=train,
        infonce_weight=infonce_weight,
        infonce_negatives=infonce_negatives,
    )
    torch.manual_seed(seed)
    model = MarkupToImageModel(model_cfg=cfg, image=DomainConfig(height=HEIGHT, width=WIDTH), vocab_size=vocab_size)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / STEPS))
    )
    sched, loss_fn = noise_scheduler(params.diffusion), get_objective(objective)
    images = torch.from_numpy(golds.astype(np.float32) / 127.5 - 1)[:, None].repeat(REPEAT, 1, 1, 1)
    model.train()
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step + 100_003 * seed)
        batch = TrainBatch(
            images=images,
            input_ids=input_ids.repeat(REPEAT, 1),
            attention_mask=mask.repeat(REPEAT, 1),
            markup_keys=torch.arange(len(FORMULAS)).repeat(REPEAT),
            noise=torch.randn(images.shape, generator=g),
            timesteps=torch.randint(0, 1000, (images.shape[0],), generator=g),
            generator=g,
        )
        loss, terms = loss_fn(model, batch, sched, params, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 0.01)
    return ema.eval(), params, sched, golds, input_ids, mask, images[: len(FORMULAS)], terms


def _overfit(
    objective: str, switches: dict, num_negatives: int = 5, infonce_weight: float = 0.0
) -> tuple[float, float, float]:
    """Train on the four formulas with ``objective``; returns (final loss, model DTW, blank DTW)."""
    ema, params, _, golds, input_ids, mask, _, terms = _train(objective, switches, num_negatives, infonce_weight)
    samples = to_uint8(
        sample_images(ema, input_ids, mask, sampler="ddpm", steps=1000, seed=0, diffusion=params.diffusion)
    )
    model_dtw = np.mean([dtw_distance(s, g) for s, g in zip(samples, golds, strict=True)])
    blank_dtw = np.mean([dtw_distance(np.full_like(g, 255), g) for g in golds])
    simple = float(terms["loss_simple"])
    log.info("overfit %s: L_simple %.4f, model DTW %.2f, blank DTW %.2f", objective, simple, model_dtw, blank_dtw)
    return simple, float(model_dtw), float(blank_dtw)


def test_overfit_beats_blank_baseline():
    simple, model_dtw, blank_dtw = _overfit("ddpm", {})
    assert simple < 0.05
    assert model_dtw < 0.7 * blank_dtw, f"model DTW {model_dtw:.2f} vs blank {blank_dtw:.2f}"


def test_fsa_cdm_overfit_beats_blank_baseline():
    """``fsa_cdm`` with FSA (L_fa, stop-gradient targets) and a CCAM: learns the four formulas AND uses the markup.

    Before the stop-gradient target in L_fa this run drew the wrong training formulas (the U-Net ignored the
    markup: DTW 8.25 against blank 7.94); with it, DTW 3.03 (ddpm 3.73) in 109 s on the shared CPU. The
    contrast-augmented terms are left out here (their test is below: the shifted positives slow the fit).
    """
    simple, model_dtw, blank_dtw = _overfit("fsa_cdm", FSA_CDM_SWITCHES, num_negatives=2)
    assert simple < 0.05
    assert model_dtw < 0.7 * blank_dtw, f"model DTW {model_dtw:.2f} vs blank {blank_dtw:.2f}"


def test_fsa_cdm_contrast_augmented_uses_the_markup():
    """The whole FSA-CDM (FSA, CCAM, positive, K = 2 negatives with EUBO, InfoNCE at the default weight 0) learns to
    read the markup: at t = 300 the denoising loss with a shuffled markup is well above the right one.

    Measured (700 steps, ~170 s on a free core): 0.0215 vs 0.0601 (seed 0), 0.0251 vs 0.0596 (seed 1). With
    ``infonce_weight`` 1 (paper eq. 10) the same run gives 0.054 vs 0.055 and 0.0534 vs 0.0534: the markup is
    ignored (diffusion/objectives.py). Samples are not drawn here: the shifted positives make four formulas a
    harder target, and 700 steps reach DTW 7.1-7.3 against 7.94 for blank (2,800 steps are out of a CI budget).
    """
    switches = {**FSA_CDM_SWITCHES, "con_aug": True}
    ema, _, _, _, ids, mask, images, terms = _train("fsa_cdm", switches, num_negatives=2, infonce_weight=0.0)
    right, shuffled = markup_use_losses(ema, images, ids, mask, t=300)  # what evaluate reports as markup_use
    log.info("fsa_cdm + con_aug: loss at t=300 right %.4f shuffled %.4f, terms %s", right, shuffled, terms)
    assert terms["loss_simple"] < 0.05
    assert "loss_infonce" in terms and "loss_eubo" in terms and "loss_positive" in terms
    assert shuffled > 1.5 * right, f"the markup is not used: loss {right:.4f} right vs {shuffled:.4f} shuffled"
