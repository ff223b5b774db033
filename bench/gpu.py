"""GPU readiness: DiT training-step time, tokens/s, MFU and peak memory, with and without compile.

    python bench/gpu.py                               # 100M and 1B, 65x256x256, eager and compiled, bf16
    python bench/gpu.py --sizes 1B --compile on --steps 20
    python bench/gpu.py --peak-tflops 989             # datasheet peak when the GPU's name is not known
    python bench/gpu.py --tiny                        # seconds on a CPU: the debug DiT, 9x64x64 (the suite runs this)

One training step as `sora-train` runs it on one GPU without a strategy (bf16-mixed: fp32
weights, autocast bf16 compute, fused AdamW): a random latent of the clip's shape through the
4x8x8 VAE's geometry (16 channels), T5-XXL-shaped text (300 x 4096), forward, MSE, backward,
optimizer step. Per size and compile setting it prints:

- step time (median over --steps after --warmup; compile happens in the warm-up),
- tokens/s (video tokens per second),
- MFU against two peaks: the bf16 matmul rate measured here (best of large square matmuls)
  and the datasheet's dense bf16 peak (by GPU name, or --peak-tflops). Model FLOPs are
  `DiT.flops_per_step` (every matmul, attention included, backward = 2x forward;
  recompute from activation checkpointing is not counted),
- peak memory (`torch.cuda.max_memory_allocated`; on CPU the process's peak RSS) beside what
  `sora-plan`'s arithmetic (sora_train/parallel/plan.py) predicts for the same step.

`--json PATH` writes the rows as data. Asserts nothing; docs/benchmarks.md records runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity), by a
# substring of torch.cuda.get_device_name().
DATASHEET_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0,
    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
}


def datasheet_tflops(name: str) -> float | None:
    for key in sorted(DATASHEET_BF16_TFLOPS, key=len, reverse=True):  # most specific first
        if key in name:
            return DATASHEET_BF16_TFLOPS[key]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # CPU-GPU sync point: only around timed regions


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 5) -> float:
    """Best FLOP/s of n x n @ n x n matmuls in `dtype` over `sizes`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # first call: library set-up
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_size(size: str, compiled: bool, args: argparse.Namespace, device: torch.device) -> dict:
    from sora_train.models.dit import build_dit
    from sora_train.parallel.plan import LatentGeometry, Setup, dit_shape, plan_memory

    torch.manual_seed(0)
    tf, sf = args.vae_factors
    geometry = LatentGeometry(tf, sf)
    dit = build_dit(size, in_channels=args.latent_channels, text_dim=args.text_dim).to(device)
    tokens = geometry.tokens(args.frames, args.height, args.width, dit.patch_size)
    f, h, w = 1 + (args.frames - 1) // tf, args.height // sf, args.width // sf
    if args.checkpointing or compiled:
        from sora_train.parallel.strategies import apply_parallelism

        apply_parallelism(dit, activation_checkpointing=args.checkpointing, compile=compiled)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=fused)
    B, L = args.batch, args.text_len
    x0 = torch.randn(B, args.latent_channels, f, h, w, device=device)
    noise = torch.randn_like(x0)
    text = torch.randn(B, L, args.text_dim, device=device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    bf16 = args.precision == "bf16-mixed"

    def step() -> None:
        t = torch.rand(B, device=device)
        xt = (1 - t[:, None, None, None, None]) * x0 + t[:, None, None, None, None] * noise  # (B, C, f, h, w)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            v = dit(xt, t, text, mask)
        loss = F.mse_loss(v.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = dit.flops_per_step(tokens, L, training=True) * B
    setup = Setup(strategy="auto", precision=args.precision, activation_checkpointing=args.checkpointing, micro_batch=B, text_len=L)
    predicted = plan_memory(dit_shape(dit), tokens, setup).gpu
    row = {
        "size": size, "compile": compiled, "params": dit.num_params(), "tokens": tokens, "batch": B,
        "shape": f"{args.frames}x{args.height}x{args.width}", "step_s": step_s, "warmup_s": warm_s,
        "tokens_per_s": B * tokens / step_s, "tflops": flops / step_s / 1e12, "model_tflop_per_step": flops / 1e12,
        "peak_mem_gb": peak_memory(device) / 1e9, "planned_mem_gb": predicted / 1e9,
    }
    del dit, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100M,1B", help="comma-separated sizes of sora_train/models/dit/sizes.py")
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (parallel.activation_checkpointing)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("bf16-mixed", "32-true"), default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--peak-tflops", type=float, help="datasheet dense bf16 peak of this GPU (default: by name)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--tiny", action="store_true", help="debug DiT, 9x64x64, 2 steps, eager: a CPU smoke run in seconds")
    args = p.parse_args(argv)
    args.vae_factors = (4, 8)  # the 4x8x8 VAE's temporal / spatial factors
    args.latent_channels, args.text_dim, args.text_len = 16, 4096, 300
    if args.tiny:
        args.sizes, args.frames, args.height, args.width = "debug", 9, 64, 64
        args.steps, args.warmup, args.compile = min(args.steps, 2), min(args.warmup, 1), "off"
        args.text_dim, args.text_len = 32, 8
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16-mixed" if args.device.type == "cuda" else "32-true")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    measured = matmul_peak(device, dtype, (4096, 8192) if cuda else (256, 512), repeats=5 if cuda else 2)
    sheet = args.peak_tflops or (datasheet_tflops(name) if cuda else None)
    print(f"device: {name}; torch {torch.__version__}; {args.precision}; measured {dtype} matmul peak "
          f"{measured / 1e12:.3g} TFLOP/s; datasheet peak {f'{sheet:g} TFLOP/s' if sheet else 'unknown (--peak-tflops)'}")
    rows = []
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        for compiled in settings:
            row = run_size(size, compiled, args, device)
            row["mfu_measured_peak"] = row["tflops"] * 1e12 / measured
            row["mfu_datasheet"] = row["tflops"] / sheet if sheet else None
            row.update(device=name, precision=args.precision, checkpointing=args.checkpointing)
            rows.append(row)
            mfu_sheet = f"{row['mfu_datasheet']:.1%}" if row["mfu_datasheet"] is not None else "—"
            print(f"{size:>5} {'compiled' if compiled else 'eager':>8} {row['shape']} x{row['batch']}: {row['tokens']:,} tokens, "
                  f"step {row['step_s'] * 1e3:,.1f} ms (warm-up {row['warmup_s']:.1f} s), {row['tokens_per_s']:,.0f} tokens/s, "
                  f"{row['tflops']:.3g} TFLOP/s, MFU {row['mfu_measured_peak']:.1%} of measured / {mfu_sheet} of datasheet, "
                  f"{'peak memory' if cuda else 'peak RSS of the process'} {row['peak_mem_gb']:.2f} GB (plan of the step {row['planned_mem_gb']:.2f} GB)")
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_peak_tflops": measured / 1e12, "datasheet_tflops": sheet, "rows": rows}, indent=2))
    if any(not math.isfinite(r["step_s"]) for r in rows):
        raise SystemExit("a step time was not finite")
    return rows


if __name__ == "__main__":
    main()
