"""Markup use under each InfoNCE reading at the paper's weight 1, on the overfit harness (docs/decisions.md §4).

    OMP_NUM_THREADS=1 python scripts/infonce_negatives.py --seeds 0 1 --out docs/infonce_negatives.json

Trains the whole FSA-CDM (FSA, CCAM, positive, K = 2 negatives, EUBO) on four rendered formulas for 700 steps per
run, with ``infonce_weight`` 1 and ``infonce_negatives`` other_items or own_markup (and weight 0 as the reference),
and reports the denoising loss at t = 300 with each formula's own markup vs a shuffled one (``markup_use``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from test_overfit import FSA_CDM_SWITCHES, _train  # noqa: E402

from markup2image.evaluation.markup_use import markup_use_losses  # noqa: E402

READINGS = (("other_items", 1.0), ("own_markup", 1.0), ("other_items", 0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    runs = [(r, w, s) for r, w in READINGS for s in args.seeds]
    for reading, weight, seed in tqdm(runs, desc="infonce readings"):
        start = time.perf_counter()
        switches = {**FSA_CDM_SWITCHES, "con_aug": True}
        ema, _, _, _, ids, mask, images, terms = _train("fsa_cdm", switches, 2, weight, seed, reading)
        right, shuffled = markup_use_losses(ema, images, ids, mask, t=300)
        rows.append(
            {
                "infonce_negatives": reading,
                "infonce_weight": weight,
                "seed": seed,
                "loss_own_markup": right,
                "loss_shuffled_markup": shuffled,
                "markup_use": shuffled / right,
                "loss_simple": float(terms["loss_simple"]),
                "loss_infonce": float(terms["loss_infonce"]),
                "seconds": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
