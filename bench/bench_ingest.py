"""How fast `sora-data ingest` turns footage into shards: hours of video per hour per core.

    python bench/bench_ingest.py                         # ~20 s: 8 videos of 6 s at 320x180
    python bench/bench_ingest.py --videos 32 --seconds 20 --size 640x360 --workers 4

Generates a corpus of H.264 videos (half of them longer than --max-clip-seconds, so they are
cut and re-encoded; the rest are kept as they are) and ingests it twice:

- in-process (--workers 0): CPU seconds of this process (decoder + encoder threads included)
  give hours of video per CPU-hour: the cost per core, without pool overhead;
- with --workers N: wall-clock hours of video per hour, divided by N, the throughput per
  core that a run of that width sees (worker start-up included).

It prints ratios, not pass/fail. Decoding every frame dominates for kept files; encoding
dominates for cut ones.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import av  # noqa: F401  (before decord: see data_tools/probe.py)
import numpy as np

from sora_train.data.video_io import encode_video
from sora_train.data_tools.ingest import IngestOptions, ingest


def make_corpus(root: Path, videos: int, seconds: float, width: int, height: int, fps: int) -> float:
    """Write ``videos`` captioned mp4s under ``root``; returns the total seconds of video."""
    rng = np.random.default_rng(0)
    total = 0.0
    for i in range(videos):
        n = int(seconds * fps * (2.0 if i % 2 else 0.5))  # alternate: cut into clips / kept whole
        y, x = np.mgrid[0:height, 0:width]
        frames = np.empty((n, height, width, 3), np.uint8)
        for t in range(n):  # a moving gradient + noise: some motion and texture to code
            frames[t, ..., 0] = (x + 4 * t) % 256
            frames[t, ..., 1] = (y + 2 * t) % 256
            frames[t, ..., 2] = rng.integers(0, 32, (height, width))
        (root / f"v{i:03d}.mp4").write_bytes(encode_video(frames, fps, "mp4"))
        (root / f"v{i:03d}.txt").write_text(f"benchmark video {i}")
        total += n / fps
    return total


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0, help="mean length of a video")
    p.add_argument("--size", default="320x180", help="WxH")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-clip-seconds", type=float, default=5.0)
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))

    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        src = tmp / "footage"
        src.mkdir()
        t0 = time.perf_counter()
        video_s = make_corpus(src, args.videos, args.seconds, width, height, args.fps)
        print(f"corpus: {args.videos} videos, {video_s:.0f} s of {args.size} @ {args.fps} fps (generated in {time.perf_counter() - t0:.1f} s)")

        opts = dict(max_clip_seconds=args.max_clip_seconds, min_clip_seconds=1.0, min_frames=8)
        c0, w0 = cpu_seconds(), time.perf_counter()
        index = ingest([src], tmp / "inproc", IngestOptions(workers=0, **opts), quiet=True)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
        print(f"in-process : {index['num_samples']} clips, {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"-> {video_s / cpu:.1f} hours of video per CPU-hour")

        w0 = time.perf_counter()
        index = ingest([src], tmp / "pool", IngestOptions(workers=args.workers, **opts), quiet=True)
        wall = time.perf_counter() - w0
        print(f"{args.workers} workers  : {index['num_samples']} clips, {wall:.2f} s wall "
              f"-> {video_s / wall:.1f} hours of video per hour, {video_s / wall / args.workers:.1f} per hour per core "
              "(includes starting the workers: a few seconds, so use a bigger corpus for a steady-state number)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
