"""The VAE with its adversarial loss under 2-rank DDP, across adv_start_step, and an exact resume.

The discriminator lives outside the strategy (its own optimizer, gradients averaged by hand,
both saved in each checkpoint under "discriminator"): two ranks train 6 steps with the
discriminator on from step 4 (adv_start_step=3, 0-based), checkpointing every 2; a second run
resumes from the step-4 checkpoint in new processes and must log the losses the uninterrupted
run logged at steps 5 and 6 - the generator's and the discriminator's - which needs the
discriminator's weights and optimizer state back as well as the VAE's. ~45 s (two 2-rank runs).
"""

from __future__ import annotations

import csv

import pytest

from cli_runs import Run, smoke_data_dir, sora

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _metric(run_dir, name: str) -> dict[int, float]:
    """``name`` by global step (1-based) from every CSVLogger version of a run."""
    out: dict[int, float] = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get(name):
                    out[int(row["step"]) + 1] = float(row[name])
    return out


def test_vae_with_discriminator_trains_on_two_ranks_and_resumes_exactly(tmp_path_factory):
    data = smoke_data_dir(tmp_path_factory) / "shapes_smoke"
    base = tmp_path_factory.mktemp("vae_adv")
    common = ["experiment=demo_vae", "vae=debug", "task.loss.adv_weight=0.1", "task.loss.adv_start_step=3",
              "trainer.accelerator=cpu", "trainer.devices=2", "strategy=ddp", "logger=csv", "callbacks.progress=null",
              f"data.train_shards={data}/train", f"data.val_shards={data}/val", "data.prepare=null", "data.num_workers=0",
              "data.buckets=[{num_frames:9,height:32,width:32,batch_size:2}]", "trainer.limit_val_batches=0",
              "trainer.log_every_n_steps=1", "latent_stats_batches=1", "export=false", "trainer.max_steps=6",
              "callbacks.checkpoint.every_n_steps=2", "callbacks.checkpoint.keep_last=10"]
    whole, resumed = base / "whole", base / "resumed"
    try:
        Run(sora("sora-train", *common, f"hydra.run.dir={whole}"), base / "whole.log").ok(300)
        ckpt = whole / "checkpoints" / "step=00000004.ckpt"
        resume = f"resume='{ckpt}'"  # quoted: the file name holds '='
        log = Run(sora("sora-train", *common, f"hydra.run.dir={resumed}", resume), base / "resumed.log").ok(300).output()
    finally:
        Run.kill_all()
    assert f"resuming from {ckpt}" in log

    loss, disc = _metric(whole, "train/loss"), _metric(whole, "train/disc_loss")
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert sorted(disc) == [4, 5, 6]  # the discriminator trains from adv_start_step on
    again, disc_again = _metric(resumed, "train/loss"), _metric(resumed, "train/disc_loss")
    assert sorted(again) == [5, 6] and sorted(disc_again) == [5, 6]
    for step in (5, 6):
        assert again[step] == pytest.approx(loss[step], rel=1e-5), (step, again, loss)
        assert disc_again[step] == pytest.approx(disc[step], rel=1e-5), (step, disc_again, disc)
