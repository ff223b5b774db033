"""Does the loader leak? Resident memory of the main process + its workers over many samples.

    python bench/bench_loader_memory.py                       # 2,000 samples after warm-up
    python bench/bench_loader_memory.py --samples 5000 --size 640x360 --bucket 33x256x448

Reads a generated shard set (``bench_loader.make_shards``: H.264 clips through
``ShardWriter``) with ``VideoDataModule`` and 2 DataLoader workers, like training, and samples
the RSS and USS (psutil) of the main process and every worker every ``--every`` samples. The curve
starts after ``--warmup`` samples, once shuffle buffers, bucket pools, decoder and allocator
arenas have reached their working size; growth is the mean of the last 5 points over the
mean of the first 5 (target < 5%), for RSS (as ``top`` shows it) and USS (private memory). decord readers are the usual suspect (one short-lived
reader per sample, see ``video_io``). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bench_loader import make_shards


def tree_memory() -> tuple[int, int, list[int]]:
    """(RSS, USS) bytes of this process and its children (the workers), and RSS per process.

    RSS counts every page a process has mapped, shared ones too: a worker's RSS grows as it
    touches more of the (shared, file-backed) torch/decord libraries. USS counts only the
    pages no other process maps, i.e. what the process would give back on exit.
    """
    me = psutil.Process()
    rss, uss = [], 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_full_info()  # reads /proc/PID/smaps: ~ms per process
        except psutil.NoSuchProcess:
            continue
        rss.append(info.rss)
        uss += info.uss
    return sum(rss), uss, rss


def growth(points: list[int]) -> float:
    """% change from the mean of the first 5 points to the mean of the last 5."""
    head, tail = points[:5], points[-5:]
    return 100.0 * (sum(tail) / len(tail) - sum(head) / len(head)) / (sum(head) / len(head))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2000, help="samples measured after warm-up")
    p.add_argument("--warmup", type=int, default=200, help="samples before the first measurement")
    p.add_argument("--every", type=int, default=50, help="samples between RSS measurements")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", default="256x144", help="clip WxH")
    p.add_argument("--bucket", default="33x128x224", help="FxHxW the loader emits")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    width, height = map(int, args.size.split("x"))
    bf, bh, bw = map(int, args.bucket.split("x"))

    from sora_train.data.datamodule import VideoDataModule

    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_memory_"))
    try:
        make_shards(tmp / "shards", args.clips, args.frames, width, height, per_shard=max(1, args.clips // 8))
        dm = VideoDataModule(
            train_shards=str(tmp / "shards"),
            buckets=[{"num_frames": bf, "height": bh, "width": bw, "batch_size": args.batch_size}],
            num_workers=args.workers,
        )
        dm.setup("fit")
        print(
            f"{args.clips} clips of {args.frames} frames {width}x{height} -> bucket {args.bucket} x{args.batch_size}, "
            f"{args.workers} workers; warm-up {args.warmup} samples, then {args.samples}, RSS every {args.every}"
        )
        it = iter(dm.train_dataloader())
        seen, next_mark, t0 = 0, args.warmup, time.perf_counter()
        curve: list[tuple[int, int, int, list[int]]] = []  # (samples after warm-up, RSS, USS, RSS per process)
        while seen < args.warmup + args.samples:
            batch = next(it)
            seen += batch["video"].shape[0]
            del batch
            if seen >= next_mark:
                curve.append((seen - args.warmup, *tree_memory()))
                next_mark += args.every
        seconds = time.perf_counter() - t0
        del it

        mib = 1 << 20
        rss, uss = [c[1] for c in curve], [c[2] for c in curve]
        print(f"{seen} samples in {seconds:.0f} s ({seen / seconds:.1f} samples/s); {len(curve)} points")
        step = max(1, len(curve) // 10)
        for n, total, private, per in curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else []):
            parts = " + ".join(f"{r / mib:.0f}" for r in per)
            print(f"  +{n:5d} samples: RSS {total / mib:7.1f} MiB ({parts}: main + workers), USS {private / mib:7.1f} MiB")
        for name, points in (("RSS", rss), ("USS", uss)):
            print(
                f"{name}: min {min(points) / mib:.1f} / max {max(points) / mib:.1f} MiB; first-5 mean {sum(points[:5]) / 5 / mib:.1f}, "
                f"last-5 mean {sum(points[-5:]) / 5 / mib:.1f} MiB; growth {growth(points):+.2f}% (target < 5%)"
            )
        half = len(curve) // 2
        print(f"second half alone (+{curve[half][0]} .. +{curve[-1][0]} samples): RSS growth {growth(rss[half:]):+.2f}%, USS {growth(uss[half:]):+.2f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
