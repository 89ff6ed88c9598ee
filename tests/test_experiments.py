"""The ablation and the search on real Ray Tune + Optuna, at tiny budgets: results, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from lmd.experiments.results import COLUMNS, summarize
from tests.conftest import SMALL_RUN, run_tune_script

REPO = Path(__file__).resolve().parent.parent
SMALL = SMALL_RUN


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_tune_script(script, *args, timeout=timeout)


def test_ablation_writes_a_tidy_table_and_a_summary(ablation_run):
    proc, experiment = ablation_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(experiment / "results.parquet")
    assert set(COLUMNS) <= set(table.columns)
    assert table["trial_id"].nunique() == 4
    assert sorted(table.groupby("trial_id")["step"].apply(list).tolist()) == [[10, 20]] * 4  # each report once
    assert table["val_psnr"].between(5, 60).all() and (table["device_seconds"] > 0).all()
    assert (table["workers"] == 1).all() and set(table["projector"]) == {"lmd-f8c4", "identity"}
    assert set(zip(table["variant"], table["scheduler"], strict=True)) == {("lmd_cosine", "cosine"),
                                                                          ("pixel_mae", "constant")}
    summary = json.loads((experiment / "summary.json").read_text())
    assert {r["variant"] for r in summary} == {"lmd_cosine", "pixel_mae"} and all(r["seeds"] == 2 for r in summary)
    assert "target PSNR (pixel MAE's mean final)" in proc.stdout and "lmd_cosine" in proc.stdout
    assert f"dashboard: {experiment / 'dashboard.html'}" in proc.stdout


def test_summary_statistics_and_time_to_target():
    rows = []
    for seed, (early, late) in enumerate([(10.0, 12.0), (11.0, 13.0)]):
        for step, psnr, wall in ((10, early, 1.0), (20, late, 2.0)):
            rows.append({"trial_id": f"pix{seed}", "variant": "pixel_mae", "seed": seed, "step": step,
                         "samples_seen": step, "wall_seconds": 2 * wall, "device_seconds": 2 * wall, "val_psnr": psnr,
                         "val_masked_mse_fixed": 0.1})
            rows.append({"trial_id": f"lmd{seed}", "variant": "lmd_cosine", "seed": seed, "step": step,
                         "samples_seen": step, "wall_seconds": wall, "device_seconds": wall, "val_psnr": psnr + 2,
                         "val_masked_mse_fixed": 0.2})
    summary = summarize(pd.DataFrame(rows)).set_index("variant")
    assert summary.attrs["target_psnr"] == pytest.approx(12.5)  # the baseline's mean final PSNR
    assert summary.loc["pixel_mae", "psnr"] == pytest.approx(12.5)
    assert summary.loc["pixel_mae", "psnr_ci95"] == pytest.approx(12.706 * 0.5, rel=1e-3)  # t(0.975, 1) * s / sqrt(2)
    # lmd reaches 12.5 at its first eval in one seed (1 s) and at its second in the other (2 s)...
    assert summary.loc["lmd_cosine", "time_to_target_s"] == pytest.approx(1.5)
    # ...pixel MAE only at its last eval of the seed that ends above the mean (4 s): speedup 4 / 1.5.
    assert summary.loc["pixel_mae", "reached_target"] == "1/2"
    assert summary.loc["lmd_cosine", "speedup_vs_pixel_mae"] == pytest.approx(4 / 1.5)
    assert summary.loc["pixel_mae", "speedup_ci95"] == 0.0  # the baseline against itself, exactly
    assert math.isnan(summary.loc["lmd_cosine", "speedup_ci95"])  # one baseline seed reached it: no interval


@pytest.mark.parametrize(("args", "message"), [
    (["--variants", "lmd_cosine", "nope"], "--variants: unknown nope"),
    (["--seeds", "0"], "--seeds=0"),
    (["--workers-per-trial", "2", "--gpus-per-trial", "1"], "0.5 GPU per worker"),
])
def test_ablation_bad_input_is_one_line(tmp_path, args, message):
    proc = _run("ablation.py", *args, "--storage", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ablation: error:") and message in proc.stderr


def test_search_bad_range_is_refused(tmp_path):
    proc = _run("search.py", "--end-range", "0.9", "0.5", "--storage", str(tmp_path))
    assert proc.returncode == 2 and "--end-range 0.9 0.5: empty or inverted range" in proc.stderr


def test_killed_ablation_resumes_without_rerunning_finished_trials(tmp_path):
    # Three trials on two CPUs: the third waits, so a kill after the first finishes leaves both kinds.
    args = [sys.executable, str(REPO / "tune" / "ablation.py"), "--variants", "lmd_cosine", "--seeds", "3",
            "--budget", "40", "--eval-every", "10", "--num-train", "128", "--num-val", "16",
            "--batch-size", "16", "--storage", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    experiment, deadline = tmp_path / "ablation", time.monotonic() + 300

    def finished_trials() -> set[str]:
        done = set()
        for result in experiment.glob("*/result.json"):
            lines = result.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("step") == 40:
                done.add(result.parent.name)
        return done

    while not finished_trials() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = finished_trials()
    assert before, "no trial finished before the kill"
    first_rows = {t: (experiment / t / "result.json").read_text() for t in before}
    # Existing experiment without --resume: refused, nothing overwritten.
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_parquet(experiment / "results.parquet")
    assert table["trial_id"].nunique() == 3
    assert table.groupby("trial_id")["step"].apply(lambda s: sorted(s) == [10, 20, 30, 40]).all()
    for trial in before:  # finished trials were not run again
        assert (experiment / trial / "result.json").read_text() == first_rows[trial]


def test_search_persists_one_optuna_study_with_each_trial_once(search_run):
    proc, experiment = search_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal")))
    study = optuna.load_study(study_name="search", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and len({t.number for t in trials}) == 4
    for t in trials:
        assert {"scheduler", "mask_end", "depth", "decoder_depth", "lr"} <= set(t.params)
        assert ("mask_start" in t.params) == (t.params["scheduler"] != "constant")
    table = pd.read_parquet(experiment / "results.parquet")
    assert table["trial_id"].nunique() == 4
    assert set(table["variant"]) == set(table["scheduler"]) <= {"uniform", "piecewise", "cosine", "constant"}


def test_multi_worker_trial_survives_a_driver_kill_and_trains_like_the_engine(tmp_path):
    """Driver-function pattern: each trial fits a 2-worker TorchTrainer whose rows reach Tune. The driver is
    killed after the Train run's first checkpoint; --resume refits the same run, which continues from it
    and replays the rows the new driver never saw. The result equals the single-process engine's."""
    from lmd.config import TrainConfig
    from lmd.engine import Engine
    from lmd.experiments.ablation import parse_args, trial_configs

    flags = ["--variants", "lmd_cosine", "--seeds", "1", "--budget", "40", "--eval-every", "10", "--num-train", "128",
             "--num-val", "16", "--batch-size", "16", "--workers-per-trial", "2", "--storage", str(tmp_path)]
    args = [sys.executable, str(REPO / "tune" / "ablation.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    train_runs, deadline = tmp_path / "ablation" / "train", time.monotonic() + 300
    while not list(train_runs.glob("*/step_*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    saved = sorted(p.name for p in train_runs.glob("*/step_*"))
    assert saved and "step_00000040" not in saved, f"no checkpoint before the kill, or the run had finished: {saved}"

    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "ablation" / "results.parquet").set_index("step")
    assert table.index.tolist() == [10, 20, 30, 40] and (table["workers"] == 2).all()  # none lost, none twice

    cfg = TrainConfig.from_dict(trial_configs(parse_args(flags))[0]["cfg"])
    rows = []
    Engine(cfg, tmp_path / "single", reporter=lambda row, _ckpt: rows.append(row)).fit()
    single = pd.DataFrame(rows).set_index("step")
    assert table["loss"].to_numpy() == pytest.approx(single["loss"].to_numpy(), rel=1e-4)
    assert table["val_psnr"].to_numpy() == pytest.approx(single["val_psnr"].to_numpy(), abs=0.05)


def test_killed_search_resumes_with_each_optuna_trial_once(tmp_path):
    args = [sys.executable, str(REPO / "tune" / "search.py"), "--samples", "3", "--budget", "40", "--eval-every",
            "10", "--num-train", "128", "--num-val", "16", "--batch-size", "16", "--storage", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    experiment, deadline = tmp_path / "search", time.monotonic() + 300

    def reported_trials() -> int:
        return sum(1 for r in experiment.glob("*/result.json") if r.read_text().strip())

    while reported_trials() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert reported_trials() >= 1, "no trial reported before the kill: the resume would be a fresh start"
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal")))
    trials = optuna.load_study(study_name="search", storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 3, [(t.number, t.state) for t in trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    table = pd.read_parquet(experiment / "results.parquet")
    assert table["trial_id"].nunique() == 3
    assert not table.duplicated(["trial_id", "step"]).any()
