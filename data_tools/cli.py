"""`sora-data`: footage -> shards, and tools over shard sets.

    sora-data ingest footage/ --out data/shards/mine        # docs/data.md
    sora-data probe footage/                                # what decodes, codecs, hours
    sora-data probe data/shards/mine --json                 # verify a shard set
    sora-data ingest footage/ --out OUT --part 2/4          # one part of an array job; then:
    sora-data merge OUT                                     # the parts -> one shard set

Adding a subcommand is one line in ``SUBCOMMANDS``: its help and the module that implements
it, with ``add_arguments(parser)`` and ``run(args) -> exit status``.

Exit status: 0 done; 1 the run finished but failed (nothing usable written, a shard set that
does not verify); 2 a usage error (a missing input, a bad option), printed as one line
``error: <message>``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

Runner = Callable[[argparse.Namespace], int]

# name -> (help, module). Each module has add_arguments(parser) and run(args) -> exit status;
# it is imported only when its subcommand runs, so `sora-data probe` does not pay for what
# `sora-data cache-latents` imports (Lightning, the models).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("footage folders/files + captions -> webdataset shards, index.json, rejects.jsonl", "ingest"),
    "probe": ("summarise a footage folder (what decodes, codecs, hours) or verify a shard set", "probe"),
    "preview": ("PNG contact sheet of what the loader feeds, per bucket (frames + captions)", "preview"),
    "cache-latents": ("video shard set -> latent shard set (VAE latents, optional text embeddings) for DiT training", "cache_latents"),
    "recaption": ("rewrite a shard set's captions with a re-writer (optionally from frames) -> a new shard set", "recaption"),
    "merge": ("join the parts an array job wrote (--part K/N of ingest, recaption, cache-latents) into one shard set", "parts"),
}


def configure(name: str, parser: argparse.ArgumentParser) -> Runner:
    """Import subcommand ``name``'s module, add its arguments to ``parser``; -> its runner."""
    module = importlib.import_module(f"sora_train.data_tools.{SUBCOMMANDS[name][1]}")
    module.add_arguments(parser)
    return module.run


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
    for name, (help, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        if name == chosen:
            p.set_defaults(_run=configure(name, p))
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
