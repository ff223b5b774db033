"""Elastic resume: a run saved on N data-parallel ranks continues on M.

- The data position (no training, the real loader on a small shard set): the samples seen
  before and after the resume cover the pass in progress, none twice, none skipped; the rule is
  in docs/strategies.md, "Elastic resume".
- ZeRO-2 and ZeRO-3 checkpoints saved on 2 gloo CPU ranks resume on 1 through DeepSpeed's
  universal checkpoint, and a DDP one too (real sora-train runs): after two more steps the
  three 1-rank runs hold the same weights and losses (within fp32 reduction order), which needs
  the weights and the Adam state (moments, step) of the save to have been carried over.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sora_train.data.datamodule import VideoDataModule
from sora_train.data.shards import ShardWriter
from sora_train.data.video_io import encode_video

BUCKETS = [{"num_frames": 9, "height": 32, "width": 32, "batch_size": 4}]
NUM_SAMPLES = 40  # one pass; 5 shards of 8


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic_shards")
    with ShardWriter(d, max_count=8) as w:
        for i in range(NUM_SAMPLES):
            frames = np.full((9, 32, 32, 3), i * 5, np.uint8)
            meta = dict(caption=f"clip {i}", captions={"original": f"clip {i}"}, fps=8.0, num_frames=9, width=32, height=32,
                        duration=9 / 8, frame_range=[0, 9], source={"path": f"src/{i}", "sha256": f"{i:064x}"})
            w.write(f"vid{i:03d}", {"mp4": encode_video(frames, 8)}, meta)
    return d


class _Training:
    training = True


def _run(monkeypatch, shard_dir, world: int, workers: int, steps: int, state: dict | None = None):
    """Every rank's keys of ``steps`` training batches, and rank 0's DataModule state after them."""
    keys: list[list[list[str]]] = []  # [rank][step] -> keys
    saved = None
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        dm = VideoDataModule(str(shard_dir), BUCKETS, num_workers=workers, shuffle_buffer=8, seed=5)
        dm.trainer = _Training()
        if state is not None:
            dm.load_state_dict(state)
        dm.setup()
        it = iter(dm.train_dataloader())
        mine = []
        for _ in range(steps):
            batch = next(it)
            dm.on_after_batch_transfer(batch, 0)
            mine.append(list(batch["key"]))
        keys.append(mine)
        if rank == 0:
            saved = dm.state_dict()
    return keys, saved


@pytest.mark.parametrize(("before", "after"), [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 2), (1, 0)), ((1, 0), (3, 2))],
                         ids=["2to1", "1to2", "2x2workers_to_1", "1to3x2workers"])
def test_data_position_covers_the_pass_once(monkeypatch, shard_dir, before, after):
    """Rule: the global batch index goes on from the first batch not delivered; the samples of
    the pass in progress that no rank consumed are split over the new ranks. So the keys seen
    before, plus those of the steps after the resume that hold only what the pass still had,
    are every sample of the pass, each once."""
    (w0, n0), (w1, n1) = before, after
    steps_before = 3
    old, state = _run(monkeypatch, shard_dir, w0, n0, steps_before)
    seen = [k for rank in old for step in rank for k in step]
    assert len(seen) == len(set(seen)) == w0 * steps_before * 4  # within the first pass (40 samples)
    assert state["world"] == w0
    remaining = NUM_SAMPLES - len(seen)
    per_step = w1 * 4
    steps_after = math.ceil(remaining / per_step) + 1
    new, _ = _run(monkeypatch, shard_dir, w1, n1, steps_after, state)
    # Whole steps that can only hold the pass's remainder: every rank has >= that many batches of it.
    full_steps = (remaining // w1) // 4
    rest = [k for rank in new for step in rank[:full_steps] for k in step]
    assert len(rest) == len(set(rest)), "a sample served twice after the resume"
    assert not set(rest) & set(seen), "a sample consumed before the resume served again in the same pass"
    later = {k for rank in new for step in rank[full_steps:] for k in step}
    missing = {f"vid{i:03d}" for i in range(NUM_SAMPLES)} - set(seen) - set(rest) - later
    assert not missing, f"skipped: {sorted(missing)}"
    # And the resumed run continues the global batch count.
    assert state["next_index"] and min(int(v) for v in state["next_index"].values()) == steps_before


def test_data_position_survives_a_second_change(monkeypatch, shard_dir):
    """2 ranks -> 1 -> 2 within one pass: the checkpoint of the 1-rank run records its layout and
    the one before it, so the third run still serves each sample of the pass once."""
    first, state = _run(monkeypatch, shard_dir, 2, 0, 2)  # 16 samples
    second, state = _run(monkeypatch, shard_dir, 1, 0, 2, state)  # 8 more
    assert state["layout"]["origin"]["world"] == 2 and state["world"] == 1
    third, _ = _run(monkeypatch, shard_dir, 2, 0, 2, state)  # the last 16
    keys = [k for run in (first, second, third) for rank in run for step in rank for k in step]
    assert sorted(keys) == [f"vid{i:03d}" for i in range(NUM_SAMPLES)]


# --------------------------------------------------------------------------- what cannot be converted


def _fake_zero_checkpoint(root, ranks: int, optim: bool = True):
    """A ZeRO checkpoint directory's layout (Lightning's: latest + tag folder) with unreadable shards."""
    ckpt = root / "step=00000002.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    for r in range(ranks):
        (ckpt / "checkpoint" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
        if optim:
            (ckpt / "checkpoint" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    return ckpt


def test_what_cannot_be_converted_is_one_line(tmp_path):
    import lightning.pytorch as pl

    from sora_train.training.elastic import prepare_resume, universal_checkpoint, zero_world_size
    from sora_train.utils.errors import SoraError

    assert zero_world_size(tmp_path) is None  # not a ZeRO checkpoint: nothing to do
    no_optim = _fake_zero_checkpoint(tmp_path / "a", 2, optim=False)
    with pytest.raises(SoraError, match=r"has no \*_optim_states.pt shards .* resume on the same number of ranks") as e:
        zero_world_size(no_optim)
    assert "\n" not in str(e.value)
    ckpt = _fake_zero_checkpoint(tmp_path / "b", 2)
    assert zero_world_size(ckpt) == 2
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(SoraError, match=r"is a DeepSpeed ZeRO checkpoint \(saved on 2 ranks\) but strategy is SingleDeviceStrategy"):
        prepare_resume(str(ckpt), trainer)
    pytest.importorskip("deepspeed")
    with pytest.raises(SoraError, match=r"ds_to_universal could not convert it") as e:
        universal_checkpoint(ckpt)
    assert str(ckpt) in str(e.value)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]  # no .partial, no lock left behind


# --------------------------------------------------------------------------- real runs: 2 ranks -> 1

STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_3")
TIMEOUT = 300
SAVED_AT, RESUMED_TO, GROWN_TO = 2, 3, 4
GROWN = ("ddp", "deepspeed_stage_3")


def _launch(out: Path, cells: list[tuple[str, str]], ranks: int, log: Path) -> str:
    """The cells on ``ranks`` gloo ranks in one matrix_driver launch (cli_runs.launch_driver)."""
    from cli_runs import launch_driver

    text = launch_driver(out, cells, ranks, log, TIMEOUT)
    for name, _ in cells:
        if f"[matrix] rank 0 cell {name}: ok" not in text:
            pytest.fail(f"{name} on {ranks} rank(s) failed:\n{text[-6000:]}")
    return text


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory):
    """Each strategy: 2 ranks train 2 steps (checkpoint at 2), then 1 rank resumes it (resume=auto)
    and trains step 3; then 2 ranks resume DDP's and ZeRO-3's and train step 4 (ZeRO-2 grows through
    the same conversion; left out for time)."""
    pytest.importorskip("deepspeed")
    from cli_runs import smoke_data_dir

    data = smoke_data_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("elastic")
    common = (f"experiment=smoke paths.data_dir={data} trainer.accelerator=cpu data.num_workers=0 callbacks.samples=null export=false "
              f"callbacks.checkpoint.every_n_steps={SAVED_AT} callbacks.checkpoint.keep_last=10")
    _launch(out, [(s, f"{common} strategy={s} trainer.devices=2 trainer.max_steps={SAVED_AT}") for s in STRATEGIES], 2, out / "2ranks.log")
    log = _launch(out, [(s, f"{common} strategy={s} trainer.devices=1 trainer.max_steps={RESUMED_TO} resume=auto") for s in STRATEGIES], 1,
                  out / "1rank.log")
    grown = _launch(out, [(s, f"{common} strategy={s} trainer.devices=2 trainer.max_steps={GROWN_TO} resume=auto") for s in GROWN], 2,
                    out / "2ranks_again.log")
    return {"dirs": {s: out / s for s in STRATEGIES}, "log": log, "grown_log": grown}


def _ckpt(run_dir, step: int):
    return run_dir / "checkpoints" / f"step={step:08d}.ckpt"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_resume_on_one(elastic_runs):
    import torch
    from cli_runs import history

    from sora_train.parallel.consolidate import read_checkpoint_weights

    from sora_train.parallel.consolidate import _safe_load  # weights_only, as test_multiprocess reads them

    dirs, log = elastic_runs["dirs"], elastic_runs["log"]
    assert log.count("elastic resume through a universal checkpoint") == 2, log[-4000:]  # ZeRO-2 and ZeRO-3, not DDP
    for s in STRATEGIES:
        zero = s.startswith("deepspeed")
        assert (_ckpt(dirs[s], SAVED_AT).parent / f"step={SAVED_AT:08d}.ckpt.universal").is_dir() == zero
        assert sorted(history(dirs[s]))[:RESUMED_TO] == list(range(1, RESUMED_TO + 1))  # one curve across the change
        # The data position went through the elastic mapping, and the resumed run records it.
        ckpt = _ckpt(dirs[s], RESUMED_TO)
        saved = _safe_load(next((ckpt / "checkpoint").glob("*model_states.pt")), deepspeed_shard=True) if zero else _safe_load(ckpt)
        layout = saved["VideoDataModule"]["layout"]
        assert (layout["world"], layout["start"], layout["origin"]["world"]) == (1, SAVED_AT, 2), layout
    # Same weights and the same batch after the resume: the same loss at step 3 (ZeRO's loaded
    # weights are DDP's). The weights after step 3's update are equal too, which needs Adam's
    # moments and step count at the save to have come through the conversion.
    ddp_loss = history(dirs["ddp"])
    ddp_w, _ = read_checkpoint_weights(_ckpt(dirs["ddp"], RESUMED_TO))
    for s in STRATEGIES[1:]:
        loss = history(dirs[s])
        assert math.isclose(loss[RESUMED_TO], ddp_loss[RESUMED_TO], rel_tol=1e-5), (s, loss, ddp_loss)
        w, meta = read_checkpoint_weights(_ckpt(dirs[s], RESUMED_TO))
        assert meta["world_size"] == 1
        # dit: through the optimizer state; ema (frozen): what the universal load leaves out, put back
        keys = [k for k in ddp_w if k.startswith(("dit.", "ema."))]
        assert any(k.startswith("ema.") for k in keys) and len(w) == len(ddp_w)
        assert all(torch.allclose(w[k].detach().float(), ddp_w[k].detach().float(), rtol=1e-4, atol=1e-6) for k in keys), (
            s, max((w[k].detach().float() - ddp_w[k].detach().float()).abs().max().item() for k in keys))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_adam_state_is_the_consolidated_one(elastic_runs):
    """Adam's step count and moments after the resumed step: ZeRO's one partition (1 rank) holds
    what DDP's full optimizer state holds."""
    import torch

    from sora_train.parallel.consolidate import _safe_load  # weights_only, as test_multiprocess reads them

    dirs = elastic_runs["dirs"]
    ddp = _safe_load(_ckpt(dirs["ddp"], RESUMED_TO))["optimizer_states"][0]["state"]
    assert {float(v["step"]) for v in ddp.values()} == {float(RESUMED_TO)}
    ddp_norm = {m: math.sqrt(sum(float(v[m].double().pow(2).sum()) for v in ddp.values())) for m in ("exp_avg", "exp_avg_sq")}
    for s in STRATEGIES[1:]:
        (shard,) = _ckpt(dirs[s], RESUMED_TO).joinpath("checkpoint").glob("*optim_states.pt")
        opt = _safe_load(shard, deepspeed_shard=True)["optimizer_state_dict"]
        (state,) = (opt.get("base_optimizer_state") or opt["optimizer_state_dict"])["state"].values()
        assert float(state["step"]) == RESUMED_TO, s
        for m, want in ddp_norm.items():
            got = float(state[m].double().norm())  # the flat partition; padding is zero
            assert math.isclose(got, want, rel_tol=1e-4), (s, m, got, want)
        assert torch.isfinite(state["exp_avg"]).all()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_starting_together_convert_once(elastic_runs, tmp_path):
    """Under torchrun or srun every rank reaches the conversion at once: one converts, the others
    wait for its rename and read the same copy."""
    import shutil
    import threading

    from sora_train.training.elastic import universal_checkpoint

    src = tmp_path / f"step={SAVED_AT:08d}.ckpt"
    shutil.copytree(_ckpt(elastic_runs["dirs"]["deepspeed_stage_3"], SAVED_AT), src)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(universal_checkpoint(src, wait_s=60))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 3 and len(set(got)) == 1
    out = got[0]
    assert (out / "latest").read_text() == "checkpoint" and (out / "latest_universal").read_text() == "checkpoint"
    assert (out / "checkpoint" / "zero" / "optimizer_state.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no lock or .partial left

    # A checkpoint saved again under its name (last.ckpt) is converted again, not served stale.
    before = (out / "converted_from.txt").read_text()
    model_states = next((src / "checkpoint").glob("*model_states.pt"))
    shutil.copy(model_states, model_states.with_suffix(".new"))
    model_states.with_suffix(".new").replace(model_states)  # new file, as a save writes it
    assert universal_checkpoint(src) == out and (out / "converted_from.txt").read_text() != before

    # A lock left by a process killed during its conversion (same host, pid gone) is taken over.
    import socket
    import subprocess
    import sys

    shutil.rmtree(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    lock = tmp_path / f"{out.name}.lock"
    lock.mkdir()
    (lock / "owner").write_text(f"{socket.gethostname()} pid {int(dead.stdout)}\n")
    assert universal_checkpoint(src, wait_s=30) == out and out.is_dir() and not lock.exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_rank_resumes_on_two(elastic_runs):
    """And back: the 1-rank checkpoints continue on 2 ranks (ZeRO-3 converts again), with the same
    loss and weights after step 4 as DDP."""
    import torch
    from cli_runs import history

    from sora_train.parallel.consolidate import read_checkpoint_weights

    dirs = elastic_runs["dirs"]
    grown_log = elastic_runs["grown_log"]  # rank 0's output
    assert grown_log.count("elastic resume through a universal checkpoint") == 1  # ZeRO-3
    assert grown_log.count("data position: saved with 1 rank(s) x 1 worker(s), resumed with 2 x 1") == len(GROWN)
    ddp_loss = history(dirs["ddp"])
    assert sorted(ddp_loss) == list(range(1, GROWN_TO + 1))
    ddp_w, _ = read_checkpoint_weights(_ckpt(dirs["ddp"], GROWN_TO))
    for s in GROWN[1:]:
        assert (_ckpt(dirs[s], RESUMED_TO).parent / f"step={RESUMED_TO:08d}.ckpt.universal").is_dir()
        loss = history(dirs[s])
        assert math.isclose(loss[GROWN_TO], ddp_loss[GROWN_TO], rel_tol=1e-4), (s, loss, ddp_loss)
        w, meta = read_checkpoint_weights(_ckpt(dirs[s], GROWN_TO))
        assert meta["world_size"] == 2
        keys = [k for k in ddp_w if k.startswith(("dit.", "ema."))]
        assert all(torch.allclose(w[k].detach().float(), ddp_w[k].detach().float(), rtol=1e-4, atol=1e-6) for k in keys), s
