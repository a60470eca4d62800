"""Grounded-sample figure (issue 7): train a CPU overfit-scale HCMA model on a few rendered formulas, sample them
into given layouts with and without guidance, write a grid with the boxes drawn and the layout accuracy.

    .venv/bin/python scripts/grounded_grid.py --out docs/grounded   # about 5 minutes on 2 CPU cores
"""

import argparse
import logging
import os
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("grounded"))
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance-global", type=float, default=50.0)
    p.add_argument("--guidance-local", type=float, default=3000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="sample with the model an earlier run left in --out")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from markup2image.evaluation.grounded_demo import run_grounded_demo

    report = run_grounded_demo(
        args.out,
        steps=args.steps,
        sample_steps=args.sample_steps,
        guidance=(args.guidance_global, args.guidance_local),
        seed=args.seed,
        reuse=args.reuse,
    )
    for name, scores in report["layout_accuracy"].items():
        print(f"{name:>16}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
