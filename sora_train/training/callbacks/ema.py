"""Exponential moving average of the DiT weights, used for sampling by default.

The EMA copy is a frozen submodule of the LightningModule (``pl_module.ema``), so it is saved
and restored with the model in every checkpoint format, and under DeepSpeed ZeRO-3 it is
partitioned like the model: each rank averages only its own partition (``ds_tensor``), which
is exact because the update is elementwise. ZeRO-3 also keeps a gathered full copy of small
("persistent") parameters between steps; where the EMA parameter has one, it is averaged too,
so sampling with the EMA between steps sees the current average, not the previous one.

Precision: the average is always accumulated in fp32. Under DeepSpeed's bf16 mode the EMA
submodule is cast to bf16 with the rest of the module, and a bf16 average barely moves (with
decay 0.999 an update is 0.1% of the difference, below bf16's 0.4% resolution for most
weights). So when the EMA's storage is not fp32, this callback keeps an fp32 shadow of what
this rank holds (its partition under ZeRO-3, the whole tensor otherwise), averages into it and
writes the rounded result into the module. The shadow is saved with the callback's state in
each checkpoint (under ZeRO-3 in every rank's own file) and restored on resume. In fp32 runs
the module's own tensors are the average: no shadow, no extra memory.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch

from sora_train.training.log_steps import is_optimizer_step
from sora_train.utils.logging import get_logger

log = get_logger(__name__)


class EMA(pl.Callback):
    """Args:
        decay: EMA decay per optimizer step.
        warmup: use ``min(decay, (1 + step) / (10 + step))`` so early averages are not
            dominated by the random init.
        attr: the module attribute to average (``dit``).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, attr: str = "dit") -> None:
        self.decay, self.warmup, self.attr = decay, warmup, attr
        self._shadow: dict[str, torch.Tensor] = {}  # "i" (what the rank holds) / "i.full" (ZeRO-3 gathered copy) -> fp32
        self._restored: dict[str, torch.Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "ema", None) is None:
            ema = copy.deepcopy(getattr(pl_module, self.attr))
            ema.requires_grad_(False).eval()
            pl_module.ema = ema

    def _decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _lerp(self, key: str, ema: torch.Tensor, src: torch.Tensor, weight: float) -> None:
        """ema <- ema + weight * (src - ema), accumulated in fp32 whatever ema's dtype."""
        if ema.dtype == torch.float32:
            ema.lerp_(src.to(torch.float32), weight)
            return
        shadow = self._shadow.get(key)
        if shadow is None:
            restored = self._restored.pop(key, None)
            if restored is not None and restored.shape == ema.shape:
                shadow = restored.to(device=ema.device, dtype=torch.float32)
            else:
                shadow = ema.detach().to(torch.float32).clone()
            self._shadow[key] = shadow
        shadow.lerp_(src.to(torch.float32), weight)
        ema.copy_(shadow)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not is_optimizer_step(trainer, batch_idx):
            return
        w = 1.0 - self._decay(trainer.global_step)
        src = getattr(pl_module, self.attr)
        pairs = list(zip(pl_module.ema.parameters(), src.parameters()))
        plain = [(i, e, p) for i, (e, p) in enumerate(pairs) if not hasattr(e, "ds_tensor")]
        if plain and all(e.dtype == torch.float32 for _, e, _ in plain):  # one fused update over all tensors
            torch._foreach_lerp_([e.data for _, e, _ in plain], [p.data.to(torch.float32) for _, _, p in plain], w)
        else:
            for i, e, p in plain:
                self._lerp(str(i), e.data, p.data, w)
        for i, (e, p) in enumerate(pairs):
            if not hasattr(e, "ds_tensor"):
                continue
            # ZeRO-3: each rank's partition lives in ds_tensor (the truth that checkpoints,
            # gathers and the next step read).
            self._lerp(str(i), e.ds_tensor, p.ds_tensor, w)
            if _gathered(e) and not _shares_partition(e):  # a persistent parameter's full copy, re-gathered only after the next step
                if _gathered(p):
                    self._lerp(f"{i}.full", e.data, p.data, w)
                else:
                    e.partition()  # drop the stale copy; the next use gathers it from ds_tensor
        for e, p in zip(pl_module.ema.buffers(), src.buffers()):
            e.copy_(p)

    def state_dict(self) -> dict[str, Any]:
        return {"fp32_shadow": {k: v.detach().cpu() for k, v in self._shadow.items()}} if self._shadow else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._shadow = {}
        self._restored = dict(state_dict.get("fp32_shadow") or {})

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The EMA module must exist before the state dict with "ema.*" keys is loaded.
        if getattr(pl_module, "ema", None) is None:
            self.setup(trainer, pl_module, "fit")


def _shares_partition(param: torch.Tensor) -> bool:
    """ZeRO-3 on one rank: the full tensor is the partition itself (same storage), so averaging
    both would apply the step twice."""
    return param.data.untyped_storage().data_ptr() == param.ds_tensor.untyped_storage().data_ptr()  # type: ignore[attr-defined]


def _gathered(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full tensor is currently materialised on this rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel
