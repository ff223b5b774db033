#!/usr/bin/env bash
# `make demo`: the whole path on the embedded shapes world, on CPU, in under 5 minutes, ending
# with a score the demo cannot fix by construction (it reads its own videos back from pixels).
#   1. shapes-world shards are generated under data/shapes if missing (real H.264 mp4s),
#   2. a small causal VAE trains (outputs/demo/vae),
#   3. a small DiT trains in its latent space (outputs/demo/dit),
#   4. sora-sample writes videos from captions (outputs/demo/samples/*.mp4),
#   5. sora-eval shapes scores the DiT's export: it generates a clip per caption combination
#      (48 seen, up to 48 held-out) and reads colour, shape and direction back from the pixels
#      (outputs/demo/eval_shapes/report.json; samples.png: a grid of clips with their captions
#      and what was read; the targets are make demo's, `--targets demo`),
#   6. the loss curves of both stages go into outputs/demo/loss_curves.png.
# Re-running resumes each stage from its last checkpoint (resume=auto) instead of retraining.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
out=${SORA_DEMO_DIR:-outputs/demo}   # the experiments read the same variable
export SORA_DEMO_DIR=$out
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

stage "VAE"
sora-train experiment=demo_vae resume=auto "$@"

stage "DiT"
sora-train experiment=demo resume=auto "$@"

stage "samples and scores"
sora-sample --ckpt "$out/dit/export" --prompts-file launch/demo_prompts.txt --out "$out/samples" --seed 0
mkdir -p "$out/eval_shapes"
sora-eval shapes --ckpt "$out/dit/export" --out "$out/eval_shapes" --targets demo --t2v-only \
  --max-combos "${SORA_DEMO_EVAL_COMBOS:-48}" --no-progress > "$out/eval_shapes/eval.log"
sora-eval loss-plot "$out/vae" "$out/dit" --labels vae dit --out "$out/loss_curves.png"

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  $(tail -n 1 "$out/eval_shapes/eval.log")"
echo "  samples:     $out/samples/ and $out/eval_shapes/samples.png (captions above each clip)"
echo "  report:      $out/eval_shapes/report.json (tables: $out/eval_shapes/eval.log)"
echo "  loss curves: $out/loss_curves.png"
echo "  exports:     $out/vae/export $out/dit/export (safetensors)"
