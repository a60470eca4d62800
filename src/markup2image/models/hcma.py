"""HCMA for markup (design §8): global and local image-markup alignment on the noisy image ``y_t``.

Adapted from "Hierarchical Cross-modal Alignment for Grounded Text-to-Image Generation" (HCMA, 2025):

* **Global alignment.** A small ViT reads the patches of ``y_t`` (timestep embedding added to every token) with a
  [CLS] token; an MLP maps [CLS] to the markup feature size ``D``. ``L_global = 1 - cos(g, t_bar)`` with ``t_bar``
  the masked mean of the markup features ``t [B, N, D]`` over valid tokens.
* **Local alignment.** Each layout box ``k`` (a markup segment, :mod:`markup2image.data.layouts`) gets a Fourier
  embedding of its coordinates, fused with the patch features of ``y_t`` (``GELU(W_p v_p + W_b e_k)``) and
  mean-pooled over the patches whose centres fall inside the box (a box too small to hold a patch centre uses the
  patch under its own centre, so no box is empty); an MLP projects the pooled feature to ``D``.
  ``L_local = mean over valid boxes of 1 - cos(f_k, s_k)``, ``s_k`` the mean markup feature of the segment's tokens.
  The local patch features come from a convolutional patch encoder whose receptive field is the patch (plus one
  pixel), NOT from the ViT: see :class:`LocalPatchEncoder` for the shortcut that ViT features allowed.
* ``hcma.translate`` (training): each (``y_t``, boxes) pair is rolled by a random in-canvas offset
  (:func:`random_translate`), since every training image shows its segments at one place only.
* ``hcma.global_weight`` / ``hcma.local_weight`` weight the two losses in the training loss; a module whose weight
  is 0 is not built, and with both at 0 :func:`build_hcma` returns None (no parameters at all).
* With ``hcma.detach_text`` (default) the markup features are a fixed target here: the alignment trains the image
  side and cannot pull the markup encoder towards a collapsed, trivially alignable representation.
* ``hcma.center_text`` (default): both targets use the markup features minus their mean: the batch's in training
  (the jointly trained encoder keeps moving), the running mean (a buffer, :data:`TEXT_MEAN_MOMENTUM`) at sampling.
  Uncentred, ``1 - cos`` is reached by predicting the features' common direction from pure noise, and guidance
  vanishes: docs/decisions.md §8.

Layouts as tensors (boxes -> markup token positions): :mod:`markup2image.data.layout_tensors`; the two losses:
:mod:`markup2image.diffusion.losses`.

Training: the denoiser owns the module as its ``hcma`` submodule (``MarkupToImageModel`` built with the ``hcma``
params), so the optimizer, EMA, DDP, checkpoints and ``model.save`` carry it: the model folder's
``model_config.json`` holds its config under ``hcma_module`` and ``model.safetensors`` its ``hcma.*`` weights.
:func:`save_hcma` writes a module trained on its own beside a model (``hcma_config.json`` + ``hcma.safetensors``);
:func:`load_hcma` reads either, so sampling-time guidance (:mod:`markup2image.diffusion.guidance`) finds it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from markup2image.config import DomainConfig, HcmaConfig, check_type
from markup2image.data.layout_tensors import LayoutBatch
from markup2image.diffusion.losses import global_alignment_loss, local_alignment_loss, masked_mean
from markup2image.io import atomic_open

__all__ = [
    "HCMA_CONFIG",
    "HCMA_WEIGHTS",
    "GlobalAlignmentHead",
    "HcmaModule",
    "LocalAlignmentHead",
    "LocalPatchEncoder",
    "NoisyImageViT",
    "build_hcma",
    "fourier_box_embedding",
    "hcma_loss",
    "load_hcma",
    "random_translate",
    "save_hcma",
]

HCMA_CONFIG = "hcma_config.json"
HCMA_WEIGHTS = "hcma.safetensors"
TEXT_MEAN_MOMENTUM = 0.99  # running mean of the markup features (hcma.center_text); bias-corrected at the start


# ----------------------------------------------------------------------------------------------------------------
# modules


def fourier_box_embedding(boxes: torch.Tensor, bands: int) -> torch.Tensor:
    """``[..., 4]`` boxes in [0, 1] -> ``[..., 8 * bands]``: sin and cos of ``2^j pi x``, j < bands, per coordinate."""
    freqs = math.pi * 2.0 ** torch.arange(bands, device=boxes.device, dtype=boxes.dtype)  # (F,)
    angles = boxes[..., None] * freqs  # (..., 4, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., 4 * 2F)


def patch_grid(image: DomainConfig, patch_size: int) -> tuple[int, int]:
    """``(Hp, Wp)`` patches of ``patch_size`` pixels; raises naming ``hcma.patch_size`` if they do not tile."""
    if image.height % patch_size or image.width % patch_size:
        raise ValueError(f"hcma.patch_size: {patch_size} does not divide the {image.height}x{image.width} image")
    return image.height // patch_size, image.width // patch_size


def patch_centres(grid: tuple[int, int]) -> torch.Tensor:
    """``[P, 2]`` centre (x, y) of each patch as fractions of the width/height, row-major."""
    ys = (torch.arange(grid[0]) + 0.5) / grid[0]
    xs = (torch.arange(grid[1]) + 0.5) / grid[1]
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx.flatten(), cy.flatten()], dim=-1)


def timestep_features(timesteps: torch.Tensor, batch: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``timesteps`` (``[B]`` or a scalar)."""
    emb = get_timestep_embedding(timesteps.expand(batch), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return emb.to(dtype)


class NoisyImageViT(nn.Module):
    """A small ViT over ``y_t``: ``[B, C, H, W]`` + timesteps ``[B]`` -> [CLS] ``[B, d]``, patches ``[B, P, d]``."""

    def __init__(self, *, image: DomainConfig, patch_size: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.grid = patch_grid(image, patch_size)  # (Hp, Wp)
        self.dim = dim
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embedding = nn.Conv2d(image.channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = sample.shape[0]
        patches = self.patch_embedding(sample).flatten(2).transpose(1, 2)  # (B, P, d)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1) + self.position_embedding
        tokens = tokens + self.time_mlp(timestep_features(timesteps, b, self.dim, tokens.dtype))[:, None]
        h = self.norm(self.encoder(tokens))  # (B, 1 + P, d)
        return h[:, 0], h[:, 1:]


class GlobalAlignmentHead(nn.Module):
    """[CLS] ``[B, d]`` -> ``g [B, D]``."""

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, text_dim))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(cls)


class LocalPatchEncoder(nn.Module):
    """Local patch features of ``y_t``: ``[B, C, H, W]`` + timesteps ``[B]`` -> ``[B, P, d]``.

    Receptive field: the patch plus a one-pixel ring, nothing else. The ViT's patch features mix the whole image,
    and a local head fed with them learned a shortcut on the demo data (which formula this is + the box's shape ->
    the segment) that ignored what is inside the box: moving every box onto blank canvas left ``L_local`` unchanged.
    With local features the box's content is what the head sees, and the gradient of ``L_local`` (guidance)
    reaches only the pixels in and next to the box.
    """

    def __init__(self, *, image: DomainConfig, patch_size: int, dim: int) -> None:
        super().__init__()
        self.grid = patch_grid(image, patch_size)
        self.dim = dim
        self.conv = nn.Sequential(
            nn.Conv2d(image.channels, dim // 2, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, kernel_size=patch_size, stride=patch_size),
        )
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("centres", patch_centres(self.grid), persistent=False)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        h = self.conv(sample).flatten(2).transpose(1, 2)  # (B, P, d)
        h = h + self.time_mlp(timestep_features(timesteps, sample.shape[0], self.dim, h.dtype))[:, None]
        return h + self.mlp(h)


class LocalAlignmentHead(nn.Module):
    """``y_t [B, C, H, W]`` + timesteps + boxes ``[B, K, 4]`` -> box features ``f [B, K, D]``: local patch
    features fused with the Fourier box embedding, mean-pooled over the box's patches, projected to ``D``."""

    def __init__(self, *, image: DomainConfig, patch_size: int, dim: int, text_dim: int, bands: int) -> None:
        super().__init__()
        self.bands = bands
        self.patches = LocalPatchEncoder(image=image, patch_size=patch_size, dim=dim)
        self.box_mlp = nn.Sequential(nn.Linear(8 * bands, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.patch_proj = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, text_dim))

    @staticmethod
    def membership(centres: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, K, P]`` bool: patch centre inside the box, or (for a box holding no centre) the patch under the
        box's own centre."""
        cx, cy = centres[:, 0], centres[:, 1]  # (P,)
        x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))  # (B, K, 1)
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)  # (B, K, P)
        hp, wp = grid
        col = ((x0 + x1) / 2 * wp).floor().clamp(0, wp - 1)
        row = ((y0 + y1) / 2 * hp).floor().clamp(0, hp - 1)
        own = torch.arange(hp * wp, device=boxes.device) == (row * wp + col).long()  # (B, K, P)
        return inside | (own & ~inside.any(-1, keepdim=True))

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        patches = self.patches(sample, timesteps)  # (B, P, d)
        boxes = boxes.to(patches.dtype)
        e = self.box_mlp(fourier_box_embedding(boxes, self.bands))  # (B, K, d)
        fused = F.gelu(self.patch_proj(patches)[:, None] + e[:, :, None])  # (B, K, P, d)
        member = self.membership(self.patches.centres, boxes, self.patches.grid)  # (B, K, P)
        pooled = masked_mean(fused, member[..., None], dim=2)  # (B, K, d)
        return self.out(pooled)


class HcmaModule(nn.Module):
    """The global module (ViT + head, ``hcma.global_weight > 0``) and the local module (local patch encoder +
    box pooling head, ``hcma.local_weight > 0``). ``text_dim``: the markup feature size ``D``."""

    def __init__(self, cfg: HcmaConfig, *, image: DomainConfig, text_dim: int) -> None:
        super().__init__()
        if not (cfg.global_weight > 0 or cfg.local_weight > 0):
            raise ValueError("hcma.global_weight / hcma.local_weight: both are 0, so there is no HCMA module to build")
        self.cfg, self.image, self.text_dim = cfg, image, text_dim
        self.vit: NoisyImageViT | None = None
        self.global_head: GlobalAlignmentHead | None = None
        self.local_head: LocalAlignmentHead | None = None
        if cfg.global_weight > 0:
            self.vit = NoisyImageViT(
                image=image, patch_size=cfg.patch_size, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads
            )
            self.global_head = GlobalAlignmentHead(cfg.dim, text_dim)
        if cfg.local_weight > 0:
            self.local_head = LocalAlignmentHead(
                image=image, patch_size=cfg.patch_size, dim=cfg.dim, text_dim=text_dim, bands=cfg.fourier_bands
            )
        self.register_buffer("text_mean", torch.zeros(text_dim))  # (D,) running mean of the markup features
        self.register_buffer("text_mean_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_text_mean(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The batch's mean markup feature ``[D]`` (``hidden [B, N, D]`` over valid tokens), folded into
        ``text_mean``: an exponential average with weight ``max(1 / n, 1 - TEXT_MEAN_MOMENTUM)`` at update ``n``."""
        batch_mean = masked_mean(hidden.reshape(-1, hidden.shape[-1]).float(), mask.reshape(-1, 1), dim=0)  # (D,)
        self.text_mean_updates += 1
        weight = max(1.0 / float(self.text_mean_updates), 1.0 - TEXT_MEAN_MOMENTUM)
        self.text_mean.lerp_(batch_mean.to(self.text_mean.device), weight)
        return batch_mean

    def alignment_losses(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        layout: LayoutBatch | None = None,
        *,
        use_global: bool = True,
        use_local: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Per-item terms: ``global [B]`` (needs the global head), ``local_sum [B]`` and ``local_count [B]`` (need
        the local head and a layout). ``sample`` ``y_t [B, C, H, W]``, ``timesteps [B]``, ``hidden [B, N, D]``."""
        if self.cfg.detach_text:
            hidden = hidden.detach()
        if self.cfg.center_text:  # training: the batch's own mean (the encoder moves); sampling: the running mean
            mean = self.update_text_mean(hidden.detach(), mask) if self.training else self.text_mean
            hidden = hidden - mean.to(hidden.dtype)  # (B, N, D)
        out: dict[str, torch.Tensor] = {}
        if use_global and self.vit is not None and self.global_head is not None:
            cls, _ = self.vit(sample, timesteps)
            out["global"] = global_alignment_loss(self.global_head(cls), hidden, mask)
        if use_local and self.local_head is not None and layout is not None:
            f = self.local_head(sample, timesteps, layout.boxes)
            out["local_sum"], out["local_count"] = local_alignment_loss(
                f, hidden, layout.segment_mask, layout.box_mask
            )
        return out

    def config_dict(self) -> dict[str, Any]:
        return {
            "hcma": dataclasses.asdict(self.cfg),
            "image": dataclasses.asdict(self.image),
            "text_dim": self.text_dim,
        }


def build_hcma(cfg: HcmaConfig, *, image: DomainConfig, text_dim: int) -> HcmaModule | None:
    """The HCMA module, or None when ``hcma.global_weight`` and ``hcma.local_weight`` are both 0."""
    if not (cfg.global_weight > 0 or cfg.local_weight > 0):
        return None
    return HcmaModule(cfg, image=image, text_dim=text_dim)


def hcma_loss(
    hcma_module: HcmaModule | None,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    boxes: LayoutBatch | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``hcma.global_weight * L_global + hcma.local_weight * L_local`` and its terms (detached floats).

    ``x_t [B, C, H, W]`` the noisy images the denoiser sees, ``timesteps [B]``, ``hidden [B, N, D]`` the markup
    features (``model.encode``), ``mask [B, N]``, ``boxes`` the batch's layouts (None: no local term). ``L_global``
    is the batch mean; ``L_local`` the mean over every valid box of the batch (0 when there is none). With no module
    (both weights 0) the loss is a constant 0. In training mode with ``hcma.translate``, each item with boxes is
    first moved by :func:`random_translate` (offsets drawn from ``generator``).
    """
    if hcma_module is None:
        return x_t.new_zeros(()), {}
    cfg = hcma_module.cfg
    if boxes is not None and cfg.translate and hcma_module.training:
        x_t, boxes = random_translate(x_t, boxes, generator)
    parts = hcma_module.alignment_losses(x_t, timesteps, hidden, mask, boxes)
    loss = x_t.new_zeros(())
    terms: dict[str, float] = {}
    if "global" in parts:
        l_global = parts["global"].mean()
        loss = loss + cfg.global_weight * l_global
        terms["hcma_global"] = float(l_global.detach())
    if "local_sum" in parts:
        l_local = parts["local_sum"].sum() / parts["local_count"].sum().clamp(min=1.0)
        loss = loss + cfg.local_weight * l_local
        terms["hcma_local"] = float(l_local.detach())
        terms["hcma_boxes"] = float(parts["local_count"].sum())
    return loss, terms


def random_translate(
    x_t: torch.Tensor, layout: LayoutBatch, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, LayoutBatch]:
    """Roll each item's ``x_t [B, C, H, W]`` and its boxes by one random whole-pixel offset that keeps every valid
    box inside the canvas (items without boxes stay put).

    Why: each training image has its segments at one place only, so a local head can fit ``L_local`` from WHICH
    formula it sees (ViT features are global) and the box coordinates, without looking inside the box; it then
    cannot ground a segment anywhere else. Moving image and boxes together makes the box's content the only
    consistent cue. A roll of ``y_t`` is a noisy version of the rolled ``y0`` (the noise is i.i.d. per pixel); what
    wraps around is the white margin.
    """
    _, _, h, w = x_t.shape
    out, boxes = x_t.clone(), layout.boxes.clone()
    for i in range(x_t.shape[0]):
        valid = layout.box_mask[i]
        if not bool(valid.any()):
            continue
        b = layout.boxes[i, valid]  # (k, 4) fractions
        lo_x, hi_x = -round(float(b[:, 0].min()) * w), w - round(float(b[:, 2].max()) * w)  # whole pixels
        lo_y, hi_y = -round(float(b[:, 1].min()) * h), h - round(float(b[:, 3].max()) * h)
        dx = int(torch.randint(lo_x, max(hi_x, lo_x) + 1, (), generator=generator))
        dy = int(torch.randint(lo_y, max(hi_y, lo_y) + 1, (), generator=generator))
        out[i] = torch.roll(x_t[i], shifts=(dy, dx), dims=(1, 2))
        shift = torch.tensor([dx / w, dy / h, dx / w, dy / h], dtype=boxes.dtype, device=boxes.device)
        boxes[i] = layout.boxes[i] + shift
    return out, LayoutBatch(boxes, layout.box_mask, layout.segment_mask)


# ----------------------------------------------------------------------------------------------------------------
# persistence (beside the denoiser's model folder)


def save_hcma(module: HcmaModule, folder: str | Path) -> None:
    """Write ``hcma_config.json`` and ``hcma.safetensors`` into ``folder`` (atomically, file by file)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_open(folder / HCMA_WEIGHTS, "wb") as fh:
        fh.write(save(state))
    with atomic_open(folder / HCMA_CONFIG) as fh:
        json.dump(module.config_dict(), fh, indent=2)


def _module_from_config(cfg: dict[str, Any], source: str) -> HcmaModule:

    hcma = check_type(cfg["hcma"], HcmaConfig, f"{source}.hcma")
    image = check_type(cfg["image"], DomainConfig, f"{source}.image")
    return HcmaModule(hcma, image=image, text_dim=int(cfg["text_dim"]))


def load_hcma(folder: str | Path, map_location: str | torch.device = "cpu") -> HcmaModule | None:
    """The HCMA module saved with a model: ``hcma_config.json`` + ``hcma.safetensors`` beside it, or (if the model
    holds it as its ``hcma`` submodule) the ``hcma`` entry of ``model_config.json`` and the ``hcma.*`` weights of
    ``model.safetensors``. None when the model was trained without one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / HCMA_CONFIG).exists():
        module = _module_from_config(json.loads((folder / HCMA_CONFIG).read_text()), str(folder / HCMA_CONFIG))
        module.load_state_dict(load_file(str(folder / HCMA_WEIGHTS), device=str(map_location)))
        return module.eval()
    model_cfg_path = folder / "model_config.json"
    if not model_cfg_path.exists():
        return None
    saved = json.loads(model_cfg_path.read_text())
    inside = saved.get("hcma_module")
    if not inside:
        return None
    module = _module_from_config(inside, f"{model_cfg_path}:hcma_module")
    state = load_file(str(folder / "model.safetensors"), device=str(map_location))
    module.load_state_dict({k[len("hcma.") :]: v for k, v in state.items() if k.startswith("hcma.")})
    return module.eval()
