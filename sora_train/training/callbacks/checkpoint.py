"""Checkpoint policy: every N steps and/or every M minutes, keep the last K, write atomically.

Atomic: a checkpoint is written under ``<name>.partial`` (a file, or a directory for DeepSpeed's
sharded format) and renamed to its final name only after every rank finished writing. A kill
during a save leaves at most a ``.partial`` that ``resume=auto`` ignores, never a corrupt
checkpoint under a real name.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from sora_train.utils.errors import SoraError

PARTIAL = ".partial"
_STEP_RE = re.compile(r"step=(\d+)")


class CheckpointPolicy(ModelCheckpoint):
    """Args:
        dirpath: where checkpoints go (``run_dir/checkpoints``).
        every_n_steps: save every N optimizer steps (None: off).
        every_n_minutes: save every M minutes of training wall-clock (None: off).
        keep_last: how many periodic checkpoints to keep (newest by step).
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = 500, every_n_minutes: float | None = None, keep_last: int = 3) -> None:
        # Lightning's ModelCheckpoint takes one trigger: with both, steps go to Lightning and
        # minutes are checked here in on_train_batch_end.
        super().__init__(
            dirpath=dirpath,
            filename="step={step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps or None,
            train_time_interval=timedelta(minutes=every_n_minutes) if (every_n_minutes and not every_n_steps) else None,
            save_top_k=keep_last,
            monitor="step",
            mode="max",
            save_last=True,
            save_on_train_epoch_end=False,
        )
        self.every_n_minutes = every_n_minutes if every_n_steps else None
        self._last_time_save: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.every_n_minutes:
            import time

            now = time.monotonic()
            if self._last_time_save is None:
                self._last_time_save = now
            elif (now - self._last_time_save) / 60.0 >= self.every_n_minutes:
                self._last_time_save = now
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Always leave a checkpoint of the final step.
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL
        if trainer.is_global_zero and os.path.exists(partial):
            _remove(partial)
        trainer.strategy.barrier("checkpoint_pre")
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier("checkpoint_written")
        if trainer.is_global_zero:
            if os.path.exists(filepath) or os.path.islink(filepath):
                _remove(filepath)
            os.replace(partial, filepath)
        trainer.strategy.barrier("checkpoint_renamed")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def find_resume_checkpoint(spec: str | None, run_dir: str | os.PathLike) -> str | None:
    """``resume``: None -> fresh run; "auto" -> newest complete checkpoint under
    run_dir/checkpoints (None if there is none yet); a path -> that checkpoint."""
    if spec in (None, "", "null", "none", False):
        return None
    if spec == "auto":
        ckpt_dir = Path(run_dir) / "checkpoints"
        if not ckpt_dir.is_dir():
            return None
        best: tuple[int, str] | None = None
        for p in ckpt_dir.iterdir():
            if p.name.endswith(PARTIAL) or not p.name.endswith(".ckpt"):
                continue
            m = _STEP_RE.search(p.name)
            step = int(m.group(1)) if m else -1
            if p.name == "last.ckpt":
                step = -1  # prefer an explicitly numbered checkpoint; last.ckpt is a copy of one
            if best is None or step > best[0]:
                best = (step, str(p))
        return best[1] if best else None
    if not os.path.exists(str(spec)):
        raise SoraError(f"resume={spec}: no such checkpoint")
    return str(spec)
