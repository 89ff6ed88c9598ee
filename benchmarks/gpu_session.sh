#!/usr/bin/env bash
# The GPU measurements the open issues ask for, as one prepared run for a lent H100/H200 (no Ray needed):
#   1. the train step per preset, eager and compiled, with MFU, and base_p4's next to the official LMD step
#      rebuilt (benchmarks/official_step.py) at the same batch, with our/official ratios (issue 14, point 3);
#   2. the real loop next to its bare step, with the host profile (issue 14, points 1-2);
#   3. with ABLATION=1 only: the ablation's exact trials through the engine at the probe-separating budget.
#   4. the projector's encode rate at 128 px, one process (issue 12's GPU figure; the pipeline needs Ray).
# Each part has its own time limit; their sum (2 x 130 + 100 + 120 + 60 s = 9 min; +5 min with ABLATION=1)
# bounds the whole, under the device tool's 10 minutes a command.
#
#   LMD_FASHION_MNIST=shared/fashion-mnist bash benchmarks/gpu_session.sh         # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_session.sh                                         # a CPU rehearsal, ~2 min
#
# Writes its outputs under $OUT (default runs/gpu-session): device.txt, step-b<batch>.json, step.txt, loop.txt,
# precompute.txt; with ABLATION=1 ablation.txt, ablation/results.parquet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"

if [[ "${SMOKE:-0}" == "1" ]]; then  # same commands, CPU-sized (no compile: inductor takes minutes on CPU)
  # The official step is rebuilt at the tiny preset's dims here (fp32 on CPU): a rehearsal of the command, not a figure.
  DEVICE=cpu; PRESETS="tiny"; BATCHES="64"; COMPILE=""; GRAPHS=""; PRECOMPUTE="--items 64 --num-val 16 --repeats 1"; OFFICIAL="--official tiny"; LOOP="--preset tiny --batch-size 64 --steps 20 --warmup 5"
  ABL="--variants lmd_cosine pixel_mae --seeds 2 --budget-by steps --budget 20 --evals 2 --num-train 256 --num-val 32 --num-probe 64 --batch-size 32"
else
  DEVICE=cuda; PRESETS="base_p4 large"; BATCHES="256 1024"; COMPILE="--compile"; OFFICIAL="--official base_p4"
  LOOP="--preset small --batch-size 256 --steps 300 --warmup 30"; GRAPHS="--compile --compile-mode reduce-overhead"
  PRECOMPUTE="--items 4096 --num-val 512 --batch-size 256 --shard-size 512 --repeats 2"
  # 40 TFLOP per trial: where the linear probe leaves its random-encoder band on CPU (README).
  ABL="--variants lmd_cosine no_scheduler pixel_mae --seeds 3 --budget 40 --evals 4 --target-metric val_probe_acc --batch-size 512"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"; \
  $PY -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/device.txt"

for batch in $BATCHES; do
  # The official rows (ViT-B, fp16 eager, 40 steps) add seconds, not minutes: most of this limit is compilation.
  timeout 130 $PY benchmarks/step_speed.py --presets $PRESETS --batch-size "$batch" --steps 30 --warmup 10 \
    $COMPILE $OFFICIAL --device "$DEVICE" --json "$OUT/step-b$batch.json" | tee -a "$OUT/step.txt" || echo "step_speed b$batch: exit $?" | tee -a "$OUT/step.txt"
done
timeout 100 $PY benchmarks/loop_speed.py $LOOP --device "$DEVICE" | tee "$OUT/loop.txt" || echo "loop_speed: exit $?" | tee -a "$OUT/loop.txt"
# The same loop with CUDA graphs (one per visible-token count; the loop's latents live on the GPU either way).
timeout 120 $PY benchmarks/loop_speed.py $LOOP --device "$DEVICE" $GRAPHS --profile-steps 0 | tee -a "$OUT/loop.txt" \
  || echo "loop_speed graphs: exit $?" | tee -a "$OUT/loop.txt"
# Issue 12: the shipped projector's encode rate at 128 px on this GPU (the one-process path; no Ray here).
timeout 60 $PY benchmarks/precompute.py --one-process --device "$DEVICE" $PRECOMPUTE --profile | tee "$OUT/precompute.txt" \
  || echo "precompute: exit $?" | tee -a "$OUT/precompute.txt"
if [[ "${ABLATION:-0}" == "1" ]]; then
  timeout 300 $PY benchmarks/ablation_engine.py --device "$DEVICE" $ABL --out "$OUT/ablation" | tee "$OUT/ablation.txt" \
    || echo "ablation_engine: exit $?" | tee -a "$OUT/ablation.txt"
fi
