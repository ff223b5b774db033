"""Causal VAE memory and speed, and what caching latents buys the DiT's input pipeline.

    python bench/bench_vae.py                      # all three, ~2 min on 2 busy cores
    python bench/bench_vae.py --only memory --size standard_4x8x8_16c --hw 256 --device cuda
    python bench/bench_vae.py --only loader --clips 128 --loader-hw 128

(a) memory: peak extra memory while encoding a short clip (1 + k*s_t frames: 9 for the debug
    VAE by default, --k) in one go, a clip 8x longer (1 + 8k*s_t: 65) streamed in chunks of k*s_t
    frames (--chunk-frames), and the long clip in one go for contrast. Each case runs in a
    fresh subprocess, which builds the model and input and encodes once to warm up (one-time
    library set-up is not working memory); then, on CPU, a thread samples the resident set
    size (RSS) every 1 ms during a second encode, and the figure is the highest sample minus
    the RSS just before it. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 and
    MALLOC_TRIM_THRESHOLD_=0, so glibc maps every block >= 64 KiB on its own and unmaps it on
    free: RSS then rises and falls with live tensors (and oneDNN's scratch buffers) instead of
    staying at the allocator's high-water mark. (Torch keeps no CPU allocator statistics and
    tracemalloc does not see its allocations.) On CUDA it is torch.cuda.max_memory_allocated.
    A third pass counts live tensor bytes exactly (`LiveTensorBytes`, a torch dispatch mode):
    the activation working set, free of allocator effects. Also: time per frame, long chunked
    vs short, which should be ~1 (linear in length). Defaults use the debug size at 64x64
    because the standard size takes minutes per long clip on a 2-core CPU; at the small
    resolutions a CPU can afford, glibc's small-block heap and kernel scratch, not
    activations, dominate its RSS (live tensors: see --size standard_4x8x8_16c --hw 32).
(b) throughput: encode frames/s (posterior mode; warm, median of 3) of the `debug` and
    `standard_4x8x8_16c` sizes at one resolution on CPU.
(c) loader: samples/s of the video loader (decord decode + resize/crop) and of the latent
    loader on the same shard set (same keys, json and shuffle; latents of the standard VAE's
    shape for those clips: 16 x 5 x H/8 x W/8 fp16, written directly so the benchmark does not
    spend minutes in a CPU VAE), both with num_workers=0 (one process: per-core cost).

Prints ratios, not pass/fail. Targets: (a) long/short peak <= 1.3x; (c) latent/video >= 20x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av  # noqa: F401  (before decord: see data_tools/probe.py)
import torch


# -- (a) memory, one measurement per fresh process ------------------------------------------
# glibc: serve every block >= 64 KiB with its own mmap and unmap it on free (a fixed threshold
# turns off glibc's adaptive one, which would move freed tensors to the heap and keep them), so
# RSS rises and falls with the live tensors instead of with the allocator's high-water mark.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


class LiveTensorBytes:
    """Exact bytes of live tensor storages created while active (a torch dispatch mode).

    Every op's output storage is counted once (views share it) and released when the last
    tensor on it dies (a weakref finalizer; torch keeps the Python object alive as long as
    C++ holds the tensor). Storages of ``exclude`` (weights, the input: a slice of the input
    is a view, not new memory) are not counted, nor are buffers a kernel allocates internally
    (im2col, oneDNN scratch). Independent of the allocator: the figure a GPU caching
    allocator would see, less fragmentation.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        outer._track(t)
                return out

        self.mode = _Mode()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors on it]
        self.current = self.peak = 0
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.excluded:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __enter__(self) -> "LiveTensorBytes":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def _child_memory(size: str, frames: int, hw: int, chunk: int | None, device: str = "cpu") -> dict:
    import psutil

    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(size).eval().to(device)
    x = (torch.rand(1, 3, frames, hw, hw) * 2 - 1).to(device)  # (1, 3, F, H, W)
    with torch.no_grad():  # warm-up on the same workload: one-time set-up (oneDNN kernels, thread pool) is not working memory
        vae.encode(x, chunk_frames=chunk)
    if device.startswith("cuda"):  # the caching allocator counts live tensors exactly
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak, stop = [base], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
    t0 = time.perf_counter()
    with torch.no_grad():
        z = vae.encode(x, chunk_frames=chunk).mode()  # (1, C, f, h, w)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_bytes = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        t.join()
        peak_bytes = peak[0] - base
    seconds = time.perf_counter() - t0
    with torch.no_grad(), LiveTensorBytes(exclude=[x, *vae.parameters(), *vae.buffers()]) as live:  # a third pass, counting tensors
        vae.encode(x, chunk_frames=chunk)
    return {"peak_mb": peak_bytes / 2**20, "live_mb": live.peak / 2**20, "seconds": seconds, "latent": list(z.shape)}


def run_memory(size: str, hw: int, k: int, chunk: int | None, device: str) -> None:
    from sora_train.models.vae import build_vae

    with torch.device("meta"):  # only the factor: no weights
        tf = build_vae(size).temporal_factor
    short, long = 1 + k * tf, 1 + 8 * k * tf
    chunk = chunk or k * tf  # chunks as long as the short clip: the same working set
    cases = [("short, one go", short, None), (f"8x long, chunk_frames={chunk}", long, chunk), ("8x long, one go", long, None)]
    print(f"(a) peak memory while encoding: vae={size}, {hw}x{hw} px on {device}, a fresh process each, torch threads={torch.get_num_threads()}")
    res = {}
    for name, frames, c in cases:
        cmd = [sys.executable, __file__, "--child-memory", json.dumps([size, frames, hw, c, device])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}).stdout
        r = res[name] = json.loads(out.strip().splitlines()[-1])
        print(f"    {name:<28} F={frames:<4} {'RSS' if device == 'cpu' else 'allocator'} peak +{r['peak_mb']:7.1f} MB, "
              f"live tensors peak {r['live_mb']:7.1f} MB  {r['seconds']:6.2f} s = {1000 * r['seconds'] / frames:6.1f} ms/frame  latent {r['latent']}")
    s, lc, lo = (res[n] for n, _, _ in cases)
    for key, what in (("peak_mb", "RSS" if device == "cpu" else "allocator"), ("live_mb", "live tensors")):
        print(f"    {what:<12} peak, long chunked / short = {lc[key] / s[key]:.2f}x (target <= 1.3x); long one go / short = {lo[key] / s[key]:.2f}x")
    print(f"    time per frame, long chunked / short = {(lc['seconds'] / long) / (s['seconds'] / short):.2f} (1.0 = linear in length)")


# -- (b) encode throughput -------------------------------------------------------------------
def run_throughput(sizes: list[str], hw: int, frames: int, batch: int) -> None:
    from sora_train.models.vae import build_vae, param_count

    print(f"(b) encode throughput on CPU: {batch} x {frames} frames of {hw}x{hw}, posterior mode, warm, median of 3")
    for size in sizes:
        torch.manual_seed(0)
        vae = build_vae(size).eval()
        x = torch.rand(batch, 3, frames, hw, hw) * 2 - 1
        times = []
        with torch.no_grad():
            vae.encode(x[:1])  # warm-up (oneDNN picks its kernels per shape)
            for _ in range(3):
                t0 = time.perf_counter()
                vae.encode(x).mode()
                times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        print(f"    {size:<20} {param_count(size) / 1e6:6.2f} M params  {batch * frames / sec:8.1f} frames/s  ({sec:.2f} s per call)")


# -- (c) loader ------------------------------------------------------------------------------
def run_loader(clips: int, hw: int, frames: int, batch: int, root: Path) -> None:
    from sora_train.data.datamodule import VideoDataModule
    from sora_train.data.latents import LATENT_FORMAT, LatentDataModule, encode_latent
    from sora_train.data.shapes import ShapesWorld, generate_shards
    from sora_train.data.shards import ShardWriter, iter_samples, shard_paths

    t0 = time.perf_counter()
    world = ShapesWorld(height=hw, width=hw, num_frames=frames, supersample=2)
    generate_shards(root / "shapes", num_train=clips, num_val=0, world=world, heldout=[], clips_per_shard=64)
    src = root / "shapes" / "train"
    # Latents of the standard VAE's shape (16 ch, 4x time, 8x space) for the same samples.
    lat = root / "latents"
    f, h, w = 1 + (frames - 1) // 4, hw // 8, hw // 8
    g = torch.Generator().manual_seed(0)
    with ShardWriter(lat, max_count=64, tool="bench_vae", extra_index={"vae_hash": "bench", "latent_format": LATENT_FORMAT}) as wr:
        for p in shard_paths(src):
            for s in iter_samples(p, exts=()):
                meta = json.loads(s["json"])
                meta["latent"] = {"shape": [16, f, h, w], "dtype": "float16", "member": "latent.safetensors", "normalized": True}
                z = torch.randn(16, f, h, w, generator=g).half()
                wr.write(s["__key__"], {"latent.safetensors": encode_latent(z)}, meta)
    print(f"(c) loader: {clips} shapes clips {frames}x{hw}x{hw} (H.264) and their 16x{f}x{h}x{w} fp16 latents, "
          f"batch {batch}, num_workers=0 (set up in {time.perf_counter() - t0:.1f} s)")

    def rate(dm, n_batches: int) -> float:
        dm.setup()
        it = iter(dm.train_dataloader())
        next(it)  # warm-up: opens the first shard, fills the shuffle buffer
        t = time.perf_counter()
        n = sum(len(next(it)["caption"]) for _ in range(n_batches))
        return n / (time.perf_counter() - t)

    bucket = [{"num_frames": frames, "height": hw, "width": hw, "batch_size": batch}]
    common = dict(num_workers=0, shuffle_buffer=64, seed=0)
    video = rate(VideoDataModule(str(src), bucket, caption_probs={"original": 0.5, "dense": 0.5}, **common), max(4, clips // batch))
    latent = rate(LatentDataModule(str(lat), batch_size=batch, expected_vae_hash="bench", caption_probs={"original": 0.5, "dense": 0.5}, **common),
                  max(40, 10 * clips // batch))
    print(f"    video loader  {video:9.1f} samples/s")
    print(f"    latent loader {latent:9.1f} samples/s  -> {latent / video:.1f}x (target >= 20x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["memory", "throughput", "loader"], action="append", help="run only these parts")
    p.add_argument("--size", default="debug", help="(a) VAE size")
    p.add_argument("--hw", type=int, default=64, help="(a) clip side in pixels")
    p.add_argument("--device", default="cpu", help="(a) cpu (RSS) or cuda (the allocator's peak)")
    p.add_argument("--k", type=int, default=4, help="(a) short clip = 1 + k * temporal factor frames; long = 1 + 8k * factor")
    p.add_argument("--chunk-frames", type=int, default=None, help="(a) chunk of the long clip (default: k * factor, the short clip's length - 1)")
    p.add_argument("--tp-hw", type=int, default=64, help="(b) clip side")
    p.add_argument("--tp-frames", type=int, default=17, help="(b) frames per clip")
    p.add_argument("--tp-batch", type=int, default=1, help="(b) clips per call")
    p.add_argument("--clips", type=int, default=96, help="(c) clips in the shard set")
    p.add_argument("--loader-hw", type=int, default=128, help="(c) clip side")
    p.add_argument("--loader-frames", type=int, default=17, help="(c) frames per clip")
    p.add_argument("--batch", type=int, default=8, help="(c) batch size")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        print(json.dumps(_child_memory(*json.loads(args.child_memory))))
        return
    parts = args.only or ["memory", "throughput", "loader"]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    if "memory" in parts:
        run_memory(args.size, args.hw, args.k, args.chunk_frames, args.device)
    if "throughput" in parts:
        run_throughput(["debug", "standard_4x8x8_16c"], args.tp_hw, args.tp_frames, args.tp_batch)
    if "loader" in parts:
        tmp = Path(tempfile.mkdtemp(prefix="bench_vae_"))
        try:
            run_loader(args.clips, args.loader_hw, args.loader_frames, args.batch, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
