"""The loss terms against hand-computed values."""

from __future__ import annotations

import math

import torch

from markup2image.diffusion.losses import (
    eubo_term,
    fine_grained_alignment_loss,
    info_nce_loss,
    same_batch_info_nce_loss,
    simple_loss,
)


def test_simple_loss_is_per_item_pixel_mean():
    pred = torch.zeros(2, 1, 2, 2)
    eps = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    # item 0: mean(1,1,1,1) = 1; item 1: mean(4,0,0,0) = 1
    assert torch.allclose(simple_loss(pred, eps), torch.tensor([1.0, 1.0]))


def _fa_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # item 0: tokens 0, 1 valid, token 2 padding.
    #   cos(c0, t0) = 1, cos(c0, t1) = 1/sqrt2; cos(c1, t1) = 1/sqrt2, cos(c1, t0) = 0.
    #   i=0: 1 - 1 + 0.7071/1 = 0.7071;  i=1: 1 - 0.7071 + 0/1 = 0.2929;  L = (0.7071 + 0.2929)/2 = 0.5
    # item 1: one valid token, cos(c0, t0) = 1, no other tokens -> L = 0
    # batch mean: (0.5 + 0) / 2 = 0.25
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[0.0, 1.0], [3.0, -1.0], [2.0, 2.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [9.0, -9.0]], [[0.0, 2.0], [1.0, 7.0], [-4.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return c, t, mask


def test_fine_grained_alignment_loss_hand_computed():
    c, t, mask = _fa_example()
    assert math.isclose(fine_grained_alignment_loss(c[:1], t[:1], mask[:1]).item(), 0.5, abs_tol=1e-6)
    assert math.isclose(fine_grained_alignment_loss(c, t, mask).item(), 0.25, abs_tol=1e-6)


def test_fine_grained_alignment_loss_ignores_padding():
    c, t, mask = _fa_example()
    c2, t2 = c.clone(), t.clone()
    c2[0, 2], t2[0, 2] = torch.tensor([-3.0, 8.0]), torch.tensor([0.5, -0.1])
    c2[1, 1:], t2[1, 1:] = torch.randn(2, 2), torch.randn(2, 2)
    assert math.isclose(fine_grained_alignment_loss(c2, t2, mask).item(), 0.25, abs_tol=1e-6)
    # a valid token does count: with c1 = (1, 1) = t1 in item 0, i=1 becomes 1 - cos(c1, t1) + cos(c1, t0)
    # = 1 - 1 + 0.7071; L = (0.7071 + 0.7071) / 2 = 0.7071
    c3 = c.clone()
    c3[0, 1] = torch.tensor([1.0, 1.0])
    assert math.isclose(fine_grained_alignment_loss(c3[:1], t[:1], mask[:1]).item(), 1 / math.sqrt(2), abs_tol=1e-6)


def test_eubo_term_hand_computed():
    neg = torch.tensor([[0.0, math.log(2) / 2], [math.log(2), 100.0], [0.3, 0.4]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    # row 0: (e^0 + e^{-ln2}) / 2 = (1 + 0.5) / 2 = 0.75; row 1: e^{-2 ln2} = 0.25 (100 masked);
    # row 2: no valid negative -> left out.  mean = (0.75 + 0.25) / 2 = 0.5
    assert math.isclose(eubo_term(neg, valid).item(), 0.5, abs_tol=1e-6)
    # without a mask every entry counts: row 1 -> (0.25 + e^-200)/2, row 2 -> (e^-0.6 + e^-0.8)/2
    expected = (0.75 + 0.125 + (math.exp(-0.6) + math.exp(-0.8)) / 2) / 3
    assert math.isclose(eubo_term(neg).item(), expected, abs_tol=1e-6)


def test_info_nce_hand_computed():
    anchor = torch.tensor([[2.0, 0.0]])  # normalised inside -> (1, 0)
    positive = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]])
    # tau = 0.5: logits pos 1/0.5 = 2, negatives 0 and -2
    # L = -log(e^2 / (e^2 + e^0 + e^-2)) = log(1 + e^-2 + e^-4) = 0.142932
    loss = info_nce_loss(anchor, positive, negatives, tau=0.5)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-2) + math.exp(-4)), abs_tol=1e-6)
    # masking the second negative: log(1 + e^-2) = 0.126928
    masked = info_nce_loss(anchor, positive, negatives, tau=0.5, negative_mask=torch.tensor([[True, False]]))
    assert math.isclose(masked.item(), math.log(1 + math.exp(-2)), abs_tol=1e-6)


def test_info_nce_items_without_negatives_are_left_out_and_finite():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    positive = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    negatives = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])
    mask = torch.tensor([[True], [False]])
    loss = info_nce_loss(anchor, positive, negatives, tau=1.0, negative_mask=mask)
    # only item 0: log(1 + e^{0 - 1}) = log(1 + e^-1)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1)), abs_tol=1e-6)
    loss.backward()
    assert torch.isfinite(anchor.grad).all()


def test_same_batch_info_nce_uses_the_other_items_views():
    # three items; items 1 and 2 share a markup key, so they are not each other's negatives
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    keys = torch.tensor([7, 8, 8])
    loss = same_batch_info_nce_loss(anchor, positive, keys, tau=1.0)
    # item 0: pos a0.p0 = 1; negatives a0.a1 = a0.a2 = a0.p1 = 0 and a0.p2 = 1
    l0 = -math.log(math.e / (math.e + 1 + 1 + 1 + math.e))
    # item 1: pos a1.p1 = 1; negatives (item 0 only) a1.a0 = 0, a1.p0 = 0
    l1 = -math.log(math.e / (math.e + 1 + 1))
    # item 2: pos a2.p2 = 0 (normalised (0,1).(1,0)); negatives a2.a0 = 0, a2.p0 = 0
    l2 = -math.log(1 / 3)
    assert math.isclose(loss.item(), (l0 + l1 + l2) / 3, abs_tol=1e-6)
    # an item whose every other item shares its markup is left out; all alike -> no term at all
    assert same_batch_info_nce_loss(anchor, positive, torch.tensor([1, 1, 1]), tau=1.0).item() == 0.0
