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
import copy
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger("sora_train.export")


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """The composed config a run saved (RUN_DIR/.hydra/config.yaml), with ``run_dir`` set to it
    and the paths the run resolved from the environment (RUN_DIR/.hydra/run_paths.json) pinned:
    ``vae_ckpt: ${oc.env:SORA_QUALITY_DIR,...}/vae/export`` means what it meant in training."""
    import json

    from sora_train.cli.train import RUN_PATHS_FILE

    run_dir = Path(run_dir)
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise SoraError(f"{run_dir}: no saved config at {path}; is this a sora-train run directory?")
    cfg = OmegaConf.load(path)
    cfg.run_dir = str(run_dir.resolve())  # was ${hydra:runtime.output_dir}, resolvable only inside Hydra
    paths = run_dir / ".hydra" / RUN_PATHS_FILE
    if paths.is_file():  # runs from before it was recorded resolve as the config says
        try:
            pinned = json.loads(paths.read_text())
        except ValueError as e:
            raise SoraError(f"{paths}: not valid JSON ({e})") from None
        for key, value in pinned.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


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


def export_checkpoint(cfg: DictConfig, ckpt: str | os.PathLike, out_dir: str | os.PathLike, datamodule: Any = None) -> Path:
    """Rebuild the run's LightningModule from ``cfg``, load ``ckpt``'s weights, write the export.

    Args:
        cfg: the run's composed config.
        ckpt: a Lightning ``.ckpt`` or a DeepSpeed checkpoint directory.
        out_dir: where model.json and model.safetensors go.
        datamodule: the run's data module (built from ``cfg.data`` when None); a VAE export
            measures its latent statistics on training data.
    """
    from hydra.utils import instantiate

    from sora_train.cli.train import _is_vae_task, build_module, export_run
    from sora_train.parallel.consolidate import read_checkpoint_weights
    from sora_train.models.export import _is_derived

    state, meta = read_checkpoint_weights(ckpt)
    cfg = copy.deepcopy(cfg)
    cfg.init_from = None  # the checkpoint holds every weight
    if cfg.get("vae_ckpt") and not os.path.exists(str(cfg.vae_ckpt)):
        log.warning("vae_ckpt=%s no longer exists: the VAE is built from the config and loaded from the checkpoint", cfg.vae_ckpt)
        cfg.vae_ckpt = None
    import lightning.pytorch as pl

    # Frozen parts (the DiT's VAE and text encoder) are not in checkpoints: built as training
    # built them (same seed, same order), or loaded from vae_ckpt / text.path.
    pl.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    module = build_module(cfg)
    for name in getattr(module, "_frozen", {}):  # checkpoints from before frozen parts left the model
        prefix = f"{name}."
        old = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        if old:
            getattr(module, name).load_state_dict(old)
    for key in [k for k in state if k.startswith("loss.")]:  # a VAE run's discriminator (older checkpoints): not exported
        del state[key]
    ema_cfg = (cfg.get("callbacks") or {}).get("ema") or {}
    if any(k.startswith("ema.") for k in state) and getattr(module, "ema", None) is None:
        ema = copy.deepcopy(getattr(module, ema_cfg.get("attr", "dit")))
        module.ema = ema.requires_grad_(False).eval()
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_derived(k)]
    if missing or unexpected:
        raise SoraError(f"{ckpt} does not match the model of the run's config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if datamodule is None:
        datamodule = instantiate(cfg.data)
        if _is_vae_task(cfg):
            datamodule.setup("fit")
    step = meta.get("global_step")
    out = export_run(cfg, module, datamodule, Path(cfg.run_dir), out_dir=Path(out_dir), step=int(step) if step is not None else None)
    log.info("exported %s (step %s) to %s", ckpt, step, out)
    return out


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
