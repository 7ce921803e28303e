#!/usr/bin/env bash
# Refresh the text-to-image teacher and its one-step student on one GPU in about 9.5 minutes.
#
# Two fine-tunes of the embedded teacher run side by side on the same GPU, with the eyes weighted
# 5x and 15x (--eye_weight). Each trains on 40000 renders at batch 1024. The small UNet leaves most
# of the GPU idle, so two runs at once cost little more than one. A DMD2 student is then distilled
# from each teacher, again side by side, and each student is compressed into the smaller UNet the
# shipped student has (compress_student: merged attention heads, no mid block, cross-attention
# only at 16x16, no transformer in the 16x16 down block). The autoencoder stays as it is, so the
# shipped tiny decoder of the student still fits them all. The runs land in $RUNS/teacher_gpu_e{5,15},
# $RUNS/dmd2_gpu_e{5,15} and $RUNS/compress_gpu_e{5,15} (RUNS=runs by default, relative to the
# repository root, where the script runs).
# Pick the better pair with the benchmark, and copy it into assets/ as docs/TRAINING.md shows.
#
#   bash scripts/refresh_text_to_image_gpu.sh            # GPU sizes (CUDA)
#   TINY=1 bash scripts/refresh_text_to_image_gpu.sh     # a few steps on the CPU, to check the wiring
#
# STUDENT_INIT=DIR starts each DMD2 student from DIR's UNet (a pipeline or UNet folder, such as
# assets/portrait_student, which already has the compressed architecture) instead of from a copy of its
# teacher, and then skips the compression stage; that leaves time for TEACHER_MINUTES=4.5 (default 4.0)
# of teacher training and 2.0 minutes of DMD2 in the same call.
#
# Needs the requirements installed (or on PYTHONPATH). MINILM_PATH may name an exported text encoder
# (python -m pipelines.text_encoder export). On a machine without the package it is required.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ "${TINY:-0}" = 1 ]; then
  N=64; TMIN=0.6; DMIN=0.3; CMIN=0.4; TB=8; DB=4; CB=4; W=2; DEV=cpu; TT=300; DT=300; CT=300; EP=0
else
  N=40000; TMIN=${TEACHER_MINUTES:-4.0}; DMIN=1.8; CMIN=1.2; TB=1024; DB=128; CB=256; W=8; DEV=cuda
  TT=$(awk -v m="$TMIN" 'BEGIN { printf "%d", m * 60 + 30 }'); DT=185; CT=120; EP=16
  if [ -n "${STUDENT_INIT:-}" ]; then DMIN=2.0; DT=200; fi
fi
[[ ${TEACHER_MINUTES:-4.0} =~ ^[0-9]+(\.[0-9]+)?$ ]] \
  || { echo "TEACHER_MINUTES=${TEACHER_MINUTES} is not a number of minutes (such as 4.5)" >&2; exit 1; }
INIT=()
if [ -n "${STUDENT_INIT:-}" ]; then
  [ -f "$STUDENT_INIT/unet/config.json" ] || [ -f "$STUDENT_INIT/config.json" ] \
    || { echo "STUDENT_INIT=$STUDENT_INIT holds no UNet (unet/config.json or config.json)" >&2; exit 1; }
  INIT=(--student_init "$STUDENT_INIT")
fi
RUNS=${RUNS:-runs}
LOGS=${LOGS:-$RUNS/logs_gpu_refresh}
mkdir -p "$LOGS" "$RUNS/cache"

say "rendering $N training images"
$PY -c "
import sys
from pipelines.training.train_autoencoder import load_bank
if __name__ == '__main__':
    load_bank($N, size=64, seed=0, split='train', cache_dir='$RUNS/cache', workers=16)
" || exit 1

say "two teacher fine-tunes (eye weight 5 and 15)"
TEACHER="--init_from assets/portrait_teacher --vae_path assets/portrait_teacher/vae --num_images $N
 --bank_cache $RUNS/cache --block_out_channels 64,128,128 --max_length 52 --captions_per_image 4
 --batch_size $TB --lr 2.5e-4 --warmup_steps 100 --ema_decay 0.999 --mixed_precision no
 --total_steps 100000 --log_every 100 --sample_every 1000000 --checkpoint_every 1000000 --num_samples 9
 --sample_steps 20 --workers $W --device $DEV --max_minutes $TMIN"
for e in 5 15; do
  # shellcheck disable=SC2086  # the option lists split into words on purpose
  timeout "$TT" $PY -m pipelines.training.train_diffusion_teacher $TEACHER --out_dir "$RUNS/teacher_gpu_e$e" \
    --eye_weight "$e" > "$LOGS/teacher_e$e.log" 2>&1 &
done
wait
say "teachers done"; tail -n 3 "$LOGS"/teacher_e*.log

say "DMD2 from each teacher"
STUDENT="--batch $DB --steps 5000 --max_train_minutes $DMIN --lr_generator 1.5e-4 --lr_fake 1.5e-4
 --fake_updates 3 --real_images $N --bank_cache $RUNS/cache --captions_per_image 2 --mixed_precision no
 --log_every 20 --sample_every 1000000 --checkpoint_every 1000000 --num_samples 9 --eval_prompts $EP
 --workers $W --device $DEV"
for e in 5 15; do
  if [ -f "$RUNS/teacher_gpu_e$e/pipeline/model_index.json" ]; then
    # shellcheck disable=SC2086
    timeout "$DT" $PY -m pipelines.training.distill_dmd2 --teacher "$RUNS/teacher_gpu_e$e/pipeline" \
      --out_dir "$RUNS/dmd2_gpu_e$e" $STUDENT "${INIT[@]}" > "$LOGS/dmd2_e$e.log" 2>&1 &
  fi
done
wait
say "students done"; tail -n 4 "$LOGS"/dmd2_e*.log
if [ ${#INIT[@]} -gt 0 ]; then
  say "students started from $STUDENT_INIT: no compression stage"; exit 0
fi

say "compressing each student"
COMPRESS="--attention_heads 1,2,8 --drop_mid_block true --only_cross_attention true,false,false --drop_down_attention 0
 --real_images $N --bank_cache $RUNS/cache --captions_per_image 2 --batch $CB --lr 3e-4 --warmup_steps 50
 --total_steps 100000 --max_minutes $CMIN
 --first_step_share 0.6 --mixed_precision no --log_every 20 --sample_every 1000000 --checkpoint_every 1000000
 --eval_prompts $EP --workers $W --device $DEV"
for e in 5 15; do
  if [ -f "$RUNS/dmd2_gpu_e$e/pipeline/model_index.json" ]; then
    # shellcheck disable=SC2086
    timeout "$CT" $PY -m pipelines.training.compress_student --source "$RUNS/dmd2_gpu_e$e/pipeline" \
      --teacher "$RUNS/teacher_gpu_e$e/pipeline" --out_dir "$RUNS/compress_gpu_e$e" $COMPRESS \
      > "$LOGS/compress_e$e.log" 2>&1 &
  fi
done
wait
say "compressed students done"; tail -n 3 "$LOGS"/compress_e*.log
