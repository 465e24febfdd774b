#!/usr/bin/env bash
# Train the cpu_small base model on one CUDA GPU: three recipes side by side (a small UNet
# leaves most of the GPU idle, so three processes share it), each for MINUTES of wall time
# with its cosine schedule fitted to the measured rate, then export their EMA weights and
# judge each against *training* windows (the held-out judgement is made afterwards, on any
# machine, with `python -m riffloop.music evaluate --model …`), so picking a recipe never
# looks at the held-out set.
#
# Run from the repository root on the GPU machine, with
#   .gpu/corpus  ← python -m riffloop.music pack --out .gpu/corpus   (≈ 30 MB)
#   .whl/        ← wheels of what that machine lacks (diffusers, soundfile, cffi, …)
# Writes to $OUT (default ./gpu-out): train-<run>.log, model-<run>.tar, eval.jsonl.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
MINUTES=${MINUTES:-7}
RUNS=${RUNS:-"A:256:3e-4 B:256:6e-4 C:128:3e-4"}   # name:batch:learning-rate
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Smoke test first (train a few seconds, export, sample): a broken setup fails in a minute,
# not after the whole budget.
python3 -m riffloop.music train --config cpu_small --corpus .gpu/corpus --device "${DEVICE:-cuda}" \
    --steps "${SMOKE_STEPS:-50}" --threads 4 --batch-size 64 --version smoke --out /tmp/runs/smoke \
    --export /tmp/models/smoke >"$OUT/smoke.log" 2>&1 &&
    python3 -m riffloop.music evaluate --model /tmp/models/smoke --n 8 --device "${DEVICE:-cuda}" \
        --reference train --corpus .gpu/corpus --threads 8 >>"$OUT/smoke.log" 2>&1 ||
    { tail -c 3000 "$OUT/smoke.log"; exit 1; }
tail -n 2 "$OUT/smoke.log"
rm -f "$OUT/smoke.log"
for run in $RUNS; do
    IFS=: read -r name batch lr <<<"$run"
    python3 -m riffloop.music train --config cpu_small --corpus .gpu/corpus --device "${DEVICE:-cuda}" \
        --minutes "$MINUTES" --checkpoint-minutes 1000 --threads 4 --batch-size "$batch" \
        --lr "$lr" --seed 0 --version base-v2 --out "/tmp/runs/$name" \
        --export "/tmp/models/$name" >"$OUT/train-$name.log" 2>&1 &
done
wait
for run in $RUNS; do
    name=${run%%:*}
    tail -c 600 "$OUT/train-$name.log"
    [ -d "/tmp/models/$name" ] && tar -C /tmp/models -cf "$OUT/model-$name.tar" "$name"
done
for run in $RUNS; do
    name=${run%%:*}
    [ -d "/tmp/models/$name" ] || continue
    python3 -m riffloop.music evaluate --model "/tmp/models/$name" --n 64 --device "${DEVICE:-cuda}" \
        --reference train --corpus .gpu/corpus --threads 8 \
        | sed "s/^{/{\"run\": \"$name\", /" | tee -a "$OUT/eval.jsonl"
done
