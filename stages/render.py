"""render: gold images for every markup item, or a reject with its reason -> data/rendered/<domain>/."""

from pathlib import Path

from markup2image.data.render import render_corpus
from markup2image.stage_args import parser, setup


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = setup(args)
    render_corpus(args.domain, params, args.raw, args.out)


if __name__ == "__main__":
    main()
