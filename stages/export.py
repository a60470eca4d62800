"""export: ONNX U-Net + markup encoder + tokenizer + manifest, parity report, TensorRT engine where installed."""

import sys
from pathlib import Path

from markup2image.export.onnx_export import export_model
from markup2image.export.parity import ExportParityError
from markup2image.stage_args import parser, setup, user_errors


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    params = setup(args)
    try:
        with user_errors():
            export_model(params, args.model, args.out)
    except ExportParityError as exc:
        sys.exit(f"error: export parity failed for {args.domain}: {exc}")


if __name__ == "__main__":
    main()
