"""HCMA guidance at sampling time and grounded generation (design §8).

At every sampler step the alignment energy

    E(x_t) = guidance_global * L_global(x_t, t, markup) + guidance_local * L_local(x_t, t, markup, layout)

(per item, from :class:`markup2image.models.hcma.HcmaModule`) is differentiated with respect to ``x_t`` and added
to the noise prediction, classifier-guidance style (Dhariwal & Nichol 2021, eq. 14, with ``E = -log p(c | x_t)``):

    eps_hat = eps_theta(x_t, t, markup) + sqrt(1 - alpha_bar_t) * grad_x E(x_t)

so the sampler's x̂0 moves along ``-grad E`` and each step lowers the alignment loss. The scheduler then steps
with ``eps_hat`` unchanged (DDIM, DDPM and DPM-Solver++ alike). Grounded generation passes a layout (boxes of
markup segments, :mod:`markup2image.data.layouts`): the local term pulls each segment towards its box.

:func:`guided_sample_images` is :func:`markup2image.diffusion.sampling.sample_images` with that one change: same
schedulers (``make_scheduler``), same numpy-seeded noise (one ``default_rng(seed)`` per batch: the initial noise,
then the DDPM variance noise step by step). With both scales 0 it returns exactly what ``sample_images`` returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from markup2image.config import DiffusionConfig
from markup2image.diffusion.sampling import check_steps, eta_for, make_scheduler, to_uint8
from markup2image.models.hcma import HcmaModule, LayoutBatch

log = logging.getLogger(__name__)

__all__ = ["alignment_energy", "alignment_guidance", "guided_sample_images", "sample_with_layout"]


def alignment_energy(
    hcma: HcmaModule,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    layout: LayoutBatch | None,
    *,
    guidance_global: float,
    guidance_local: float,
) -> torch.Tensor:
    """Per-item energy ``E [B]`` = ``guidance_global * L_global + guidance_local * L_local`` (mean over the item's
    valid boxes; 0 for an item without boxes). Differentiable in ``x_t [B, C, H, W]``."""
    if guidance_global > 0 and hcma.global_head is None:
        raise ValueError("hcma.guidance_global: the model's HCMA module has no global head (trained with weight 0)")
    if guidance_local > 0 and hcma.local_head is None:
        raise ValueError("hcma.guidance_local: the model's HCMA module has no local head (trained with weight 0)")
    parts = hcma.alignment_losses(
        x_t, timesteps, hidden, mask, layout, use_global=guidance_global > 0, use_local=guidance_local > 0
    )
    energy = x_t.new_zeros(x_t.shape[0])
    if "global" in parts:
        energy = energy + guidance_global * parts["global"]
    if "local_sum" in parts:
        energy = energy + guidance_local * parts["local_sum"] / parts["local_count"].clamp(min=1.0)
    return energy


def alignment_guidance(
    hcma: HcmaModule,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    layout: LayoutBatch | None,
    *,
    guidance_global: float,
    guidance_local: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_x E [B, C, H, W]`` and ``E [B]`` at ``x_t`` (items do not mix: E is summed before the gradient)."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        energy = alignment_energy(
            hcma, x, timesteps, hidden.detach(), mask, layout,
            guidance_global=guidance_global, guidance_local=guidance_local,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return grad, energy.detach()


@torch.no_grad()
def guided_sample_images(
    model: torch.nn.Module,
    hcma: HcmaModule | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    seed: int,
    diffusion: DiffusionConfig,
    guidance_global: float = 0.0,
    guidance_local: float = 0.0,
    layout: LayoutBatch | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one batch with HCMA guidance. ``input_ids, attention_mask [B, N]`` -> images in [-1, 1],
    ``[B, C, H, W]`` float32. ``layout`` (boxes over the same ``N`` token positions) enables the local term."""
    check_steps(sampler, steps, diffusion)
    guided = hcma is not None and (guidance_global > 0 or (guidance_local > 0 and layout is not None))
    if (guidance_global > 0 or guidance_local > 0) and hcma is None:
        raise ValueError("hcma.guidance_global / hcma.guidance_local: guidance needs a model trained with HCMA")
    if guidance_local > 0 and layout is None:
        log.warning("hcma.guidance_local is %g but no layout was given: local guidance is off", guidance_local)
    device = input_ids.device
    img = model.image
    shape = (input_ids.shape[0], img.channels, img.height, img.width)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(device)
    sched = make_scheduler(sampler, diffusion)
    sched.set_timesteps(steps)
    hidden = model.encode(input_ids, attention_mask)  # (B, N, D), once per batch
    layout = layout.to(device) if layout is not None else None
    eta = eta_for(sampler)
    for t in tqdm(sched.timesteps, desc=f"guided {sampler} sampling", disable=not progress, leave=False):
        tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        eps = model.denoise(x, tt, hidden, attention_mask)
        if guided:
            assert hcma is not None
            grad, _ = alignment_guidance(
                hcma, x, tt, hidden, attention_mask, layout if guidance_local > 0 else None,
                guidance_global=guidance_global, guidance_local=guidance_local,
            )  # fmt: skip
            sigma = (1.0 - sched.alphas_cumprod[int(t)]).sqrt().to(device=device, dtype=eps.dtype)
            eps = eps + sigma * grad
        if isinstance(sched, DDIMScheduler):
            noise = None
            if eta > 0:
                noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(device)
            x = sched.step(eps, int(t), x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
        else:
            x = sched.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def sample_with_layout(
    model_dir: str | Path,
    markup: str,
    layout_path: str | Path | None,
    out: str | Path,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    guidance_global: float | None = None,
    guidance_local: float | None = None,
    boxes_out: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Grounded generation: sample ``markup`` with a trained model, its segments anchored at the boxes of
    ``layout_path`` (a JSON list of boxes or ``{"boxes": [...]}``, each with ``box`` in pixels and ``chars`` or
    ``span``; a render stage's ``layouts/<id>.json`` works as is). Writes the uint8 image to ``out`` (and, with
    ``boxes_out``, a copy with the boxes drawn) and returns it.

    Guidance scales default to the ``hcma.guidance_*`` values the HCMA module was trained with; the diffusion
    schedule to the model's training params. Raises ``ValueError`` naming the file or key on bad input.
    """
    from markup2image.config import _check_type
    from markup2image.data.layouts import draw_boxes, read_layout_file
    from markup2image.io import save_png
    from markup2image.models.hcma import layout_batch, load_hcma
    from markup2image.models.model import MODEL_CONFIG, load_model
    from markup2image.text.tokenizer import encode_batch, load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_CONFIG).exists():
        raise FileNotFoundError(f"{model_dir}: not a trained model folder (expected models/<domain>/model)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_dir, map_location=device).to(device)
    hcma = load_hcma(model_dir, map_location=device)
    if hcma is None:
        raise ValueError(
            f"{model_dir}: the model has no HCMA module; train it with hcma.global_weight or hcma.local_weight > 0"
        )
    hcma = hcma.to(device)
    g = hcma.cfg.guidance_global if guidance_global is None else guidance_global
    lo = hcma.cfg.guidance_local if guidance_local is None else guidance_local
    saved = json.loads((model_dir / MODEL_CONFIG).read_text()).get("params", {})
    diffusion = _check_type(saved.get("diffusion", {}), DiffusionConfig, "diffusion")
    tok = load_tokenizer(model_dir)
    ids, mask = encode_batch(tok, [markup], model.model_cfg.max_text_length)
    boxes = read_layout_file(layout_path) if layout_path is not None else []
    layout = None
    if boxes:
        hw = (model.image.height, model.image.width)
        layout = layout_batch([boxes], [markup], tok, ids.shape[1], hw, hcma.cfg.max_boxes)
        if not bool(layout.box_mask.any()):
            raise ValueError(f"{layout_path}: no box names a segment of the markup {markup[:60]!r}")
    images = guided_sample_images(
        model, hcma, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
        sampler=sampler, steps=steps, seed=seed, diffusion=diffusion,
        guidance_global=g, guidance_local=lo, layout=layout, progress=progress,
    )  # fmt: skip
    image = to_uint8(images)[0]
    save_png(out, image)
    if boxes_out is not None:
        save_png(boxes_out, draw_boxes(image, boxes, scale=2))
    log.info("grounded sample (%d boxes, guidance %g/%g) -> %s", len(boxes), g, lo, out)
    return image
