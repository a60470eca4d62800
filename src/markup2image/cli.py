"""``markup2image``: render, score, sample, summary and bench from the command line.

Every command fails with one clear line (``error: ...``) and a non-zero exit on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from markup2image import bench
from markup2image.bench import emit
from markup2image.modes import DOMAINS, SAMPLERS

log = logging.getLogger("markup2image")


def _params(path: str):
    from markup2image.config import Params, load_params

    return load_params(path) if Path(path).exists() else Params()


# -- commands -------------------------------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    import dataclasses

    from markup2image.data.renderers import RenderError, render_batch, render_markup, resolve_engine
    from markup2image.io import save_png

    params = _params(args.params)
    cfg = params.domain_config(args.domain)
    if args.engine:
        cfg = dataclasses.replace(cfg, engine=args.engine)
    cfg = resolve_engine(args.domain, cfg)
    if args.markup_file is None:
        if args.markup is None:
            raise SystemExit("error: render needs --markup or --markup-file")
        try:
            image = render_markup(args.domain, args.markup, cfg)
        except RenderError as exc:
            raise SystemExit(f"error: {args.domain} markup not rendered ({exc.reason}): {exc.detail}") from None
        save_png(args.out, image)
        print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]})")
        return 0
    rows = _markup_rows(args.markup_file, args.domain)
    results = render_batch(args.domain, [(r["id"], r["markup"]) for r in rows], cfg, params.render.timeout)
    rejected = 0
    for r in results:
        if r.image is None:
            rejected += 1
            print(f"{r.id}: not rendered ({r.reason}): {r.detail}", file=sys.stderr)
        else:
            save_png(Path(args.out) / f"{r.id}.png", r.image)
    print(f"rendered {len(rows) - rejected} of {len(rows)} items into {args.out} ({rejected} rejected)")
    return 0


def _markup_rows(path: Path, domain: str) -> list[dict[str, str]]:
    from markup2image.data.markup_file import read_markup_file

    try:
        return read_markup_file(path, domain)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_score(args: argparse.Namespace) -> int:
    from markup2image.evaluation.score import score_folders

    for d in (args.pred, args.gold):
        if not Path(d).is_dir():
            raise SystemExit(f"error: {d}: not a folder of images")
    result = score_folders(args.pred, args.gold, progress=True)
    emit(result, args.out)
    summary = result["summary"]
    blank = result["blank_baseline"]
    if not summary["n"]:
        raise SystemExit(
            f"error: no pair could be scored: {len(result['mismatched'])} with different sizes, "
            f"{len(result['unreadable'])} with an unreadable file (each named above); the JSON lists them"
        )
    print(
        "mean over {n}: DTW {dtw:.2f}  DTW-TI {dtw_ti:.2f}  RMSE {rmse:.2f}  SSIM {ssim:.4f}".format(**summary)
        + f"  | blank: DTW {blank['dtw']:.2f}  RMSE {blank['rmse']:.2f}"
        + f"  | gold one row off: DTW {result['row_shift_dtw']:.2f}",
        file=sys.stderr,
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from markup2image.diffusion.sampling import sample_images, to_uint8
    from markup2image.io import save_png
    from markup2image.models.model import MODEL_CONFIG, load_model
    from markup2image.text.tokenizer import empty_markup_like, encode_batch, load_tokenizer

    model_dir = Path(args.model)
    if not (model_dir / MODEL_CONFIG).exists():
        raise SystemExit(f"error: {model_dir}: not a trained model folder (expected models/<domain>/model)")
    if args.layout is not None:
        return _sample_grounded(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, map_location=device).to(device)
    saved = json.loads((model_dir / MODEL_CONFIG).read_text())
    diffusion = model.diffusion
    steps = args.steps or (diffusion.num_train_timesteps if args.sampler == "ddpm" else 50)
    if args.markup_file is not None:
        rows = _markup_rows(args.markup_file, saved.get("domain") or "math")
    elif args.markup:
        rows = [{"id": "", "markup": m} for m in args.markup]
    else:
        raise SystemExit("error: sample needs --markup (repeatable) or --markup-file")
    tok = load_tokenizer(model_dir)
    size = max(1, args.batch_size)
    w = args.guidance_scale
    if w is None:  # the evaluate stage's scale for this model
        w = float(saved.get("params", {}).get("evaluate", {}).get("guidance_scale", 1.0))
    arrays = []
    for lo in tqdm(range(0, len(rows), size), desc="sample", unit="batch", disable=len(rows) <= size):
        chunk = [r["markup"] for r in rows[lo : lo + size]]
        ids, mask = encode_batch(tok, chunk, model.model_cfg.max_text_length)
        uncond = tuple(torch.from_numpy(a).to(device) for a in empty_markup_like(tok, ids)) if w != 1.0 else None
        try:
            images = sample_images(
                model,
                torch.from_numpy(ids).to(device),
                torch.from_numpy(mask).to(device),
                sampler=args.sampler,
                steps=steps,
                seed=args.seed + lo,
                diffusion=diffusion,
                progress=len(rows) <= size,
                guidance_scale=w,
                uncond=uncond,
            )
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        arrays.extend(to_uint8(images))
    if args.markup_file is not None:
        outs = [Path(args.out) / f"{r['id']}.png" for r in rows]
    elif len(arrays) == 1:
        outs = [Path(args.out)]
    else:
        outs = [Path(args.out).with_name(f"{Path(args.out).stem}_{i}.png") for i in range(len(arrays))]
    for out, img in zip(outs, arrays):
        save_png(out, img)
    print(f"wrote {outs[0]}" if len(outs) == 1 else f"wrote {len(outs)} images into {outs[0].parent}")
    return 0


def _sample_grounded(args: argparse.Namespace) -> int:
    """``sample --layout``: one markup, its segments steered into the layout's boxes by HCMA guidance."""
    from markup2image.diffusion.guidance import sample_with_layout

    if len(args.markup) != 1:
        raise SystemExit(
            f"error: --layout {args.layout}: grounded sampling takes one --markup, got {len(args.markup)}"
        )
    try:
        sample_with_layout(
            args.model,
            args.markup[0],
            args.layout,
            args.out,
            sampler=args.sampler,
            steps=args.steps or 50,
            seed=args.seed,
            guidance_global=args.guidance_global,
            guidance_local=args.guidance_local,
            boxes_out=args.boxes_out,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {args.out}" + (f" and {args.boxes_out}" if args.boxes_out else ""))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from markup2image.models.summary import parameter_summary

    params = _params(args.params)
    domain = args.domain or params.domains[0]
    summary = parameter_summary(params, domain, args.vocab_size, size=args.size)
    if args.table:
        from markup2image.models.summary import paper_table, paper_table_markdown

        print(paper_table_markdown(paper_table(summary)), end="")
        return 0
    emit(summary, args.out)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """Print (or queue, or check) the ``dvc exp run -S ...`` of each recipe file."""
    import shlex
    import subprocess

    from markup2image.recipes import dvc_command, recipe_check

    for recipe in args.recipes:
        if args.check:
            emit(recipe_check(recipe, args.params), None)
            continue
        cmd = dvc_command(recipe, queue=args.queue or args.print_queue)
        print(shlex.join(cmd))
        if args.queue:
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"error: {recipe}: dvc exp run --queue failed (exit {proc.returncode})")
    if args.queue:
        print("queued; run them with: dvc exp run --run-all (then dvc exp show / dvc metrics diff)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """``study run`` / ``study queue``: the Tables 1-3 runs; ``study report``: them as a table and plots."""
    from markup2image import study

    domain = args.domain or _params(args.params).domains[0]
    if args.action == "queue":
        study.queue(study.rows_arg(args.rows), args.seeds, domain, args.params, dry_run=args.dry_run)
        return 0
    if args.action == "run":
        runs = study.saved_runs(Path(args.out)) | study.experiments(study.exp_show(), domain)
        done = study.finished(runs, args.params)
        result = study.run(study.rows_arg(args.rows), args.seeds, domain, args.params, jobs=args.jobs, done=done)
        ran, failed, skipped = (len(result[k]) for k in ("ran", "failed", "skipped"))
        print(f"study run: {ran} ran, {failed} failed, {skipped} done before")
        if result["failed"]:
            print("failed: " + " ".join(result["failed"]), file=sys.stderr)
            return 1
        return 0
    show = json.loads(Path(args.exp_json).read_text()) if args.exp_json else study.exp_show()
    rendered = Path(args.rendered) if args.rendered else None
    result = study.report(show, Path(args.out), domain, rendered=rendered)
    wt, wl = (max(len(row[k]) for row in result["rows"]) for k in ("table", "label"))
    for row in result["rows"]:
        print(f"{row['table']:{wt}}  {row['label']:{wl}}  {row['verdict']}")
    print(f"{len(result['runs'])} runs -> {args.out}/results.{{md,json,png}}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench.run(args, _params(args.params))


# -- parser ---------------------------------------------------------------------------------------------------------


def _add_render(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("render", help="render markup with the domain's real renderer (one item or a file of them)")
    r.add_argument("--domain", required=True, choices=DOMAINS)
    r.add_argument("--markup")
    r.add_argument(
        "--markup-file", type=Path, help="one markup per line, or JSONL with 'id' and 'markup'; --out is a folder"
    )
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--engine", help="override the domain's engine (math: mathtext | latex)")
    r.set_defaults(fn=cmd_render)


def _add_score(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("score", help="score same-named images of two folders (design §6 protocol)")
    s.add_argument("--pred", required=True, type=Path)
    s.add_argument("--gold", required=True, type=Path)
    s.add_argument("--out", type=Path, help="JSON file (default: stdout)")
    s.set_defaults(fn=cmd_score)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    sm = sub.add_parser("sample", help="generate the image of markup with a trained model")
    sm.add_argument("--model", required=True, type=Path)
    sm.add_argument("--markup", action="append", help="repeat for a batch")
    sm.add_argument(
        "--markup-file", type=Path, help="one markup per line, or JSONL with 'id' and 'markup'; --out is a folder"
    )
    sm.add_argument("--batch-size", type=int, default=32, help="items sampled together")
    sm.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance (default: the model's evaluate.guidance_scale)"
    )
    sm.add_argument("--out", required=True, type=Path)
    sm.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    sm.add_argument("--steps", type=int, default=0, help="default: 1000 for ddpm, 50 otherwise")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument(
        "--layout",
        type=Path,
        help="grounded generation (HCMA model): JSON boxes [{'box': [x0, y0, x1, y1], 'chars': [c0, c1]}, ...]",
    )
    sm.add_argument("--guidance-global", type=float, help="with --layout: global guidance scale (default: trained)")
    sm.add_argument("--guidance-local", type=float, help="with --layout: local guidance scale (default: trained)")
    sm.add_argument("--boxes-out", type=Path, help="with --layout: also write the sample with its boxes drawn")
    sm.set_defaults(fn=cmd_sample)


def _add_summary(sub: argparse._SubParsersAction) -> None:
    su = sub.add_parser("summary", help="parameter count per module for the current params (JSON)")
    su.add_argument("--domain")
    su.add_argument("--vocab-size", type=int, default=512)
    su.add_argument(
        "--size",
        default="params",
        choices=["params", "tiny", "paper"],
        help="params = the model in params.yaml; paper = the SS-DM U-Net (with switches)",
    )
    su.add_argument("--out", type=Path)
    su.add_argument("--table", action="store_true", help="markdown rows like for like with paper Table 1")
    su.set_defaults(fn=cmd_summary)


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    rc = sub.add_parser("recipe", help="paper recipes (configs/paper/<domain>.yaml) as dvc exp run -S overrides")
    rc.add_argument("recipes", nargs="+", type=Path, help="recipe files, e.g. configs/paper/*.yaml")
    rc.add_argument("--queue", action="store_true", help="run `dvc exp run --queue -S ...` for each recipe")
    rc.add_argument("--print-queue", action="store_true", help="print the --queue commands without running them")
    rc.add_argument(
        "--check", action="store_true", help="validate each recipe and build its model on the meta device (JSON)"
    )
    rc.set_defaults(fn=cmd_recipe)


def _add_study(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser(
        "study", help="paper Tables 1-3 as a dvc exp series: run it (run, or queue for dvc queue) and report it"
    )
    st.add_argument("action", choices=("run", "queue", "report"))
    st.add_argument("-j", "--jobs", type=int, default=2, help="run: experiments at a time (default 2)")
    st.add_argument("--rows", nargs="+", help="study rows to queue (default: all); see markup2image.study.CONFIGS")
    st.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="train.seed values (default 0 1)")
    st.add_argument("--domain", default=None, help="default: the first of params.yaml domains")
    st.add_argument("--dry-run", action="store_true", help="queue: print the dvc commands without queueing them")
    st.add_argument("--exp-json", default=None, help="report: a saved `dvc exp show --json` (default: run it)")
    st.add_argument(
        "--out", default="docs/study", help="results.{json,md,png}; its runs.json: runs kept from earlier reports"
    )
    st.add_argument("--rendered", default=None, help="report: the rendered split (data/rendered/math): samples.png")
    st.set_defaults(fn=cmd_study)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="markup2image", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="params file (defaults apply if it does not exist)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    _add_render(sub)
    _add_score(sub)
    _add_sample(sub)
    _add_summary(sub)
    _add_recipe(sub)
    _add_study(sub)
    b = sub.add_parser("bench", help="benchmarks, JSON out: markup2image bench NAME --help for one bench's flags")
    bench.add_parsers(b)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from markup2image.config import ConfigError
    from markup2image.io import CorruptFileError

    try:
        return args.fn(args)
    except ConfigError as exc:
        raise SystemExit(f"error: {args.params}: {exc}") from None
    except (FileNotFoundError, CorruptFileError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except ValueError as exc:  # the commands' own checks name the input and the fix (e.g. score's folders)
        if args.verbose:
            raise
        raise SystemExit(f"error: {exc} (run with -v for the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
