"""Gradient health: log ``train/grad_norm``, skip steps with NaN/Inf gradients, and stop the run
after K non-finite losses in a row."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from sora_train.training.log_steps import is_optimizer_step, writes_logs
from sora_train.utils.errors import SoraError


class NaNGuard(pl.Callback):
    """Before each optimizer step the total gradient norm (before clipping) is computed once and
    logged as ``train/grad_norm`` (on the steps Lightning writes logs). If it is not finite (a
    NaN/Inf gradient anywhere; after DDP's all-reduce every rank sees the same), every gradient
    is set to None, so ``optimizer.step()`` skips every parameter: no weight, no Adam moment and
    no weight decay changes (the LR scheduler and ``global_step`` still advance). A non-finite loss is counted as
    ``train/nonfinite_steps``; ``max_consecutive`` in a row stop the run with a one-line error
    instead of training on garbage.

    Under DeepSpeed ZeRO the gradients live in DeepSpeed's partitioned buffers, not in ``.grad``:
    there ``train/grad_norm`` is DeepSpeed's global norm of the step just taken, and a bad step
    cannot be skipped here (DeepSpeed skips only fp16 overflow steps); the counter and the stop
    still apply.

    Args:
        max_consecutive: non-finite losses in a row that stop the run.
        log_grad_norm: log ``train/grad_norm`` every step.
    """

    def __init__(self, max_consecutive: int = 5, log_grad_norm: bool = True) -> None:
        self.max_consecutive = max_consecutive
        self.log_grad_norm = log_grad_norm
        self.consecutive = 0
        self.total = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.log_grad_norm and _is_deepspeed(trainer) and is_optimizer_step(trainer, batch_idx) and writes_logs(trainer):
            norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                pl_module.log("train/grad_norm", float(norm))
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
        grads = [p.grad.detach() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:  # DeepSpeed ZeRO, or nothing trainable
            return
        # One fused norm and one host sync per step (instead of a check per tensor).
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        if self.log_grad_norm and writes_logs(trainer):  # self.log costs ~1 ms: only on the steps that are written
            pl_module.log("train/grad_norm", norm)
        if not torch.isfinite(norm):
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None  # optimizer.step() skips parameters without a gradient

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.total = int(state_dict.get("total", 0))


def _is_deepspeed(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)
