"""Exponential moving average of the DiT weights, used for sampling by default.

The EMA copy is a frozen submodule of the LightningModule (``pl_module.ema``), so it is saved
and restored with the model in every checkpoint format, and under DeepSpeed ZeRO-3 it is
partitioned like the model: each rank averages only its own partition (``ds_tensor``), which
is exact because the update is elementwise.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch


class EMA(pl.Callback):
    """Args:
        decay: EMA decay per optimizer step.
        warmup: use ``min(decay, (1 + step) / (10 + step))`` so early averages are not
            dominated by the random init.
        attr: the module attribute to average (``dit``).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, attr: str = "dit") -> None:
        self.decay, self.warmup, self.attr = decay, warmup, attr

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "ema", None) is None:
            ema = copy.deepcopy(getattr(pl_module, self.attr))
            ema.requires_grad_(False).eval()
            pl_module.ema = ema

    def _decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():  # only after an optimizer step
            return
        d = self._decay(trainer.global_step)
        src = getattr(pl_module, self.attr)
        for e, p in zip(pl_module.ema.parameters(), src.parameters()):
            # ZeRO-3 keeps each rank's partition in ds_tensor; elsewhere the full tensor.
            e_t = e.ds_tensor if hasattr(e, "ds_tensor") else e.data
            p_t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            e_t.lerp_(p_t.to(e_t.dtype), 1.0 - d)
        for e, p in zip(pl_module.ema.buffers(), src.buffers()):
            e.copy_(p)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The EMA module must exist before the state dict with "ema.*" keys is loaded.
        if getattr(pl_module, "ema", None) is None:
            self.setup(trainer, pl_module, "fit")
