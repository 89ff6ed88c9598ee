#!/usr/bin/env bash
# The GPU measurements the open issues ask for, as one prepared run for a lent H100/H200 (no Ray needed):
#   1. the train step per preset, eager and compiled, with MFU, and base_p4's next to the official LMD step
#      rebuilt (benchmarks/official_step.py) at the same batch, with our/official ratios (issue 14, point 3);
#   2. the real loop next to its bare step, with the host profile (issue 14, points 1-2);
#   3. with ABLATION=1 only: the ablation's exact trials through the engine at the probe-separating budget.
#   4. the projector's encode rate at 128 px, one process (issue 12's GPU figure; the pipeline needs Ray).
#   5. tests/test_gpu.py: pinned host batches, CUDA graphs in the real loop, resume on CUDA (skipped on CPU).
# Each part has its own time limit; their sum (2 x 120 + 90 + 95 + 45 + 100 s = 570 s; +5 min with ABLATION=1)
# bounds the whole, under the device tool's 10 minutes a command.
#
#   bash benchmarks/gpu_prepare.sh                                    # here first: foolbox's wheel, Fashion-MNIST
#   run(command="bash benchmarks/gpu_session.sh", carry=[".device"], timeout_s=600)   # the device tool's call
#   SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh    # a CPU rehearsal, ~2 min
# The GPU machine has torch but no Ray, Optuna or Plotly: every part runs the engine alone
# (tests/test_device_rehearsal.py runs these scripts with those imports blocked).
#
# Writes its outputs under $OUT (default runs/gpu-session): device.txt, step-b<batch>.json, step.txt, loop.txt,
# precompute.txt, gpu-tests.txt (-v: each test as it ends, kept if the part times out); with ABLATION=1 ablation.txt, ablation/results.parquet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU machine's torch is its plain python3
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the GPU machine runs the tree as is: lmd is not pip-installed there
if compgen -G ".device/whl/*.whl" >/dev/null; then  # carried by gpu_prepare.sh: foolbox (bundled photos), tqdm, pytest
  $PY -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/lmd-site .device/whl/*.whl
  export PYTHONPATH=/tmp/lmd-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -d .device/fashion-mnist && -z "${LMD_FASHION_MNIST:-}" ]]; then export LMD_FASHION_MNIST=$PWD/.device/fashion-mnist; fi

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
  timeout 120 $PY benchmarks/step_speed.py --presets $PRESETS --batch-size "$batch" --steps 30 --warmup 10 \
    $COMPILE $OFFICIAL --device "$DEVICE" --json "$OUT/step-b$batch.json" | tee -a "$OUT/step.txt" || echo "step_speed b$batch: exit $?" | tee -a "$OUT/step.txt"
done
timeout 90 $PY benchmarks/loop_speed.py $LOOP --device "$DEVICE" | tee "$OUT/loop.txt" || echo "loop_speed: exit $?" | tee -a "$OUT/loop.txt"
# The same loop with CUDA graphs (one per visible-token count; the loop's latents live on the GPU either way).
timeout 95 $PY benchmarks/loop_speed.py $LOOP --device "$DEVICE" $GRAPHS --profile-steps 0 | tee -a "$OUT/loop.txt" \
  || echo "loop_speed graphs: exit $?" | tee -a "$OUT/loop.txt"
# Issue 12: the shipped projector's encode rate at 128 px on this GPU (the one-process path; no Ray here).
timeout 45 $PY benchmarks/precompute.py --one-process --device "$DEVICE" $PRECOMPUTE --profile | tee "$OUT/precompute.txt" \
  || echo "precompute: exit $?" | tee -a "$OUT/precompute.txt"
# What only a GPU shows, as assertions: pinned batches, bit-exact resume on CUDA, CUDA graphs in Engine.fit (last:
# it compiles).
# -o addopts: pyproject's addopts ask for pytest-xdist's -n, which the GPU machine does not have.
timeout 100 $PY -m pytest -o addopts="" -v -p no:cacheprovider -rs tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu-tests.txt" \
  || echo "tests/test_gpu.py: exit $?" | tee -a "$OUT/gpu-tests.txt"
if [[ "${ABLATION:-0}" == "1" ]]; then
  timeout 300 $PY benchmarks/ablation_engine.py --device "$DEVICE" $ABL --out "$OUT/ablation" | tee "$OUT/ablation.txt" \
    || echo "ablation_engine: exit $?" | tee -a "$OUT/ablation.txt"
fi
