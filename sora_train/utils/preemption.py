"""Slurm's time-limit warning: note it now, save the current step, then requeue the job.

Slurm signals a job's tasks ahead of its time limit when asked to: ``sbatch --signal=USR1@120``
(launch/sbatch/train.sbatch) or, under Hydra's submitit launcher, ``USR2@signal_delay_s``;
``scancel -s USR1 <job>`` does the same by hand (a preemption warning). Both signals end a
process by default, so sora-train installs one handler for them as early as it can (before
torch is imported) and again when training is built (the submitit path starts elsewhere). The
handler only notes the signal: it may run inside a collective or a file write. The checkpoint
policy (``training/callbacks/checkpoint.py``) reads the note at the end of the step, every
rank takes part in saving that step atomically, and then :func:`hand_over` requeues the job:

- through the handler that was there before ours, when there was one: submitit's, which
  re-pickles the Hydra job, runs ``scontrol requeue`` on rank 0 and exits there;
- else with ``scontrol requeue $SLURM_JOB_ID`` itself, on rank 0 (the plain sbatch path).

Lightning's own SIGUSR1 handler (save ``hpc_ckpt_<n>.ckpt``, not atomically, from inside the
signal handler, then requeue) is never installed: Lightning leaves a signal alone when it
already has a handler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any

# The warning signals: SIGUSR1 (plain sbatch, Lightning's convention) and SIGUSR2 (submitit's).
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
SCONTROL_TIMEOUT_S = 60

_noted: list[int] = []
_previous: dict[int, Any] = {}


def _note(signum: int, frame: Any) -> None:
    # Only a note: a signal handler may run inside a collective or a file write.
    _noted.append(signum)


def install() -> None:
    """Install the noting handler for REQUEUE_SIGNALS (idempotent; main thread only, where
    Python allows it). The handler found there first is kept for :func:`hand_over`."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in REQUEUE_SIGNALS:
        current = signal.getsignal(sig)
        if current is _note:
            continue
        _previous[sig] = signal.signal(sig, _note)


def uninstall() -> None:
    """Put back the handlers :func:`install` found, and forget any noted signal."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in list(_previous.items()):
        if signal.getsignal(sig) is _note:
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        del _previous[sig]
    _noted.clear()


def requested() -> int | None:
    """The first requeue signal noted since start (or :func:`clear`), else None."""
    return _noted[0] if _noted else None


def clear() -> None:
    _noted.clear()


def job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_job() -> str:
    """``scontrol requeue`` this job; returns what happened, in words (never raises: the
    checkpoint is already saved, and a job that is not requeued can be resubmitted)."""
    jid = job_id()
    if jid is None:
        return "not a Slurm job: not requeued"
    try:
        r = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {jid} failed: {e}"
    if r.returncode != 0:
        return f"scontrol requeue {jid} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}"
    return f"requeued Slurm job {jid}"


def hand_over(signum: int, rank: int) -> str:
    """After the checkpoint of the signal's step is complete on every rank: pass the signal to
    the handler that had it before ours (submitit: requeues on rank 0, then ``sys.exit``), or
    requeue the job from rank 0. Returns what was done, in words."""
    previous = _previous.get(signum)
    if callable(previous):
        name = getattr(previous, "__qualname__", type(previous).__qualname__)
        previous(signum, None)  # may raise SystemExit (submitit, rank 0, after its requeue)
        return f"passed {signal.Signals(signum).name} on to {name}"
    if rank != 0:
        return "rank 0 requeues the job"
    return requeue_job()
