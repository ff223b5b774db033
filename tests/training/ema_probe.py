"""A test callback: the fp32 reference EMA of the weights the DiT really had after each step.

Added to a run with ``+callbacks.probe._target_=ema_probe.EMAProbe +callbacks.probe.out=FILE``
(placed after the EMA callback, so it sees each step's weights after the EMA update). At the
end rank 0 writes FILE (JSON): how far the EMA callback's fp32 average, the EMA module's stored
weights and a naive EMA kept in the weights' own dtype are from the reference, and how far
each moved from the initial weights. Not for ZeRO-3 (it reads whole parameters).
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch

from sora_train.training.callbacks.ema import EMA
from sora_train.training.log_steps import is_optimizer_step


class EMAProbe(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def _ema(self, trainer: pl.Trainer) -> EMA:
        return next(c for c in trainer.callbacks if isinstance(c, EMA))

    def on_train_start(self, trainer, pl_module) -> None:
        self.init = [p.detach().float().clone() for p in pl_module.ema.parameters()]
        self.ref = [t.clone() for t in self.init]
        self.naive = [p.detach().clone() for p in pl_module.ema.parameters()]  # the weights' own dtype
        self.steps = 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not is_optimizer_step(trainer, batch_idx):
            return
        w = 1.0 - self._ema(trainer)._decay(trainer.global_step)
        for r, n, p in zip(self.ref, self.naive, pl_module.dit.parameters()):
            r.lerp_(p.detach().float(), w)
            n.lerp_(p.detach().to(n.dtype), w)
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        ema = self._ema(trainer)
        params = list(pl_module.ema.parameters())
        shadow = [ema._shadow.get(str(i), p.detach().float()) for i, p in enumerate(params)]

        def dist(a, b):
            return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))

        def moved(a):
            return float(sum(((x.float() - i) ** 2).sum() for x, i in zip(a, self.init)) ** 0.5)

        report = {
            "steps": self.steps,
            "dtype": str(params[0].dtype),
            "has_shadow": bool(ema._shadow),
            "shadow_vs_ref": dist(shadow, self.ref),
            "stored_vs_ref": dist(params, self.ref),
            "ref_scale": max(float(r.abs().max()) for r in self.ref),
            "moved_ref": moved(self.ref),
            "moved_ema": moved(params),
            "moved_shadow": moved(shadow),
            "moved_naive": moved(self.naive),
        }
        with open(self.out, "w") as f:
            json.dump(report, f)
