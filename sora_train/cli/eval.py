"""sora-eval: measure what a run produced.

  sora-eval loss-plot RUN_DIR [RUN_DIR ...] --out loss.png     loss curves of one or more runs
  sora-eval vae --vae EXPORT --shards DIR [--out DIR]             VAE reconstruction PSNR/SSIM + side-by-side video
  sora-eval shapes --ckpt RUN_DIR/export [--out DIR] [--fast]    caption adherence and prompting modes, from pixels
  sora-eval shapes-compare BASE=REPORT RUN=REPORT ... --colour C  what a fine-tune on colour C taught and what it forgot
  sora-eval provenance FILE [FILE ...] [--trust CA.pem] [--json]  C2PA manifest + watermark: ours / not ours / unknown
  sora-eval scaling LADDER_DIR --next SIZE [--next-run RUN_DIR]   fit L(C) = a*C^-b + c to a DiT ladder, predict the next size
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from sora_train.cli.common import one_line_errors
from sora_train.utils.errors import SoraError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (add_args, fn)
        return fn

    return register


def _loss_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (each with plots/loss_history.json)")
    p.add_argument("--labels", nargs="*", help="one label per run (default: directory names)")
    p.add_argument("--out", required=True, help="PNG to write")


@command("loss-plot", _loss_plot_args)
def loss_plot(args: argparse.Namespace) -> int:
    from sora_train.training.callbacks.plots import combine_plots

    files = []
    for run in args.runs:
        f = Path(run) / "plots" / "loss_history.json"
        if not f.is_file():
            raise SoraError(f"{run}: no plots/loss_history.json (did that run finish training?)")
        files.append(f)
    if args.labels and len(args.labels) != len(files):
        raise SoraError(f"--labels: {len(args.labels)} labels for {len(files)} runs")
    out = combine_plots(files, args.out, labels=args.labels or [Path(r).name for r in args.runs])
    print(f"wrote {out}")
    return 0


def _shapes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="DiT export directory (run_dir/export of a shapes-world run)")
    p.add_argument("--out", default=None, help="report directory (default: <ckpt>/../eval_shapes)")
    p.add_argument("--num-per-combo", type=int, default=1, help="text-to-video samples per caption combination")
    p.add_argument("--max-combos", type=int, default=None, help="at most this many combinations per group, seen / held out (default: all)")
    p.add_argument("--clips-per-mode", type=int, default=16, help="ground-truth clips prompted per mode (i2v, extension, interpolation)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the export's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the export's)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift spacing the sampler's steps (default: the export's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--data", default=None, help="shapes dataset root whose index.json names the held-out pairs (default: the export's record)")
    p.add_argument("--control-clips", type=int, default=8, help="box control (exports trained with control=boxes): requested paths per kind (curve, zig-zag, stop-and-go)")
    p.add_argument("--targets", default="quality", choices=["quality", "demo"], help="the bar to check: the shapes recipe's (every mode) or make demo's (seen captions)")
    p.add_argument("--t2v-only", action="store_true", help="score text-to-video only (no image-to-video, extension, interpolation)")
    p.add_argument("--colour", action="append", default=[], help="also prompt every combination of this colour, scored as its own group (repeatable)")
    p.add_argument("--shapes", nargs="+", default=[], metavar="FxHxW",
                   help="also generate at these clip shapes (seen in training or not; 1xHxW: an image) and score each against the train shape")
    p.add_argument("--fast", action="store_true", help="a quick check that everything runs: 2 steps, a few combos and clips")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("shapes", _shapes_args)
def shapes(args: argparse.Namespace) -> int:
    """Caption adherence, prompting modes and consistency of a shapes-world DiT, read from pixels."""
    from sora_train.training.shapes_eval import ShapesEvalSettings, one_line, print_table, run_shapes_eval

    settings = ShapesEvalSettings(num_per_combo=args.num_per_combo, max_combos=args.max_combos, clips_per_mode=args.clips_per_mode,
                                  steps=args.steps, guidance_scale=args.guidance, shift=args.shift, seed=args.seed, batch_size=args.batch_size, fast=args.fast,
                                  control_clips=args.control_clips, targets=args.targets, modes=not args.t2v_only, colours=tuple(args.colour),
                                  shapes=tuple(args.shapes))
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / "eval_shapes"
    report = run_shapes_eval(args.ckpt, out, settings, data_dir=args.data, progress=not args.no_progress)
    print_table(report)
    print(f"wrote {out / 'report.json'} and {out / 'samples.png'}" + (f" and {out / 'native.png'}" if "native" in report else ""))
    print(one_line(report))
    return 0


def _shapes_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", metavar="LABEL=REPORT", help="the base's report.json first, then each fine-tune's (sora-eval shapes)")
    p.add_argument("--colour", required=True, help="the colour the base never saw and the fine-tunes taught")
    p.add_argument("--times", default=None, help="file of 'label seconds' lines: each run's wall time (launch/finetune_quality.sh writes it)")
    p.add_argument("--out", default=None, help="directory for compare.json (default: none written)")


@command("shapes-compare", _shapes_compare_args)
def shapes_compare(args: argparse.Namespace) -> int:
    """A base and its fine-tunes side by side: the new colour learned, points lost on the others, wall times."""
    from sora_train.training.shapes_compare import compare_reports, print_comparison, read_report, read_times, write_comparison

    reports = {}
    for item in args.reports:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SoraError(f"shapes-compare: {item!r} must be LABEL=REPORT (e.g. lora=outputs/x/eval/lora/report.json)")
        if label in reports:
            raise SoraError(f"shapes-compare: label {label!r} given twice")
        reports[label] = read_report(path)
    result = compare_reports(reports, args.colour, read_times(args.times))
    print_comparison(result)
    if args.out:
        print(f"wrote {write_comparison(result, args.out)}")
    return 0


def _vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="an export directory holding a 'vae' part")
    p.add_argument("--shards", required=True, help="a video shard set (directory with index.json, glob or brace pattern)")
    p.add_argument("--num-frames", type=int, help="clip shape (default: the set's most common shape, cut to what the VAE takes)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--max-samples", type=int, default=64, help="clips to measure")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-videos", type=int, default=4, help="clips shown input | reconstruction in the mp4 and PNG")
    p.add_argument("--chunk-frames", type=int, help="encode/decode time in chunks (long clips)")
    p.add_argument("--tile", type=int, help="encode/decode spatial tiles of this many pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="vae_eval", help="directory for vae_eval.json, reconstructions.mp4/.png")


@command("vae", _vae_args)
def vae(args: argparse.Namespace) -> int:
    """Reconstruction PSNR/SSIM of a VAE export on a shard set, with input | reconstruction videos."""
    from sora_train.training.vae_eval import evaluate_vae, print_report

    result = evaluate_vae(
        args.vae, args.shards, args.out, num_frames=args.num_frames, height=args.height, width=args.width, max_samples=args.max_samples,
        batch_size=args.batch_size, num_videos=args.num_videos, chunk_frames=args.chunk_frames, tile=args.tile, device=args.device,
    )
    print_report(result, args.out)
    return 0


def _provenance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="videos or images to check")
    p.add_argument("--trust", help="PEM file of CA certificates to trust (default: $SORA_C2PA_TRUST_ANCHORS; none: signatures are checked, signers are not)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    p.add_argument("--no-watermark", action="store_true", help="check the manifest only (skips decoding frames)")


@command("provenance", _provenance_args)
def provenance(args: argparse.Namespace) -> int:
    """Per file: C2PA manifest present and valid, its claims, the watermark's payload and confidence.

    Exit status: 0 every file ours, 1 some file not ours, 3 otherwise some file unknown."""
    import json

    from sora_train.provenance.verify import EXIT_CODES, NOT_OURS, UNKNOWN, inspect_file, load_trust_anchors, summarize

    anchors = load_trust_anchors(args.trust)
    verdicts = []
    for f in args.files:
        report = inspect_file(f, anchors, watermark=not args.no_watermark)
        verdicts.append(report.verdict)
        print(json.dumps(report.to_dict(), ensure_ascii=False) if args.json else summarize(report), flush=True)
    for verdict in (NOT_OURS, UNKNOWN):
        if verdict in verdicts:
            return EXIT_CODES[verdict]
    return 0


def _scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ladder", help="the ladder's sweep directory (<trial>/scaling.json per size, from hparams_search=scaling)")
    p.add_argument("--next", required=True, help="the size to predict, a name of the ladder's scaling.sizes (e.g. d128)")
    p.add_argument("--next-run", default=None, help="that size's run directory once it has trained: adds the measured loss")
    p.add_argument("--out", default=None, help="report directory (default: <ladder>/../report)")


@command("scaling", _scaling_args)
def scaling(args: argparse.Namespace) -> int:
    """Scaling law of a DiT ladder: fit, predict the next size, compare with its run; report.json + scaling.png."""
    from sora_train.training.scaling import one_line, scaling_report

    out = Path(args.out) if args.out else Path(args.ladder).resolve().parent / "report"
    report = scaling_report(args.ladder, args.next, out, next_run=args.next_run)
    print(f"wrote {out / 'report.json'} and {out / 'scaling.png'}")
    print(one_line(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        add_args(p)
        p.set_defaults(_fn=fn)
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = args._fn(args)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
