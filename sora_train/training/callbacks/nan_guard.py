"""NaN/Inf loss guard: skip the step, and stop the run after K non-finite losses in a row."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from sora_train.utils.errors import SoraError


class NaNGuard(pl.Callback):
    """A non-finite loss zeroes the gradients before the optimizer step (the step is skipped in
    effect: AdamW with zero grads still decays moments but moves no weight without weight
    decay) and is counted as ``train/nonfinite_steps``; ``max_consecutive`` in a row stops the
    run with a clear error instead of training on garbage."""

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self._bad = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if torch.isfinite(loss.detach()).all():
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        pl_module.log("train/nonfinite_steps", float(self.total))
        if self.consecutive >= self.max_consecutive:
            raise SoraError(
                f"loss was NaN/Inf for {self.consecutive} steps in a row (step {trainer.global_step}); "
                "lower optimizer.lr, check the data (sora-data probe) or resume from an earlier checkpoint"
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all() for g in optimizer.param_groups for p in g["params"])
        if bad:
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None  # optimizer.step() skips parameters without a gradient
