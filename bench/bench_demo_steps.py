"""CPU-seconds per training step of the demo's models (what sizes `make demo`).

    python bench/bench_demo_steps.py

Measures process CPU time (not wall time: the machine is shared) with one intra-op thread,
best of 3 after a warm-up, for the demo VAE (vae=shapes, batch 8 x 17x32x32), the demo DiT
(hidden 128, depth 4) and dit=shapes (batch 8, 9x8x8x4 latents, tiny text encoder).
"""

from __future__ import annotations

import time

import torch

from sora_train.models.dit import build_dit
from sora_train.models.text import TinyTextEncoder
from sora_train.models.vae import build_vae
from sora_train.models.vae.losses import VAELoss


def cpu_seconds(step, repeats: int = 3) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        step()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae, loss = build_vae("shapes"), VAELoss()
    opt = torch.optim.AdamW(vae.parameters(), 1e-3)
    x = torch.rand(8, 3, 17, 32, 32) * 2 - 1

    def vae_step() -> None:
        recon, post = vae(x)
        opt.zero_grad()
        loss(x, recon, post)["loss"].backward()
        opt.step()

    print(f"demo VAE (vae=shapes), B=8 17x32x32: {cpu_seconds(vae_step):.3f} CPU-s/step")
    text = TinyTextEncoder()
    z = torch.randn(8, 4, 9, 8, 8)
    for name, kw in (("demo DiT (hidden 128, depth 4)", dict(hidden_size=128, depth=4, num_heads=4)), ("dit=shapes", {})):
        dit = build_dit("shapes", 4, text.dim, **kw)
        o = torch.optim.AdamW(list(dit.parameters()) + list(text.parameters()), 1e-3)

        def dit_step() -> None:
            emb, mask = text(["a small red circle moving left"] * 8)
            dit(z, torch.rand(8), emb, mask).square().mean().backward()
            o.step()
            o.zero_grad()

        print(f"{name}, B=8, 144 tokens: {cpu_seconds(dit_step):.3f} CPU-s/step ({dit.num_params() / 1e6:.1f}M params)")


if __name__ == "__main__":
    main()
