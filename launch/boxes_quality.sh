#!/usr/bin/env bash
# Box motion control on the shapes world (issue 19), on CPU, on top of the shapes-quality base:
#   0. the base: outputs/shapes_quality (VAE + DiT exports) is reused when present, else
#      launch/shapes_quality.sh builds it first (~23 min more);
#   1. varied-motion shapes clips (turns, uneven speed, stops) whose json carries per-frame
#      boxes, under $SORA_DATA_DIR/shapes_boxes;
#   2. latent shards through the base's VAE (cache-latents re-maps the boxes to each clip);
#   3. the base DiT gains box control and trains jointly (experiment=boxes_quality);
#   4. sora-eval shapes: caption adherence as before plus the control scores — centre error,
#      inside-soft-box fraction, colour / shape with vs without boxes — on curve, zig-zag and
#      stop-and-go paths no training clip followed.
# Everything lands in ${SORA_BOXES_DIR:-outputs/boxes_quality}; re-running resumes training from
# its last checkpoint. Extra arguments go to sora-train, e.g. trainer.max_steps=1000.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
base=${SORA_QUALITY_DIR:-outputs/shapes_quality}
out=${SORA_BOXES_DIR:-outputs/boxes_quality}
data=${SORA_DATA_DIR:-data}
export SORA_QUALITY_DIR=$base SORA_BOXES_DIR=$out   # the experiment reads the same variables
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

stage "base"
if [[ -f "$base/dit/export/model.json" && -f "$base/vae/export/model.json" ]]; then
  echo "reusing the shapes-quality base in $base"
else
  bash launch/shapes_quality.sh
fi

stage "varied-motion shapes clips with boxes"
python - "$data/shapes_boxes" <<'PY'
import sys
from sora_train.data.shapes import ShapesWorld, ensure_shapes_dataset
ensure_shapes_dataset(sys.argv[1], num_train=2048, num_val=64, seed=0, world=ShapesWorld(motion="varied"), progress=True)
PY

stage "cache latents"
for split in train val; do
  sora-data cache-latents "$data/shapes_boxes/$split" --vae "$base/vae/export" --out "$out/latents/$split" \
    --num-frames 17 --height 32 --width 32 --dtype float32
done

stage "DiT with box control"
dit_start=$(date +%s)
sora-train experiment=boxes_quality resume=auto "$@"
dit_done=$(date +%s)

stage "sora-eval shapes (with control scores)"
sora-eval shapes --ckpt "$out/dit/export" --out "$out/eval_shapes" --no-progress

echo
echo "boxes recipe finished in $(( $(date +%s) - start )) s (DiT training $(( dit_done - dit_start )) s)"
echo "  report: $out/eval_shapes/report.json (\"control\", \"targets\")"
