"""Checkpoint policy: every N steps and/or every M minutes, keep the last K, write atomically.

Atomic: a checkpoint is written under ``<name>.partial`` (a file, or a directory for DeepSpeed's
sharded format) and renamed to its final name only after every rank finished writing. A kill
during a save leaves at most a ``.partial`` that ``resume=auto`` ignores, never a corrupt
checkpoint under a real name.

SIGTERM (a scheduler's preemption, ``kill``, Slurm's cancel/time limit): the run finishes the
step it is in, saves a checkpoint of that step (atomically, like any other), and exits with
status ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again later") on rank 0 and 0 on the
other ranks (Lightning's launcher kills rank 0 when a child exits non-zero; torchrun and srun
report rank 0's 75 either way); ``resume=auto`` continues from it. Lightning's own SIGTERM
handling outside Slurm stops without saving (and exits 0), and broadcasts from inside the
signal handler; ours only sets a flag, and the ranks agree on it at the end of each step with
one small all-reduce. SIGKILL cannot be caught: resume continues from the newest complete
periodic checkpoint.

SIGUSR1 / SIGUSR2 (Slurm's time-limit warning: ``sbatch --signal=USR1@120``, or USR2 from
Hydra's submitit launcher; ``scancel -s USR1`` by hand): the same save of the current step on
every rank, then the job is requeued (``utils/preemption.py``: submitit's handler requeues on
the submitit path, ``scontrol requeue`` on the plain sbatch path) and the run exits like after
SIGTERM. Lightning's SLURM auto-requeue (a non-atomic ``hpc_ckpt_<n>.ckpt``) is switched off.

Which checkpoint ``resume=auto`` picks (one rule, :func:`find_resume_checkpoint`): the
complete ``checkpoints/step=<N>.ckpt`` with the highest N; ``last.ckpt`` only when there is no
numbered one; never a ``.partial``. A run directory holding Lightning's ``hpc_ckpt_*.ckpt`` is
refused with one line (resume from it explicitly, or move it away).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sora_train.training.log_steps import is_optimizer_step
from sora_train.utils import preemption
from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger(__name__)

PARTIAL = ".partial"
_STEP_RE = re.compile(r"step=(\d+)")
_NUMBERED_RE = re.compile(r"step=(\d+)\.ckpt")  # what resume=auto ranks (not .partial, not .universal)
# Exit status of a run stopped by SIGTERM after saving its checkpoint (sysexits EX_TEMPFAIL).
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    """Raised on every rank after the SIGTERM (or requeue signal) checkpoint is written; rank 0
    exits with PREEMPTED_EXIT_CODE, the others with 0."""

    def __init__(self, step: int, path: str | None, rank: int = 0) -> None:
        super().__init__(PREEMPTED_EXIT_CODE if rank == 0 else 0)
        self.step, self.path = step, path


class CheckpointPolicy(ModelCheckpoint):
    """Args:
        dirpath: where checkpoints go (``run_dir/checkpoints``).
        every_n_steps: save every N optimizer steps (None: off).
        every_n_minutes: save every M minutes of training wall-clock (None: off).
        keep_last: how many periodic checkpoints to keep (newest by step).
        save_on_sigterm: on SIGTERM, finish the step, save it and exit with status 75; on
            SIGUSR1/SIGUSR2 (Slurm's time-limit warning) the same, and the job is requeued.
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = 500, every_n_minutes: float | None = None, keep_last: int = 3,
                 save_on_sigterm: bool = True) -> None:
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
            # A name is overwritten (atomically), never versioned: "last-v1.ckpt" after a resume,
            # or "step=N-v1.ckpt" when resuming from an older checkpoint, would be stale copies.
            enable_version_counter=False,
        )
        self.every_n_minutes = every_n_minutes if every_n_steps else None
        self._last_time_save: float | None = None
        self.save_on_sigterm = save_on_sigterm
        self._sigterm = False
        self._previous_handler: Any = None
        if save_on_sigterm:
            # Now already, not at on_train_start: a time-limit warning during set-up must not
            # end the process (SIGUSR1/2's default), nor reach Lightning's own requeue handler.
            preemption.install()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from lightning.fabric.plugins.environments import SLURMEnvironment

        # One checkpoint path: ours. Lightning's SLURM auto-requeue would save hpc_ckpt_<n>.ckpt
        # (not atomically, from inside its signal handler) and resume from it whenever fit gets
        # no ckpt_path. Its handlers are registered after this hook, from the connector's
        # environment (single-device strategies hold none of their own).
        environment = getattr(trainer.strategy, "cluster_environment", None) or getattr(trainer._accelerator_connector, "cluster_environment", None)
        if self.save_on_sigterm and isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False

    # -- SIGTERM ---------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only a flag: a signal handler may run inside a collective or a file write.
        self._sigterm = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its own handler (Trainer._run), which it
        # replaces; Lightning's teardown puts the original back.
        if self.save_on_sigterm and threading_is_main():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm = self._sigterm or trainer.received_sigterm  # arrived while Lightning's handler was set

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading_is_main():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        super().on_exception(trainer, pl_module, exception)

    def _agree(self, trainer: pl.Trainer, sigterm: bool, time_due: bool, requeue: int) -> tuple[bool, bool, int]:
        """Every rank must take the same decision to save (a save is collective). ``requeue``:
        the requeue signal's number, 0 for none."""
        if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return sigterm, time_due, requeue
        # One 3-element all-reduce per step; on GPUs a host sync, like Lightning's own per-step
        # SIGTERM broadcast.
        flags = torch.tensor([float(sigterm), float(time_due), float(requeue)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        s, t, r = flags.tolist()
        return bool(s), bool(t), int(r)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not (self.save_on_sigterm or self.every_n_minutes) or not is_optimizer_step(trainer, batch_idx):
            return  # checkpoints are taken between optimizer steps
        time_due = False
        if self.every_n_minutes:
            now = time.monotonic()
            if self._last_time_save is None:
                self._last_time_save = now
            time_due = (now - self._last_time_save) / 60.0 >= self.every_n_minutes
        noted = (preemption.requested() or 0) if self.save_on_sigterm else 0
        sigterm, time_due, requeue = self._agree(trainer, self._sigterm, time_due, noted)
        if time_due:
            self._last_time_save = time.monotonic()
        if (sigterm or time_due or requeue) and self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if requeue and 0 < trainer.max_steps <= trainer.global_step:
            log.warning("%s: the last step is done; the run ends as usual, not requeued", signal.Signals(requeue).name)
        elif requeue:
            path = self.best_model_path or None
            name = signal.Signals(requeue).name
            log.warning("%s: saved the checkpoint of step %d (%s); requeueing the job", name, trainer.global_step, path)
            self._restore_handler()
            done = preemption.hand_over(requeue, trainer.global_rank)  # submitit's handler exits here on rank 0
            log.warning("%s: %s; exiting with status %d (resume=auto continues from step %d)", name, done, PREEMPTED_EXIT_CODE, trainer.global_step)
            raise Preempted(trainer.global_step, path, trainer.global_rank)
        if sigterm:
            path = self.best_model_path or None  # top-k by step: the newest
            log.warning("SIGTERM: saved the checkpoint of step %d (%s); exiting with status %d, continue with resume=auto",
                        trainer.global_step, path, PREEMPTED_EXIT_CODE)
            self._restore_handler()
            raise Preempted(trainer.global_step, path, trainer.global_rank)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()
        # Always leave a checkpoint of the final step.
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL
        if trainer.is_global_zero and os.path.exists(partial):
            _remove(partial)
        trainer.strategy.barrier("checkpoint_pre")
        full: BaseException | None = None
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
        except (OSError, RuntimeError) as e:
            if not _disk_full(e):
                raise
            full = e
        # Doubles as the "every rank has written" barrier; a rank whose disk filled up must not
        # leave the others waiting in the next collective.
        if trainer.strategy.reduce_boolean_decision(full is not None, all=False):
            self._give_up_on_save(trainer, filepath, partial, full)
        if trainer.is_global_zero:
            _fsync_tree(partial)  # on disk before it gets a real name: survives a node crash too
            if os.path.exists(filepath) or os.path.islink(filepath):
                _remove(filepath)
            os.replace(partial, filepath)
        trainer.strategy.barrier("checkpoint_renamed")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


    def _give_up_on_save(self, trainer: pl.Trainer, filepath: str, partial: str, error: BaseException | None) -> None:
        """Disk full: drop the half-written checkpoint (its space is what the next try needs)
        and stop every rank with one line that names the directory, the free space and the
        checkpoint to continue from. Nothing complete was touched: the name of a checkpoint
        is only ever replaced after its new content is written."""
        if trainer.is_global_zero and (os.path.exists(partial) or os.path.islink(partial)):
            _remove(partial)
        trainer.strategy.barrier("checkpoint_abandoned")
        directory = os.path.dirname(os.path.abspath(filepath))
        usage = shutil.disk_usage(directory)
        previous = _newest_complete(directory) or "none yet"
        detail = f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else ""
        raise SoraError(
            f"checkpoint {os.path.basename(filepath)} of step {trainer.global_step} not written: disk full in {directory}{detail}, "
            f"{_mib(usage.free)} free of {_mib(usage.total)}; the previous checkpoint is intact ({previous}): "
            "make room and continue with resume=auto"
        )


def _disk_full(e: BaseException) -> bool:
    """Whether a failed write ran out of space (or quota). torch.save reports it as a
    RuntimeError from its C++ writer ("file write failed"), Python file writes as OSError."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or "file write failed" in text


def _newest_complete(directory: str) -> str | None:
    """The newest complete numbered checkpoint in ``directory`` (what resume=auto would take)."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("*.ckpt") if (m := _STEP_RE.search(p.name))]
    return str(max(found)[1]) if found else None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()  # signal.signal works only there


def _fsync_tree(path: str) -> None:
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files] + [d for d, _, _ in os.walk(path)]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on directories
            pass
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def find_resume_checkpoint(spec: str | None, run_dir: str | os.PathLike) -> str | None:
    """``resume``: None -> fresh run; a path -> that checkpoint; "auto" -> the one rule:

    the complete ``run_dir/checkpoints/step=<N>.ckpt`` (file, or DeepSpeed's directory) with the
    highest N, whether a periodic save, the final one or a signal's (SIGTERM, Slurm's time-limit
    warning) wrote it; ``last.ckpt`` only when no numbered one exists; ``*.partial`` (a save that
    did not finish) never; None when there is nothing yet. Lightning's ``run_dir/hpc_ckpt_*.ckpt``
    (written by its SLURM auto-requeue, which sora-train switches off; not atomic) is refused:
    Lightning would otherwise resume from it by itself whenever no checkpoint is passed."""
    if spec in (None, "", "null", "none", False):
        return None
    if spec == "auto":
        ckpt_dir = Path(run_dir) / "checkpoints"
        hpc = sorted(Path(run_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: (len(p.name), p.name))
        if hpc:
            raise SoraError(
                f"resume=auto: {run_dir} holds Lightning's HPC checkpoint {hpc[-1].name}, which sora-train neither writes nor "
                f"resumes from (it is not written atomically); continue from it with resume={hpc[-1]}, or move it out of {run_dir}"
            )
        if not ckpt_dir.is_dir():
            return None
        numbered = [(int(m.group(1)), str(p)) for p in ckpt_dir.iterdir() if (m := _NUMBERED_RE.fullmatch(p.name))]
        if numbered:
            return max(numbered)[1]
        last = ckpt_dir / "last.ckpt"  # a copy of a numbered one, written after it
        return str(last) if last.exists() else None
    if not os.path.exists(str(spec)):
        raise SoraError(f"resume={spec}: no such checkpoint")
    return str(spec)
