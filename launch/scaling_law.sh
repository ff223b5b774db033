#!/usr/bin/env bash
# The scaling-law recipe (issue 18): DiT sizes on one fixed budget -> L(C) = a*C^(-b) + c -> the
# next size predicted, then trained and compared. On 2 CPU cores in ~20 minutes:
#   1. (only when missing) the shapes VAE and its cached latents, as launch/shapes_quality.sh
#      makes them: ${SORA_QUALITY_DIR:-outputs/shapes_quality}/{vae/export,latents/{train,val}};
#   2. the ladder (experiment=scaling_shapes hparams_search=scaling): 5 sizes, the same
#      number of training samples each, two trials at a time with one thread each;
#   3. sora-eval scaling fits the ladder and writes the prediction for the next size
#      (report/prediction.json) before that size starts;
#   4. the next size trains alone, one thread too (SCALING_NEXT_THREADS: more on an idle machine;
#      threads do not change its loss; on a shared one two OpenMP threads spin against the load);
#   5. sora-eval scaling again, with its run: predicted vs measured, report.json, scaling.png.
# Everything lands in ${SORA_SCALING_DIR:-outputs/scaling}. Extra arguments go to every
# sora-train call of stages 2 and 4, e.g. a quick check of the plumbing:
#   bash launch/scaling_law.sh trainer.max_steps=20
# SCALING_LADDER (comma list, default the overlay's), SCALING_NEXT (d128) and SCALING_PARALLEL
# (trials at once, 2) choose the sizes and the parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
out=${SORA_SCALING_DIR:-outputs/scaling}
export SORA_SCALING_DIR=$out
quality=${SORA_QUALITY_DIR:-outputs/shapes_quality}
export SORA_QUALITY_DIR=$quality
data=${SORA_DATA_DIR:-data}
next=${SCALING_NEXT:-d128}
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

if [[ ! -f $quality/latents/train/index.json || ! -f $quality/latents/val/index.json ]]; then
  if [[ ! -f $quality/vae/export/model.json ]]; then
    stage "VAE (missing: $quality/vae/export)"
    sora-train experiment=shapes_quality_vae resume=auto
  fi
  stage "cache latents (missing: $quality/latents)"
  for split in train val; do
    sora-data cache-latents "$data/shapes/$split" --vae "$quality/vae/export" --out "$quality/latents/$split" \
      --num-frames 17 --height 32 --width 32 --dtype float32
  done
fi

stage "ladder: ${SCALING_LADDER:-as in conf/hparams_search/scaling.yaml}, ${SCALING_PARALLEL:-2} at a time, 1 thread each"
ladder_args=(hydra.sweeper.max_batch_size="${SCALING_PARALLEL:-2}")
[[ -n ${SCALING_LADDER:-} ]] && ladder_args+=(scaling.size="$SCALING_LADDER")   # the command line wins over the overlay's params
rm -rf "$out/ladder" "$out/report" "$out/runs/$next"   # a fresh ladder, prediction and next run
ladder_start=$(date +%s)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 sora-train -m experiment=scaling_shapes hparams_search=scaling "${ladder_args[@]}" "$@"
ladder_done=$(date +%s)

stage "fit and predict $next"
sora-eval scaling "$out/ladder" --next "$next" --out "$out/report"

stage "train $next"
next_start=$(date +%s)
OMP_NUM_THREADS=${SCALING_NEXT_THREADS:-1} MKL_NUM_THREADS=${SCALING_NEXT_THREADS:-1} sora-train experiment=scaling_shapes scaling.size="$next" "$@"
next_done=$(date +%s)

stage "predicted vs measured"
sora-eval scaling "$out/ladder" --next "$next" --next-run "$out/runs/$next" --out "$out/report"

echo
echo "scaling-law recipe finished in $(( $(date +%s) - start )) s" \
     "(ladder $(( ladder_done - ladder_start )) s, $next $(( next_done - next_start )) s)"
echo "  report: $out/report/report.json, $out/report/scaling.png"
