"""Objectives: scheduled sampling, negatives, the FSA-CDM composition and its gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_models import TINY_IMAGE, TINY_MODEL
from torch import nn

from markup2image.config import HcmaConfig, Params, TrainConfig
from markup2image.data.layout_tensors import HcmaBatch, LayoutBatch
from markup2image.diffusion.losses import contrastive_diffusion_loss
from markup2image.diffusion.objectives import (
    OBJECTIVES,
    NegativePool,
    TrainBatch,
    augment_positive,
    choose_negatives,
    get_objective,
    noise_scheduler,
    scheduled_sampling_probability,
    ss_dm_loss,
)
from markup2image.models.model import MarkupToImageModel
from markup2image.modes import OBJECTIVE_NAMES

IMAGE, TINY = TINY_IMAGE, TINY_MODEL
SCHED = noise_scheduler(Params().diffusion)


def _batch(b: int = 4, keys: list[int] | None = None, t: list[int] | None = None, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[0, 4:] = 0
    return TrainBatch(
        images=torch.rand(b, 1, IMAGE.height, IMAGE.width, generator=g) * 2 - 1,
        input_ids=torch.randint(1, 30, (b, 6), generator=g) * mask,
        attention_mask=mask,
        markup_keys=torch.tensor(keys if keys is not None else list(range(b))),
        noise=torch.randn(b, 1, IMAGE.height, IMAGE.width, generator=g),
        timesteps=torch.tensor(t) if t is not None else torch.randint(0, 1000, (b,), generator=g),
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _model(**switches) -> MarkupToImageModel:
    torch.manual_seed(0)
    return MarkupToImageModel(model_cfg=dataclasses.replace(TINY, **switches), image=IMAGE, vocab_size=30)


def _params(model: MarkupToImageModel, **train) -> Params:
    return Params(model=model.model_cfg, train=TrainConfig(**({"num_negatives": 2, "steps": 100} | train)))


class RecordingDenoiser(nn.Module):
    """Predicts zero noise and records every call's ``(sample, timestep, kwargs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.model_cfg = TINY
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, input_ids, attention_mask, **kwargs):
        self.calls.append((sample.clone(), timestep.clone(), kwargs))
        return torch.zeros_like(sample) + self.weight


def test_registry_has_every_objective():
    assert set(OBJECTIVES) == {"ddpm", "ss_dm", "cdcd", "fsa_cdm"}
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES  # the registry and train.objective's Literal list the same modes
    with pytest.raises(ValueError, match="train.objective"):
        get_objective("nope")


def test_scheduled_sampling_probability_is_linear_per_step():
    assert scheduled_sampling_probability(0, 100, 0.8) == 0.0
    assert math.isclose(scheduled_sampling_probability(25, 100, 0.8), 0.2)
    assert math.isclose(scheduled_sampling_probability(50, 100, 0.8), 0.4)
    assert scheduled_sampling_probability(100, 100, 0.8) == 0.8
    assert scheduled_sampling_probability(500, 100, 0.8) == 0.8


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    return SCHED.alphas_cumprod[t].view(-1, 1, 1, 1)


def test_ss_dm_rollout_and_target_with_m1():
    """P(m=1) = 1: y_{t+1} ~ q, x̂0 from the model, re-noised to t with fresh noise; target from the TRUE y0."""
    model = RecordingDenoiser()
    batch = _batch(t=[0, 10, 500, 998])
    params = Params(model=TINY, train=TrainConfig(steps=10, ss_max_prob=1.0))
    gen = torch.Generator()
    gen.set_state(batch.generator.get_state())
    torch.rand((), generator=gen)  # the draw of m
    fresh = torch.randn(batch.images.shape, generator=gen)  # the re-noising noise
    loss, terms = ss_dm_loss(model, batch, SCHED, params, step=10)
    assert terms["ss_m"] == 1.0
    assert len(model.calls) == 2
    (y1, t1, _), (y_t, t_grad, _) = model.calls
    t = batch.timesteps
    assert torch.equal(t1, t + 1) and torch.equal(t_grad, t)
    ab1, ab = _alpha_bar(t + 1), _alpha_bar(t)
    assert torch.allclose(y1, ab1.sqrt() * batch.images + (1 - ab1).sqrt() * batch.noise, atol=1e-6)
    x0_hat = y1 / ab1.sqrt()  # eps_theta = 0, unclipped
    assert x0_hat.abs().max() > 1.0  # really unclipped at t=998
    expected_y_t = ab.sqrt() * x0_hat + (1 - ab).sqrt() * fresh
    assert torch.allclose(y_t, expected_y_t, atol=1e-5)
    target = (y_t - ab.sqrt() * batch.images) / (1 - ab).sqrt()
    # eps_theta = 0 -> L_simple = mean(target^2) per item
    assert torch.allclose(terms["per_item"], target.pow(2).flatten(1).mean(1), rtol=1e-5)
    assert math.isclose(loss.item(), target.pow(2).mean().item(), rel_tol=1e-5)


def test_ss_dm_m_drops_to_zero_when_t_plus_m_leaves_the_schedule():
    model = RecordingDenoiser()
    batch = _batch(t=[0, 999, 5, 7])
    params = Params(model=TINY, train=TrainConfig(steps=10, ss_max_prob=1.0))
    loss, terms = ss_dm_loss(model, batch, SCHED, params, step=10)
    assert terms["ss_m"] == 0.0 and len(model.calls) == 1
    # m = 0: target = the true noise
    assert math.isclose(loss.item(), batch.noise.pow(2).mean().item(), rel_tol=1e-5)


def test_ss_dm_at_step_zero_never_rolls_out():
    model = RecordingDenoiser()
    params = Params(model=TINY, train=TrainConfig(steps=10, ss_max_prob=0.8))
    for seed in range(20):
        _, terms = ss_dm_loss(model, _batch(seed=seed, t=[1, 2, 3, 4]), SCHED, params, step=0)
        assert terms["ss_m"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_negatives_never_share_the_anchor_markup(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 3, (9,), generator=g)
    index, valid = choose_negatives(keys, 5, g)
    assert index.shape == valid.shape == (9, 5)
    for i in range(9):
        others = int((keys != keys[i]).sum())
        assert bool(valid[i].all()) == (others > 0)
        if others:
            assert (keys[index[i]] != keys[i]).all()
            # fewer valid candidates than K: every one is used, none more than ceil(K / count) times
            used = torch.bincount(index[i], minlength=9)[keys != keys[i]]
            assert (used >= 5 // others).all() and (used <= -(-5 // others)).all()


def test_negatives_are_masked_when_the_whole_batch_shares_one_markup():
    index, valid = choose_negatives(torch.tensor([7, 7, 7]), 2)
    assert not valid.any()
    assert torch.equal(index, torch.tensor([[0, 0], [1, 1], [2, 2]]))


def test_augment_positive_is_mild():
    g = torch.Generator().manual_seed(0)
    white = torch.ones(3, 1, 8, 16)
    assert torch.equal(augment_positive(white, g), white)  # white stays white (white fill, contrast about white)
    img = torch.ones(6, 1, 12, 20)
    img[:, :, 6, 10] = -1.0  # one ink pixel
    out = augment_positive(img, g)
    assert out.min() >= -1 and out.max() <= 1
    for i in range(6):
        r, c = divmod(int(out[i, 0].argmin()), 20)
        assert abs(r - 6) <= 1 and 1 <= abs(c - 10) <= 2  # shifted by 1-2 px horizontally, <= 1 px vertically
        assert out[i].min() < -0.45  # the ink is still clearly ink (threshold +0.18)


def test_fsa_cdm_with_everything_off_equals_ddpm():
    model = _model()
    batch = _batch()
    params = _params(model)
    ddpm, _ = get_objective("ddpm")(model, batch, SCHED, params, 0)
    fsa, terms = get_objective("fsa_cdm")(model, batch, SCHED, params, 0)
    assert torch.allclose(ddpm, fsa) and "loss_fa" not in terms


def test_fsa_cdm_without_con_aug_is_simple_plus_beta_fa():
    model = _model(fsa=True)
    params = dataclasses.replace(_params(model), beta=0.5)
    loss, terms = get_objective("fsa_cdm")(model, _batch(), SCHED, params, 0)
    assert "loss_infonce" not in terms
    assert math.isclose(loss.item(), terms["loss_simple"] + 0.5 * terms["loss_fa"], rel_tol=1e-5)


def test_fsa_cdm_composition_and_one_batched_unet_call():
    model = _model(fsa=True, con_aug=True, ccam=True)
    params = dataclasses.replace(_params(model, num_negatives=3), beta=0.3, lambda_=0.7, tau=0.2, infonce_weight=0.4)
    calls = []
    model.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    loss, terms = get_objective("fsa_cdm")(model, _batch(b=4, keys=[1, 1, 2, 3]), SCHED, params, 0)
    assert calls == [4 * (3 + 2)]  # anchor + positive + K negatives, one U-Net call
    expected = (
        terms["loss_simple"]
        + terms["loss_positive"]
        + 0.7 * terms["loss_eubo"]
        + 0.4 * terms["loss_infonce"]
        + 0.3 * terms["loss_fa"]
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert terms["negatives_valid"] == 1.0  # keys 1,1,2,3: every item has a different-markup image


def test_fsa_cdm_at_lambda_zero_skips_the_negatives_it_would_not_read():
    """Table 3's lambda 0 with ``other_items`` InfoNCE: no term reads the K negatives, so only anchor and positive
    run (2B, not (K+2)B), with the same loss and gradients as the full call (its negatives' draws come last from the
    step's own generator, so anchor and positive see the same randomness)."""
    model = _model(fsa=True, con_aug=True, ccam=True)
    base = dataclasses.replace(_params(model, num_negatives=3), infonce_weight=1.0)
    calls = []
    model.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    results = {}
    for lam in (0.0, 1e-30):  # 1e-30: the full call, its EUBO term numerically nothing
        model.zero_grad()
        loss, terms = get_objective("fsa_cdm")(
            model, _batch(b=4, keys=[1, 2, 3, 4]), SCHED, dataclasses.replace(base, lambda_=lam), 0
        )
        loss.backward()
        results[lam] = (loss.item(), terms, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert calls == [4 * 2, 4 * (3 + 2)]
    (fast, fast_terms, fast_grads), (full, full_terms, full_grads) = results[0.0], results[1e-30]
    assert "loss_eubo" not in fast_terms and "loss_eubo" in full_terms  # not computed, so not logged as a number
    assert math.isclose(fast, full, rel_tol=1e-5)
    assert fast_terms["loss_infonce"] == pytest.approx(full_terms["loss_infonce"], rel=1e-5)
    assert len(fast_grads) == len(full_grads)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fast_grads, full_grads))  # float rounding
    own = dataclasses.replace(base, lambda_=0.0, infonce_negatives="own_markup")  # here InfoNCE reads them
    get_objective("fsa_cdm")(model, _batch(b=4, keys=[1, 2, 3, 4]), SCHED, own, 0)
    assert calls[-1] == 4 * (3 + 2)


def test_fsa_cdm_pairs_negatives_with_the_anchor_markup():
    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner
            self.kwargs = None

        def forward(self, *args, **kwargs):
            self.kwargs = kwargs
            return self.module(*args, **kwargs)

    spy = Spy(_model(con_aug=True))
    batch = _batch(b=4, keys=[5, 5, 6, 7])
    get_objective("fsa_cdm")(spy, batch, SCHED, _params(spy.module, num_negatives=2), 0)
    text_index = spy.kwargs["text_index"]
    assert torch.equal(text_index[:8], torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert torch.equal(text_index[8:], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


@pytest.mark.parametrize("reading", ["other_items", "own_markup"])
def test_fsa_cdm_gradients_reach_every_trainable_module(reading):
    model = _model(fsa=True, con_aug=True, ccam=True)
    params = dataclasses.replace(_params(model), infonce_weight=1.0, infonce_negatives=reading)
    loss, terms = get_objective("fsa_cdm")(model, _batch(b=4, keys=[1, 2, 3, 4]), SCHED, params, 0)
    expected = terms["loss_simple"] + terms["loss_positive"] + params.lambda_ * terms["loss_eubo"]
    expected += terms["loss_infonce"] + params.beta * terms["loss_fa"]
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    # the padding row of the token embedding is the only zero gradient allowed, and it is a row, not a tensor
    assert missing == []
    for part in (model.alignment, model.contrastive_head, model.encoder):
        assert any(p.grad.abs().sum() > 0 for p in part.parameters())


def test_fsa_cdm_infonce_weight_zero_keeps_the_head_in_the_graph():
    """At the default ``infonce_weight`` 0 the InfoNCE term is still logged and its head gets ZERO gradients (not
    None), so DDP finds every parameter used; the loss is exactly the weighted sum without it."""
    model = _model(fsa=True, con_aug=True, ccam=True)
    params = _params(model)
    assert params.infonce_weight == 0.0
    loss, terms = get_objective("fsa_cdm")(model, _batch(b=4, keys=[1, 2, 3, 4]), SCHED, params, 0)
    assert terms["loss_infonce"] > 0
    expected = terms["loss_simple"] + terms["loss_positive"] + params.lambda_ * terms["loss_eubo"]
    assert math.isclose(loss.item(), expected + params.beta * terms["loss_fa"], rel_tol=1e-5)
    loss.backward()
    grads = [p.grad for p in model.contrastive_head.parameters()]
    assert all(g is not None and float(g.abs().sum()) == 0.0 for g in grads)


def test_cdcd_is_simple_plus_weighted_contrastive_term():
    model = _model()
    params = _params(model, cdcd_weight=0.25)
    calls = []
    model.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    loss, terms = get_objective("cdcd")(model, _batch(keys=[1, 2, 3, 4]), SCHED, params, 0)
    assert calls == [4 * 3]
    pixels = IMAGE.channels * IMAGE.height * IMAGE.width
    assert math.isclose(loss.item(), terms["loss_simple"] + 0.25 * terms["loss_cdcd"] / pixels, rel_tol=1e-5)
    assert terms["loss_cdcd"] >= 0


def test_cdcd_contrastive_term_is_bounded_and_saturates():
    pos = torch.tensor([0.10, 0.10])
    for scale in (1.0, 10.0, 1e3, 1e6):  # ever worse predictions on the mismatched pairs
        neg = torch.full((2, 3), 0.10 * scale)
        value = contrastive_diffusion_loss(pos, neg, pixels=64)
        assert value >= 0
    assert contrastive_diffusion_loss(pos, torch.full((2, 3), 0.1), pixels=64) == pytest.approx(math.log(4))
    assert contrastive_diffusion_loss(pos, torch.full((2, 3), 1e6), pixels=64) == pytest.approx(0.0, abs=1e-6)
    # worse negatives lower it; a worse positive raises it
    neg = torch.full((2, 3), 0.11)
    base = contrastive_diffusion_loss(pos, neg, pixels=64)
    assert contrastive_diffusion_loss(pos, neg + 0.01, pixels=64) < base
    assert contrastive_diffusion_loss(pos + 0.01, neg, pixels=64) > base
    # by hand: -log(e^{-64*0.1} / (e^{-64*0.1} + 3 e^{-64*0.11}))
    assert float(base) == pytest.approx(math.log(1 + 3 * math.exp(-64 * 0.01)), rel=1e-6)
    # masked negatives drop out; an item without any is left out of the mean
    mask = torch.tensor([[True, False, False], [False, False, False]])
    assert float(contrastive_diffusion_loss(pos, neg, 64, mask)) == pytest.approx(math.log(1 + math.exp(-0.64)))


# -- HCMA ---------------------------------------------------------------------------------------------------------

HCMA = HcmaConfig(global_weight=0.5, local_weight=2.0, patch_size=4, dim=8, layers=1, heads=2, fourier_bands=2)


def _hcma_layout(b: int = 4) -> LayoutBatch:
    """Two boxes per item, each naming one token of the batch's 6 positions; item 3 has no boxes."""
    seg = torch.zeros(b, 2, 6, dtype=torch.bool)
    seg[:3, 0, 1] = seg[:3, 1, 2] = True
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 0.75, 0.75]]]).expand(b, 2, 4).clone()
    return LayoutBatch(boxes, seg.any(-1), seg)


@pytest.mark.parametrize(
    ("name", "switches"),
    [("ddpm", {}), ("ss_dm", {}), ("cdcd", {}), ("fsa_cdm", {}), ("fsa_cdm", {"fsa": True, "con_aug": True})],
)
def test_every_objective_adds_the_hcma_loss_on_its_y_t(name, switches):
    torch.manual_seed(0)
    model = MarkupToImageModel(model_cfg=dataclasses.replace(TINY, **switches), image=IMAGE, vocab_size=30, hcma=HCMA)
    params = dataclasses.replace(_params(model), hcma=HCMA)
    plain_loss, plain_terms = get_objective(name)(model, _batch(seed=3), SCHED, params, 100)
    batch = dataclasses.replace(_batch(seed=3), hcma=HcmaBatch(_hcma_layout(), torch.Generator().manual_seed(9)))
    loss, terms = get_objective(name)(model, batch, SCHED, params, 100)
    assert terms["hcma_boxes"] == 6.0 and {"hcma_global", "hcma_local"} <= set(terms)
    want = plain_loss + 0.5 * terms["hcma_global"] + 2.0 * terms["hcma_local"]
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=0, atol=1e-5)
    assert terms["loss_simple"] == plain_terms["loss_simple"]  # the denoiser saw the same y_t
    loss.backward()
    for part in (model.hcma.vit, model.hcma.global_head, model.hcma.local_head):
        assert all(p.grad is not None for p in part.parameters())
    assert model.hcma.local_head.out[-1].weight.grad.abs().sum() > 0
    assert model.hcma.global_head.mlp[-1].weight.grad.abs().sum() > 0


def test_infonce_readings_pick_different_negatives():
    """other_items: 2(B-1) views of the other items (their own markup); own_markup: the K negative images with the
    anchor's markup. Same batch, same model, different InfoNCE values; with every key alike other_items has none."""
    model = _model(fsa=True, con_aug=True, ccam=True)
    values = {}
    for reading in ("other_items", "own_markup"):
        params = dataclasses.replace(_params(model), infonce_weight=1.0, infonce_negatives=reading)
        _, terms = get_objective("fsa_cdm")(model, _batch(b=4, keys=[1, 2, 3, 4]), SCHED, params, 0)
        values[reading] = terms["loss_infonce"]
    assert values["other_items"] > 0 and values["own_markup"] > 0
    assert not math.isclose(values["other_items"], values["own_markup"], rel_tol=1e-3)
    params = dataclasses.replace(_params(model), infonce_weight=1.0)
    _, terms = get_objective("fsa_cdm")(model, _batch(b=4, keys=[1, 1, 1, 1]), SCHED, params, 0)
    assert terms["loss_infonce"] == 0.0


def test_negatives_come_from_the_global_micro_batch_in_the_same_distribution():
    """Two processes holding 2 items each draw K = 3 negatives per item from the global micro-batch of 4 (the pool),
    as one process holding all 4 does: every item's negatives spread evenly over the other-markup items of the
    global batch, whichever process holds it (K = 3 > 2 items per process would not fit a per-shard choice)."""
    keys = torch.tensor([10, 11, 12, 10])  # items 0 and 3 share a markup
    k, trials = 3, 3000
    counts = {world: torch.zeros(4, 4) for world in (1, 2)}
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        index, valid = choose_negatives(keys, k, g)  # one process: its batch is the pool
        counts[1].index_put_((torch.arange(4)[:, None].expand(4, k), index), torch.ones(4, k), accumulate=True)
        for rank in (0, 1):
            share = keys[2 * rank : 2 * rank + 2]
            index, valid = choose_negatives(share, k, torch.Generator().manual_seed(trial + rank), pool_keys=keys)
            assert valid.all()
            rows = (torch.arange(2)[:, None] + 2 * rank).expand(2, k)
            counts[2].index_put_((rows, index), torch.ones(2, k), accumulate=True)
    for world in (1, 2):
        freq = counts[world] / (trials * k)
        differ = (keys[:, None] != keys[None, :]).float()
        assert torch.equal(freq > 0, differ > 0)  # never an item with the anchor's markup, every other one
        expected = differ / differ.sum(1, keepdim=True)
        assert (freq - expected).abs().max() < 0.03, f"world {world}: {freq}"


def test_objectives_draw_negative_images_from_the_pool():
    """With a pool, the negative views are pool images: here a constant image the batch does not hold."""
    model = RecordingDenoiser()
    batch = _batch(b=2, keys=[1, 2], t=[0, 0])  # t = 0: a noisy view is its clean image to ~1%
    pool = NegativePool(torch.full((3, 1, IMAGE.height, IMAGE.width), 0.25), torch.tensor([1, 2, 3]))
    params = _params(_model(), num_negatives=2)
    get_objective("cdcd")(model, dataclasses.replace(batch, negative_pool=pool), SCHED, params, 0)
    sample = model.calls[0][0]  # [y_t (B); negatives (B*k)]
    assert sample.shape[0] == 2 + 2 * 2
    assert (sample[2:] - 0.25).abs().max() < 0.1
    assert (sample[:2] - 0.25).abs().max() > 0.5  # the anchors are the batch's own (random) images
