"""Sample videos during training: every N steps and at the end, written as mp4 + PNG strips
under run_dir/samples/step_XXXXXXXX/ and logged to wandb as video media.

Rank 0 samples and writes. Under DeepSpeed ZeRO-3 every forward gathers partitioned parameters
with collectives, so there every rank runs the same generation (same seed, same result) and
rank 0 alone writes; sampling on rank 0 alone would wait forever for the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch

from sora_train.training.log_steps import is_optimizer_step


class SampleVideos(pl.Callback):
    """Args:
        prompts: captions to generate from.
        out_dir: where step folders go.
        every_n_steps: sample every N optimizer steps (0: only at the end).
        num_frames, height, width: video shape (None: the first video bucket of the data).
        steps, guidance_scale: sampler settings (None: the diffusion config's defaults).
        use_ema: sample with the EMA weights when the EMA callback keeps them.
        fps: frame rate written into the mp4s.
    """

    def __init__(self, prompts: Sequence[str], out_dir: str, every_n_steps: int = 0, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, steps: int | None = None, guidance_scale: float | None = None, use_ema: bool = True, fps: float = 8.0, seed: int = 0) -> None:
        self.prompts = list(prompts)
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.shape = (num_frames, height, width)
        self.steps, self.guidance_scale = steps, guidance_scale
        self.use_ema, self.fps, self.seed = use_ema, fps, seed
        self.written: list[Path] = []

    def _shape(self, trainer: pl.Trainer) -> tuple[int, int, int]:
        f, h, w = self.shape
        if f and h and w:
            return f, h, w
        dm = trainer.datamodule
        buckets = dm.make_buckets()
        b = (buckets.video or buckets.buckets)[0]
        return f or b.num_frames, h or b.height, w or b.width

    @staticmethod
    def _ranks_sample(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether this rank takes part: rank 0, and every rank when parameters are partitioned."""
        sampled = getattr(pl_module, "ema", None) if getattr(pl_module, "ema", None) is not None else pl_module.dit
        return (trainer.is_global_zero or any(hasattr(p, "ds_id") for p in pl_module.parameters())
                or hasattr(sampled, "_sequence_parallel"))  # a sequence-parallel DiT's forward is collective

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        from sora_train.training.pipeline import VideoPipeline

        dit = pl_module.ema if (self.use_ema and getattr(pl_module, "ema", None) is not None) else pl_module.dit
        modes = {m: m.training for m in (dit, pl_module.text_encoder)}
        pipe = VideoPipeline(pl_module.vae, pl_module.text_encoder, dit, pl_module.flow, meta={"weights": "ema" if dit is not pl_module.dit else "dit", "step": trainer.global_step})
        F, H, W = self._shape(trainer)
        gen = pipe.generate(self.prompts, F, H, W, steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed)
        for m, mode in modes.items():  # the pipeline put them in eval mode
            m.train(mode)
        if not trainer.is_global_zero:
            return []
        paths = pipe.save(gen, self.out_dir / f"step_{trainer.global_step:08d}", fps=self.fps)
        self._log(trainer, paths)
        self.written += paths
        return paths

    def _log(self, trainer: pl.Trainer, paths: list[Path]) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                from sora_train.utils.pii import scrub

                # The videos went through provenance.write_generated_video (label, watermark, C2PA).
                logger.experiment.log({"samples/video": [wandb.Video(str(p), caption=scrub(c), format="mp4") for p, c in zip(paths, self.prompts)], "trainer/global_step": trainer.global_step})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and is_optimizer_step(trainer, batch_idx) \
                and self._ranks_sample(trainer, pl_module):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and self._ranks_sample(trainer, pl_module):
            self.sample(trainer, pl_module)
