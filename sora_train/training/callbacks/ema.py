"""Exponential moving average of the DiT weights, used for sampling by default.

The EMA copy is a frozen submodule of the LightningModule (``pl_module.ema``), so it is saved
and restored with the model in every checkpoint format, and under DeepSpeed ZeRO-3 it is
partitioned like the model: each rank averages only its own partition (``ds_tensor``), which
is exact because the update is elementwise. ZeRO-3 also keeps a gathered full copy of small
("persistent") parameters between steps; where the EMA parameter has one, it is averaged too,
so sampling with the EMA between steps sees the current average, not the previous one.
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
        pairs = list(zip(pl_module.ema.parameters(), src.parameters()))
        plain = [(e, p) for e, p in pairs if not hasattr(e, "ds_tensor")]
        if plain:  # one fused update over all tensors
            torch._foreach_lerp_([e.data for e, _ in plain], [p.data.to(e.dtype) for e, p in plain], 1.0 - d)
        for e, p in pairs:
            if not hasattr(e, "ds_tensor"):
                continue
            # ZeRO-3: each rank's partition lives in ds_tensor (the truth that checkpoints,
            # gathers and the next step read).
            e.ds_tensor.lerp_(p.ds_tensor.to(e.ds_tensor.dtype), 1.0 - d)
            if _gathered(e):  # a persistent parameter's full copy, re-gathered only after the next step
                if _gathered(p):
                    e.data.lerp_(p.data.to(e.dtype), 1.0 - d)
                else:
                    e.partition()  # drop the stale copy; the next use gathers it from ds_tensor
        for e, p in zip(pl_module.ema.buffers(), src.buffers()):
            e.copy_(p)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The EMA module must exist before the state dict with "ema.*" keys is loaded.
        if getattr(pl_module, "ema", None) is None:
            self.setup(trainer, pl_module, "fit")


def _gathered(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full tensor is currently materialised on this rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel
