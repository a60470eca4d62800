"""Start stages/train.py under `accelerate launch` with the process count and precision from params.yaml."""

import sys
from pathlib import Path

from markup2image.stage_args import parser, setup
from markup2image.training.launch import run_launch


def main() -> None:
    p = parser(__doc__)
    p.add_argument("rest", nargs="*", help="arguments passed on to stages/train.py")
    args, unknown = p.parse_known_args()
    params = setup(args)
    script = str(Path(__file__).with_name("train.py"))
    sys.exit(run_launch(params, script, ["--domain", args.domain, "--params", args.params, *args.rest, *unknown]))


if __name__ == "__main__":
    main()
