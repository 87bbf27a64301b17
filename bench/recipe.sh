#!/usr/bin/env bash
# The recipe measurements of docs/training.md ("A recipe that converges on a CPU"), one arm at a
# time: every arm is the 1.86M demo UNet (channels 32,64,64) trained on the Fashion-MNIST
# train split X with its 20 stored neighbours in D = the db split, 600 steps of batch 64, seed 0,
# fp32, unless its flags say otherwise; then measured by `rdm eval` on N test-image queries with
# the shipped domain classifier's features.
#
#   bash bench/recipe.sh db                  # D and the neighbours of X (runs/fm-db)
#   bash bench/recipe.sh train ARM [STEPS]   # train (or resume) runs/recipe/ARM
#   bash bench/recipe.sh eval ARM NAME FLAGS # runs/recipe/eval/ARM-NAME with extra eval FLAGS
#   python bench/recipe_table.py runs/recipe/eval/*
#
# Threads: one torch thread per job, two jobs side by side on the 2-core CPU.
set -euo pipefail
export OMP_NUM_THREADS=1
DB=runs/fm-db
COMMON=(--data fashion-mnist --db "$DB" --preset small --channels 32,64,64 --ema-decay 0.999
        --mixed-precision no --checkpoint-every 200 --sample-every 0 --seed 0 --threads 1
        --clip-sample)
declare -A ARMS=(
  [R0-eps-rgb-1e-4]="--image-channels 3 --prediction epsilon --lr 1e-4"
  [R1-v-grey-5e-4]="--image-channels 1 --prediction v_prediction --lr 5e-4"
  [R2-v-grey-5e-4-ztsnr]="--image-channels 1 --prediction v_prediction --lr 5e-4 --zero-snr"
  [R3-v-grey-5e-4-minsnr5]="--image-channels 1 --prediction v_prediction --lr 5e-4 --snr-gamma 5"
  [R4-eps-grey-5e-4]="--image-channels 1 --prediction epsilon --lr 5e-4"
  # R1 with a cosine learning rate, and four further EMAs of the same trajectory (--weights NAME)
  [R5-v-grey-5e-4-cosine]="--image-channels 1 --prediction v_prediction --lr 5e-4 --lr-schedule cosine --ema-extra power:0.6667 --ema-extra power:0.75 --ema-extra halflife:4000 --ema-extra halflife:16000"
  # R1 at batch 32 for twice the steps: the same images seen, about the same wall time
  [R6-v-grey-5e-4-b32]="--image-channels 1 --prediction v_prediction --lr 5e-4 --batch-size 32"
  # width and depth at R1's wall time: give STEPS = 600 x (R1's s/step) / (this arm's s/step),
  # measured side by side (bench/train_sample.py); the small preset's full width (7.4M) and
  # two ResNet layers per level
  [R7-v-grey-5e-4-wide]="--image-channels 1 --prediction v_prediction --lr 5e-4 --channels 64,128,128"
  [R8-v-grey-5e-4-deep]="--image-channels 1 --prediction v_prediction --lr 5e-4 --layers-per-block 2"
  # R1's trajectory again (same seed, EMAs draw no random numbers) with further EMAs: the EMA
  # warm-up variants on a constant learning rate
  [R9-v-grey-5e-4-emas]="--image-channels 1 --prediction v_prediction --lr 5e-4 --ema-extra power:0.6667 --ema-extra power:0.75 --ema-extra halflife:1000"
)
case "${1:-}" in
  db)
    rdm db build fashion-mnist --split db --encoder default --out "$DB"
    rdm db neighbors "$DB" --queries fashion-mnist --split train -k 20 ;;
  train)
    arm=$2; steps=${3:-600}; out=runs/recipe/$arm
    batch=(--batch-size 64)  # the arms' batch (the small preset's default is now R6's 32)
    [[ $arm == R6-* ]] && { steps=${3:-1200}; batch=(); }
    resume=(); [[ -f $out/config.json ]] && resume=(--resume)
    # shellcheck disable=SC2086
    rdm train "${COMMON[@]}" "${batch[@]}" ${ARMS[$arm]} --steps "$steps" --out "$out" "${resume[@]}" ;;
  eval)
    arm=$2; name=$3; shift 3
    rdm eval "runs/recipe/$arm" --db "$DB" --n "${N:-500}" --features classifier --seed 0 \
      --threads 1 --out "runs/recipe/eval/$arm-$name" "$@" ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
