"""When Lightning writes logged metrics: every ``trainer.log_every_n_steps`` training steps.

``self.log`` costs about a millisecond of Python per call; metrics that only matter as curves
(loss by timestep, gradient norm) are computed and logged on those steps alone.
"""

from __future__ import annotations

from typing import Any


def writes_logs(trainer: Any) -> bool:
    """Whether Lightning hands this training step's logged metrics to the loggers; True outside
    a Trainer. Same answer in every hook of one step (Lightning counts steps with
    ``_batches_that_stepped + 1``, incremented after ``on_train_batch_end``)."""
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(connector.should_update_logs)


def is_optimizer_step(trainer: Any, batch_idx: int) -> bool:
    """Whether the training batch that just ended (``on_train_batch_end``) closed an optimizer
    step: the last of ``accumulate_grad_batches`` micro-batches, or the last batch of an epoch.
    The same rule under DeepSpeed, which steps its engine at those boundaries itself."""
    n = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    if n <= 1 or (batch_idx + 1) % n == 0:
        return True
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))
