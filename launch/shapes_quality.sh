#!/usr/bin/env bash
# The shapes-world quality recipe (issue "the model really learns"), on CPU in under 30 minutes:
#   1. the shapes VAE trains (experiment=shapes_quality_vae) and is scored on held-out clips
#      (sora-eval vae: PSNR / SSIM, side-by-side video),
#   2. the clips are encoded once into latent shards (sora-data cache-latents), and the DiT
#      trains on them (experiment=shapes_quality): no video decode or VAE encode per step,
#   3. sora-eval shapes reads colour / shape / direction back from generated videos, for
#      seen and held-out caption combinations and every prompting mode, and writes the report.
# Everything lands in ${SORA_QUALITY_DIR:-outputs/shapes_quality}; re-running resumes each
# stage from its last checkpoint. Extra arguments go to both sora-train calls, e.g.
#   bash launch/shapes_quality.sh trainer=gpu trainer.precision=bf16-mixed   (same recipe on a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
out=${SORA_QUALITY_DIR:-outputs/shapes_quality}
export SORA_QUALITY_DIR=$out   # the experiments read the same variable
data=${SORA_DATA_DIR:-data}
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

stage "VAE"
sora-train experiment=shapes_quality_vae resume=auto "$@"
vae_done=$(date +%s)
sora-eval vae --vae "$out/vae/export" --shards "$data/shapes/heldout" --max-samples 256 --out "$out/eval_vae"

stage "cache latents"
for split in train val; do
  sora-data cache-latents "$data/shapes/$split" --vae "$out/vae/export" --out "$out/latents/$split" \
    --num-frames 17 --height 32 --width 32 --dtype float32
done

stage "DiT"
dit_start=$(date +%s)
sora-train experiment=shapes_quality resume=auto "$@"
dit_done=$(date +%s)

stage "sora-eval shapes"
sora-eval shapes --ckpt "$out/dit/export" --out "$out/eval_shapes"
sora-eval loss-plot "$out/vae" "$out/dit" --labels vae dit --out "$out/loss_curves.png"

echo
echo "shapes quality recipe finished in $(( $(date +%s) - start )) s" \
     "(VAE training $(( vae_done - start )) s, DiT training $(( dit_done - dit_start )) s)"
echo "  VAE on held-out clips: $out/eval_vae/vae_eval.json"
echo "  shapes report:         $out/eval_shapes/"
