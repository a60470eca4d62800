"""download: markup corpus with ids and train/val/test splits -> data/raw/<domain>/."""

from pathlib import Path

from markup2image.data.download import download_corpus
from markup2image.stage_args import parser, setup, user_errors


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = setup(args)
    with user_errors():
        download_corpus(params, args.domain, args.out)


if __name__ == "__main__":
    main()
