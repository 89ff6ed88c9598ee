"""The GPU session's scripts run where a lent GPU runs them: without Ray, Optuna or Plotly installed.

Lent GPU time is rare (15 minutes a session), and `benchmarks/gpu_session.sh` is prepared ahead of it.
These tests run each of its commands at CPU size in a Python where those packages cannot be imported
(tests/device_site/sitecustomize.py), and check each prints or writes its figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "device_site"


def run_as_on_device(*argv: str, **extra_env: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{SITE}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1", **extra_env}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(argv)} failed on the rehearsed GPU machine:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_blocked_packages_are_really_absent():
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    for package in ("ray", "optuna", "plotly"):
        proc = subprocess.run([sys.executable, "-c", f"import {package}"], env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and "not installed on the lent GPU machine" in proc.stderr, package


def test_step_speed_with_the_official_step_needs_neither_ray_nor_photos(tmp_path):
    out = tmp_path / "step.json"
    run_as_on_device("benchmarks/step_speed.py", "--presets", "tiny", "--batch-size", "8", "--steps", "2",
                     "--warmup", "1", "--official", "tiny", "--device", "cpu", "--json", str(out))
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    modes = {(r["preset"], r["mode"]) for r in rows}
    assert ("tiny", "eager") in modes and any("official" in m for _, m in modes), modes
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_loop_speed_prints_the_loop_to_step_ratio(tmp_path):
    stdout = run_as_on_device("benchmarks/loop_speed.py", "--preset", "tiny", "--batch-size", "8", "--steps", "4",
                              "--warmup", "2", "--log-every", "1", "--profile-steps", "0", "--device", "cpu")
    ratio = [line for line in stdout.splitlines() if line.startswith("loop / step:")]
    assert ratio and float(ratio[0].split()[3]) > 0, stdout


def test_precompute_one_process_encodes_the_bundled_photos(tmp_path):
    stdout = run_as_on_device("benchmarks/precompute.py", "--one-process", "--items", "16", "--num-val", "8",
                              "--repeats", "1", "--batch-size", "8", "--device", "cpu")
    assert "images/s" in stdout, stdout


def test_lmd_train_runs_on_the_engine_alone(tmp_path):
    run_dir = tmp_path / "run"
    stdout = run_as_on_device("-m", "lmd.cli", "train", "--dataset", "synthetic", "--preset", "tiny", "--steps", "3",
                              "--batch-size", "8", "--run-dir", str(run_dir), "--device", "cpu")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["final_loss"] > 0, summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "val_masked_mse" in rows[-1], rows[-1]
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").exists()


def test_the_gpu_tests_collect_without_ray_or_xdist():
    # As gpu_session.sh runs them: no plugin autoload (the GPU image's plugins must not stop the run), so no
    # pytest-xdist either, and pyproject's `-n 2` must not reach pytest.
    stdout = run_as_on_device("-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-rs",
                              "tests/test_gpu.py", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "4 skipped" in stdout or "4 passed" in stdout, stdout
