"""The memory planner (sora_train/parallel/plan.py) against measured peaks of real CPU steps.

    python bench/bench_plan.py                       # the default grid, with and without checkpointing
    python bench/bench_plan.py --hidden 256 --depth 4 --latent 8x16x16

Each configuration runs in a fresh process: a small DiT, fp32, batch 1, a few training steps
(forward, MSE against a target, backward, AdamW), and the process's peak resident memory
since just before the model is built (VmHWM, reset there through /proc/self/clear_refs; else
`ru_maxrss`) minus its RSS at that point. glibc would keep freed blocks
in its heap and blur the peak, so the child runs with MALLOC_MMAP_THRESHOLD_=65536: every
tensor above 64 KiB is its own mapping, returned on free. The same configuration goes
through `plan_memory` (strategy auto, 32-true) and the ratio predicted / measured is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def child(cfg: dict) -> dict:
    import resource

    import psutil
    import torch

    from sora_train.models.dit import build_dit
    from sora_train.parallel.strategies import apply_parallelism

    torch.manual_seed(0)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    f, h, w = cfg["latent"]
    C, L, T = 4, 8, 32
    x = torch.randn(1, C, f, h, w)
    target = torch.randn(1, C, f, h, w)
    t = torch.rand(1)
    text = torch.randn(1, L, T)
    mask = torch.ones(1, L, dtype=torch.bool)
    # Warm the kernels the step uses on a tiny model, so their one-time set-up is in the baseline.
    warm = build_dit("debug", in_channels=C, text_dim=T)
    warm(x[:, :, :1, :4, :4].contiguous(), t, text, mask).sum().backward()
    del warm
    base = psutil.Process().memory_info().rss
    _reset_peak_rss()  # the peak of importing (e.g. DeepSpeed's accelerator probe) is not the step's
    dit = build_dit("debug", in_channels=C, text_dim=T, hidden_size=cfg["hidden"], depth=cfg["depth"], num_heads=cfg["heads"], modulation=cfg.get("modulation", "shared"))
    apply_parallelism(dit, activation_checkpointing=cfg["checkpointing"])
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    for _ in range(cfg.get("steps", 3)):
        loss = torch.nn.functional.mse_loss(dit(x, t, text, mask), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - base, "num_params": sum(p.numel() for p in dit.parameters())}


def _reset_peak_rss() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(cfg: dict) -> dict:
    """Run `child(cfg)` in a fresh process; -> {"measured": bytes, "num_params": int}."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict(cfg: dict, num_params: int) -> float:
    from sora_train.parallel.plan import DiTShape, Setup, plan_memory

    f, h, w = cfg["latent"]
    shape = DiTShape(num_params=num_params, hidden_size=cfg["hidden"], depth=cfg["depth"], num_heads=cfg["heads"])
    setup = Setup(strategy="auto", precision="32-true", activation_checkpointing=cfg["checkpointing"], text_len=8)
    tokens = f * (h // 2) * (w // 2)
    return plan_memory(shape, tokens, setup).gpu


def compare(cfg: dict) -> dict:
    m = measure(cfg)
    p = predict(cfg, m["num_params"])
    return {**cfg, **m, "predicted": p, "ratio": p / m["measured"]}


GRID = [
    dict(hidden=128, depth=4, heads=2, latent=(8, 32, 32)),
    dict(hidden=256, depth=4, heads=4, latent=(8, 16, 16)),
    dict(hidden=192, depth=6, heads=3, latent=(4, 32, 32)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int)
    p.add_argument("--latent", help="f x h x w, e.g. 8x32x32")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    grid = GRID
    if args.hidden:
        grid = [dict(hidden=args.hidden, depth=args.depth, heads=args.heads or max(1, args.hidden // 64), latent=tuple(int(v) for v in args.latent.split("x")))]
    print(f"{'D':>4} {'depth':>5} {'tokens':>6} {'ckpt':>5} {'params':>9} {'measured MB':>11} {'predicted MB':>12} {'pred/meas':>9}")
    for base in grid:
        for ckpt in (False, True):
            r = compare({**base, "checkpointing": ckpt, "steps": args.steps})
            f, h, w = r["latent"]
            print(f"{r['hidden']:>4} {r['depth']:>5} {f * h * w // 4:>6} {str(ckpt):>5} {r['num_params']:>9,} "
                  f"{r['measured'] / 1e6:>11.1f} {r['predicted'] / 1e6:>12.1f} {r['ratio']:>9.2f}")


if __name__ == "__main__":
    main()
