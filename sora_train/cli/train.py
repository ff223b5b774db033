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

    # Here, not at the top: main() must install the time-limit signal handler before torch loads.
    from sora_train.cli.build import build_callbacks, build_loggers, build_module, export_checkpoint, export_run, instantiate, is_vae_config, record_run_paths
    from sora_train.training.callbacks.checkpoint import find_resume_checkpoint
    from sora_train.training.elastic import prepare_resume

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

    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    if hasattr(datamodule, "expect_models"):  # latent sets: refuse latents and text embeddings of other parts than the run's
        datamodule.expect_models(getattr(module, "vae", None), getattr(module, "text_encoder", None))
    strategy = instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    trainer_kwargs: dict[str, Any] = {}
    if is_vae_config(cfg):
        trainer_kwargs["gradient_clip_val"] = None  # manual optimisation clips in the module
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False, strategy=strategy, **trainer_kwargs)
    ckpt = find_resume_checkpoint(cfg.get("resume"), run_dir)
    ckpt = prepare_resume(ckpt, trainer)  # another world size: a ZeRO checkpoint goes through its universal copy
    if ckpt:
        log.info("resuming from %s", ckpt)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except RuntimeError as e:
        if not ckpt or "Error(s) in loading state_dict" not in str(e):
            raise
        raise SoraError(_resume_mismatch(ckpt, run_dir, str(e))) from None

    if cfg.get("export"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # The live weights are partitioned across ranks (ZeRO-3) or in the training dtype;
            # the final checkpoint holds them all in fp32: export what sora-export would.
            # CheckpointPolicy keeps the top-k by step: its best is the final step's checkpoint.
            last = getattr(trainer.checkpoint_callback, "best_model_path", None) or find_resume_checkpoint("auto", run_dir)
            if not last:
                log.warning("no checkpoint to export from (callbacks.checkpoint is off); skipped the export")
            elif trainer.is_global_zero:
                out = export_checkpoint(cfg, last, run_dir / "export", datamodule)
                log.info("exported weights to %s", out)
        elif trainer.is_global_zero:
            out = export_run(cfg, module, datamodule, run_dir / "export")
            log.info("exported weights to %s", out)
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    metric = float(metric) if metric is not None else None
    _close_process_group()
    return metric


def _resume_mismatch(ckpt: str, run_dir: Path, error: str) -> str:
    """One line for a resumed checkpoint that holds another model than the config builds (a
    run directory reused after the experiment changed, e.g. make demo's after an update)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[-1])
    return (f"resume: {ckpt} holds another model than this config builds ({first[:200]}); "
            f"train in a new hydra.run.dir, or move {run_dir} away")


def _close_process_group() -> None:
    """Tear a finished run's process group down while the interpreter is still whole: left to
    the exit, gloo's worker threads can outlive it and abort the process ("terminate called
    without an active exception"), so a job that finished reads as failed. Only after every
    rank got here: destroying while another rank is mid-collective can hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Rank 0 ends later (plots, export); a rank that exits first closes its gloo connections
        # under it ("Connection closed by peer" on rank 0, seen under srun on two nodes).
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    from sora_train.cli.common import run_hydra
    from sora_train.utils import preemption

    # First thing: Slurm's time-limit warning (SIGUSR1/2) ends a process that has no handler,
    # and may come while torch is still loading (docs/launching.md, "Requeue and resume").
    preemption.install()
    run_hydra(train, "train")


if __name__ == "__main__":
    main()
