#!/usr/bin/env bash
# Fine-tuning measured (issue 18) on the shapes world, on CPU: does a fine-tune teach a pretrained
# model something new, and what does it forget?
#   0. the VAE: the shapes-quality recipe's (outputs/shapes_quality/vae/export, trained on every
#      colour, as fine-tuners reuse a generic public VAE), trained first when it is absent;
#   1. data: a shapes set with one colour (default yellow) left out of every clip and caption of
#      every split (exclude_colours), and a few dozen clips of that colour alone, both cached
#      into latent shards through that VAE;
#   2. pretrain: the shapes-quality DiT on the first set (experiment=finetune_shapes_pretrain);
#   3. fine-tune from its export on the new colour's clips, full (experiment=finetune_shapes_full)
#      and LoRA (experiment=finetune_shapes_lora), each alone and with replay (one pretrain latent
#      shard, 128 clips of the other colours, mixed in);
#   4. sora-eval shapes on the pretrain and on every fine-tune, with the same seed and prompts
#      (the pretrain set's held-out pairs), then sora-eval shapes-compare: the new colour's
#      accuracy on prompts asking for it, points lost on the other colours' colour / shape /
#      direction, and each fine-tune's wall time -> $out/compare/compare.json and a table.
# Everything lands in ${SORA_FINETUNE_DIR:-outputs/finetune_quality}; a stage whose export exists
# is reused (delete its folder to redo it). Settings (environment):
#   SORA_NEW_COLOUR=yellow  SORA_FINETUNE_VARIANTS="full_replay lora_replay full lora" (run in order)
#   SORA_PRETRAIN_MAX_TIME=DD:HH:MM:SS: stop the pretrain there if its steps are not done (a busy machine)
#   SORA_FINETUNE_PARALLEL=1: the fine-tunes and evals side by side (more cores, or a shared machine)
#   SORA_FINETUNE_FAST=1: the plumbing at toy scale (tiny DiT, 2 steps, sora-eval --fast; tests)
# Extra arguments go to every sora-train call (pretrain and fine-tunes), e.g. trainer=gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true
base=${SORA_QUALITY_DIR:-outputs/shapes_quality}
out=${SORA_FINETUNE_DIR:-outputs/finetune_quality}
data=${SORA_DATA_DIR:-data}
colour=${SORA_NEW_COLOUR:-yellow}
fast=${SORA_FINETUNE_FAST:-0}
variants=${SORA_FINETUNE_VARIANTS:-full_replay lora_replay full lora}
export SORA_QUALITY_DIR=$base SORA_FINETUNE_DIR=$out   # the experiments read the same variables
mkdir -p "$out"
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }
times="$out/wall_times.txt"   # "label seconds" per training stage run here

if [[ $fast == 1 ]]; then
  n_pre=32 n_new=8 n_val=4 shard_size=16 val=0   # no validation sets: two fewer cache-latents runs
  train_args=(dit.hidden_size=32 dit.depth=1 dit.num_heads=2 trainer.max_steps=2 data.val_shards=null
              callbacks.samples=null callbacks.checkpoint.every_n_steps=2 data.num_workers=0 data.batch_size=4
              trainer.enable_progress_bar=false)
  ft_args=(trainer.max_steps=2 data.val_shards=null callbacks.samples=null callbacks.checkpoint.every_n_steps=2
           data.num_workers=0 data.batch_size=4 trainer.enable_progress_bar=false)
  eval_args=(--fast --no-progress)
else
  n_pre=1024 n_new=48 n_val=16 shard_size=128 val=1
  train_args=() ft_args=()
  # text-to-video only (the issue's targets are colour / shape / direction): 96 seen combinations
  # (a seeded spread), every held-out pair's 24 and every one of the new colour's 32
  eval_args=(--max-combos 96 --no-progress)
fi
[[ -n ${SORA_PRETRAIN_MAX_TIME:-} ]] && train_args+=("+trainer.max_time=$SORA_PRETRAIN_MAX_TIME")

stage "VAE"
if [[ -f "$base/vae/export/model.json" ]]; then
  echo "reusing the shapes-quality VAE $base/vae/export"
else
  sora-train experiment=shapes_quality_vae resume=auto
fi

stage "data: shapes without $colour, and $n_new clips of $colour alone"
python - "$data" "$colour" "$n_pre" "$n_new" "$n_val" <<'PY'
import sys
from sora_train.data.shapes import ShapesWorld, ensure_shapes_dataset
data, colour, n_pre, n_new, n_val = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
ensure_shapes_dataset(f"{data}/shapes_without_{colour}", num_train=n_pre, num_val=64 if n_pre > 64 else n_val, seed=0,
                      world=ShapesWorld(), exclude_colours=[colour])
# another seed: none of these clips is a pretrain clip recoloured; every shape, direction and size
ensure_shapes_dataset(f"{data}/shapes_only_{colour}", num_train=n_new, num_val=n_val, seed=1,
                      world=ShapesWorld(), colours=[colour], heldout=[])
PY

stage "cache latents (the VAE above)"
cache() { sora-data cache-latents "$1" --vae "$base/vae/export" --out "$2" --num-frames 17 --height 32 --width 32 \
            --dtype float32 --shard-size "$shard_size"; }
cache "$data/shapes_without_$colour/train" "$out/latents/pretrain_train"
cache "$data/shapes_only_$colour/train" "$out/latents/new_train"
if [[ $val == 1 ]]; then
  cache "$data/shapes_without_$colour/val" "$out/latents/pretrain_val"
  cache "$data/shapes_only_$colour/val" "$out/latents/new_val"
fi

stage "pretrain without $colour"
if [[ -f "$out/pretrain/export/model.json" ]]; then
  echo "reusing the pretrain export $out/pretrain/export"
else
  t=$(date +%s)
  sora-train experiment=finetune_shapes_pretrain vae_ckpt="$base/vae/export" resume=auto "${train_args[@]}" "$@"
  echo "pretrain $(( $(date +%s) - t ))" >> "$times"
fi

replay="[$out/latents/new_train,$out/latents/pretrain_train/shard-000000.tar]"
for v in $variants; do
  case $v in full|lora|full_replay|lora_replay) ;;
    *) echo "error: SORA_FINETUNE_VARIANTS: unknown variant '$v' (full, lora, full_replay, lora_replay)" >&2; exit 2 ;;
  esac
done
finetune() {  # one variant: fine-tune from the pretrain's export (reused when its export exists)
  local v=$1 exp=finetune_shapes_full mix=() t
  [[ $v == lora* ]] && exp=finetune_shapes_lora
  [[ $v == *_replay ]] && mix=("data.train_shards=$replay")
  if [[ -f "$out/$v/export/model.json" ]]; then
    echo "reusing $out/$v/export"
  else
    t=$(date +%s)
    sora-train experiment=$exp hydra.run.dir="$out/$v" "${mix[@]}" "${ft_args[@]}" "${extra[@]}"
    echo "$v $(( $(date +%s) - t ))" >> "$times"
  fi
}
score() {  # sora-eval shapes with the same seed, prompts and held-out pairs for every export
  sora-eval shapes --ckpt "$out/$1/export" --out "$out/eval/$1" --data "$data/shapes_without_$colour" --colour "$colour" \
    --t2v-only "${eval_args[@]}"
}
extra=("$@")
reports=()
for run in pretrain $variants; do reports+=("$run=$out/eval/$run/report.json"); done
if [[ ${SORA_FINETUNE_PARALLEL:-0} == 1 ]]; then
  # every fine-tune (then its eval) and the pretrain's eval at once, one log each under $out/logs
  stage "fine-tunes and evals side by side: $variants (logs: $out/logs)"
  mkdir -p "$out/logs"
  pids=()
  score pretrain > "$out/logs/eval_pretrain.log" 2>&1 & pids+=($!)
  for v in $variants; do
    { finetune "$v" && score "$v"; } > "$out/logs/$v.log" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done   # set -e: any that failed stops the recipe here
else
  for v in $variants; do
    stage "fine-tune: $v"
    finetune "$v"
  done
  stage "sora-eval shapes (same seed and prompts for every export)"
  for run in pretrain $variants; do score "$run"; done
fi

stage "compare"
sora-eval shapes-compare "${reports[@]}" --colour "$colour" --times "$times" --out "$out/compare"

echo
echo "fine-tune recipe finished in $(( $(date +%s) - start )) s; wall times per stage: $times"
echo "  comparison: $out/compare/compare.json"
