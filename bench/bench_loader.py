"""Loader throughput vs raw decord, per decoder: how much of the decoder's speed reaches training.

    python bench/bench_loader.py                              # 48 clips, 33 frames 320x180 -> 33x144x256
    python bench/bench_loader.py --decoders decord            # only the default decoder
    python bench/bench_loader.py --size 256x256 --bucket 33x256x256 --rounds 7
    python bench/bench_loader.py --frames 49                  # longer clips: random temporal crops

Writes a shard set of H.264 clips (``synthetic_clip``: panning texture + noise, about the
bitrate of ordinary 320x180 footage, so decoding costs what it does on real data) through
``ShardWriter`` and reads it two ways, both with 2 processes:

- **loader[D]**: for each decoder D of ``--decoders`` (``data.decoder``: decord, pyav,
  torchcodec; one that does not load here is reported and left out),
  ``VideoDataModule`` with ``--workers`` DataLoader workers and one bucket; the
  main process only takes batches. Everything the loader does counts: tar streaming, json,
  shuffling, bucketing, decoding, cropping, stacking the uint8 batch, and handing it to the
  main process through shared memory (the float conversion happens on the training device,
  after transfer, as in training);
- **raw**: the same number of processes, each holding the mp4 bytes of its share of the
  clips in memory, run ``decord.VideoReader(bytes, width, height)`` + ``get_batch`` on the
  frame indices and output size the loader uses (``frame_indices`` / ``resize_for_crop``).

Frames per second of each are timed side by side in alternating rounds (steady state: the
loader's first batches, which include worker start-up, are not timed), and the ratio
loader[D]/raw decord is the median over rounds (target >= 0.85 for the default decoder; the
others' ratios say what choosing them costs or gains). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av  # noqa: F401  (before decord: see data_tools/probe.py)
import numpy as np
import torch

from sora_train.data.shards import ShardWriter, read_index, iter_samples, shard_paths
from sora_train.data.transforms import frame_indices, resize_for_crop
from sora_train.data.video_io import DECODERS, encode_video, torchcodec_problem
from sora_train.utils import sha256_bytes

FPS = 24


def synthetic_clip(rng: np.random.Generator, frames: int, width: int, height: int, shift: int) -> np.ndarray:
    """(F, H, W, 3) uint8 that codes like ordinary footage (~3 KB a frame at 320x180, crf 18):
    a blocky random texture panning 3 px a frame (motion to compensate), a drifting gradient,
    and fresh sensor-like noise every frame (residuals to code)."""
    pan = 3
    tex = rng.integers(0, 256, (height // 4 + 1, (width + pan * frames) // 4 + 1, 3)).astype(np.float32)
    tex = np.kron(tex, np.ones((4, 4, 1), np.float32))  # 4x4 blocks: coarse enough to survive crf 18
    x = np.arange(width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        grad = (x + 4 * t + shift) % 256  # (1, W, 1)
        noise = rng.normal(0.0, 4.0, (height, width, 3))
        video[t] = np.clip(0.6 * tex[:height, pan * t : pan * t + width] + 0.4 * grad + noise, 0, 255).astype(np.uint8)
    return video


def make_shards(out: Path, clips: int, frames: int, width: int, height: int, per_shard: int) -> dict:
    """Write ``clips`` captioned H.264 clips into a shard set at ``out``; returns the index."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, max_count=per_shard, tool="bench_loader") as writer:
        for i in range(clips):
            video = synthetic_clip(rng, frames, width, height, shift=7 * i)  # (F, H, W, 3)
            data = encode_video(video, FPS, "mp4")
            caption = f"benchmark clip {i}: a texture panning left over a drifting gradient"
            meta = {
                "caption": caption,
                "captions": {"original": caption},
                "fps": FPS,
                "num_frames": frames,
                "width": width,
                "height": height,
                "duration": frames / FPS,
                "frame_range": [0, frames],
                "source": {"path": f"bench/clip{i:04d}.mp4", "sha256": sha256_bytes(data)},
            }
            writer.write(f"clip{i:04d}", {"mp4": data}, meta)
    return read_index(out)


# -- raw decord -------------------------------------------------------------------------------
def _raw_worker(conn, shard_dir: str, rank: int, world: int, bucket: tuple[int, int, int]) -> None:
    """Hold this rank's clips in memory; on each request for n clips, decode them and reply."""
    import decord

    torch.set_num_threads(1)
    num_frames, out_h, out_w = bucket
    clips = []
    for path in shard_paths(shard_dir):
        for s in iter_samples(path):
            clips.append((s["mp4"], json.loads(s["json"])))
    clips = clips[rank::world]
    rng = np.random.default_rng(rank)
    i = 0
    conn.send("ready")
    while True:
        n = conn.recv()
        if n is None:
            return
        frames = 0
        for _ in range(n):
            data, meta = clips[i % len(clips)]
            i += 1
            rh, rw = resize_for_crop(meta["height"], meta["width"], out_h, out_w)
            idx = frame_indices(meta["num_frames"], meta["fps"], num_frames, None, rng)
            vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=rw, height=rh, num_threads=1)
            frames += vr.get_batch(idx).asnumpy().shape[0]  # (F, rh, rw, 3) uint8
            del vr
        conn.send(frames)


class RawDecord:
    """``world`` processes decoding clips with decord directly, as fast as they can."""

    def __init__(self, shard_dir: Path, world: int, bucket: tuple[int, int, int]) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_raw_worker, args=(child, str(shard_dir), r, world, bucket), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for c in self.conns:
            assert c.recv() == "ready"

    def run(self, samples: int) -> tuple[int, float]:
        """Decode ``samples`` clips split over the processes -> (frames, wall seconds)."""
        share = [samples // len(self.conns) + (r < samples % len(self.conns)) for r in range(len(self.conns))]
        t0 = time.perf_counter()
        for c, n in zip(self.conns, share):
            c.send(n)
        frames = sum(c.recv() for c in self.conns)
        return frames, time.perf_counter() - t0

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=10)


# -- the loader -------------------------------------------------------------------------------
def loader_run(dm, warmup_batches: int, batches: int) -> tuple[int, float]:
    """Frames delivered in ``batches`` steady-state batches and the wall seconds they took."""
    it = iter(dm.train_dataloader())
    for _ in range(warmup_batches):  # worker start-up and the first decodes
        next(it)
    frames = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        frames += len(batch["key"]) * int(batch["bucket"].split("x")[0])  # B * F, whatever the video layout
    seconds = time.perf_counter() - t0
    del it  # shuts the workers down
    return frames, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--frames", type=int, default=33, help="frames per clip (>= the bucket's)")
    p.add_argument("--size", default="320x180", help="clip WxH")
    p.add_argument("--bucket", default="33x144x256", help="FxHxW the loader emits (and raw decodes to)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers = raw decode processes")
    p.add_argument("--batches", type=int, default=16, help="timed batches per loader round")
    p.add_argument("--warmup-batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--keep", type=Path, default=None, help="write the shard set here and keep it")
    p.add_argument("--decoders", default=",".join(DECODERS), help=f"comma-separated, of {','.join(DECODERS)}")
    args = p.parse_args()
    decoders = []
    for d in args.decoders.split(","):
        if d not in DECODERS:
            p.error(f"--decoders: {d!r} is not one of {','.join(DECODERS)}")
        problem = torchcodec_problem() if d == "torchcodec" else None
        if problem:
            print(f"{d}: left out, {problem}")
        else:
            decoders.append(d)
    torch.set_num_threads(1)
    width, height = map(int, args.size.split("x"))
    bf, bh, bw = map(int, args.bucket.split("x"))

    from sora_train.data.datamodule import VideoDataModule

    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    shard_dir = args.keep or tmp / "shards"
    try:
        t0 = time.perf_counter()
        index = make_shards(shard_dir, args.clips, args.frames, width, height, per_shard=max(1, args.clips // 8))
        print(
            f"shards: {index['num_samples']} clips of {args.frames} frames {width}x{height} @ {FPS} fps in "
            f"{len(index['shards'])} tars, {sum(s['bytes'] for s in index['shards']) / (args.clips * args.frames) / 1e3:.1f} KB/frame "
            f"({time.perf_counter() - t0:.1f} s to write); bucket {args.bucket} x{args.batch_size}, "
            f"{args.workers} workers / processes"
        )
        dms = {}
        for d in decoders:
            dms[d] = VideoDataModule(
                train_shards=str(shard_dir),
                buckets=[{"num_frames": bf, "height": bh, "width": bw, "batch_size": args.batch_size}],
                num_workers=args.workers,
                shuffle_buffer=16,
                decoder=d,
            )
            dms[d].setup("fit")
        raw = RawDecord(shard_dir, args.workers, (bf, bh, bw))
        samples = args.batches * args.batch_size
        raw.run(args.workers * 2)  # warm-up: first decodes
        names = ["raw", *decoders]
        ratios: dict[str, list[float]] = {d: [] for d in decoders}
        rates: dict[str, list[float]] = {n: [] for n in names}
        try:
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]  # alternate, so drift hits all alike
                got = {}
                for name in order:
                    frames, secs = raw.run(samples) if name == "raw" else loader_run(dms[name], args.warmup_batches, args.batches)
                    got[name] = frames / secs
                    rates[name].append(got[name])
                for d in decoders:
                    ratios[d].append(got[d] / got["raw"])
                print(f"round {r}: raw decord {got['raw']:7.1f} frames/s  " + "  ".join(f"loader[{d}] {got[d]:7.1f} ({ratios[d][-1]:.3f})" for d in decoders))
        finally:
            raw.close()
        med = statistics.median
        print(f"median raw decord: {med(rates['raw']):.1f} frames/s ({bh}x{bw})")
        for d in decoders:
            target = " (target >= 0.85)" if d == "decord" else ""
            print(
                f"  loader[{d}]: {med(rates[d]):.1f} frames/s; ratio loader[{d}]/raw decord = "
                f"{med(ratios[d]):.3f} [{min(ratios[d]):.3f}..{max(ratios[d]):.3f}]{target}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
