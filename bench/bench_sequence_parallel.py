"""Activation memory per rank with Ulysses sequence parallelism, SP=1 vs SP=2, on CPU ranks.

What a training step keeps for backward is measured exactly: every tensor autograd saves
during the DiT's forward (``torch.autograd.graph.saved_tensors_hooks``), counted once per
storage, in bytes, on each rank. Weights, gradients and optimizer state are the same per rank
with or without SP (they are ZeRO's business), so this is the number SP exists to cut.

Prints, for one clip, the saved bytes per rank at SP=1 and SP=2 and their ratio (target <=
0.6); then, under a fixed budget of saved bytes per rank (what SP=1 needs for --frames), the
longest clip each fits, searched over the frame count, and the ratio (target >= 1.8).

    python bench/bench_sequence_parallel.py                    # DiT "shapes" size, 64x64 clips
    python bench/bench_sequence_parallel.py --size debug --res 32 --frames 33
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = r'''
import json, os, sys, torch, torch.distributed as dist
from sora_train.models.dit import build_dit
from sora_train.parallel.sequence import apply_sequence_parallel, init_sequence_parallel
from sora_train.utils.dist_groups import sequence_parallel
args = json.loads(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
dit = build_dit(args["size"], in_channels=8, text_dim=32)
if world > 1:
    apply_sequence_parallel(dit, init_sequence_parallel(world), *sequence_parallel()[1:])
results = {}
for frames in args["frames_list"]:
    f = 1 + (frames - 1) // 4  # a 4x8x8 VAE's latent frames
    h = w = args["res"] // 8
    x = torch.randn(1, 8, f, h, w)
    t, text, mask = torch.rand(1), torch.randn(1, 16, 32), torch.ones(1, 16, dtype=torch.bool)
    seen, total = set(), [0]
    params = {p.untyped_storage().data_ptr() for p in dit.parameters()}

    def pack_acts(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key[0] not in params and key not in seen:  # weights are not activations; count a storage once
            seen.add(key)
            total[0] += key[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack_acts, lambda t: t):
        loss = dit(x, t, text, mask).pow(2).mean()
    loss.backward()
    dit.zero_grad(set_to_none=True)
    results[frames] = total[0]
if world == 1 or dist.get_rank() == 0:
    print("RESULT " + json.dumps(results))
if world > 1:
    dist.destroy_process_group()
'''


def run(world: int, size: str, res: int, frames_list: list[int]) -> dict[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000 + world), "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        arg = json.dumps({"size": size, "res": res, "frames_list": frames_list})
        procs = [subprocess.Popen([sys.executable, script, arg], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
        outs = [p.communicate(timeout=1800)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit("\n".join(o[-2000:] for o in outs))
        line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
        return {int(k): v for k, v in json.loads(line[len("RESULT "):]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="shapes", help="DiT size (dit/sizes.py); its head count must be even")
    p.add_argument("--res", type=int, default=64, help="clip height = width in pixels (a 4x8x8 VAE's latents)")
    p.add_argument("--frames", type=int, default=33, help="the clip for the per-rank ratio; also sets the budget")
    p.add_argument("--max-frames", type=int, default=161, help="longest clip tried in the search")
    args = p.parse_args()
    # frame counts 1 + 4k whose token count is even (so SP=2 can split every one of them)
    candidates = [fr for fr in range(5, args.max_frames + 1, 4) if (1 + (fr - 1) // 4) * (args.res // 16) ** 2 % 2 == 0]
    one = run(1, args.size, args.res, sorted(set(candidates) | {args.frames}))
    two = run(2, args.size, args.res, sorted(set(candidates) | {args.frames}))
    ratio = two[args.frames] / one[args.frames]
    budget = one[args.frames]
    fits_one = max(fr for fr, b in one.items() if b <= budget)
    fits_two = max(fr for fr, b in two.items() if b <= budget)
    print(f"DiT {args.size}, {args.frames}x{args.res}x{args.res}: activations saved per rank SP=1 {one[args.frames] / 2**20:.1f} MiB, "
          f"SP=2 {two[args.frames] / 2**20:.1f} MiB, ratio {ratio:.3f} (target <= 0.6)")
    print(f"longest clip within {budget / 2**20:.1f} MiB of activations per rank: SP=1 {fits_one} frames, SP=2 {fits_two} frames, "
          f"ratio {fits_two / fits_one:.2f} (target >= 1.8; search up to {args.max_frames} frames)")


if __name__ == "__main__":
    main()
