"""Grounded samples at CPU overfit scale (issue 7): does HCMA guidance put each markup segment in its box?

A tiny denoiser with both HCMA modules trains (the real training loop, ``ddpm`` objective) on a handful of
formulas rendered with mathtext, each at several horizontal places (the renderer's layout moved with it), so the
markup alone does not fix where a formula goes. Each formula is then sampled for each place's layout under four
settings, with the same seed: no guidance, global only, local only, and both. Layout accuracy
(:mod:`~markup2image.evaluation.layout_metrics`, against the gold image at that place) says how much ink lands in
the boxes asked for.

``scripts/grounded_grid.py`` runs it and writes ``grounded_grid.png`` (boxes drawn) and ``grounded_metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from markup2image.config import DomainConfig, params_from_dict
from markup2image.data.layout_tensors import layout_batch
from markup2image.data.layouts import LAYOUTS_JSONL, LayoutBox, draw_boxes
from markup2image.data.renderers import get_engine
from markup2image.diffusion.guidance import guided_sample_images
from markup2image.diffusion.sampling import to_uint8
from markup2image.evaluation.layout_metrics import layout_scores, mean_layout_scores
from markup2image.evaluation.report import save_image_grid
from markup2image.io import atomic_open, save_png, write_json, write_jsonl
from markup2image.models.model import load_model
from markup2image.text.tokenizer import TOKENIZER_FILE, encode_batch, load_tokenizer, train_bpe
from markup2image.training.loop import TrainPaths, train

log = logging.getLogger(__name__)

FORMULAS = (r"x + y", r"a - b", r"\alpha = 2", r"b + 1", r"\beta - y", r"2 = a")
IMAGE = DomainConfig(height=24, width=96, channels=1, engine="mathtext", font_size=8.0)
OFFSETS = (0, 48)  # horizontal places (pixels) of each formula in the training set
SETTINGS = ("no guidance", "global", "local", "global + local")


def shifted(image: np.ndarray, boxes: list[LayoutBox], dx: int) -> tuple[np.ndarray, list[LayoutBox]]:
    """The image moved ``dx`` pixels right (white comes in on the left) and its boxes with it."""
    out = np.full_like(image, 255)
    out[:, dx:] = image[:, : image.shape[1] - dx]
    moved = [{**b, "box": [b["box"][0] + dx, b["box"][1], b["box"][2] + dx, b["box"][3]]} for b in boxes]
    return out, moved  # type: ignore[return-value]


def write_demo_set(root: Path, formulas: tuple[str, ...] = FORMULAS) -> list[dict]:
    """Render ``formulas`` at every offset into ``root/rendered`` (+ ``layouts.jsonl``) and ``root/tokenized``;
    returns the items ``{"id", "markup", "image" (uint8), "boxes"}``."""
    engine = get_engine("math", "mathtext")
    items = []
    for f, markup in enumerate(formulas):
        image, boxes = engine.render_with_layout(markup, IMAGE)
        width = max(b["box"][2] for b in boxes)
        if width + max(OFFSETS) > IMAGE.width:
            raise ValueError(f"{markup!r} is {width} px wide: it does not fit at offset {max(OFFSETS)}")
        for dx in OFFSETS:
            img, moved = shifted(image, boxes, dx)
            items.append({"id": f"f{f}_x{dx}", "markup": markup, "image": img, "boxes": moved, "dx": dx})
    rendered, tokenized = root / "rendered", root / "tokenized"
    for it in items:
        save_png(rendered / "images" / f"{it['id']}.png", it["image"])
    write_jsonl(rendered / "train.jsonl", ({"id": i["id"], "markup": i["markup"], "image": f"images/{i['id']}.png"}
                                           for i in items))  # fmt: skip
    write_jsonl(rendered / LAYOUTS_JSONL, ({"id": i["id"], "boxes": i["boxes"]} for i in items))
    tok = train_bpe(list(formulas) * 3, vocab_size=40, min_frequency=1)
    tokenized.mkdir(parents=True, exist_ok=True)
    with atomic_open(tokenized / TOKENIZER_FILE) as fh:
        fh.write(tok.to_str())
    write_jsonl(tokenized / "train.jsonl", ({"id": i["id"], "ids": tok.encode(i["markup"]).ids} for i in items))
    return items


def demo_params(steps: int, batch_size: int, guidance: tuple[float, float]):
    """A tiny U-Net (``norm_num_groups=1`` as in the overfit test; attention only at 1/4 resolution, 6 x 24) with
    both HCMA modules; ``ddpm`` on the CPU."""
    return params_from_dict({
        "domains": ["math"],
        "domain": {"math": dataclasses.asdict(IMAGE)},
        "model": {"block_out_channels": [16, 32, 64], "cross_attention_levels": [False, False, True],
                  "norm_num_groups": 1, "attention_head_dim": 8, "encoder_dim": 32, "encoder_layers": 1,
                  "encoder_heads": 2},
        "train": {"steps": steps, "batch_size": batch_size, "lr": 2e-3, "warmup_steps": 20, "ema_decay": 0.99,
                  "log_every": 50, "checkpoint_every": steps, "cpu": True, "keep_checkpoints": 1},
        "hcma": {"global_weight": 1.0, "local_weight": 1.0, "guidance_global": guidance[0],
                 "guidance_local": guidance[1], "patch_size": 4, "dim": 48, "layers": 2, "heads": 4,
                 "fourier_bands": 4},
    })  # fmt: skip


def sample_settings(model_dir: Path, items: list[dict], params, sample_steps: int, seed: int) -> dict[str, list]:
    """uint8 samples ``[H, W]`` of every item under each of :data:`SETTINGS` (same seed, DDIM)."""
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    ids, mask = (torch.from_numpy(a) for a in encode_batch(tok, [i["markup"] for i in items], 32))
    hw = (IMAGE.height, IMAGE.width)
    layout = layout_batch([i["boxes"] for i in items], [i["markup"] for i in items], tok, ids.shape[1], hw, 8)
    g, lo = params.hcma.guidance_global, params.hcma.guidance_local
    scales = {"no guidance": (0.0, 0.0), "global": (g, 0.0), "local": (0.0, lo), "global + local": (g, lo)}
    out = {}
    for name in SETTINGS:
        images = guided_sample_images(
            model, model.hcma, ids, mask, sampler="ddim", steps=sample_steps, seed=seed, diffusion=params.diffusion,
            guidance_global=scales[name][0], guidance_local=scales[name][1], layout=layout, progress=True,
        )  # fmt: skip
        out[name] = list(to_uint8(images))
    return out


def run_grounded_demo(
    out_dir: Path,
    *,
    steps: int = 300,
    batch_size: int = 12,
    sample_steps: int = 50,
    guidance: tuple[float, float] = (50.0, 3000.0),
    seed: int = 0,
    reuse: bool = False,
) -> dict:
    """Train, sample, score; write ``grounded_grid.png`` and ``grounded_metrics.json`` into ``out_dir``.
    ``reuse``: sample with the model a previous run left in ``out_dir/work`` (e.g. to try other scales)."""

    work = out_dir / "work"
    items = write_demo_set(work)
    params = demo_params(steps, batch_size, guidance)
    t0 = time.perf_counter()
    if not (reuse and (work / "models" / "model").exists()):
        train(params, "math", TrainPaths(work / "rendered", work / "tokenized", work / "models"))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = sample_settings(work / "models" / "model", items, params, sample_steps, seed)
    sample_s = time.perf_counter() - t0
    metrics = {
        name: mean_layout_scores([layout_scores(s, i["boxes"], gold=i["image"]) for s, i in zip(imgs, items)])
        for name, imgs in samples.items()
    }
    tiles, titles = [], []
    for k, item in enumerate(items):
        tiles.append(draw_boxes(item["image"], item["boxes"], scale=2))
        titles.append(f"gold {item['markup']} (+{item['dx']} px)")
        for name in SETTINGS:
            tiles.append(draw_boxes(samples[name][k], item["boxes"], scale=2))
            f1 = layout_scores(samples[name][k], item["boxes"], gold=item["image"])["layout_f1"]
            titles.append(f"{name}: F1 {f1:.2f}")
    save_image_grid(tiles, out_dir / "grounded_grid.png", ncols=1 + len(SETTINGS), titles=titles)
    report = {
        "layout_accuracy": metrics,
        "guidance_global": guidance[0],
        "guidance_local": guidance[1],
        "train_steps": steps,
        "sample_steps": sample_steps,
        "items": len(items),
        "train_seconds": round(train_s, 1),
        "sample_seconds": round(sample_s, 1),
    }
    write_json(out_dir / "grounded_metrics.json", report)
    log.info("grounded demo: %s", json.dumps(report))
    return report
