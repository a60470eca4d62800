"""tokenize: a BPE, word or char tokenizer trained on the train split (or a pretrained one), ids for all splits."""

from pathlib import Path

from markup2image.stage_args import parser, setup, user_errors
from markup2image.text.tokenizer import tokenize_corpus


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rendered", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = setup(args)
    with user_errors():
        tokenize_corpus(params.tokenize, args.rendered, args.out)


if __name__ == "__main__":
    main()
