"""callbacks.scaling: what a trial of the scaling-law recipe trained, for ``sora-eval scaling``
(sora_train/training/scaling.py): parameters, samples, training FLOPs and the final val/loss.
Here, not beside the fit, so the report does not import Lightning."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json


class ScalingRecord(pl.Callback):
    """Per trial: parameters, samples, training FLOPs and the final val/loss -> ``out``.

    FLOPs are summed per training step as ``batch * dit.flops_per_step(tokens, text_len,
    training=True)`` (per sample, forward + backward) with the token count and text length
    the DiT was called on in that step (read by a forward pre-hook: cached or encoded text,
    latent or pixel batches alike), times the data-parallel ranks: a run's compute is the
    model's own accounting of what it trained on.

    Args:
        out: the JSON file to write when training ends (``${run_dir}/scaling.json``).
        name: the size's name in the ladder (``${scaling.size}``).
        sizes: the ladder, ``{name: {hidden_size, depth, num_heads}}`` (``${scaling.sizes}``),
            recorded so ``sora-eval scaling`` can cost a size that has not trained yet.
    """

    def __init__(self, out: str, name: str = "", sizes: dict[str, dict[str, int]] | None = None) -> None:
        self.out = Path(out)
        self.name = name
        self.sizes = {str(k): {str(a): int(b) for a, b in dict(v).items()} for k, v in (sizes or {}).items()}
        self.samples = 0
        self.flops = 0.0
        self.text_len_sum = 0  # sum over samples: flops_per_step is linear in text_len
        self.num_tokens = 0
        self.val_loss: float | None = None
        self._t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._seen: tuple[int, int, int] | None = None
        pl_module.dit.register_forward_pre_hook(self._see)

    def _see(self, dit: Any, args: tuple[Any, ...]) -> None:
        """The DiT's training call: (x (B, C, f, h, w), t, text (B, L, D), ...)."""
        if dit.training and len(args) >= 3:
            B, _, f, h, w = args[0].shape
            pt, ph, pw = dit.patch_size
            self._seen = (B, (f // pt) * (h // ph) * (w // pw), int(args[2].shape[1]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._seen is None:
            raise SoraError("callbacks.scaling: the DiT was not called with (x, t, text, ...) in this step; nothing to count")
        B, n, text_len = self._seen
        B *= trainer.world_size  # every data-parallel rank trains on a batch of the same shape
        self.samples += B
        self.flops += B * pl_module.dit.flops_per_step(n, text_len, training=True)
        self.text_len_sum += B * text_len
        self.num_tokens = n
        self._seen = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        v = trainer.callback_metrics.get("val/loss")
        if v is not None and not trainer.sanity_checking:
            self.val_loss = float(v)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dit = pl_module.dit
        record = {
            "name": self.name,
            "params": int(sum(p.numel() for p in dit.parameters())),
            "dit": dit.config(),
            "steps": int(trainer.global_step),
            "samples": self.samples,
            "num_tokens": self.num_tokens,
            "text_len_mean": self.text_len_sum / max(self.samples, 1),
            "flops": self.flops,
            "val_loss": self.val_loss,
            "train_seconds": round(time.perf_counter() - self._t0, 1),
            "sizes": self.sizes,
        }
        atomic_write_json(self.out, record)
