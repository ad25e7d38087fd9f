#!/usr/bin/env bash
# The whole SpikeCLIP recipe on the CIFAR-10 (JPEG) shards with the offline teacher:
#   align -> align-text -> teacher-finetune -> finetune, then zero-shot and fine-tuned top-1 of the
#   student and the task teacher on the same test images, with python -m open_clip_spiking.eval.
#
# Usage: benchmarks/finetune_cifar10.sh OUTPUT_DIR
# The student is scored once before and once after fine-tuning, by the eval module at the end, so the
# finetune stage runs without --val-data here (each validation of spikeclip-vit-s costs minutes on a CPU).
# Budgets and paths come from the environment (defaults fit a 2-core CPU in about an hour):
#   DATA          folder that contains cifar10_jpeg          (default ../shared/data/wds)
#   TEACHER_CKPT  offline teacher checkpoint           (default /tmp/teacher/lit-effnetlite0-minilm.safetensors)
#   MODEL         student config                       (default spikeclip-vit-s)
#   ALIGN_SAMPLES, FINETUNE_SAMPLES, TEACHER_SAMPLES   training images per stage
#   TEXT_STEPS    align-text steps                     TEST_SAMPLES  test images scored
#   BATCH         batch size of the image stages       WORKERS       data-loader workers
set -euo pipefail

OUT=${1:?usage: benchmarks/finetune_cifar10.sh OUTPUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${DATA:-$HERE/../../shared/data/wds}
SRC=$DATA/cifar10_jpeg
TEACHER_CKPT=${TEACHER_CKPT:-/tmp/teacher/lit-effnetlite0-minilm.safetensors}
MODEL=${MODEL:-spikeclip-vit-s}
ALIGN_SAMPLES=${ALIGN_SAMPLES:-1536}
TEXT_STEPS=${TEXT_STEPS:-300}
TEACHER_SAMPLES=${TEACHER_SAMPLES:-4000}
FINETUNE_SAMPLES=${FINETUNE_SAMPLES:-1536}
TEST_SAMPLES=${TEST_SAMPLES:-500}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-1}
PY=${PY:-python}

if [ ! -f "$SRC/classnames.txt" ]; then
    echo "no CIFAR-10 shards under $SRC; set DATA to the folder that contains cifar10_jpeg" >&2
    exit 2
fi
if [ ! -f "$TEACHER_CKPT" ]; then
    echo "teacher checkpoint $TEACHER_CKPT not found; build it with 'make teacher' or set TEACHER_CKPT" >&2
    exit 2
fi
mkdir -p "$OUT"
TEACHER=(--teacher lit-effnetlite0-minilm --teacher-pretrained "$TEACHER_CKPT")
TRAIN="$SRC/train/{0..9}.tar"

# A clip_benchmark dataset folder with the first TEST_SAMPLES test images, scored by every model.
TEST=$OUT/cifar10_test_subset
if [ ! -f "$TEST/test/0.tar" ]; then
    mkdir -p "$TEST/test"
    cp "$SRC/classnames.txt" "$SRC/zeroshot_classification_templates.txt" "$TEST/"
    echo 1 > "$TEST/test/nshards.txt"
    "$PY" -c 'import sys; from open_clip_spiking.train.data import copy_shard_head; copy_shard_head(*sys.argv[1:3], int(sys.argv[3]))' \
        "$SRC/test/0.tar" "$TEST/test/0.tar" "$TEST_SAMPLES"
fi

run() { echo "+ $*" >&2; /usr/bin/time -f "%e s wall, %M KiB peak RSS" "$@"; }
# A stage whose first epoch checkpoint exists is done, so a rerun of the script continues after it.
done_stage() { [ -f "$OUT/$1/epoch_1.safetensors" ] && echo "$1: done, skipped" >&2; }

done_stage align || run "$PY" -m open_clip_spiking.train --stage align --model "$MODEL" "${TEACHER[@]}" \
    --train-data "$TRAIN" --classnames "$SRC" --train-num-samples "$ALIGN_SAMPLES" \
    --batch-size "$BATCH" --workers "$WORKERS" --output-dir "$OUT/align" --log-every-n-steps 4

done_stage align_text || run "$PY" -m open_clip_spiking.train --stage align-text --model "$MODEL" "${TEACHER[@]}" \
    --pretrained "$OUT/align/latest.safetensors" --classnames "$SRC" \
    --train-num-samples $((TEXT_STEPS * 60)) --batch-size 60 --output-dir "$OUT/align_text" --log-every-n-steps 25

done_stage teacher_finetune || run "$PY" -m open_clip_spiking.train --stage teacher-finetune "${TEACHER[@]}" \
    --train-data "$TRAIN" --classnames "$SRC" --train-num-samples "$TEACHER_SAMPLES" \
    --lock-image --lr 1e-3 --lr-min 1e-4 --logit-scale 100 \
    --val-data "$TEST/test" --batch-size 64 --workers "$WORKERS" --output-dir "$OUT/teacher_finetune" \
    --log-every-n-steps 8

done_stage finetune || run "$PY" -m open_clip_spiking.train --stage finetune --model "$MODEL" \
    --pretrained "$OUT/align_text/latest.safetensors" \
    --teacher lit-effnetlite0-minilm --teacher-pretrained "$OUT/teacher_finetune/latest.safetensors" \
    --train-data "$TRAIN" --classnames "$SRC" --train-num-samples "$FINETUNE_SAMPLES" \
    --batch-size "$BATCH" --workers "$WORKERS" --output-dir "$OUT/finetune" \
    --log-every-n-steps 4

for name in teacher task_teacher; do
    if [ "$name" = teacher ]; then ckpt=$TEACHER_CKPT; else ckpt=$OUT/teacher_finetune/latest.safetensors; fi
    [ -f "$OUT/eval_$name.json" ] || run "$PY" -m open_clip_spiking.eval --model lit-effnetlite0-minilm --pretrained "$ckpt" \
        --data "$TEST/test" --classnames "$TEST" --output "$OUT/eval_$name.json" --workers "$WORKERS"
done
for name in align_text finetune; do
    [ -f "$OUT/eval_student_$name.json" ] || run "$PY" -m open_clip_spiking.eval --model "$MODEL" --pretrained "$OUT/$name/latest.safetensors" \
        --data "$TEST/test" --classnames "$TEST" --output "$OUT/eval_student_$name.json" --workers "$WORKERS"
done
echo "results in $OUT" >&2
