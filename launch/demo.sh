#!/usr/bin/env bash
# `make demo`: the whole path on the embedded shapes world, on CPU, in under 5 minutes, ending
# with a score the demo cannot fix by construction (it reads its own videos back from pixels).
#   1. shapes-world shards (make demo's world: larger objects, conf/data/shapes_demo.yaml) are
#      generated under data/shapes_demo if missing (real H.264 mp4s),
#   2. a small causal VAE trains (outputs/demo/vae),
#   3. the clips are encoded once into latent shards, 5 frames at 2 fps (outputs/demo/latents),
#   4. a small DiT trains on them (outputs/demo/dit),
#   5. sora-sample writes videos from captions (outputs/demo/samples/*.mp4),
#   6. sora-eval shapes scores the DiT's export: it generates a clip per caption combination
#      (48 seen, up to 48 held-out) and reads colour, shape and direction back from the pixels
#      (outputs/demo/eval_shapes/report.json; samples.png: a grid of clips with their captions
#      and what was read; the targets are make demo's, `--targets demo`),
#   7. the loss curves of both stages go into outputs/demo/loss_curves.png.
# Re-running resumes each stage from its last checkpoint (resume=auto) instead of retraining; a
# demo dir from before an update that changed the models stops with a one-line error: move it
# away (or set SORA_DEMO_DIR) to train afresh.
# Arguments are Hydra overrides for both sora-train calls; SORA_DEMO_VAE_ARGS holds overrides
# for the VAE stage alone (it is the one that generates the shards: data.prepare.num_train=...).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
# Torch threads (OMP_NUM_THREADS, unless set): every core when the machine is otherwise idle, one
# when other work is running. Idle, two threads beat one on 2 cores (DiT 300 steps 41 s vs 58 s,
# VAE 150 steps 32 s vs 42 s); busy, OpenMP threads that must wait for a taken core spin (the VAE
# stage: 78 s with one thread, over 10 minutes with two; docs/benchmarks.md).
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  cpu() { local _ u n s i w q sq st; read -r _ u n s i w q sq st _ < /proc/stat; echo "$((u + n + s + i + w + q + sq + st)) $((i + w))"; }
  read -r t0 i0 <<< "$(cpu)"; sleep 1; read -r t1 i1 <<< "$(cpu)"
  busy=$(( $(grep -c "^cpu[0-9]" /proc/stat) * 100 * ((t1 - t0) - (i1 - i0)) / (t1 - t0 > 0 ? t1 - t0 : 1) ))   # % of one core in use
  if (( busy < 50 )); then OMP_NUM_THREADS=$(nproc); else OMP_NUM_THREADS=1; fi
  echo "torch threads: $OMP_NUM_THREADS (${busy}% of a core busy before the demo)"
fi
export OMP_NUM_THREADS
out=${SORA_DEMO_DIR:-outputs/demo}   # the experiments read the same variable
export SORA_DEMO_DIR=$out
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

data=${SORA_DATA_DIR:-data}
clip=(--num-frames 5 --fps 2 --height 32 --width 32)   # the DiT's clips: every fourth frame

stage "VAE"
# shellcheck disable=SC2086  # SORA_DEMO_VAE_ARGS is a list of overrides
sora-train experiment=demo_vae resume=auto ${SORA_DEMO_VAE_ARGS:-} "$@"

stage "latents"
for split in train val; do
  sora-data cache-latents "$data/shapes_demo/$split" --vae "$out/vae/export" --out "$out/latents/$split" \
    "${clip[@]}" --dtype float32 > "$out/latents-$split.log"
done

stage "DiT"
sora-train experiment=demo resume=auto "$@"

stage "samples and scores"
# The loss plot (mostly process start-up) is drawn while the samples are generated.
sora-eval loss-plot "$out/vae" "$out/dit" --labels vae dit --out "$out/loss_curves.png" &
plot=$!
sora-sample --ckpt "$out/dit/export" --prompts-file launch/demo_prompts.txt --out "$out/samples" --seed 0 --fps 2
mkdir -p "$out/eval_shapes"
sora-eval shapes --ckpt "$out/dit/export" --out "$out/eval_shapes" --targets demo --t2v-only \
  --max-combos "${SORA_DEMO_EVAL_COMBOS:-48}" --no-progress > "$out/eval_shapes/eval.log"
wait "$plot"

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  $(tail -n 1 "$out/eval_shapes/eval.log")"
echo "  samples:     $out/samples/ and $out/eval_shapes/samples.png (captions above each clip)"
echo "  report:      $out/eval_shapes/report.json (tables: $out/eval_shapes/eval.log)"
echo "  loss curves: $out/loss_curves.png"
echo "  exports:     $out/vae/export $out/dit/export (safetensors)"
