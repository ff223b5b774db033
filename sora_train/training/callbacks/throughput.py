"""perf/samples_per_s, perf/tokens_per_s and perf/mfu, measured between optimizer steps; and
data/skipped, the corrupt samples the loader has skipped so far (this rank's workers)."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch


class Throughput(pl.Callback):
    """Args:
        peak_flops: the hardware's peak FLOP/s per device for the run's precision (e.g. 989e12
            for H100 bf16 dense). None: MFU is not logged (CPU peaks vary; bench/ measures one).
        log_every_n_steps: averaging window.
    """

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int = 10) -> None:
        self.peak_flops = peak_flops
        self.every = max(1, log_every_n_steps)
        self._t0: float | None = None
        self._samples = 0
        self._tokens = 0
        self._flops = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        b = len(batch["caption"]) if isinstance(batch, dict) and "caption" in batch else 0
        self._samples += b
        tokens = self._tokens_of(pl_module, batch)
        self._tokens += tokens
        dit = getattr(pl_module, "dit", None)
        if dit is not None and hasattr(dit, "flops_per_step") and b:
            text_len = 64
            self._flops += b * dit.flops_per_step(tokens // max(b, 1), text_len, training=True)
        if trainer.global_step > 0 and trainer.global_step % self.every == 0 and self._t0 is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # CPU-GPU sync point, once per window
            dt = max(time.perf_counter() - self._t0, 1e-9)
            world = trainer.world_size
            metrics = {"perf/samples_per_s": self._samples * world / dt, "perf/tokens_per_s": self._tokens * world / dt}
            if self.peak_flops and self._flops:
                metrics["perf/mfu"] = self._flops / dt / self.peak_flops
            skipped = getattr(trainer.datamodule, "skipped", None)
            if skipped is not None:
                metrics["data/skipped"] = float(skipped)
            pl_module.log_dict(metrics, rank_zero_only=True)
            self._t0, self._samples, self._tokens, self._flops = time.perf_counter(), 0, 0, 0.0

    @staticmethod
    def _tokens_of(pl_module: pl.LightningModule, batch: Any) -> int:
        if not isinstance(batch, dict):
            return 0
        dit = getattr(pl_module, "dit", None)
        vae = getattr(pl_module, "vae", None)
        if "latent" in batch:
            B, _, f, h, w = batch["latent"].shape
        elif "video" in batch and vae is not None and hasattr(vae, "latent_shape"):
            B, _, F, H, W = batch["video"].shape
            f, h, w = vae.latent_shape(F, H, W)
        else:
            return 0
        if dit is None:
            return B * f * h * w
        pt, ph, pw = dit.patch_size
        return B * (f // pt) * (h // ph) * (w // pw)
