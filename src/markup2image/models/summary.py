"""Parameter counts per module, and the named model sizes used by benchmarks and reports.

:func:`parameter_summary` builds the model on the ``meta`` device (no memory, no weights read), so the paper
configuration counts instantly. The groups add up to ``total``:

``encoder`` (trainable part: the BPE transformer, or the adapter of a pretrained LM) + ``encoder_frozen`` (the
pretrained LM) + ``unet`` (``down`` / ``mid`` / ``up`` / ``conv`` / ``time``, without the two groups below) +
``position_embeddings`` (learned row/column and text tables of every attention) + ``ccam`` (the CoA branch and
fusion of each CCAM; its ChA branch reuses the block's cross-attention projections, counted in the U-Net) +
``fsa`` (image encoder + CAM) + ``contrastive_head`` + ``hcma`` (the HCMA alignment module when ``hcma.global_weight``
or ``hcma.local_weight`` > 0: ViT and global head, local patch encoder and box head).

Sizes (:func:`sized_model_config`): ``tiny`` (a fast CPU model; attention only at 1/8 resolution, where a math
image has 8 x 40 = 320 tokens), ``params`` (``params.model`` as configured) and
``paper``: SS-DM's U-Net (``block_out_channels (128, 128, 256, 256, 512, 512)``, two layers per level,
cross-attention on the last four down levels, the mid block and the first four up levels, 8 heads, D = 768,
GPT-Neo's width; text positions for 1024 tokens, SS-DM's ``max_input_length``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from markup2image.config import ModelConfig, Params
from markup2image.models.ccam import ContextAwareCrossAttention
from markup2image.models.model import MarkupToImageModel
from markup2image.models.unet_parts import patched_image, transformer_sites

ModelSize = Literal["tiny", "params", "paper"]
MODEL_SIZES: tuple[str, ...] = ("tiny", "params", "paper")


def sized_model_config(base: ModelConfig, size: str) -> ModelConfig:
    """``base`` with the architecture of ``size`` (its ablation switches and encoder choice are kept)."""
    if size == "params":
        return base
    if size == "tiny":
        return dataclasses.replace(
            base,
            block_out_channels=(32, 64, 64, 64),
            cross_attention_levels=(False, False, False, True),
            layers_per_block=1,
            attention_head_dim=8,
            norm_num_groups=8,
            encoder_dim=64,
            encoder_layers=2,
            encoder_heads=4,
            ccam_rank=32,
            fsa_channels=(32, 64, 128),
            fsa_hidden=64,
            contrastive_dim=64,
        )
    if size == "paper":
        return dataclasses.replace(
            base,
            block_out_channels=(128, 128, 256, 256, 512, 512),
            cross_attention_levels=(False, False, True, True, True, True),
            layers_per_block=2,
            attention_head_dim=8,
            norm_num_groups=32,
            encoder_dim=768,
            encoder_layers=2,
            encoder_heads=12,
            max_text_length=1024,
            ccam_blocks=5,
            ccam_rank=64,
            fsa_channels=(64, 128, 256, 512),
            fsa_hidden=384,
            contrastive_dim=128,
        )
    raise ValueError(f"size: unknown model size {size!r}; choose from {list(MODEL_SIZES)}")


def with_switches(cfg: ModelConfig, *, fsa: bool, con_aug: bool, ccam: bool) -> ModelConfig:
    return dataclasses.replace(cfg, fsa=fsa, con_aug=con_aug, ccam=ccam)


def _group(name: str, module_of: dict[str, type]) -> str:
    """The summary group of parameter ``name`` of a :class:`MarkupToImageModel`."""
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("alignment."):
        return "fsa"
    if name.startswith("contrastive_head."):
        return "contrastive_head"
    if name.startswith("hcma."):
        return "hcma"
    if ".image_pos." in name or ".text_pos." in name:
        return "position_embeddings"
    owner = name.rsplit(".processor.", 1)[0] + ".processor" if ".processor." in name else ""
    if owner and module_of.get(owner) is ContextAwareCrossAttention:
        return "ccam"
    part = name.split(".")[1]
    return {
        "down_blocks": "unet.down",
        "mid_block": "unet.mid",
        "up_blocks": "unet.up",
        "conv_in": "unet.conv",
        "conv_norm_out": "unet.conv",
        "conv_out": "unet.conv",
        "time_embedding": "unet.time",
    }.get(part, "unet.other")


def count_parameters(model: MarkupToImageModel) -> dict:
    """Parameter counts of ``model`` by group (see the module docstring); ``total`` and ``trainable`` too."""
    module_of = {n: type(m) for n, m in model.named_modules()}
    counts: dict[str, int] = {}
    frozen = trainable = 0
    for name, p in model.named_parameters():
        group = _group(name, module_of)
        if group == "encoder" and not p.requires_grad:
            group = "encoder_frozen"
        counts[group] = counts.get(group, 0) + p.numel()
        trainable += p.numel() if p.requires_grad else 0
        frozen += 0 if p.requires_grad else p.numel()
    unet = {k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("unet.")}
    unet["total"] = sum(unet.values())
    out = {
        "encoder": counts.get("encoder", 0),
        "encoder_frozen": counts.get("encoder_frozen", 0),
        "unet": unet,
        "position_embeddings": counts.get("position_embeddings", 0),
        "ccam": counts.get("ccam", 0),
        "fsa": counts.get("fsa", 0),
        "contrastive_head": counts.get("contrastive_head", 0),
        "hcma": counts.get("hcma", 0),
    }
    out["unet_with_attention_extras"] = unet["total"] + out["position_embeddings"] + out["ccam"]
    out["total"] = trainable + frozen
    out["trainable"] = trainable
    return out


def _meta_model(params: Params, domain: str, vocab_size: int, size: str = "params") -> MarkupToImageModel:
    """The model of ``params`` at ``size`` for ``domain``, built on the meta device (no memory, no weights)."""
    cfg = sized_model_config(params.model, size)
    with torch.device("meta"):
        return MarkupToImageModel(
            model_cfg=cfg,
            image=params.domain_config(domain),
            vocab_size=vocab_size,
            load_pretrained=False,
            hcma=params.hcma,
        )


def attention_layout(params: Params, domain: str, size: str = "params") -> dict:
    """Where the U-Net attends to the markup: cross-attention sites (CCAM and plain), their levels, feature-map
    sizes and head counts (diffusers' ``attention_head_dim`` is the head count of ``UNet2DConditionModel``)."""

    model = _meta_model(params, domain, 512, size)
    grid = patched_image(model.image, model.model_cfg.patch_size)
    sites = [s for s in transformer_sites(model.unet, grid) if s.block.attn2 is not None]
    rows = []
    for site in sites:
        processor = type(site.block.attn2.processor).__name__
        rows.append(
            {
                "site": site.name,
                "level": site.level,
                "size": [site.height, site.width],
                "heads": site.block.attn2.heads,
                "head_dim": site.channels // site.block.attn2.heads,
                "ccam": isinstance(site.block.attn2.processor, ContextAwareCrossAttention),
                "processor": processor,
            }
        )
    ccam = sum(r["ccam"] for r in rows)
    return {"cross_attention_sites": len(rows), "ccam": ccam, "plain": len(rows) - ccam, "sites": rows}


def parameter_summary(params: Params, domain: str, vocab_size: int, size: str = "params") -> dict:
    """Parameter counts of the model that ``params`` (``params.model`` at ``size``) builds for ``domain``.

    Built on the ``meta`` device: instant even for the paper configuration, no weights are read (a pretrained
    encoder is built from its config). Returns a JSON-able dict (see :func:`count_parameters`) with the model
    switches and size echoed.
    """
    cfg = sized_model_config(params.model, size)
    image = params.domain_config(domain)
    model = _meta_model(params, domain, vocab_size, size)
    summary = count_parameters(model)
    summary["config"] = {
        "size": size,
        "domain": domain,
        "image": [image.channels, image.height, image.width],
        "encoder": cfg.encoder,
        "encoder_dim": cfg.encoder_dim,
        "fsa": cfg.fsa,
        "con_aug": cfg.con_aug,
        "ccam": cfg.ccam,
        "position_embeddings": cfg.position_embeddings,
        "hcma_global_weight": params.hcma.global_weight,
        "hcma_local_weight": params.hcma.local_weight,
    }
    return summary


PAPER_TABLE1 = {"unet": 209e6, "fsa_cdm": 253e6}  # FSA-CDM Table 1: SS-DM 209 M, FSA-CDM 253 M parameters


def paper_table(summary: dict) -> list[dict]:
    """Rows like for like with paper Table 1 (cumulative trainable parameters; the frozen LM counted apart):
    U-Net with its position embeddings (SS-DM's model), + trainable encoder parts, + FSA, + CCAM, + head."""
    rows, total = [], 0
    parts = [
        ("U-Net with position embeddings (SS-DM)", summary["unet"]["total"] + summary["position_embeddings"], "unet"),
        ("+ trainable encoder parts", summary["encoder"], None),
        ("+ FSA (image encoder, CAM)", summary["fsa"], None),
        ("+ CCAM (CoA branches, fusion)", summary["ccam"], None),
        ("+ contrastive head (FSA-CDM)", summary["contrastive_head"], "fsa_cdm"),
    ]
    for name, count, paper in parts:
        total += count
        rows.append({"row": name, "added": count, "cumulative": total, "paper": PAPER_TABLE1.get(paper or "")})
    rows.append({"row": "frozen pretrained encoder (not trained)", "added": summary["encoder_frozen"],
                 "cumulative": None, "paper": None})  # fmt: skip
    return rows


def paper_table_markdown(rows: list[dict]) -> str:
    def m(x: float | None) -> str:
        return "" if x is None else f"{x / 1e6:.1f} M"

    lines = ["| part | added | cumulative | paper |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['row']} | {m(r['added'])} | {m(r['cumulative'])} | {m(r['paper'])} |" for r in rows]
    return "\n".join(lines) + "\n"
