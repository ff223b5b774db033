"""Slurm's time-limit warning in one process (the Slurm runs themselves are in
tests/launch/test_slurm_preemption.py): SIGUSR1/2 is only noted, the step it lands in is saved
atomically, then the job is requeued through whoever handled the signal before sora-train (here
a recording function stands in for submitit's handler) and the run exits 75; and the one rule for
which checkpoint resume=auto picks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sora_train.training.callbacks.checkpoint import PREEMPTED_EXIT_CODE, CheckpointPolicy, find_resume_checkpoint
from sora_train.utils import preemption
from sora_train.utils.errors import SoraError


class _Tiny(pl.LightningModule):
    def __init__(self, signal_at: int, signum: int) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.signal_at, self.signum = signal_at, signum

    def training_step(self, batch, batch_idx):
        if self.global_step + 1 == self.signal_at:
            os.kill(os.getpid(), self.signum)  # mid-step, as Slurm's signal would come
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


@pytest.fixture
def clean_signals():
    saved = {s: signal.getsignal(s) for s in preemption.REQUEUE_SIGNALS}
    preemption.uninstall()
    yield
    preemption.uninstall()
    for s, h in saved.items():
        signal.signal(s, h)


def _fit(tmp_path: Path, signum: int, signal_at: int = 2) -> tuple[pl.Trainer, SystemExit]:
    policy = CheckpointPolicy(dirpath=str(tmp_path / "checkpoints"), every_n_steps=100, keep_last=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=10, logger=False, callbacks=[policy], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(SystemExit) as e:
        trainer.fit(_Tiny(signal_at, signum), _loader())
    return trainer, e.value


@pytest.mark.parametrize("signum", preemption.REQUEUE_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_saves_its_step_then_hands_over_to_the_previous_handler(tmp_path, clean_signals, signum):
    calls: list[tuple[int, list[str]]] = []

    def submitit_like(sig, frame):  # what the handler saw: the checkpoint must be complete by then
        calls.append((sig, sorted(p.name for p in (tmp_path / "checkpoints").iterdir())))

    signal.signal(signum, submitit_like)
    trainer, exit_ = _fit(tmp_path, signum)
    assert exit_.code == PREEMPTED_EXIT_CODE and trainer.global_step == 2
    assert calls == [(signum, ["last.ckpt", "step=00000002.ckpt"])]
    assert not list(tmp_path.glob("hpc_ckpt_*"))
    assert find_resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoints" / "step=00000002.ckpt")


def test_signal_outside_slurm_saves_and_exits_75_without_requeue(tmp_path, clean_signals, monkeypatch, caplog):
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    trainer, exit_ = _fit(tmp_path, signal.SIGUSR1, signal_at=3)
    assert exit_.code == PREEMPTED_EXIT_CODE and trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "step=00000003.ckpt").is_file()
    assert "SIGUSR1: not a Slurm job: not requeued" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL  # still ours: a second warning is harmless


def test_requeue_job_names_the_array_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert preemption.job_id() == "100_1"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert preemption.job_id() == "101"


def test_resume_auto_rule(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert find_resume_checkpoint("auto", tmp_path) is None
    ckpts.mkdir()
    assert find_resume_checkpoint("auto", tmp_path) is None
    (ckpts / "last.ckpt").write_text("x")
    assert find_resume_checkpoint("auto", tmp_path) == str(ckpts / "last.ckpt")  # only without a numbered one
    for name in ("step=00000002.ckpt", "step=00000010.ckpt", "step=00000012.ckpt.partial", "step=00000011.ckpt.universal"):
        (ckpts / name).write_text("x")
    (ckpts / "step=00000009.ckpt").mkdir()  # DeepSpeed's sharded form
    os.utime(ckpts / "step=00000002.ckpt", (1e10, 1e10))  # the highest step wins, not the newest file
    assert find_resume_checkpoint("auto", tmp_path) == str(ckpts / "step=00000010.ckpt")
    assert find_resume_checkpoint(None, tmp_path) is None
    assert find_resume_checkpoint(str(ckpts / "step=00000002.ckpt"), tmp_path) == str(ckpts / "step=00000002.ckpt")
    (tmp_path / "hpc_ckpt_2.ckpt").write_text("x")
    (tmp_path / "hpc_ckpt_10.ckpt").write_text("x")
    with pytest.raises(SoraError, match=r"resume=auto: .* holds Lightning's HPC checkpoint hpc_ckpt_10\.ckpt.*resume=.*hpc_ckpt_10\.ckpt") as e:
        find_resume_checkpoint("auto", tmp_path)
    assert "\n" not in str(e.value)
    assert find_resume_checkpoint(str(tmp_path / "hpc_ckpt_10.ckpt"), tmp_path) == str(tmp_path / "hpc_ckpt_10.ckpt")  # explicitly: yes


def test_signal_in_the_last_step_ends_the_run_as_usual(tmp_path, clean_signals):
    calls: list[int] = []
    signal.signal(signal.SIGUSR1, lambda sig, frame: calls.append(sig))
    policy = CheckpointPolicy(dirpath=str(tmp_path / "checkpoints"), every_n_steps=100, keep_last=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, callbacks=[policy], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(_Tiny(3, signal.SIGUSR1), _loader())  # no requeue of a finished run
    assert trainer.global_step == 3 and calls == []
    assert (tmp_path / "checkpoints" / "step=00000003.ckpt").is_file()
