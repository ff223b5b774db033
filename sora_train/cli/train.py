"""sora-train: train the video VAE or the diffusion transformer from a composed config.

  demo on CPU:          sora-train experiment=demo_vae && sora-train experiment=demo
  1 GPU:                sora-train experiment=pretrain_100M trainer=gpu
  1 node, 8 GPUs:       sora-train experiment=pretrain_1B trainer=gpu trainer.devices=8 strategy=deepspeed_stage_2
  2 nodes on Slurm:     sora-train -m experiment=pretrain_1B launcher=slurm hydra.launcher.nodes=2
  fine-tune:            sora-train experiment=finetune_lora init_from=outputs/.../export data.train_shards=my_shards/
  sweep:                sora-train -m hparams_search=dit_lr
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger("sora_train.train")


def _instantiate(cfg: Any, **kwargs: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(cfg, **kwargs)


def _is_vae_task(cfg: DictConfig) -> bool:
    from hydra.utils import get_class

    from sora_train.training.vae_module import VAEModule

    return issubclass(get_class(cfg.task._target_), VAEModule)


def build_module(cfg: DictConfig):
    """The LightningModule of the run with every part built from the config."""
    from sora_train.models.export import load_parts

    optimizer = _instantiate(cfg.optimizer)
    scheduler = _instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    if _is_vae_task(cfg):
        vae = _instantiate(cfg.vae)
        if cfg.init_from:
            vae.load_state_dict(load_parts(cfg.init_from, ["vae"])[0]["vae"].state_dict())
        return _instantiate(cfg.task, vae=vae, optimizer=optimizer, scheduler=scheduler, gradient_clip_val=cfg.trainer.get("gradient_clip_val"))

    if cfg.vae_ckpt:
        vae = load_parts(cfg.vae_ckpt, ["vae"])[0].get("vae")
        if vae is None:
            raise SoraError(f"vae_ckpt={cfg.vae_ckpt}: the export holds no 'vae' part")
    else:
        log.warning("vae_ckpt is not set: the DiT trains in the latent space of an untrained VAE (fine for smoke tests only)")
        vae = _instantiate(cfg.vae)
    text = _instantiate(cfg.text)
    flow = _instantiate(cfg.diffusion)
    module = _instantiate(cfg.task, vae=vae, text_encoder=text, dit=_instantiate(cfg.dit), flow=flow, optimizer=optimizer, scheduler=scheduler)
    if cfg.init_from:
        parts, _ = load_parts(cfg.init_from, ["dit", "ema", "text"])
        src = parts.get("ema") or parts.get("dit")
        if src is None:
            raise SoraError(f"init_from={cfg.init_from}: the export holds no 'dit' or 'ema' part")
        module.dit.load_state_dict(src.state_dict())
        if "text" in parts and getattr(text, "trainable", False):
            module.text_encoder.load_state_dict(parts["text"].state_dict())
        log.info("initialised from %s", cfg.init_from)
    if cfg.get("lora"):
        from sora_train.models.lora import add_lora

        # Adapters into the DiT's block Linears; every other weight, the text encoder's too, frozen.
        settings = add_lora(module.dit, **OmegaConf.to_container(cfg.lora, resolve=True))
        module.freeze_text_encoder()
        trainable = sum(p.numel() for p in module.dit.parameters() if p.requires_grad)
        log.info("LoRA rank %d: %.2f M trainable of %.2f M DiT parameters", settings["rank"], trainable / 1e6, sum(p.numel() for p in module.dit.parameters()) / 1e6)
    return module


def build_callbacks(cfg: DictConfig) -> list:
    return [_instantiate(c) for _, c in (cfg.get("callbacks") or {}).items() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list:
    return [_instantiate(c) for _, c in (cfg.get("logger") or {}).items() if c is not None and "_target_" in c]


def export_run(cfg: DictConfig, module, datamodule, run_dir: Path, out_dir: Path | None = None, step: int | None = None) -> Path | None:
    """Write run_dir/export (or ``out_dir``): safetensors weights + model.json (what sora-sample
    reads). ``step``: the training step recorded (default: the module's global step)."""
    from sora_train.data.shards import read_index
    from sora_train.data.transforms import video_to_float
    from sora_train.models.export import export_parts, save_safetensors_atomic
    from sora_train.models.lora import has_lora, lora_state_dict, merged_copy

    meta = {"task": "vae" if _is_vae_task(cfg) else "dit", "step": int(module.global_step if step is None else step), "sampler": OmegaConf.to_container(cfg.diffusion.get("sampler") or {}, resolve=True), "diffusion": OmegaConf.to_container(cfg.diffusion, resolve=True)}
    if meta["task"] == "vae":
        from sora_train.models.vae import compute_latent_stats

        # Latent scale/shift for the diffusion model, measured on training data.
        loader = datamodule.train_dataloader()
        batches = (video_to_float(b["video"]) for b in loader)  # straight from the loader: uint8
        shift, scale = compute_latent_stats(module.vae, batches, max_batches=int(cfg.get("latent_stats_batches", 8)))
        module.vae.set_latent_stats(shift, scale)
        return export_parts(out_dir or run_dir / "export", {"vae": module.vae}, meta)
    buckets = datamodule.make_buckets()
    first = (buckets.video or buckets.buckets)[0]
    meta["train_shape"] = {"num_frames": first.num_frames, "height": first.height, "width": first.width}
    try:  # options the training data was written with (shapes world: held-out pairs), for sora-eval shapes;
        # for latent shards, those of the video set they were cached from
        index = read_index(cfg.data.get("train_shards"))
        meta["train_data"] = index.get("source_options") or index.get("options") or {}
    except (SoraError, TypeError, OSError):
        pass
    parts = {"vae": module.vae, "text": module.text_encoder, "dit": module.dit}
    if getattr(module, "ema", None) is not None:
        parts["ema"] = module.ema
    # A text encoder rebuilt from its own folder (config "path") is exported as config only.
    weights = {"text": not module.text_encoder.config().get("path")}
    adapter = None
    if has_lora(module.dit):  # a LoRA run exports plain models with the adapters folded in
        adapter = lora_state_dict(module.ema if "ema" in parts else module.dit)
        parts = {k: merged_copy(m) if k in ("dit", "ema") else m for k, m in parts.items()}
        meta["lora"] = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") else True
    out = export_parts(out_dir or run_dir / "export", parts, meta, weights=weights)
    if adapter is not None:
        save_safetensors_atomic(adapter, out / "adapter.safetensors")
    return out


# Config values that may come from the environment (${oc.env:...}): the run records what they
# were, so sora-export rebuilds the same model in a shell where those variables differ.
RUN_PATH_KEYS = ("vae_ckpt", "init_from", "paths.data_dir", "data.train_shards", "data.val_shards")
RUN_PATHS_FILE = "run_paths.json"  # in RUN_DIR/.hydra, next to Hydra's unresolved config.yaml


def record_run_paths(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved RUN_PATH_KEYS (paths only, never secrets) to RUN_DIR/.hydra."""
    from omegaconf import OmegaConf

    from sora_train.utils.io import atomic_write_json

    values = {}
    for key in RUN_PATH_KEYS:
        v = OmegaConf.select(cfg, key, default=None)
        values[key] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return atomic_write_json(run_dir / ".hydra" / RUN_PATHS_FILE, values)


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer=gpu`` on a machine without a usable GPU: one line that says so, before
    anything is built (Lightning's own message comes after data and models, as a traceback)."""
    import torch

    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SoraError(
            f"trainer.accelerator={accelerator} (trainer=gpu) but this machine has no usable CUDA GPU "
            f"(torch {torch.__version__}, cuda available: False); on CPU use trainer=cpu or trainer.accelerator=cpu"
        )


def train(cfg: DictConfig) -> float | None:
    """Build data -> model -> callbacks -> loggers -> trainer, fit, export; returns the metric
    a sweeper optimises (``optimized_metric``)."""
    import warnings

    import lightning.pytorch as pl

    from sora_train.training.callbacks.checkpoint import find_resume_checkpoint

    # The VAE task optimises manually; a checkpoint at step N holds the state after step N's
    # update, which is what resuming at N + 1 needs. Lightning's 20-line advice is noise here.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # The frozen VAE (and a frozen text encoder) stay in eval mode on purpose (DiTModule.train).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    check_accelerator(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_run_paths(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = _instantiate(cfg.data)
    module = build_module(cfg)
    strategy = _instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    trainer_kwargs: dict[str, Any] = {}
    if _is_vae_task(cfg):
        trainer_kwargs["gradient_clip_val"] = None  # manual optimisation clips in the module
    trainer: pl.Trainer = _instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False, strategy=strategy, **trainer_kwargs)
    ckpt = find_resume_checkpoint(cfg.get("resume"), run_dir)
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)

    if cfg.get("export"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # The live weights are partitioned across ranks (ZeRO-3) or in the training dtype;
            # the final checkpoint holds them all in fp32: export what sora-export would.
            from sora_train.cli.export import export_checkpoint

            # CheckpointPolicy keeps the top-k by step: its best is the final step's checkpoint.
            last = getattr(trainer.checkpoint_callback, "best_model_path", None) or find_resume_checkpoint("auto", run_dir)
            if not last:
                log.warning("no checkpoint to export from (callbacks.checkpoint is off); skipped the export")
            elif trainer.is_global_zero:
                out = export_checkpoint(cfg, last, run_dir / "export", datamodule)
                log.info("exported weights to %s", out)
        elif trainer.is_global_zero:
            out = export_run(cfg, module, datamodule, run_dir)
            log.info("exported weights to %s", out)
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    metric = float(metric) if metric is not None else None
    _close_process_group()
    return metric


def _close_process_group() -> None:
    """Tear a finished run's process group down while the interpreter is still whole: left to
    the exit, gloo's worker threads can outlive it and abort the process ("terminate called
    without an active exception"), so a job that finished reads as failed. Only after every
    rank got here: destroying while another rank is mid-collective can hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    from sora_train.cli.common import run_hydra

    run_hydra(train, "train")


if __name__ == "__main__":
    main()
