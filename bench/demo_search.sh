#!/usr/bin/env bash
# One run of the `make demo` search (docs/benchmarks.md, "make demo search"): a demo-width DiT
# trained on cached shapes latents, scored with make demo's own bar at every checkpoint.
#   bash bench/demo_search.sh OUT LATENTS VAE_EXPORT [sora-train overrides...]
# LATENTS holds train/ and val/ written by `sora-data cache-latents ... --vae VAE_EXPORT`, e.g.
#   sora-data cache-latents data/shapes/train --vae outputs/shapes_quality/vae/export \
#     --out /tmp/q9f4/train --num-frames 9 --fps 4 --height 32 --width 32     # and val
#   bash bench/demo_search.sh /tmp/runF /tmp/q9f4 outputs/shapes_quality/vae/export trainer.max_steps=1500
# Every 300 steps a checkpoint is exported and scored (`sora-eval shapes --targets demo
# --t2v-only --max-combos 48`); OUT/scores.txt gets one line per checkpoint. The scores depend on
# the step, not on the machine's load, so several runs may share the cores (OMP_NUM_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 latents=$2 vae=$3
shift 3
export WANDB_SILENT=true
sora-train experiment=demo logger=csv vae_ckpt="$vae" data.train_shards="$latents/train" data.val_shards="$latents/val" \
  callbacks.checkpoint.every_n_steps=300 trainer.val_check_interval=300 hydra.run.dir="$out" "$@"
for ckpt in "$out"/checkpoints/step=*.ckpt; do
  step=$(basename "$ckpt" .ckpt); step=$((10#${step#step=}))
  sora-export "$out" --ckpt "$ckpt" --out "$out/export$step" > /dev/null
  sora-eval shapes --ckpt "$out/export$step" --out "$out/eval$step" --targets demo --t2v-only --max-combos 48 --no-progress \
    | tail -n 1 | tee -a "$out/scores.txt"
done
