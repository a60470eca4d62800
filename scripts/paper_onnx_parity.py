"""ONNX export and ONNX Runtime parity of the paper-size U-Net with the paper's CCAM placement (random init).

    OMP_NUM_THREADS=1 python scripts/paper_onnx_parity.py --out docs/paper_onnx_parity.json  # [--recipe FILE]

Builds the recipe's model (5 CCAMs at the lowest resolution with ``ccam_query: relation``, Q = Psi(R), 16 plain
cross-attentions, learned positions, 8 heads) with a from-scratch encoder of the recipe's width in place of the
frozen hub LM (the U-Net graph only sees its ``[B, N, 768]`` states), exports ``unet.onnx`` as the export stage does,
and compares ONNX Runtime with torch at another batch and text length than the export's, padded keys included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from markup2image.export.graphs import UNET_AXES, UNET_OUTPUTS, UNetForExport, export_onnx, unet_inputs
from markup2image.models.ccam import ContextAwareCrossAttention
from markup2image.models.model import MarkupToImageModel
from markup2image.recipes import recipe_params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=Path("configs/paper/math.yaml"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = recipe_params(args.recipe)
    domain = params.domains[0]
    cfg = dataclasses.replace(params.model, encoder="transformer", pretrained_encoder="", encoder_layers=1)
    image = params.domain[domain]
    torch.manual_seed(0)
    model = MarkupToImageModel(model_cfg=cfg, image=image, vocab_size=64).eval()
    ccams = [m for m in model.unet.modules() if isinstance(m, ContextAwareCrossAttention)]
    unet_params = sum(p.numel() for p in model.unet.parameters())
    shape = (image.channels, image.height, image.width)
    g = torch.Generator().manual_seed(0)
    example = unet_inputs(2, 16, shape, cfg.encoder_dim, params.diffusion.num_train_timesteps, g)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.onnx"
        start = time.perf_counter()
        rec = export_onnx(
            UNetForExport(model.unet, model.to_epsilon),
            example,
            path,
            output_names=UNET_OUTPUTS,
            dynamic=UNET_AXES,
            opset=params.export.opset,
            exporter=params.export.exporter,
            max_text_length=cfg.max_text_length,
        )
        export_s = time.perf_counter() - start
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = unet_inputs(3, 41, shape, cfg.encoder_dim, params.diffusion.num_train_timesteps, g)
        feeds["encoder_attention_mask"][1, 20:] = 0
        feeds["encoder_attention_mask"][2, 5:] = 0
        start = time.perf_counter()
        (got,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        ort_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            want = model.denoise(
                feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"], feeds["encoder_attention_mask"]
            ).numpy()
        torch_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    err = float(np.abs(got - want).max())
    result = {
        "recipe": str(args.recipe),
        "image": list(shape),
        "unet_parameters": unet_params,
        "ccam_sites": len(ccams),
        "ccam_query": sorted({m.query for m in ccams}),
        "psi_in_features": sorted({m.psi.in_features for m in ccams}),
        "cross_attention_sites": sum(1 for n, _ in model.unet.named_modules() if n.endswith("attn2")),
        "exporter": params.export.exporter,
        "opset": params.export.opset,
        "external_data": rec["external_data"] is not None,
        "onnx_bytes": size,
        "export_s": round(export_s, 1),
        "parity_batch": 3,
        "parity_text_len": 41,
        "max_abs_error": err,
        "output_abs_max": float(np.abs(want).max()),
        "ort_s": round(ort_s, 2),
        "torch_s": round(torch_s, 2),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if err <= 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
