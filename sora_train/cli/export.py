"""sora-export: a run's checkpoint -> an export (model.json + model.safetensors, what sora-sample
and fine-tuning read), for any checkpoint kind: a Lightning ``.ckpt`` file (single device, DDP)
or a DeepSpeed ZeRO 1/2/3 checkpoint directory (shards merged; the world size need not match).

  newest checkpoint of a run -> RUN_DIR/export:   sora-export outputs/runs/2026-01-01/12-00-00
  its last.ckpt:                                  sora-export RUN_DIR --ckpt last
  a given checkpoint, elsewhere:                  sora-export RUN_DIR --ckpt RUN_DIR/checkpoints/step=00001000.ckpt --out exports/s1000

The model is rebuilt from the run's saved config (RUN_DIR/.hydra/config.yaml) and loaded with the
checkpoint's weights. Checkpoint files are read with ``torch.load(weights_only=True)`` (DeepSpeed
shards: plus four of DeepSpeed's plain data classes, by name), so nothing else is unpickled.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sora_train.cli.build import export_checkpoint, load_run_config
from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger("sora_train.export")


def resolve_checkpoint(run_dir: str | os.PathLike, spec: str | None) -> str:
    """``None``: the newest numbered checkpoint of the run; ``last``: its last.ckpt; else a path."""
    from sora_train.training.callbacks.checkpoint import find_resume_checkpoint

    if spec == "last":
        path = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not path.exists():
            raise SoraError(f"--ckpt last: {path} does not exist")
        return str(path)
    if spec:
        if not os.path.exists(spec):
            raise SoraError(f"--ckpt {spec}: no such checkpoint")
        return spec
    found = find_resume_checkpoint("auto", run_dir)
    if found is None:
        raise SoraError(f"{run_dir}: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    return found


def main(argv: list[str] | None = None) -> None:
    from sora_train.cli.common import one_line_errors

    parser = argparse.ArgumentParser(prog="sora-export", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a sora-train run directory (holds .hydra/config.yaml and checkpoints/)")
    parser.add_argument("--ckpt", default=None, help="checkpoint file or ZeRO directory, or 'last' (default: the newest numbered one)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")
    args = parser.parse_args(argv)

    @one_line_errors
    def run() -> None:
        cfg = load_run_config(args.run_dir)
        ckpt = resolve_checkpoint(args.run_dir, args.ckpt)
        out = export_checkpoint(cfg, ckpt, args.out or Path(args.run_dir) / "export")
        print(out)

    run()


if __name__ == "__main__":
    main()
