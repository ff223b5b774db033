"""Peak memory of `sora-sample` for a clip and one 8x longer, side by side (VAE decode included).

    python bench/bench_long_sample.py                                    # standard 4x8x8 VAE, 64x64, 17 vs 129 frames
    python bench/bench_long_sample.py --hw 32 --frames 17 --factor 8 --also-unchunked

A random-weight export (the real 4x8x8 VAE, 59M params; a small DiT, `dit=shapes` by default;
the tiny text encoder; 2 sampler steps) is written once. Each run is a fresh process that
calls `sora-sample`'s main() — load the export, sample, decode, write the mp4 with its
provenance — and reports its peak RSS (`ru_maxrss`: the whole process, the Python and torch
baseline included), plus the highest RSS a 2 ms sampler saw in each phase: loading, the DiT's
sampling loop (attention over every token of the clip), the VAE decode and writing. `delta`
is the peak over the RSS after loading, i.e. what the clip itself costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_export(out: Path, vae_size: str, dit_size: str) -> Path:
    import torch

    from sora_train.models.dit import build_dit
    from sora_train.models.export import export_parts
    from sora_train.models.text import TinyTextEncoder
    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    text = TinyTextEncoder(dim=32, depth=1, num_heads=2)
    vae = build_vae(vae_size)
    dit = build_dit(dit_size, in_channels=vae.latent_channels, text_dim=text.dim)
    return export_parts(out, {"vae": vae, "text": text, "dit": dit}, {"task": "dit", "sampler": {"steps": 2, "guidance_scale": 1.0}})


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(export: str, frames: int, hw: int, chunk: int | None, tile: int | None, out: str) -> dict:
    import resource

    import sora_train.training.pipeline as pipeline
    from sora_train.cli import sample as cli

    phase = {"now": "load"}
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            p, r = phase["now"], rss()
            peaks[p] = max(peaks.get(p, 0), r)
            time.sleep(0.002)

    def in_phase(name, fn):
        def wrapped(*a, **k):
            prev, phase["now"] = phase["now"], name
            try:
                return fn(*a, **k)
            finally:
                phase["now"] = prev
        return wrapped

    pipeline.sample = in_phase("dit", pipeline.sample)
    pipeline.VideoPipeline._decode = in_phase("decode", pipeline.VideoPipeline._decode)
    pipeline.VideoPipeline.save = in_phase("save", pipeline.VideoPipeline.save)
    loaded = {}
    from_export = pipeline.VideoPipeline.from_export.__func__

    def load(cls, *a, **k):
        p = from_export(cls, *a, **k)
        loaded["rss"] = rss()
        return p

    pipeline.VideoPipeline.from_export = classmethod(load)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    argv = ["--ckpt", export, "--prompt", "a small red circle moving left", "--frames", str(frames),
            "--height", str(hw), "--width", str(hw), "--batch-size", "1", "--out", out]
    if chunk is not None:
        argv += ["--chunk-frames", str(chunk)]
    if tile is not None:
        argv += ["--tile", str(tile)]
    t0 = time.perf_counter()
    cli.main(argv)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"frames": frames, "peak": peak, "loaded": loaded["rss"], "phases": peaks, "wall_s": wall}


def run(export: Path, frames: int, hw: int, chunk: int | None, tile: int | None, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", json.dumps([str(export), frames, hw, chunk, tile, out])]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--vae", default="standard_4x8x8_16c")
    p.add_argument("--dit", default="shapes")
    p.add_argument("--hw", type=int, default=64, help="height = width in pixels")
    p.add_argument("--frames", type=int, default=17, help="the short clip (1 + k * temporal factor)")
    p.add_argument("--factor", type=int, default=8, help="the long clip is this many times longer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--also-unchunked", action="store_true", help="also run the long clip with --chunk-frames 0 --tile 0")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    mb = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(Path(tmp) / "export", args.vae, args.dit)
        long_frames = 1 + args.factor * (args.frames - 1)
        runs = [("short", args.frames, None), ("long", long_frames, None)]
        if args.also_unchunked:
            runs.append(("long, one go", long_frames, 0))
        results = {}
        print(f"vae={args.vae} dit={args.dit} {args.hw}x{args.hw}, {args.threads} threads; MiB")
        print(f"{'run':>13} {'frames':>6} {'peak RSS':>9} {'after load':>10} {'delta':>6} {'loading':>7} {'DiT loop':>8} {'decode':>7} {'save':>6} {'wall s':>7}")
        for name, frames, off in runs:
            r = run(export, frames, args.hw, off, off, args.threads)
            results[name] = r
            ph = r["phases"]
            print(f"{name:>13} {frames:>6} {mb(r['peak']):>9} {mb(r['loaded']):>10} {mb(r['peak'] - r['loaded']):>6} {mb(ph.get('load', 0)):>7} "
                  f"{mb(ph.get('dit', 0)):>8} {mb(ph.get('decode', 0)):>7} {mb(ph.get('save', 0)):>6} {r['wall_s']:>7.1f}")
        s, l_ = results["short"], results["long"]
        print(f"peak RSS long / short: {l_['peak'] / s['peak']:.2f}x (target <= 1.5x); "
              f"clip cost (peak - after load) long / short: {(l_['peak'] - l_['loaded']) / max(1, s['peak'] - s['loaded']):.2f}x")
        dec = lambda r: r["phases"].get("decode", 0)  # noqa: E731
        print(f"decode-phase peak long / short: {dec(l_) / dec(s):.2f}x; over the RSS after loading: "
              f"{(dec(l_) - l_['loaded']) / max(1, dec(s) - s['loaded']):.2f}x")
        if args.also_unchunked:
            u = results["long, one go"]
            print(f"without chunking: peak RSS long / short {u['peak'] / s['peak']:.2f}x; decode-phase peak {dec(u) / dec(s):.2f}x")


if __name__ == "__main__":
    main()
