"""Test hooks for sora-train runs under Slurm, added as one more callback from the command line
(``+callbacks.hold._target_=preempt_hooks.HoldForSignal``, with this folder on PYTHONPATH):
they fix *where* a run is interrupted without changing *what* it computes.

- ``hold_at[r]``: in run ``r`` of the job (``SLURM_RESTART_COUNT``), at the end of step
  ``hold_at[r]``, every rank writes ``<marker_dir>/hold-r<r>-rank<rank>`` and waits (at most
  ``timeout_s``) until a requeue signal has been noted. So the signal always lands in that step
  and the checkpoint policy saves exactly that step.
- ``torn_save_on``: in that run, the save of the held step is written, cut to half its size (a
  process killed mid-write), ``<marker_dir>/torn-r<r>`` gets the pid, and the process hangs
  (``timeout_s``) until the test requeues the job and the process is killed.

Callbacks run before the checkpoint policy (Lightning orders checkpoint callbacks last).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl

from sora_train.utils import preemption


def _restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


class HoldForSignal(pl.Callback):
    def __init__(self, marker_dir: str, hold_at: list[int], torn_save_on: int | None = None, timeout_s: float = 150.0) -> None:
        self.marker_dir = Path(marker_dir)
        self.hold_at = list(hold_at)
        self.torn_save_on = torn_save_on
        self.timeout_s = timeout_s

    def _held_step(self) -> int | None:
        r = _restart()
        return self.hold_at[r] if r < len(self.hold_at) else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        step = self._held_step()
        if self.torn_save_on != _restart() or step is None or not trainer.is_global_zero:
            return
        original = trainer.save_checkpoint
        marker = self.marker_dir / f"torn-r{_restart()}"
        timeout_s = self.timeout_s

        def save_torn_and_hang(filepath, *args, **kwargs):
            original(filepath, *args, **kwargs)
            if f"step={step:08d}" in str(filepath):
                p = Path(filepath)
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
                marker.write_text(str(os.getpid()))
                time.sleep(timeout_s)

        trainer.save_checkpoint = save_torn_and_hang  # the instance attribute the policy calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._held_step():
            return
        (self.marker_dir / f"hold-r{_restart()}-rank{trainer.global_rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout_s
        while preemption.requested() is None and time.monotonic() < deadline:
            time.sleep(0.05)
