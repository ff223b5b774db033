"""sora-eval: measure what a run produced.

  sora-eval loss-plot RUN_DIR [RUN_DIR ...] --out loss.png     loss curves of one or more runs
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
