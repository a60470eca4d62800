"""The loss terms of the objectives (design §4-5), as pure functions of tensors.

* :func:`simple_loss`: ``L_simple = ||eps - eps_theta||^2`` averaged over pixels, per item.
* :func:`fine_grained_alignment_loss`: FSA-CDM's ``L_fa`` over the valid markup tokens.
* :func:`eubo_term`: the EUBO-side term ``mean_k exp(-2 L_simple(negative_k))`` of eq. 10.
* :func:`info_nce_loss`: InfoNCE of an anchor against one positive and K (maskable) negatives.
* :func:`same_batch_info_nce_loss`: InfoNCE whose negatives are the other items' views (SimCLR's same batch).
* :func:`contrastive_diffusion_loss`: CDCD's contrastive term, InfoNCE whose scores are the negative denoising losses.
* :func:`global_alignment_loss`, :func:`local_alignment_loss`: HCMA's ``1 - cos`` of image and markup features,
  per item and per layout box (design §8, :mod:`markup2image.models.hcma`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_loss_weights(alpha_bar: torch.Tensor, prediction_type: str, snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-item weights ``[B]`` on ``||eps - eps_hat||^2`` that train a parameterisation in its own space.

    With ``SNR = ab / (1 - ab)``: ``||y0 - y0_hat||^2 = ||eps - eps_hat||^2 / SNR`` and
    ``||v - v_hat||^2 = ||eps - eps_hat||^2 (1 + SNR) / SNR``, so ``epsilon`` has weight 1, ``sample`` ``1 / SNR``
    and ``v_prediction`` ``(1 + SNR) / SNR``. ``snr_gamma > 0``: min-SNR-gamma (Hang et al. 2023, eq. 6),
    ``min(SNR, gamma) ||y0 - y0_hat||^2``, i.e. weight ``min(SNR, gamma) / SNR`` whatever the parameterisation.
    ``alpha_bar``: ``[B]``.
    """
    ab = alpha_bar.float()
    snr = ab / (1.0 - ab)
    if snr_gamma > 0:
        return snr.clamp(max=snr_gamma) / snr
    if prediction_type == "epsilon":
        return torch.ones_like(ab)
    if prediction_type == "sample":
        return 1.0 / snr
    if prediction_type == "v_prediction":
        return (1.0 + snr) / snr
    raise ValueError(f"diffusion.prediction_type: unknown {prediction_type!r}")


def simple_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``L_simple = ||eps - eps_theta||^2`` (DDPM, Ho et al. 2020, eq. 14) averaged over pixels: ``[B, C, H, W]`` ->
    ``[B]``."""
    return F.mse_loss(eps_pred.float(), eps.float(), reduction="none").flatten(1).mean(1)


def fine_grained_alignment_loss(c: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``L_fa`` of FSA-CDM, averaged over items.

    Per item with ``n`` valid tokens:
    ``L_fa = 1/n sum_i [ 1 - cos(c_i, t_i) + 1/(n-1) sum_{j != i} cos(c_i, t_j) ]``, sums over valid ``i, j`` only.
    With ``n = 1`` the second sum is empty and counts as 0.

    Args:
        c: aligned features ``CAM(q=t, k=vs, v=vs)``, ``[B, N, D]``.
        t: markup features, ``[B, N, D]``.
        attention_mask: ``[B, N]``, 1 for real tokens, 0 for padding.
    """
    sim = F.normalize(c.float(), dim=-1) @ F.normalize(t.float(), dim=-1).transpose(1, 2)  # (B, N, N) cos(c_i, t_j)
    valid = attention_mask.to(sim.dtype)  # (B, N)
    n = valid.sum(1)  # (B,)
    own = sim.diagonal(dim1=1, dim2=2)  # (B, N) cos(c_i, t_i)
    others = (sim * valid[:, None, :]).sum(-1) - own * valid  # (B, N) sum over valid j != i
    per_token = 1.0 - own + others / (n - 1).clamp(min=1)[:, None]
    per_item = (per_token * valid).sum(1) / n.clamp(min=1)
    return per_item.mean()


def _mean_over_items_with_negatives(per_item: torch.Tensor, negative_mask: torch.Tensor) -> torch.Tensor:
    has = negative_mask.any(1).to(per_item.dtype)  # (B,)
    return (per_item * has).sum() / has.sum().clamp(min=1)


def eubo_term(negative_simple: torch.Tensor, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_b mean_k exp(-2 L_simple(negative_bk))`` over valid negatives (the ``lambda e^{2 L_elbo}`` term).

    ``negative_simple [B, K]`` (``L_simple`` of each negative), ``negative_mask [B, K]`` bool (True = a real
    negative). Items without any valid negative are left out of the mean over items.
    """
    if negative_mask is None:
        negative_mask = torch.ones_like(negative_simple, dtype=torch.bool)
    weight = negative_mask.to(negative_simple.dtype)
    per_item = (torch.exp(-2.0 * negative_simple) * weight).sum(1) / weight.sum(1).clamp(min=1)
    return _mean_over_items_with_negatives(per_item, negative_mask)


def info_nce_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    tau: float,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE ``-log( e^{a.p/tau} / (e^{a.p/tau} + sum_k e^{a.n_k/tau}) )`` of L2-normalised vectors.

    Args:
        anchor, positive: ``[B, P]``; negatives: ``[B, K, P]`` (normalised here).
        tau: temperature.
        negative_mask: ``[B, K]`` bool, True = a real negative; masked ones drop out of the denominator. Items
            without any valid negative are left out of the mean over items.
    """
    a = F.normalize(anchor.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    n = F.normalize(negatives.float(), dim=-1)
    pos = (a * p).sum(-1, keepdim=True) / tau  # (B, 1)
    neg = torch.einsum("bp,bkp->bk", a, n) / tau  # (B, K)
    if negative_mask is None:
        negative_mask = torch.ones(neg.shape, dtype=torch.bool, device=neg.device)
    return _nce(pos, neg, negative_mask)


def same_batch_info_nce_loss(
    anchor: torch.Tensor, positive: torch.Tensor, markup_keys: torch.Tensor, tau: float
) -> torch.Tensor:
    """InfoNCE with SimCLR's same-batch negatives: for anchor ``i`` the positive is ``positive_i`` and the negatives
    are the anchors and positives of every item ``j`` whose markup key differs (each view conditioned on its own
    markup), so telling them apart never asks the denoiser to ignore the markup.

    ``anchor``, ``positive``: ``[B, P]``; ``markup_keys``: ``[B]``. Items without any differing item are left out.
    """
    a = F.normalize(anchor.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    pos = (a * p).sum(-1, keepdim=True) / tau  # (B, 1)
    neg = a @ torch.cat([a, p]).T / tau  # (B, 2B): other anchors, then other positives
    differ = markup_keys[:, None] != markup_keys[None, :]  # (B, B)
    return _nce(pos, neg, torch.cat([differ, differ], dim=1))


def _nce(pos: torch.Tensor, neg: torch.Tensor, negative_mask: torch.Tensor) -> torch.Tensor:
    """``-log softmax`` of the positive logit ``[B, 1]`` among ``[pos, neg [B, K]]``, masked negatives dropped."""
    neg = neg.masked_fill(~negative_mask, float("-inf"))
    per_item = -torch.log_softmax(torch.cat([pos, neg], dim=1), dim=1)[:, 0]  # (B,)
    return _mean_over_items_with_negatives(per_item, negative_mask)


def contrastive_diffusion_loss(
    positive_simple: torch.Tensor,
    negative_simple: torch.Tensor,
    pixels: int,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CDCD's contrastive diffusion term (Zhu et al., ICLR 2023): InfoNCE whose score of an image-markup pair
    is ``exp(-L)``, ``L`` the pair's denoising (ELBO-step) loss summed over the ``pixels`` dimensions:
    ``-log( e^{-L_pos} / (e^{-L_pos} + sum_k e^{-L_neg_k}) )``.

    Bounded below by 0: it saturates once every negative denoises clearly worse than the positive, instead of
    rewarding arbitrarily wrong predictions on mismatched pairs. ``positive_simple [B]`` and ``negative_simple
    [B, K]`` are per-pixel means (:func:`simple_loss`); ``negative_mask [B, K]`` as in :func:`info_nce_loss`.
    Returns the mean over items in nats (callers that train on per-pixel means divide by ``pixels``).
    """
    if negative_mask is None:
        negative_mask = torch.ones_like(negative_simple, dtype=torch.bool)
    return _nce(-pixels * positive_simple.float()[:, None], -pixels * negative_simple.float(), negative_mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` (broadcastable, 0/1 or bool) is set; 0 where nothing is set."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def global_alignment_loss(g: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per item ``1 - cos(g_b, t_bar_b)`` ``[B]``; ``g [B, D]``, ``hidden [B, N, D]``, ``mask [B, N]``."""
    pooled = masked_mean(hidden, mask[..., None], dim=1)  # (B, D)
    return 1.0 - F.cosine_similarity(g, pooled, dim=-1)


def local_alignment_loss(
    f: torch.Tensor, hidden: torch.Tensor, segment_mask: torch.Tensor, box_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item sum over valid boxes of ``1 - cos(f_k, s_k)`` ``[B]`` and the number of valid boxes ``[B]``.

    ``f [B, K, D]``; ``s_k`` = mean of ``hidden [B, N, D]`` over ``segment_mask [B, K, N]``; ``box_mask [B, K]``
    (:class:`~markup2image.data.layout_tensors.LayoutBatch`).
    """
    seg = segment_mask.to(hidden.dtype)  # (B, K, N)
    s = torch.einsum("bkn,bnd->bkd", seg, hidden) / seg.sum(-1, keepdim=True).clamp(min=1.0)  # (B, K, D)
    valid = box_mask.to(hidden.dtype)  # (B, K)
    per_box = 1.0 - F.cosine_similarity(f, s, dim=-1)  # (B, K)
    return (per_box * valid).sum(-1), valid.sum(-1)
