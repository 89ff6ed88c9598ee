"""`lmd train` as users run it: the documented command, a SIGKILL mid-run and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmd.checkpoint import latest_checkpoint, load_checkpoint


def _env() -> dict[str, str]:
    # One thread in every child: bit-identical results need the same reduction order. Read at call
    # time: the session fixture points LMD_CACHE at a private folder.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# A bound only a hang exceeds: the first `lmd train` builds the default store (~50 s on a quiet 2-core machine, several
# minutes at load 10+); the suite's own time limit is the real budget.
def _lmd(*args: str, timeout: float = 1500, deterministic: bool = True) -> subprocess.CompletedProcess:
    env = _env() if deterministic else {**os.environ}  # as a user runs it: all cores (it builds the store)
    return subprocess.run([sys.executable, "-m", "lmd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_documented_train_command_runs_on_default_data(tmp_path):
    run_dir = tmp_path / "run"
    proc = _lmd("train", "--preset", "tiny", "--scheduler", "cosine", "--steps", "200", "--run-dir", str(run_dir),
                deterministic=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 200
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 200 and rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((run_dir / "config.json").read_text())["mask"]["scheduler"] == "cosine"


def test_resume_on_an_unfinished_run_dir_requires_the_flag(tmp_path):
    run_dir = tmp_path / "run"
    assert _lmd("train", "--steps", "10", "--run-dir", str(run_dir)).returncode == 0
    proc = _lmd("train", "--steps", "10", "--run-dir", str(run_dir))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"lmd: error: run dir {run_dir} already holds a run (checkpoint step_00000010): pass --resume to "
        "continue it, or choose a new --run-dir"]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state, manifest = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert manifest["step"] == 300
    return state["model"]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    # Few checkpoints: each one is evaluated, and decoding the PSNR images dominates a CPU run.
    common = ["train", "--steps", "300", "--ckpt-every", "75", "--eval-every", "150", "--batch-size", "16"]
    straight = _lmd(*common, "--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "lmd.cli", *common, "--run-dir", str(crashed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(crashed / "checkpoints") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(crashed / "checkpoints")
    assert killed_at is not None and killed_at.name != "step_00000300", "the run finished before the kill"

    resumed = _lmd(*common, "--run-dir", str(crashed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed_at}" in resumed.stderr

    a, b = _final_model(tmp_path / "straight"), _final_model(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a step was logged twice after the resume"


def test_sigterm_checkpoints_and_exits_as_preempted_then_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--steps", "300", "--log-every", "5", "--ckpt-every", "1000",
            "--eval-every", "1000", "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "lmd.cli", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the run never logged a row"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # preempted: neither finished (0) nor failed (1)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] is True and 0 < summary["step"] < 300
    assert f"preempted at step {summary['step']}" in err
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{summary['step']:08d}"
    resumed = _lmd(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) | {"final_loss": None} == {
        **summary, "step": 300, "preempted": False, "final_loss": None,
        "checkpoint": str(run_dir / "checkpoints" / "step_00000300")}
