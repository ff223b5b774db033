"""Model FLOPs utilisation of a DiT training step on this CPU: achieved FLOP/s / matmul peak.

    python bench/bench_mfu.py                          # 100M size, 1,024 tokens, 1 thread
    python bench/bench_mfu.py --threads 2 --steps 5
    python bench/bench_mfu.py --size shapes --latent 4x16x16

The peak is what this CPU does at the same thread count on the one operation a transformer
is made of: large square fp32 matmuls (best of ``--repeats`` per size, max over sizes). The
achieved rate is ``DiT.flops_per_step`` (model FLOPs: every matmul, attention included,
backward = 2x forward) over the time of one full training step (forward, MSE loss, backward,
AdamW), batch 1. Peak and steps are measured in alternation, so contention from other jobs
on a shared machine hits both; each is timed by wall clock and by this process's CPU time
(at one thread the CPU time leaves out time other jobs held the core). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sora_train.models.dit import build_dit


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def matmul_rate(n: int) -> tuple[float, float]:
    """(wall, CPU) FLOP/s of one n x n @ n x n fp32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # first call: oneDNN/BLAS set-up, page faults of the output
    w0, c0 = clocks()
    torch.mm(a, b)
    w1, c1 = clocks()
    flops = 2.0 * n**3
    return flops / (w1 - w0), flops / max(c1 - c0, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="100M", help="DiT size (sora_train/models/dit/sizes.py)")
    p.add_argument("--latent", default="4x32x32", help="latent f x h x w (16 channels); patch (1,2,2) -> f*h*w/4 tokens")
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed training steps (after one warm-up)")
    p.add_argument("--matmul-sizes", default="1024,2048,3072", help="square matmul sizes for the peak")
    p.add_argument("--repeats", type=int, default=3, help="matmuls per size per round (best is kept)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [int(s) for s in args.matmul_sizes.split(",")]

    f, h, w = (int(v) for v in args.latent.split("x"))
    model = build_dit(args.size, in_channels=16, text_dim=args.text_dim).train()
    tokens = (f // model.patch_size[0]) * (h // model.patch_size[1]) * (w // model.patch_size[2])
    flops = model.flops_per_step(tokens, args.text_len, training=True)
    x = torch.randn(1, 16, f, h, w)  # (B, C, f, h, w)
    t = torch.rand(1)  # (B,)
    text = torch.randn(1, args.text_len, args.text_dim)  # (B, L, T)
    text_mask = torch.ones(1, args.text_len, dtype=torch.bool)  # (B, L)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> tuple[float, float, float, float]:
        """-> wall and CPU seconds of (forward + backward) and of the optimizer step."""
        w0, c0 = clocks()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t, text, text_mask), target).backward()
        w1, c1 = clocks()
        opt.step()
        w2, c2 = clocks()
        return w1 - w0, c1 - c0, w2 - w1, c2 - c1

    print(
        f"DiT {args.size}: {model.num_params() / 1e6:.1f} M params, N={tokens} tokens, L={args.text_len}, batch 1, fp32, "
        f"{args.threads} thread(s); {flops / 1e9:.1f} GFLOP per training step (DiT.flops_per_step)"
    )
    step()  # warm-up: AdamW state, allocator
    peak_w, peak_c = 0.0, 0.0
    fb_w, fb_c, op_w, op_c = [], [], [], []
    for i in range(args.steps):  # alternate: a round of peak matmuls, then one training step
        for n in sizes:
            for _ in range(args.repeats):
                rw, rc = matmul_rate(n)
                peak_w, peak_c = max(peak_w, rw), max(peak_c, rc)
        a, b, c, d = step()
        fb_w.append(a), fb_c.append(b), op_w.append(c), op_c.append(d)
        print(f"step {i}: fwd+bwd {a * 1e3:.0f} ms wall / {b * 1e3:.0f} ms CPU, AdamW {c * 1e3:.0f} / {d * 1e3:.0f} ms")

    med = statistics.median
    step_w = med([a + c for a, c in zip(fb_w, op_w)])
    step_c = med([b + d for b, d in zip(fb_c, op_c)])
    print(f"matmul peak ({args.threads} thread(s), best of {args.steps * args.repeats} per size {sizes}): "
          f"{peak_w / 1e9:.1f} GFLOP/s wall, {peak_c / 1e9:.1f} GFLOP/s CPU-time")
    print(f"training step (median of {args.steps}): {step_w * 1e3:.0f} ms wall, {step_c * 1e3:.0f} ms CPU "
          f"(AdamW {med(op_c) * 1e3:.0f} ms CPU of it)")
    print(f"achieved: {flops / step_w / 1e9:.1f} GFLOP/s wall, {flops / step_c / 1e9:.1f} GFLOP/s CPU-time")
    print(f"MFU = achieved / peak (target >= 50%): {100 * flops / step_c / peak_c:.1f}% by CPU time, "
          f"{100 * flops / step_w / peak_w:.1f}% by wall clock; "
          f"fwd+bwd alone {100 * flops / med(fb_c) / peak_c:.1f}% by CPU time")


if __name__ == "__main__":
    main()
