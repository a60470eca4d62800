"""``python -m markup2image.runtime``: markup -> PNG from an exported folder, without torch.

Examples::

    python -m markup2image.runtime --model export/math --markup "x ^ { 2 }" --out x2.png
    python -m markup2image.runtime --model export/math --markup "a" --markup "b" --out samples/ \\
        --sampler dpm_solver --steps 20 --seed 0 --batch-size 8

One markup and an ``--out`` ending in ``.png`` writes that file; otherwise ``--out`` is a folder that receives
``0000.png``, ``0001.png``, ... in the order given. Batch ``b`` is sampled with seed ``seed + b``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from markup2image.io import save_png
from markup2image.modes import SAMPLERS
from markup2image.runtime.sampler import BACKENDS, ExportedModel


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m markup2image.runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported folder (export/<domain>, holds manifest.json)")
    p.add_argument("--markup", action="append", default=[], help="markup to render; repeat for several")
    p.add_argument("--markup-file", type=Path, help="a text file with one markup per line (added after --markup)")
    p.add_argument("--out", required=True, type=Path, help="a .png (one markup) or a folder")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the manifest's (the evaluate stage's sampler)")
    p.add_argument("--steps", type=int, help="default: the manifest's; ddpm always runs every training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per physical core)")
    p.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True,
        help="check every file's sha256 against the manifest before loading (default; --no-verify: sizes only)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    markups = list(args.markup)
    if args.markup_file:
        markups += [line.rstrip("\n") for line in args.markup_file.read_text().splitlines() if line.strip()]
    if not markups:
        print("error: give at least one --markup or a --markup-file", file=sys.stderr)
        return 2
    single = args.out.suffix.lower() == ".png"
    if single and len(markups) != 1:
        print(
            f"error: --out {args.out} is one file but {len(markups)} markups were given; pass a folder",
            file=sys.stderr,
        )
        return 2
    try:
        model = ExportedModel(args.model, backend=args.backend, threads=args.threads, verify=args.verify)
        defaults = model.manifest.get("defaults", {})
        sampler = args.sampler or defaults.get("sampler", "ddim")
        steps = args.steps
        if steps is None:
            n_train = int(model.scheduler_config["num_train_timesteps"])
            steps = n_train if sampler == "ddpm" else int(defaults.get("steps", 20))
        images = model.generate(
            markups, sampler=sampler, steps=steps, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet
        )
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    paths = [args.out] if single else [args.out / f"{i:04d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        save_png(path, image)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
