"""What Lightning costs: the DiT training step under lightning.Trainer vs a plain PyTorch loop.

    python bench/bench_lightning_overhead.py                      # debug sizes, ~1-2 min on 2 cores
    python bench/bench_lightning_overhead.py --dit shapes --vae shapes --frames 17 --steps 20

Both loops train the same DiTModule (built from the config like `sora-train experiment=smoke`:
fp32, CPU) on the same batches, generated once and held in memory, with the same recipe per
step: the module's diffusion loss (VAE encode -> caption dropout -> t, noise -> DiT -> loss, plus
the loss-by-timestep bins it logs every ``trainer.log_every_n_steps`` = 10 steps, the default),
backward, gradient clipping at 1.0, AdamW, the LR schedule, zero_grad. The Trainer adds its loops, hooks, closures and self.log; "+ callbacks" adds ours
(EMA, random-state snapshot, NaN guard with grad norm, throughput) on top.

Trials alternate (plain, Lightning, Lightning + callbacks; who goes first rotates) so drifting
machine load hits all of them alike; each trial starts from the same weights and a fresh optimizer, skips
--warmup steps, then times --steps steps. It prints ms per step (wall and this process's CPU time; medians and
minima over repeats) and the ratio to the plain loop (target for Lightning alone: <= 1.05x).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

LOG_EVERY = 10  # conf/trainer/default.yaml: log_every_n_steps

def build(args: argparse.Namespace):
    from hydra import compose, initialize_config_module

    from sora_train.cli.build import build_module

    overrides = ["experiment=smoke", f"dit={args.dit}", f"vae={args.vae}"]
    with initialize_config_module(config_module="sora_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    module = build_module(cfg)
    g = torch.Generator().manual_seed(0)
    captions = ["a small red circle moving left", "a large blue square moving right", "a small green triangle moving up", "a large yellow diamond moving down"]
    batches = [
        {"video": torch.rand((args.batch, 3, args.frames, args.res, args.res), generator=g) * 2 - 1,  # (B, 3, F, H, W)
         "caption": [captions[(i + j) % len(captions)] for j in range(args.batch)]}
        for i in range(args.warmup + args.steps)
    ]
    return cfg, module, batches


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i]


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_step(t0: tuple[float, float], t1: tuple[float, float], n: int) -> tuple[float, float]:
    return (t1[0] - t0[0]) / n, (t1[1] - t0[1]) / n


def plain_loop(module, batches: list[dict[str, Any]], warmup: int) -> tuple[float, float]:
    from sora_train.diffusion.flow import loss_by_timestep_bins

    module.train()
    opt_cfg = module.configure_optimizers()
    opt, sched = (opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]) if isinstance(opt_cfg, dict) else (opt_cfg, None)
    params = [p for g in opt.param_groups for p in g["params"]]
    t0 = _now()
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = _now()
        out = module.diffusion_loss(batch)
        if (i + 1) % LOG_EVERY == 0:  # what training_step logs on the steps Lightning writes logs
            loss_by_timestep_bins(out["loss_per_sample"].detach(), out["t"], module.loss_bins)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
    return _per_step(t0, _now(), len(batches) - warmup)


class _Timer:
    """Wall time from the first timed batch to the end of training (a Lightning callback)."""

    def __init__(self, warmup: int) -> None:
        import lightning.pytorch as pl

        class T(pl.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                if batch_idx == warmup:
                    self.t0 = _now()

            def on_train_end(cb, trainer, pl_module):
                self.t1 = _now()

        self.callback, self.t0, self.t1 = T(), (0.0, 0.0), (0.0, 0.0)


def lightning_loop(module, batches: list[dict[str, Any]], warmup: int, callbacks: list) -> tuple[float, float]:
    import lightning.pytorch as pl

    timer = _Timer(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches), gradient_clip_val=1.0, log_every_n_steps=LOG_EVERY,
                         callbacks=[*callbacks, timer.callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    return _per_step(timer.t0, timer.t1, len(batches) - warmup)


def our_callbacks(seed: int) -> list:
    from sora_train.training.callbacks.ema import EMA
    from sora_train.training.callbacks.nan_guard import NaNGuard
    from sora_train.training.callbacks.rng import RNGState
    from sora_train.training.callbacks.throughput import Throughput

    return [EMA(decay=0.999), RNGState(seed=seed), NaNGuard(), Throughput(log_every_n_steps=10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dit", default="debug", help="dit config (conf/dit/)")
    ap.add_argument("--vae", default="debug", help="vae config (conf/vae/)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    _, module, batches = build(args)
    for name in ("lightning.pytorch", "lightning.fabric", "sora_train"):  # set after import: Lightning sets its own level
        logging.getLogger(name).setLevel(logging.ERROR)
    initial = copy.deepcopy(module.state_dict())
    n_params = sum(p.numel() for m in module.trainable_modules() for p in m.parameters())
    print(f"DiTModule dit={args.dit} vae={args.vae}: {n_params / 1e6:.2f}M trainable parameters; batch {args.batch}x3x{args.frames}x{args.res}x{args.res}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repeats, {torch.get_num_threads()} threads")

    def fresh():
        m = copy.deepcopy(module)
        m.load_state_dict(initial)
        return m

    loops = {
        "plain": lambda r: plain_loop(fresh(), batches, args.warmup),
        "lightning": lambda r: lightning_loop(fresh(), batches, args.warmup, []),
        "lightning + callbacks": lambda r: lightning_loop(fresh(), batches, args.warmup, our_callbacks(r)),
    }
    names = list(loops)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            torch.manual_seed(r)
            times[name].append(loops[name](r))
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1][0] * 1e3:.1f} ms ({v[-1][1] * 1e3:.1f} CPU)" for k, v in times.items()), flush=True)

    # Wall time is what a run pays; CPU time of this process is steadier on a shared machine
    # (other processes' load does not count) and, with one thread, measures the same work.
    # Medians, and minima (noise only ever adds time, so the fastest repeat is the cleanest).
    print(f"\n{'loop':<24}{'wall ms/step':>14}{'ratio':>8}{'CPU ms/step':>14}{'ratio':>8}{'min CPU':>10}{'ratio':>8}   ({args.repeats} repeats)")
    for name, ts in times.items():
        wall, cpu, low = (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts), min(t[1] for t in ts))
        base = times["plain"]
        bw, bc, bl = statistics.median(t[0] for t in base), statistics.median(t[1] for t in base), min(t[1] for t in base)
        print(f"{name:<24}{wall * 1e3:>14.2f}{wall / bw:>7.3f}x{cpu * 1e3:>14.2f}{cpu / bc:>7.3f}x{low * 1e3:>10.2f}{low / bl:>7.3f}x")


if __name__ == "__main__":
    main()
