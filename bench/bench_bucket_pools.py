"""Samples waiting in bucket pools over a long run: the bucket schedule against independent draws.

    python bench/bench_bucket_pools.py outputs/shapes_native/latents/train --batches 16000 --seed 42

Replays the loader's batching of an experiment's buckets (default: experiment=shapes_native)
over a latent shard set from metadata alone (nothing is decoded), and prints the peak number of
samples waiting in bucket pools, per 2,000 batches, twice: with the shipped schedule
(``BucketTable.schedule``, low-discrepancy) and with buckets drawn independently per batch
with the same weights (the schedule before it). A pool that keeps growing stops the run when
it passes the loader's ``max_pool`` (4,096).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import numpy as np
from omegaconf import OmegaConf

from sora_train.data.buckets import BucketTable
from sora_train.data.latents import LatentDataModule

ROOT = Path(__file__).resolve().parents[1]


def independent_draw(table: BucketTable, seed: int, epoch: int, index: int):
    """One independent draw per batch: images with probability image_ratio, then by weight."""
    rng = np.random.default_rng([seed, epoch, index, 0x5EED])
    pool = table.images if table.images and (not table.video or rng.random() < table.image_ratio) else table.video
    w = np.array([table.weights[b.name] for b in pool], dtype=np.float64)
    return pool[int(rng.choice(len(pool), p=w / w.sum()))]


def peaks(shards: str, experiment: str, batches: int, seed: int, every: int = 2000) -> list[int]:
    data = OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml").data
    dm = LatentDataModule(shards, buckets=OmegaConf.to_container(data.buckets), image_ratio=float(data.image_ratio),
                          num_workers=0, seed=seed)
    ds = dm.make_dataset(dm.train_spec, dm.make_buckets(), train=True)
    ds.max_pool = 10**9  # measure the pools instead of stopping at the limit
    st = ds._consumer()
    read = [0]

    def counted(stream):
        for sample in stream:
            read[0] += 1
            yield sample

    stream = ds._batches(st, counted(ds._forever(st)), 0)
    emitted, peak, out = 0, 0, []
    for i in range(batches):
        emitted += len(next(stream)[2])
        peak = max(peak, read[0] - emitted)  # read from the shards, not yet in a batch: waiting
        if (i + 1) % every == 0:
            out.append(peak)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", help="a latent shard set (cache-latents output), e.g. outputs/shapes_native/latents/train")
    ap.add_argument("--experiment", default="shapes_native", help="conf/experiment file whose data.buckets and image_ratio to use")
    ap.add_argument("--batches", type=int, default=16000)
    ap.add_argument("--seed", type=int, default=42, help="the run's seed (sora-train's default: 42)")
    args = ap.parse_args()
    shipped = peaks(args.shards, args.experiment, args.batches, args.seed)
    with mock.patch.object(BucketTable, "schedule", independent_draw):
        independent = peaks(args.shards, args.experiment, args.batches, args.seed)
    print(f"peak samples waiting, per 2,000 of {args.batches} batches (seed {args.seed}):")
    print(f"  schedule (low-discrepancy): {shipped}")
    print(f"  independent draws:          {independent}")
    print(f"independent / schedule at the end: {independent[-1] / max(shipped[-1], 1):.1f}x")


if __name__ == "__main__":
    main()
