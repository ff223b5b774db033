"""`sora-data`: footage -> shards, and tools over shard sets.

    sora-data ingest footage/ --out data/shards/mine        # docs/data.md
    sora-data probe footage/                                # what decodes, codecs, hours
    sora-data probe data/shards/mine --json                 # verify a shard set

Adding a subcommand is one function below, decorated with ``@subcommand``: it adds the
subcommand's arguments to its parser and returns the function that runs it (args -> exit
status). Import the implementing module inside that function, so that ``sora-data probe``
does not pay for what ``sora-data recaption`` imports.

Exit status: 0 done; 1 the run finished but failed (nothing usable written, a shard set that
does not verify); 2 a usage error (a missing input, a bad option), printed as one line
``error: <message>``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

Runner = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], Runner]

_SUBCOMMANDS: dict[str, tuple[str, Configure]] = {}


def subcommand(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register ``fn(parser) -> runner`` as ``sora-data <name>``."""

    def register(fn: Configure) -> Configure:
        if name in _SUBCOMMANDS:
            raise ValueError(f"sora-data subcommand {name!r} registered twice")
        _SUBCOMMANDS[name] = (help, fn)
        return fn

    return register


@subcommand("ingest", "footage folders/files + captions -> webdataset shards, index.json, rejects.jsonl")
def _ingest(p: argparse.ArgumentParser) -> Runner:
    from sora_train.data_tools import ingest

    ingest.add_arguments(p)
    return ingest.run


@subcommand("probe", "summarise a footage folder (what decodes, codecs, hours) or verify a shard set")
def _probe(p: argparse.ArgumentParser) -> Runner:
    from sora_train.data_tools import probe

    probe.add_arguments(p)
    return probe.run


@subcommand("preview", "PNG contact sheet of what the loader feeds, per bucket (frames + captions)")
def _preview(p: argparse.ArgumentParser) -> Runner:
    from sora_train.data_tools import preview

    preview.add_arguments(p)
    return preview.run


@subcommand("cache-latents", "video shard set -> latent shard set (VAE latents, optional text embeddings) for DiT training")
def _cache_latents(p: argparse.ArgumentParser) -> Runner:
    from sora_train.data_tools import cache_latents

    cache_latents.add_arguments(p)
    return cache_latents.run


@subcommand("recaption", "rewrite a shard set's captions with a re-writer (optionally from frames) -> a new shard set")
def _recaption(p: argparse.ArgumentParser) -> Runner:
    from sora_train.data_tools import recaption

    recaption.add_arguments(p)
    return recaption.run


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Only the subcommand named in ``argv`` is configured (its module imported): listing all of
    them must not import Lightning for ``cache-latents`` when the user runs ``probe``."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="sora-data", description="Footage -> shards, and tools over shard sets.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help, configure) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        if name == chosen:
            p.set_defaults(_run=configure(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sora-data` console script; returns the exit status."""
    args = build_parser(argv).parse_args(argv)
    from sora_train.utils.errors import SoraError

    try:
        return int(args._run(args) or 0)
    except SoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
