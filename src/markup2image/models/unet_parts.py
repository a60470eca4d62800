"""The U-Net: diffusers ``UNet2DConditionModel`` plus this project's attention processors (design §4).

:func:`build_unet` builds the U-Net and gives every attention a :class:`PositionalAttnProcessor` (learned
positions when ``model.position_embeddings``; masked SDPA always) and, when ``model.ccam``, turns the
``model.ccam_blocks`` cross-attentions at the lowest resolutions into :class:`ContextAwareCrossAttention`.

Resolutions are static: level ``l`` of an ``H x W`` image runs at ``ceil(H / 2^l) x ceil(W / 2^l)`` (diffusers'
stride-2, padding-1 downsampling); up block ``j`` runs at level ``L - 1 - j``; the mid block at level ``L - 1``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from markup2image.config import DomainConfig, ModelConfig
from markup2image.models.ccam import ContextAwareCrossAttention
from markup2image.models.position import PositionalAttnProcessor, sinusoidal_init_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransformerSite:
    """One transformer block of the U-Net and the feature map it runs on."""

    name: str  # e.g. "down_blocks.2.attentions.1.transformer_blocks.0"
    block: BasicTransformerBlock
    level: int  # 0 = full resolution
    height: int
    width: int
    channels: int
    order: int  # position in the forward pass (down, mid, up)


def level_size(image: DomainConfig, level: int) -> tuple[int, int]:
    """Feature-map size at U-Net level ``level``."""
    h, w = image.height, image.width
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def transformer_sites(unet: UNet2DConditionModel, image: DomainConfig) -> list[TransformerSite]:
    """Every ``BasicTransformerBlock`` of ``unet`` in forward order, with its level and feature-map size."""
    num_levels = len(unet.down_blocks)
    groups = [(f"down_blocks.{i}", b, i) for i, b in enumerate(unet.down_blocks)]
    groups.append(("mid_block", unet.mid_block, num_levels - 1))
    groups += [(f"up_blocks.{j}", b, num_levels - 1 - j) for j, b in enumerate(unet.up_blocks)]
    sites: list[TransformerSite] = []
    for prefix, group, level in groups:
        for a, transformer in enumerate(getattr(group, "attentions", None) or []):
            for k, block in enumerate(transformer.transformer_blocks):
                h, w = level_size(image, level)
                channels = block.attn1.to_q.in_features
                name = f"{prefix}.attentions.{a}.transformer_blocks.{k}"
                sites.append(TransformerSite(name, block, level, h, w, channels, len(sites)))
    return sites


def ccam_sites(sites: list[TransformerSite], count: int) -> list[TransformerSite]:
    """The ``count`` cross-attention sites at the lowest resolutions (deepest level first, then forward order)."""
    cross = [s for s in sites if s.block.attn2 is not None]
    if count > len(cross):
        log.info("model.ccam_blocks=%d but the U-Net has %d cross-attention blocks; using all", count, len(cross))
    return sorted(cross, key=lambda s: (-s.level, s.order))[: max(count, 0)]


def install_attention_processors(unet: UNet2DConditionModel, cfg: ModelConfig, image: DomainConfig) -> None:
    """Set this project's processor on every attention of ``unet`` (in place)."""
    sites = transformer_sites(unet, image)
    ccam = {s.name for s in ccam_sites(sites, cfg.ccam_blocks)} if cfg.ccam else set()
    if cfg.ccam and cfg.ccam_blocks < 1:
        raise ValueError("model.ccam_blocks: must be at least 1 when model.ccam is true")
    for site in sites:
        pos = dict(height=site.height, width=site.width) if cfg.position_embeddings else {}
        text = dict(text_length=cfg.max_text_length) if cfg.position_embeddings else {}
        site.block.attn1.set_processor(PositionalAttnProcessor(channels=site.channels, **pos))
        if site.block.attn2 is None:
            continue
        if site.name in ccam:
            proc = ContextAwareCrossAttention(
                channels=site.channels,
                text_dim=cfg.encoder_dim,
                rank=cfg.ccam_rank,
                query=cfg.ccam_query,
                positions=site.height * site.width,
                **pos,
                **text,
            )
        else:
            proc = PositionalAttnProcessor(channels=site.channels, text_dim=cfg.encoder_dim, **pos, **text)
        site.block.attn2.set_processor(proc)
    if cfg.position_init == "sinusoidal":
        sinusoidal_init_(unet)


def patched_image(image: DomainConfig, patch_size: int) -> DomainConfig:
    """The geometry the U-Net's first level sees: ``H/p x W/p`` with ``C p^2`` channels (``p = 1``: ``image``)."""
    if patch_size == 1:
        return image
    if image.height % patch_size or image.width % patch_size:
        raise ValueError(f"model.patch_size: {patch_size} does not divide the {image.height}x{image.width} image")
    return dataclasses.replace(
        image,
        height=image.height // patch_size,
        width=image.width // patch_size,
        channels=image.channels * patch_size**2,
    )


def build_unet(cfg: ModelConfig, image: DomainConfig) -> UNet2DConditionModel:
    """The diffusers U-Net; cross-attention only at levels where ``cfg.cross_attention_levels`` is true.

    ``cfg.attention_head_dim`` is diffusers' (misnamed) head *count*, as in SS-DM (8 heads). With
    ``cfg.patch_size`` p > 1 the U-Net is built for the ``C p^2``-channel ``H/p x W/p`` grid and its ``conv_in`` /
    ``conv_out`` are wrapped in ``PixelUnshuffle(p)`` / ``PixelShuffle(p)``: it still takes and returns
    ``[B, C, H, W]`` (and exports so), and :func:`transformer_sites` needs the patched geometry (``unet_image``).
    """
    levels = cfg.cross_attention_levels
    if len(levels) != len(cfg.block_out_channels):
        raise ValueError("model.cross_attention_levels: needs one entry per model.block_out_channels level")
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in levels)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(levels))
    grid = patched_image(image, cfg.patch_size)
    unet = UNet2DConditionModel(
        sample_size=(grid.height, grid.width),
        in_channels=grid.channels,
        out_channels=grid.channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.encoder_dim,
    )
    if cfg.patch_size > 1:
        unet.conv_in = nn.Sequential(nn.PixelUnshuffle(cfg.patch_size), unet.conv_in)
        unet.conv_out = nn.Sequential(unet.conv_out, nn.PixelShuffle(cfg.patch_size))
    install_attention_processors(unet, cfg, grid)
    return unet
