"""evaluate: sample the test set, score it, write metrics.json, per-image scores and a gold-vs-generated grid."""

from pathlib import Path

from markup2image.evaluation.evaluate import evaluate
from markup2image.stage_args import parser, setup, user_errors


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--rendered", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = setup(args)
    with user_errors():
        evaluate(params, args.domain, args.model, args.rendered, args.out)


if __name__ == "__main__":
    main()
