"""HCMA guidance at sampling time and grounded generation (design §8).

At every sampler step the alignment energy

    E(x_t) = guidance_global * L_global(x_t, t, markup) + guidance_local * L_local(x_t, t, markup, layout)

(per item, from :class:`markup2image.models.hcma.HcmaModule`) is differentiated with respect to ``x_t`` and added
to the noise prediction, classifier-guidance style (Dhariwal & Nichol 2021, eq. 14, with ``E = -log p(c | x_t)``):

    eps_hat = eps_theta(x_t, t, markup) + sqrt(1 - alpha_bar_t) * grad_x E(x_t)

so the sampler's x̂0 moves along ``-grad E`` and each step lowers the alignment loss. The scheduler then steps
with ``eps_hat`` unchanged (DDIM, DDPM and DPM-Solver++ alike). Grounded generation passes a layout (boxes of
markup segments, :mod:`markup2image.data.layouts`): the local term pulls each segment towards its box.

:func:`guided_sample_images` runs :func:`markup2image.diffusion.sampling.sample_images` itself on a
:class:`GuidedDenoiser` (the model with that one change to its noise prediction): same loop, schedulers and
numpy-seeded noise. With both scales 0 it returns exactly what ``sample_images`` returns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from markup2image.config import DiffusionConfig
from markup2image.data.layout_tensors import LayoutBatch, layout_batch
from markup2image.data.layouts import draw_boxes, read_layout_file
from markup2image.diffusion.sampling import make_scheduler, sample_images, to_uint8
from markup2image.io import save_png
from markup2image.models.hcma import HcmaModule, load_hcma
from markup2image.models.model import MODEL_CONFIG, load_model
from markup2image.text.tokenizer import encode_batch, load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["GuidedDenoiser", "alignment_energy", "alignment_guidance", "guided_sample_images", "sample_with_layout"]


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


class GuidedDenoiser:
    """A denoiser (``image``, ``encode``, ``denoise``) whose noise prediction carries the HCMA guidance:
    ``denoise(x_t, t, hidden, mask) = eps_theta + sqrt(1 - alpha_bar_t) * grad_x E(x_t)``.

    :func:`markup2image.diffusion.sampling.sample_images` runs it like any model, so guided sampling shares its
    loop, schedulers and noise. ``alphas_cumprod [T]``: the training schedule's ``alpha_bar``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        hcma: HcmaModule,
        alphas_cumprod: torch.Tensor,
        layout: LayoutBatch | None,
        *,
        guidance_global: float,
        guidance_local: float,
    ) -> None:
        self.model, self.hcma, self.image = model, hcma, model.image
        self.unet = getattr(model, "unet", None)  # what sample_images' cross-attention K/V cache looks for
        self.alphas_cumprod, self.layout = alphas_cumprod, layout
        self.scales = {"guidance_global": guidance_global, "guidance_local": guidance_local}

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(input_ids, attention_mask)

    def denoise(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        eps = self.model.denoise(x_t, timesteps, hidden, mask)  # (B, C, H, W)
        grad, _ = alignment_guidance(self.hcma, x_t, timesteps, hidden, mask, self.layout, **self.scales)
        abar = self.alphas_cumprod[timesteps.cpu()].to(device=x_t.device, dtype=eps.dtype)  # (B,)
        return eps + (1.0 - abar).sqrt().view(-1, 1, 1, 1) * grad


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
    guidance_scale: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample one batch with HCMA guidance (or classifier-free guidance, ``guidance_scale``, not both).
    ``input_ids, attention_mask [B, N]`` -> images in [-1, 1],
    ``[B, C, H, W]`` float32. ``layout`` (boxes over the same ``N`` token positions) enables the local term.
    Without guidance (scales 0, or only a local scale and no layout) this is exactly ``sample_images``."""
    kw = dict(sampler=sampler, steps=steps, seed=seed, diffusion=diffusion, progress=progress)
    kw |= dict(guidance_scale=guidance_scale, uncond=uncond)
    if (guidance_global > 0 or guidance_local > 0) and hcma is None:
        raise ValueError("hcma.guidance_global / hcma.guidance_local: guidance needs a model trained with HCMA")
    if guidance_local > 0 and layout is None:
        log.warning("hcma.guidance_local is %g but no layout was given: local guidance is off", guidance_local)
        guidance_local = 0.0
    if hcma is None or not (guidance_global > 0 or guidance_local > 0):
        return sample_images(model, input_ids, attention_mask, **kw)
    if guidance_scale != 1.0:
        raise ValueError("evaluate.guidance_scale: classifier-free guidance and HCMA guidance do not combine")
    alphas = make_scheduler(sampler, diffusion).alphas_cumprod  # (T,) the training schedule
    layout = layout.to(input_ids.device) if layout is not None and guidance_local > 0 else None
    guided = GuidedDenoiser(
        model, hcma, alphas, layout, guidance_global=guidance_global, guidance_local=guidance_local
    )
    return sample_images(guided, input_ids, attention_mask, **kw)


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

    The HCMA module is the model's own (``model.hcma``) or one saved beside it (:func:`save_hcma`). Guidance
    scales default to the ``hcma.guidance_*`` values the HCMA module was trained with; the diffusion schedule to the
    model's training params. Raises ``ValueError`` naming the file or key on bad input (a box outside the image,
    a segment outside the markup, no box naming any segment).
    """

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_CONFIG).exists():
        raise FileNotFoundError(f"{model_dir}: not a trained model folder (expected models/<domain>/model)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_dir, map_location=device).to(device)
    hcma = model.hcma if model.hcma is not None else load_hcma(model_dir, map_location=device)
    if hcma is None:
        raise ValueError(
            f"{model_dir}: the model has no HCMA module; train it with hcma.global_weight or hcma.local_weight > 0"
        )
    hcma = hcma.to(device)
    g = hcma.cfg.guidance_global if guidance_global is None else guidance_global
    lo = hcma.cfg.guidance_local if guidance_local is None else guidance_local
    diffusion = model.diffusion
    tok = load_tokenizer(model_dir)
    ids, mask = encode_batch(tok, [markup], model.model_cfg.max_text_length)
    boxes = read_layout_file(layout_path) if layout_path is not None else []
    layout = None
    if boxes:
        hw = (model.image.height, model.image.width)
        for i, b in enumerate(boxes):
            if min(b["box"]) < 0 or b["box"][2] > hw[1] or b["box"][3] > hw[0]:
                raise ValueError(f"{layout_path}: box {i} {b['box']} is outside the model's {hw[1]}x{hw[0]} image")
        try:
            layout = layout_batch([boxes], [markup], tok, ids.shape[1], hw, hcma.cfg.max_boxes)
        except ValueError as exc:
            raise ValueError(f"{layout_path}: {exc}") from None
        if not bool(layout.box_mask.any()):
            raise ValueError(f"{layout_path}: no box names a segment of the markup {markup[:60]!r}")
        if lo <= 0:
            log.warning("%s: hcma.guidance_local is 0, so the layout does not steer the sample", layout_path)
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
