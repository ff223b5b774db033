"""Config -> typed objects: the one place a composed config is instantiated into the parts the
recipe (``sora_train.training.recipe``) takes. sora-train, sora-export, the config tests and the
benchmarks build through here; nothing below ``cli`` reads a DictConfig.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sora_train.training.recipe import RUN_PATH_KEYS, Parallelism, build_dit_task, build_vae_task, is_vae_task
from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger("sora_train.build")


def instantiate(node: Any, **kwargs: Any) -> Any:
    from hydra.utils import instantiate as _instantiate

    return _instantiate(node, **kwargs)


def is_vae_config(cfg: DictConfig) -> bool:
    from hydra.utils import get_class

    return is_vae_task(get_class(cfg.task._target_))


def plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (resolved); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def parallelism(cfg: DictConfig) -> Parallelism:
    node = plain(cfg.get("parallel")) or {}
    known = set(Parallelism.__dataclass_fields__)
    unknown = sorted(set(node) - known)
    if unknown:
        raise SoraError(f"parallel.{unknown[0]}: unknown option; valid: {', '.join(sorted(known))}")
    return Parallelism(**node)


def build_module(cfg: DictConfig):
    """The LightningModule of the run with every part built from the config."""
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    task = instantiate(cfg.task, _partial_=True)
    if is_vae_config(cfg):
        return build_vae_task(task, vae=instantiate(cfg.vae), optimizer=optimizer, scheduler=scheduler, init_from=cfg.get("init_from"),
                              gradient_clip_val=cfg.trainer.get("gradient_clip_val"))
    vae_ckpt = cfg.get("vae_ckpt")
    return build_dit_task(
        task, dit=instantiate(cfg.dit), text=instantiate(cfg.text), flow=instantiate(cfg.diffusion), optimizer=optimizer, scheduler=scheduler,
        vae=None if (vae_ckpt or cfg.get("init_from")) else instantiate(cfg.vae), vae_ckpt=vae_ckpt, init_from=cfg.get("init_from"), lora=plain(cfg.get("lora")),
        parallel=parallelism(cfg), control=instantiate(cfg.control) if cfg.get("control") else None,
    )


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for _, c in (cfg.get("callbacks") or {}).items() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for _, c in (cfg.get("logger") or {}).items() if c is not None and "_target_" in c]


def run_paths(cfg: DictConfig) -> dict[str, Any]:
    """The resolved RUN_PATH_KEYS of a run (paths only, never secrets)."""
    return {key: plain(OmegaConf.select(cfg, key, default=None)) for key in RUN_PATH_KEYS}


def record_run_paths(cfg: DictConfig, run_dir: str | Path) -> Path:
    from sora_train.training.recipe import record_run_paths as record

    return record(run_paths(cfg), run_dir)


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """The composed config a run saved (RUN_DIR/.hydra/config.yaml), with ``run_dir`` set to it
    and the paths the run resolved from the environment (RUN_DIR/.hydra/run_paths.json) pinned:
    ``vae_ckpt: ${oc.env:SORA_QUALITY_DIR,...}/vae/export`` means what it meant in training."""
    from sora_train.training.recipe import read_run_paths

    run_dir = Path(run_dir)
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise SoraError(f"{run_dir}: no saved config at {path}; is this a sora-train run directory?")
    cfg = OmegaConf.load(path)
    cfg.run_dir = str(run_dir.resolve())  # was ${hydra:runtime.output_dir}, resolvable only inside Hydra
    for key, value in read_run_paths(run_dir).items():  # runs from before it was recorded resolve as the config says
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def export_run(cfg: DictConfig, module: Any, datamodule: Any, out_dir: str | Path, step: int | None = None) -> Path:
    """The run's export (``recipe.export_task``) with the settings its config gives."""
    from sora_train.training.recipe import export_task

    return export_task(module, out_dir, datamodule=datamodule, step=step, latent_stats_batches=int(cfg.get("latent_stats_batches", 8)),
                       lora=plain(cfg.get("lora")), train_shards=plain(OmegaConf.select(cfg, "data.train_shards", default=None)))


def export_checkpoint(cfg: DictConfig, ckpt: str | os.PathLike, out_dir: str | os.PathLike, datamodule: Any = None) -> Path:
    """Rebuild the run's LightningModule from ``cfg``, load ``ckpt``'s weights, write the export.

    Args:
        cfg: the run's composed config.
        ckpt: a Lightning ``.ckpt`` or a DeepSpeed checkpoint directory.
        out_dir: where model.json and model.safetensors go.
        datamodule: the run's data module (built from ``cfg.data`` when None); a VAE export
            measures its latent statistics on training data.
    """
    import lightning.pytorch as pl

    from sora_train.training.recipe import load_checkpoint_weights

    cfg = copy.deepcopy(cfg)
    # init_from gave the run its DiT architecture (its weights are replaced by the checkpoint's).
    if cfg.get("init_from") and not os.path.exists(str(cfg.init_from)):
        log.warning("init_from=%s no longer exists: the DiT is built from the config", cfg.init_from)
        cfg.init_from = None
    vae_gone = bool(cfg.get("vae_ckpt")) and not os.path.exists(str(cfg.vae_ckpt))
    if vae_gone:
        cfg.vae_ckpt = None
    # Frozen parts not loaded from a file are built as training built them: same seed, same order.
    pl.seed_everything(int(cfg.get("seed", 0)), verbose=False)
    module = build_module(cfg)
    ema_cfg = (cfg.get("callbacks") or {}).get("ema") or {}
    step, frozen_loaded = load_checkpoint_weights(module, ckpt, ema_attr=ema_cfg.get("attr", "dit"))
    if vae_gone and "vae" not in frozen_loaded and not is_vae_config(cfg):
        raise SoraError(f"{ckpt}: vae_ckpt no longer exists and the DiT's frozen VAE is not in checkpoints; "
                        "put the VAE export back, or set its current place as vae_ckpt in RUN_DIR/.hydra/run_paths.json")
    if datamodule is None:
        datamodule = instantiate(cfg.data)
        if is_vae_config(cfg):
            datamodule.setup("fit")
    out = export_run(cfg, module, datamodule, out_dir, step=step)
    log.info("exported %s (step %s) to %s", ckpt, step, out)
    return out
