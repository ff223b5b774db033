"""One training step of our DiT vs the Wan2.1 transformer (diffusers) at matched shapes, fp32 CPU.

    python bench/bench_dit_vs_wan.py                        # 100M size, 1,024 tokens, 5 rounds
    python bench/bench_dit_vs_wan.py --size shapes --latent 4x32x32 --rounds 3
    python bench/bench_dit_vs_wan.py --profile              # + where each model's time goes

A step is forward + MSE loss + backward + AdamW step, batch 1. The two models are matched on
everything that costs FLOPs: width D, depth, heads, FFN width, patch size (1, 2, 2), the
latent (16 channels, so the same token count N), the text length L and text width, 256
timestep frequencies, QK RMSNorm and a LayerNorm before cross-attention. What differs is the
design, and is part of what is measured:

- ours: adaLN as the size registry sets it (100M and up: one shared D -> 6D Linear plus a
  per-block table, as Wan; ``--modulation per_block`` for DiT's Linear per block), a pooled-text MLP added to the
  timestep conditioning, a key-padding mask on cross-attention, per-head QK RMSNorm, 3D RoPE
  in half-split layout, one fused qkv Linear, a 1-channel cond mask concatenated to the input;
- Wan: one shared time projection (D -> 6D) plus a learned per-block table, no text mask,
  QK RMSNorm across heads, interleaved RoPE written with strided stores, separate q/k/v.

The machine is shared, so timings are taken side by side: each round runs ``--steps`` steps
of one model and then the other (the order alternates), both at ``--threads`` threads, and
the ratio ours/Wan is the median of the per-round ratios. Each step is timed by wall clock
and by this process's CPU time, split into forward / backward / AdamW; at one thread CPU
time leaves out the time other jobs held the core, so it is the steadier of the two. Both
models get the same optimizer (torch's default AdamW; ``--fused-adamw`` for the fused one).
It prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sora_train.models.dit import build_dit
from sora_train.models.dit.dit import FREQUENCY_EMBEDDING_SIZE, TIMESTEP_SCALE

LATENT_CHANNELS = 16  # Wan2.1's VAE latent width; ours matches it in this comparison


def build_pair(size: str, text_dim: int, modulation: str | None = None):
    from diffusers import WanTransformer3DModel

    overrides = {} if modulation is None else {"modulation": modulation}
    ours = build_dit(size, in_channels=LATENT_CHANNELS, text_dim=text_dim, **overrides)
    wan = WanTransformer3DModel(
        patch_size=ours.patch_size,
        num_attention_heads=ours.num_heads,
        attention_head_dim=ours.head_dim,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=text_dim,
        freq_dim=FREQUENCY_EMBEDDING_SIZE,
        ffn_dim=int(ours.hidden_size * ours.mlp_ratio),
        num_layers=ours.depth,
        cross_attn_norm=True,  # ours: norm2 is an affine LayerNorm before cross-attention
        qk_norm="rms_norm_across_heads",  # ours: per-head RMSNorm; same cost class
        eps=1e-6,
    )
    return ours, wan


def make_step(model, forward, target, fused_adamw: bool):
    """One training step: forward, MSE against a fixed target, backward, AdamW.

    The step returns wall seconds and this process's CPU seconds of forward, backward and the
    optimizer step. At one thread CPU time leaves out the time other jobs held the core, so
    on a shared machine it is the steadier figure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw or None)

    def step() -> tuple[float, float, float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(model), target)
        c1 = time.process_time()
        loss.backward()
        c2 = time.process_time()
        opt.step()
        c3 = time.process_time()
        return time.perf_counter() - w0, c1 - c0, c2 - c1, c3 - c2

    return step


def profile_step(name: str, step, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n--- {name}: top ops by self CPU time (one step) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="100M", help="our DiT size (sora_train/models/dit/sizes.py); Wan is matched to it")
    p.add_argument("--latent", default="4x32x32", help="latent f x h x w; with patch (1,2,2): f*h*w/4 tokens")
    p.add_argument("--modulation", default=None, choices=["per_block", "shared"], help="override our size's adaLN modulation")
    p.add_argument("--text-len", type=int, default=64, help="text tokens L (all real)")
    p.add_argument("--text-dim", type=int, default=4096, help="text encoder width (umT5-XXL: 4096)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for both (default: torch's default)")
    p.add_argument("--profile", action="store_true", help="also profile one step of each (per-op wall time: noisy on a shared machine)")
    p.add_argument("--profile-rows", type=int, default=18)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    f, h, w = (int(v) for v in args.latent.split("x"))
    ours, wan = build_pair(args.size, args.text_dim, args.modulation)
    ours.train()
    wan.train()
    pt, ph, pw = ours.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)

    x = torch.randn(1, LATENT_CHANNELS, f, h, w)  # (B, C, f, h, w)
    t = torch.rand(1)  # (B,) in [0, 1]
    text = torch.randn(1, args.text_len, args.text_dim)  # (B, L, T)
    text_mask = torch.ones(1, args.text_len, dtype=torch.bool)  # (B, L)
    target = torch.randn_like(x)  # (B, C, f, h, w)

    def fwd_ours(m):
        return m(x, t, text, text_mask)  # (B, C, f, h, w)

    def fwd_wan(m):  # Wan takes timesteps on the 0..1000 scale
        return m(hidden_states=x, timestep=t * TIMESTEP_SCALE, encoder_hidden_states=text, return_dict=False)[0]

    steps = {"ours": make_step(ours, fwd_ours, target, args.fused_adamw), "wan": make_step(wan, fwd_wan, target, args.fused_adamw)}
    params = {"ours": ours.num_params(), "wan": sum(q.numel() for q in wan.parameters())}
    print(
        f"size={args.size}: D={ours.hidden_size} depth={ours.depth} heads={ours.num_heads} ffn={int(ours.hidden_size * ours.mlp_ratio)} "
        f"patch={ours.patch_size}; latent {LATENT_CHANNELS}x{f}x{h}x{w} -> N={tokens} tokens, L={args.text_len} x {args.text_dim}; "
        f"fp32, batch 1, {args.threads} thread(s), torch {torch.__version__}"
    )
    ada_ours = sum(q.numel() for n, q in ours.named_parameters() if "modulation" in n and not n.startswith("final_layer"))
    ada_wan = sum(q.numel() for q in wan.condition_embedder.time_proj.parameters()) + sum(b.scale_shift_table.numel() for b in wan.blocks)
    print(
        f"params: ours {params['ours'] / 1e6:.2f} M, wan {params['wan'] / 1e6:.2f} M; block modulation: ours {ada_ours / 1e6:.2f} M "
        f"({ours.modulation}), wan {ada_wan / 1e6:.2f} M (one shared D->6D Linear + a 6xD table per block)"
    )
    for name in ("ours", "wan"):  # warm-up: allocator, AdamW state, oneDNN primitive caches
        steps[name]()

    wall: dict[str, list[float]] = {"ours": [], "wan": []}
    cpu: dict[str, list[tuple[float, float, float]]] = {"ours": [], "wan": []}  # (fwd, bwd, opt)
    ratio_wall, ratio_cpu = [], []
    for r in range(args.rounds):
        order = ("ours", "wan") if r % 2 == 0 else ("wan", "ours")
        for name in order:
            for _ in range(args.steps):
                w_s, *phases = steps[name]()
                wall[name].append(w_s)
                cpu[name].append(tuple(phases))
        n = args.steps
        w_o, w_w = sum(wall["ours"][-n:]), sum(wall["wan"][-n:])
        c_o, c_w = sum(map(sum, cpu["ours"][-n:])), sum(map(sum, cpu["wan"][-n:]))
        ratio_wall.append(w_o / w_w)
        ratio_cpu.append(c_o / c_w)
        print(
            f"round {r} ({order[0]} first): ours {w_o / n * 1e3:6.0f} ms wall {c_o / n * 1e3:6.0f} ms CPU | "
            f"wan {w_w / n * 1e3:6.0f} ms wall {c_w / n * 1e3:6.0f} ms CPU | ratio wall {ratio_wall[-1]:.3f} CPU {ratio_cpu[-1]:.3f}"
        )
    med = statistics.median
    for name in ("ours", "wan"):
        fwd, bwd, opt = (med(ph[i] for ph in cpu[name]) * 1e3 for i in range(3))
        print(
            f"{name:4s}: median {med(wall[name]) * 1e3:6.0f} ms/step wall, {med(map(sum, cpu[name])) * 1e3:6.0f} ms/step CPU "
            f"(forward {fwd:.0f}, backward {bwd:.0f}, AdamW {opt:.0f} ms CPU)"
        )
    print(
        f"ratio ours/wan (median of {args.rounds} rounds; target <= 1.0): CPU time {med(ratio_cpu):.3f} "
        f"[{min(ratio_cpu):.3f}..{max(ratio_cpu):.3f}], wall {med(ratio_wall):.3f} [{min(ratio_wall):.3f}..{max(ratio_wall):.3f}]"
    )
    if args.profile:
        for name in ("ours", "wan"):
            profile_step(name, steps[name], args.profile_rows)


if __name__ == "__main__":
    main()
