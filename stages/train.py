"""train: run under `accelerate launch`; writes checkpoints, the EMA model and DVCLive logs to models/<domain>/."""

from pathlib import Path

from markup2image.stage_args import parser, setup, user_errors
from markup2image.training.loop import TrainPaths, train


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rendered", type=Path, required=True)
    p.add_argument("--tokenized", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = setup(args)
    with user_errors():
        train(params, args.domain, TrainPaths(rendered=args.rendered, tokenized=args.tokenized, out=args.out))


if __name__ == "__main__":
    main()
