"""Results are never destroyed or emptied: a torn row costs that row, a table never shrinks, an interrupted
experiment exits with the preempted code and writes nothing final, and resumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from lmd.entry import EXIT_PREEMPTED
from lmd.experiments.results import ShrinkingResults, reported_rows, tidy_table, write_table
from tests.conftest import SMALL_RUN

REPO = Path(__file__).resolve().parent.parent


def _trial_folder(root: Path, name: str, steps: list[int], torn: bool) -> SimpleNamespace:
    """A Tune trial folder whose result.json holds a row per step and, with `torn`, half of one more line: what a
    kill during Tune's append leaves."""
    folder = root / name
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "val_psnr": 10.0 + s, "variant": "v", "seed": 0, "samples_seen": s,
                         "wall_seconds": 1.0, "config": {"trial": {}}}) for s in steps]
    text = "\n".join(lines) + "\n"
    if torn:
        text += json.dumps({"step": 99, "val_psnr": 1.0})[:17]
    (folder / "result.json").write_text(text)
    return SimpleNamespace(path=str(folder), metrics_dataframe=None)


def test_a_torn_last_line_costs_that_line_never_the_trials_rows(tmp_path):
    result = _trial_folder(tmp_path, "t0", [10, 20, 30], torn=True)
    rows = reported_rows(result)
    assert rows["step"].tolist() == [10, 20, 30] and "config" not in rows
    table = tidy_table([result, _trial_folder(tmp_path, "t1", [10, 20], torn=False)], devices_per_trial=1.0)
    assert table.groupby("trial_id").size().to_dict() == {"t0": 3, "t1": 2}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_results_table_that_would_shrink_is_refused_and_the_old_one_kept(tmp_path):
    full = pd.DataFrame({"trial_id": ["a", "a", "b"], "step": [1, 2, 1], "val_psnr": [1.0, 2.0, 3.0]})
    path = tmp_path / "results.parquet"
    write_table(full, path)
    before = _digest(path)
    with pytest.raises(ShrinkingResults, match="kept as it is.*0 rows of 0 trials where it holds 3 rows of 2"):
        write_table(full.iloc[0:0], path)
    with pytest.raises(ShrinkingResults, match="missing b"):
        write_table(full[full["trial_id"] == "a"], path)
    assert _digest(path) == before
    grown = pd.concat([full, pd.DataFrame({"trial_id": ["c"], "step": [1], "val_psnr": [4.0]})], ignore_index=True)
    write_table(grown, path)  # more rows: fine
    assert len(pd.read_parquet(path)) == 4


def test_an_interrupted_experiment_exits_preempted_writes_nothing_final_and_resumes(tmp_path):
    args = [sys.executable, str(REPO / "tune" / "ablation.py"), "--variants", "pixel_mae", "--seeds", "2", *SMALL_RUN,
            "--budget", "600", "--evals", "6", "--storage", str(tmp_path)]  # the interrupt lands mid-run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    experiment, deadline = tmp_path / "ablation", time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not any(
            r.read_text().strip() for r in experiment.glob("*/result.json")):
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and returns with trials unfinished
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "continue with --resume" in err.strip().splitlines()[-1]
    assert not (experiment / "results.parquet").exists() and not (experiment / "summary.json").exists()
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_parquet(experiment / "results.parquet")
    assert table["trial_id"].nunique() == 2 and not table.duplicated(["trial_id", "step"]).any()
