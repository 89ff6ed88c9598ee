#!/usr/bin/env bash
# Run HERE, before a lent GPU session: puts what gpu_session.sh needs and the GPU machine lacks into .device/
# (git-ignored), which the device call carries:
#   .device/whl/            pure-Python wheels (~3 MB): foolbox, which the GPU image lacks (the bundled photos' ImageNet
#                           JPEGs live in it, and the precompute part encodes those photos); tqdm (lmd.data imports it)
#                           and pytest with its dependencies (the GPU tests), which the image has today: gpu_session.sh
#                           installs those two only where the interpreter lacks them.
#   .device/fashion-mnist/  the four IDX files (30 MB), for ABLATION=1 (the ablation trains on Fashion-MNIST).
# Then, with the device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".device"], timeout_s=600)
# The tree plus .device is ~48 MB, under the 64 MiB that travels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .device/whl .device/fashion-mnist
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .device/whl foolbox==3.3.4 tqdm==4.70.1 \
  pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
src=${LMD_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
cp "$src"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz .device/fashion-mnist/
du -sh .device
