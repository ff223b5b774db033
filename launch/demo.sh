#!/usr/bin/env bash
# `make demo`: the whole path on the embedded shapes world, on CPU, in a few minutes.
#   1. shapes-world shards are generated under data/shapes if missing (real H.264 mp4s),
#   2. a small causal VAE trains (outputs/demo/vae),
#   3. a small DiT trains in its latent space (outputs/demo/dit),
#   4. sora-sample writes videos from captions (outputs/demo/samples/*.mp4),
#   5. the loss curves of both stages go into outputs/demo/loss_curves.png.
# Re-running resumes each stage from its last checkpoint (resume=auto) instead of retraining.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
out=${SORA_DEMO_DIR:-outputs/demo}   # the experiments read the same variable
start=$(date +%s)

sora-train experiment=demo_vae resume=auto "$@"
sora-train experiment=demo resume=auto "$@"
sora-sample --ckpt "$out/dit/export" --prompts-file launch/demo_prompts.txt --out "$out/samples" --seed 0
sora-eval loss-plot "$out/vae" "$out/dit" --labels vae dit --out "$out/loss_curves.png"

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  samples:     $out/samples/"
echo "  loss curves: $out/loss_curves.png"
echo "  exports:     $out/vae/export $out/dit/export (safetensors)"
