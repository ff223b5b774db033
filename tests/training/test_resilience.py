"""Training that survives: exact resume after SIGTERM and after SIGKILL (also mid-save), the
atomic checkpoint write, what a run logs (offline wandb), and the NaN guard.

Through the real CLI in subprocesses on the smoke experiment (debug sizes, CPU, 2 DataLoader
workers). Three runs start side by side - an uninterrupted reference, one stopped by SIGTERM,
one SIGKILLed inside a checkpoint save - then the two interrupted ones resume, also side by
side. Each resumed run's loss history (the steps before the interruption come back from its
checkpoint) must equal the reference's, step for step.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from cli_runs import Run, base_env, csv_losses, history, smoke_data_dir, sora, wait_for
from sora_train.training.callbacks.checkpoint import PARTIAL, PREEMPTED_EXIT_CODE, find_resume_checkpoint

MAX_STEPS, EVERY = 7, 3
HANG_AT = 6  # the SIGKILLed run is killed inside the save of this step's checkpoint
TIMEOUT = 420

# sora-train with Trainer.save_checkpoint slowed down at one step: the file is written, cut to
# half its size (as if the process died mid-write), then the process waits to be killed.
HANG_IN_SAVE = r"""
import os, sys, time
from pathlib import Path
import lightning.pytorch as pl

original = pl.Trainer.save_checkpoint

def save_then_hang(self, filepath, *args, **kwargs):
    original(self, filepath, *args, **kwargs)
    if "step=%08d" % int(os.environ["HANG_AT_STEP"]) in str(filepath):
        p = Path(filepath)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        Path(os.environ["HANG_MARKER"]).write_text(str(filepath))
        time.sleep(600)

pl.Trainer.save_checkpoint = save_then_hang
from sora_train.cli.train import main
sys.argv = ["sora-train", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = smoke_data_dir(tmp_path_factory)
    base = tmp_path_factory.mktemp("resilience")
    ref, term, kill = base / "ref", base / "term", base / "kill"
    common = ["experiment=smoke", f"paths.data_dir={data}", f"trainer.max_steps={MAX_STEPS}", f"callbacks.checkpoint.every_n_steps={EVERY}",
              "data.num_workers=2", "export=false", "+logger.csv.flush_logs_every_n_steps=1"]
    no_samples = "callbacks.samples=null"  # sampling at the end only: no effect on the losses

    try:
        a = Run(sora("sora-train", *common, no_samples, f"hydra.run.dir={ref}"), base / "ref.log")
        # The SIGTERM run saves nothing periodically: its only checkpoint is the one SIGTERM makes.
        b = Run(sora("sora-train", *common, no_samples, f"hydra.run.dir={term}", "callbacks.checkpoint.every_n_steps=1000"), base / "term.log")
        marker = base / "hang_marker"
        c = Run([sys.executable, "-c", HANG_IN_SAVE, *common, no_samples, f"hydra.run.dir={kill}"], base / "kill.log",
                env=base_env(HANG_AT_STEP=str(HANG_AT), HANG_MARKER=str(marker)))

        # SIGTERM to the whole process group (as Slurm and terminals do: DataLoader workers too),
        # once two steps are done.
        wait_for(lambda: len(csv_losses(term)) >= 2, TIMEOUT, "2 steps of the SIGTERM run", b)
        b.signal(signal.SIGTERM)
        wait_for(marker.exists, TIMEOUT, f"the SIGKILL run to be inside the step-{HANG_AT} save", c)
        killed_in_save = {p.name for p in (kill / "checkpoints").iterdir()}
        c.signal(signal.SIGKILL)
        rc_term, rc_kill = b.wait(TIMEOUT), c.wait(TIMEOUT)
        a.ok(TIMEOUT)
        after_kill = {p.name for p in (kill / "checkpoints").iterdir()}
        resume_pick = find_resume_checkpoint("auto", kill)
        term_log = b.output()

        # Resume both; the SIGTERM one also logs to offline wandb and samples a video at the end.
        # Beside them, a diverging run (optimizer.lr=1e30: the first step throws the weights to
        # ~1e30, every later loss is NaN) for the NaN guard's one-line error.
        b2 = Run(sora("sora-train", *common, f"hydra.run.dir={term}", "resume=auto", "logger=[csv,wandb]", "callbacks.throughput.log_every_n_steps=1"),
                 base / "term2.log")
        c2 = Run(sora("sora-train", *common, no_samples, f"hydra.run.dir={kill}", "resume=auto"), base / "kill2.log")
        nan = Run(sora("sora-train", "experiment=smoke", f"paths.data_dir={data}", "optimizer.lr=1e30", "callbacks.nan_guard.max_consecutive=2",
                       "trainer.max_steps=6", no_samples, "export=false", f"hydra.run.dir={base / 'nan'}"), base / "nan.log")
        b2.ok(TIMEOUT)
        c2.ok(TIMEOUT)
        rc_nan = nan.wait(TIMEOUT)
    finally:
        Run.kill_all()
    return {
        "ref": ref, "term": term, "kill": kill, "rc_term": rc_term, "rc_kill": rc_kill, "term_log": term_log,
        "term2_log": b2.output(), "kill2_log": c2.output(), "killed_in_save": killed_in_save, "after_kill": after_kill,
        "resume_pick": resume_pick, "rc_nan": rc_nan, "nan_log": nan.output(),
    }


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-5, abs_tol=1e-7), f"step {step}: {got[step]} != {want[step]}"


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_75_and_resumes_exactly(runs):
    assert runs["rc_term"] == PREEMPTED_EXIT_CODE, runs["term_log"][-3000:]
    m = re.search(r"SIGTERM: saved the checkpoint of step (\d+)", runs["term_log"])
    assert m, runs["term_log"][-3000:]
    step = int(m.group(1))
    assert 2 <= step < MAX_STEPS
    assert f"resuming from {runs['term']}/checkpoints/step={step:08d}.ckpt" in runs["term2_log"]
    ref = history(runs["ref"])
    _assert_same_losses(history(runs["term"]), ref)
    # What the SIGTERMed process logged itself (before its checkpoint) matches too.
    first = {s: v for s, v in csv_losses(runs["term"]).items() if s <= step}
    assert first and all(math.isclose(v, ref[s], rel_tol=1e-5) for s, v in first.items())


@pytest.mark.slow
def test_sigkill_inside_a_save_leaves_nothing_corrupt_and_resumes_exactly(runs):
    partial = f"step={HANG_AT:08d}.ckpt{PARTIAL}"
    assert runs["rc_kill"] == -signal.SIGKILL
    assert partial in runs["killed_in_save"] and partial in runs["after_kill"]  # the torn write kept its temporary name
    assert f"step={HANG_AT:08d}.ckpt" not in runs["after_kill"]
    assert runs["resume_pick"] == str(runs["kill"] / "checkpoints" / f"step={EVERY:08d}.ckpt")  # the newest complete one
    assert f"resuming from {runs['resume_pick']}" in runs["kill2_log"]
    _assert_same_losses(history(runs["kill"]), history(runs["ref"]))
    final = {p.name for p in (runs["kill"] / "checkpoints").iterdir()}
    assert f"step={MAX_STEPS:08d}.ckpt" in final and not [n for n in final if n.endswith(PARTIAL)]


def _wandb_records(run_dir: Path) -> tuple[dict[str, list[float]], list[Path]]:
    """History rows of the offline wandb run(s) under run_dir (wandb has no reader for its own
    files: its leveldb-style log of protobuf records is parsed here), and the media files."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    metrics: dict[str, list[float]] = {}
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir}"
    for f in files:
        data, pos, pending, block = f.read_bytes(), 7, b"", 32768  # 7-byte file header
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # block trailer
                pos += left
                continue
            _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0 and n == 0:
                pos += left
                continue
            pending += data[pos + 7 : pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):  # full record, or last chunk of one
                rec = pb.Record()
                rec.ParseFromString(pending)
                pending = b""
                if rec.WhichOneof("record_type") == "history":
                    for item in rec.history.item:
                        key = item.key or "/".join(item.nested_key)
                        try:
                            metrics.setdefault(key, []).append(float(json.loads(item.value_json)))
                        except (TypeError, ValueError):
                            metrics.setdefault(key, [])
    media = sorted((run_dir / "wandb").glob("offline-run-*/files/media/**/*.mp4"))
    return metrics, media


@pytest.mark.slow
def test_offline_wandb_run_has_namespaced_metrics_and_sample_videos(runs):
    metrics, media = _wandb_records(runs["term"])
    for name in ("train/loss", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "data/skipped"):
        assert metrics.get(name), f"{name} not logged; got {sorted(metrics)}"
        assert all(math.isfinite(v) for v in metrics[name])
    assert metrics["data/skipped"][-1] == 0.0
    assert all(v > 0 for v in metrics["perf/tokens_per_s"] + metrics["train/grad_norm"])
    assert "samples/video/videos" in metrics  # a wandb.Video list, flattened to nested keys
    assert media, "no mp4 among the wandb run's media files"
    assert media[0].stat().st_size > 1000


def test_rich_progress_bar_is_rank_zero_only():
    """Lightning disables progress bars on ranks other than 0 in setup(); our config uses its
    RichProgressBar as is, so that stays true."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sora_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["callbacks=default"])
    GlobalHydra.instance().clear()
    for rank in (0, 1):
        bar = instantiate(cfg.callbacks.progress)
        bar.setup(SimpleNamespace(is_global_zero=rank == 0), None, "fit")
        assert bar.is_disabled == (rank != 0)


# --------------------------------------------------------------------------- NaN guard


class _Tiny(pl.LightningModule):
    """y = w x; the loss is NaN at the steps listed in ``nan_at`` (1-based)."""

    def __init__(self, nan_at: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_at = nan_at
        self.weights: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        if self.global_step + 1 in self.nan_at:
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights[self.global_step] = self.layer.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=8)


def _fit_tiny(nan_at: set[int], max_steps: int, max_consecutive: int) -> tuple[_Tiny, pl.Trainer]:
    from sora_train.training.callbacks.nan_guard import NaNGuard

    torch.manual_seed(0)
    module, guard = _Tiny(nan_at), NaNGuard(max_consecutive=max_consecutive)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module)
    return module, trainer


def test_nan_loss_step_is_skipped_entirely():
    module, trainer = _fit_tiny({3, 4}, max_steps=6, max_consecutive=3)
    w = module.weights
    assert torch.equal(w[2], w[3]) and torch.equal(w[3], w[4])  # no update, not even weight decay
    assert not torch.equal(w[4], w[5]) and torch.isfinite(w[6]).all()  # training went on
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2.0
    assert torch.isfinite(trainer.callback_metrics["train/grad_norm"])


def test_nan_guard_stops_after_k_in_a_row():
    from sora_train.utils.errors import SoraError

    with pytest.raises(SoraError, match="loss was NaN/Inf for 3 steps in a row"):
        _fit_tiny({2, 3, 4}, max_steps=10, max_consecutive=3)


@pytest.mark.slow
def test_cli_stops_a_diverging_run_with_a_one_line_error(runs):
    out = runs["nan_log"].strip().splitlines()
    assert runs["rc_nan"] == 2, "\n".join(out[-30:])
    assert out[-1].startswith("error: loss was NaN/Inf for 2 steps in a row"), out[-1]


def test_sora_export_errors_are_one_line(tmp_path, capsys):
    from sora_train.cli.export import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "no saved config" in err
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--ckpt", "last"])
    assert "last.ckpt does not exist" in capsys.readouterr().err
