#!/usr/bin/env bash
# Rehearse benchmarks/gpu_session.sh at CPU size in a Python built like the lent GPU machine's, before a session.
#
# tests/test_device_rehearsal.py rehearses in the project's own venv with Ray, Optuna and Plotly blocked; that
# venv still has torch 2.14, Python 3.11 and the project's pins. The GPU machine has Python 3.12, torch 2.11 and
# its image's packages (/work/.library/device/KINDS.md lists them: tqdm, pytest with pytest-xdist, -timeout, -cov,
# -mock, -benchmark and hypothesis among them; no Ray, Optuna, Plotly or foolbox). This script builds such an
# interpreter (pip, from the package index; ~2 GB, a few minutes the first time, reused after) with the packages
# the session touches, and runs the session in it with SMOKE=1 (then ABLATION=1) after benchmarks/gpu_prepare.sh,
# so what the session carries is what makes it work. By hand, not in CI (it downloads torch).
# NO_TOOLS=1 leaves tqdm and pytest out of a new venv: the session must then install the ones it carries.
#
#   bash benchmarks/gpu_rehearse.sh            # rc 0 and no "exit N" line in $OUT's files: the session is ready
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/lmd-device-venv}
if [[ -z "${PY312:-}" ]]; then  # the first that runs (a pyenv shim may exist and refuse)
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then PY312=$candidate; break; fi
  done
fi
[[ -n "${PY312:-}" ]] || { echo "gpu_rehearse: no Python 3.12 found (set PY312=/path/to/python3.12)" >&2; exit 2; }
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY312" -m venv "$VENV"
  # The GPU machine's image: torch 2.11 and these (of its packages, those the session's imports can reach).
  tools=(tqdm pytest pytest-xdist pytest-timeout pytest-cov pytest-mock pytest-benchmark hypothesis)
  [[ "${NO_TOOLS:-0}" == "1" ]] && tools=()
  "$VENV/bin/pip" install -q torch==2.11.0 einops safetensors numpy pyarrow pandas scikit-image scikit-learn pyyaml \
    "${tools[@]}"
fi
bash benchmarks/gpu_prepare.sh >/dev/null
rm -rf /tmp/lmd-site  # gpu_session.sh installs the carried wheels here, as it does on the GPU machine
OUT=${OUT:-/tmp/lmd-gpu-rehearsal}
rm -rf "$OUT"
# device_site blocks Ray & co. as the GPU machine lacks them (they are not in this venv either; belt and braces).
# The two device calls a session makes: every part, then ABLATION=1 alone (each into its own $OUT, as there).
OUT=$OUT/session SMOKE=1 PYTHON="$VENV/bin/python" PYTHONPATH=tests/device_site bash benchmarks/gpu_session.sh
OUT=$OUT/ablation SMOKE=1 ABLATION=1 PYTHON="$VENV/bin/python" PYTHONPATH=tests/device_site bash benchmarks/gpu_session.sh
if grep -rlE ": (pip install )?exit [0-9]" "$OUT" --include="*.txt"; then
  echo "gpu_rehearse: a part failed (files above)" >&2; exit 1
fi
for out in "$OUT/session" "$OUT/ablation"; do  # what the device tool would bring back: 8 files at most
  (( $(find "$out" -type f | wc -l) <= 8 )) || { echo "gpu_rehearse: more than 8 files under $out" >&2; exit 1; }
done
echo "gpu_rehearse: every part ran in $VENV ($("$VENV/bin/python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
