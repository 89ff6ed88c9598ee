"""The search as an experiment: equal compute per trial, rungs in FLOPs fair to curricula, finalists with fresh
seeds on a held-out half, verdicts against the paper's configuration, the Pareto front. Unit tests on plain
tables and Ray's own ASHA brackets; the real search runs are in tests/test_experiments.py and below."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
from ray.tune.schedulers import TrialScheduler

from lmd.experiments.budget import Budget
from lmd.experiments.early_stopping import ScheduleFairASHA, with_clock
from lmd.experiments.finalists import (
    FINALIST_SEED0,
    PAPER,
    Finalist,
    choose_finalists,
    difference,
    finalists_record,
    parameter_effects,
    pareto_front,
    pareto_record,
    verdict,
)
from lmd.experiments.search import finalist_trials
from lmd.experiments.trial import PLANNED_FLOPS, Placement, TrialBase, TrialSpec
from lmd.flops import run_flops, step_flops
from tests.conftest import SMALL_DATA, tune_script

REPO = Path(__file__).resolve().parent.parent


def _space(budget: Budget, depth_range=(1, 4), decoder_depth_range=(1, 3)):
    base = TrialBase(preset="mini_p1", dataset="synthetic", projector="", resolution=32, batch_size=16,
                     num_train=64, num_val=16, num_probe=0).overrides("cpu")
    return tune_script("search").SearchSpace({**base, "run.steps": 1}, Placement(), budget, evals=4,
                                             schedulers=("uniform", "piecewise", "cosine", "constant"),
                                             end_range=(0.5, 0.9), depth_range=depth_range,
                                             decoder_depth_range=decoder_depth_range, lr_range=(3e-4, 3e-3))


def test_sampled_configurations_of_different_depths_spend_the_same_training_flops():
    budget = Budget("flops", 0.05)
    space = _space(budget)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    specs = [TrialSpec.from_dict(space(study.ask())["trial"]) for _ in range(12)]
    depths = {(s.cfg.model.depth, s.cfg.model.decoder_depth) for s in specs}
    assert len(depths) >= 4 and len({s.cfg.run.steps for s in specs}) >= 4  # depths differ, so do the step counts
    for s in specs:
        spent = run_flops(s.cfg)
        # at least the budget, and over it by less than one step (well within 5%)
        assert 0.05e12 <= spent < 0.05e12 + step_flops(s.cfg, 0.0) and spent <= 1.05 * 0.05e12
        assert s.cfg.run.evals == 4 and s.seed == 0
    # At equal steps the deepest and the shallowest would differ by far more than 5%.
    deep = max(specs, key=lambda s: s.cfg.model.depth + s.cfg.model.decoder_depth)
    shallow = min(specs, key=lambda s: s.cfg.model.depth + s.cfg.model.decoder_depth)
    at_equal_steps = run_flops(replace(deep.cfg, run=replace(deep.cfg.run, steps=shallow.cfg.run.steps)))
    assert at_equal_steps > 1.5 * run_flops(shallow.cfg)


class _Trial(SimpleNamespace):
    """What a Tune scheduler reads of a trial: its id and config."""


def _trial(trial_id: str, scheduler: str) -> _Trial:
    return _Trial(trial_id=trial_id, config={"trial": {"variant": scheduler}})


def _row(value: float, spent: float, ratio: float = 0.75, end: float = 0.75) -> dict:
    return {"val_psnr": value, "train_flops": spent * 1e12, PLANNED_FLOPS: 1e12, "mask_ratio": ratio, "mask_end": end}


def test_rungs_are_in_training_flops_and_compare_within_a_scheduler_once_its_ramp_has_ended():
    asha = ScheduleFairASHA("val_psnr", "max", grace=0.5)
    trials = {name: _trial(name, scheduler) for name, scheduler in
              (("c1", "constant"), ("c2", "constant"), ("c3", "constant"), ("k1", "cosine"), ("k2", "cosine"))}
    for t in trials.values():
        asha.on_trial_add(None, t)
    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    # Before the first rung (half the FLOPs) nothing is judged, however bad.
    assert asha.on_trial_result(None, trials["c1"], _row(15.0, 0.25)) == go
    assert asha.on_trial_result(None, trials["c1"], _row(15.0, 0.5)) == go  # the rung's first: nothing to beat
    assert asha.on_trial_result(None, trials["c2"], _row(16.0, 0.5)) == go
    # At the rung (within float rounding of it), below the constant trials' median: stopped.
    assert asha.on_trial_result(None, trials["c3"], _row(10.0, 0.5 * (1 - 1e-12))) == stop
    # A cosine trial is not compared with the constant ones: a worse value at the rung is its group's first.
    assert asha.on_trial_result(None, trials["k1"], _row(11.0, 0.5)) == go
    # A cosine trial still mid-ramp at the rung is not judged there (it would look worse than it will be), nor later
    # at that rung with a more trained value than the others had there: it is exempt from that rung.
    assert with_clock(_row(5.0, 0.5, ratio=0.45)) is None
    assert asha.on_trial_result(None, trials["k2"], _row(5.0, 0.5, ratio=0.45)) == go
    assert asha.on_trial_result(None, trials["k2"], _row(3.0, 0.75)) == go  # far worse, but its rung was exempt
    # The exemption counts for no one: a third cosine trial is judged against k1 alone.
    asha.on_trial_add(None, _trial("k3", "cosine"))
    assert asha.on_trial_result(None, _trial("k3", "cosine"), _row(10.0, 0.5)) == stop


def test_a_trial_is_never_stopped_at_its_last_report_it_ends_by_itself():
    # Ray's ASHA stops a trial at max_t; a stopped multi-worker trial left its Train workers' CPUs held.
    asha = ScheduleFairASHA("val_psnr", "max", grace=0.5)
    for name in ("a", "b", "c"):
        asha.on_trial_add(None, _trial(name, "constant"))
    assert asha.on_trial_result(None, _trial("a", "constant"), _row(15.0, 1.0)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, _trial("b", "constant"), _row(16.0, 1.0)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, _trial("c", "constant"), _row(1.0, 1.0)) == TrialScheduler.CONTINUE


def test_the_rung_clock_is_flops_not_steps():
    # Two trials at the same step but different FLOPs: only the one that spent half its FLOPs is at the rung.
    deep = _row(9.0, 0.5) | {"step": 100}
    shallow = _row(9.0, 0.2) | {"step": 100}
    assert with_clock(deep)["budget_spent"] == pytest.approx(0.5) and with_clock(shallow)["budget_spent"] < 0.5


def _table(rows: list[tuple[str, str, int, float]], total: int = 20) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=["trial_id", "variant", "seed", "val_psnr"])
    return table.assign(step=total, total_steps=total, val_probe_acc=0.7, train_flops=1e12, encoder_gflops=0.01,
                        scheduler="cosine", mask_start=0.15, mask_end=0.75, mask_ramp=0.6, depth=2,
                        decoder_depth=1, peak_lr=1e-3)


def _finalists_record(mine: list[float], paper: list[float]) -> dict:
    rows = [(f"f{i}", "finalist_1", FINALIST_SEED0 + i, v) for i, v in enumerate(mine)]
    rows += [(f"p{i}", PAPER, FINALIST_SEED0 + i, v) for i, v in enumerate(paper)]
    finalists = [Finalist("finalist_1", 1, "t0", 16.0, {"scheduler": "cosine"}), Finalist(PAPER, None, None, None, {})]
    references = [{"reference": "fill", "variant": name, "metric": "val_psnr", "mean": 12.0, "ci95": 0.0, "n": 1}
                  for name in ("finalist_1", PAPER)]
    return finalists_record(_table(rows), finalists, "val_psnr", [1000, 1001, 1002], references,
                            Budget().record())


@pytest.mark.parametrize(("mine", "paper", "expected"), [
    ([15.0, 15.1, 15.2], [14.0, 14.2, 14.1], "better"),  # truly better
    ([14.0, 14.6, 14.3], [14.1, 14.5, 14.2], "not separable"),  # truly equal: seed noise only
    ([13.0, 13.1, 12.9], [14.0, 14.2, 14.1], "worse"),
])
def test_the_verdict_against_the_papers_configuration_follows_the_interval_of_the_difference(mine, paper, expected):
    record = _finalists_record(mine, paper)
    row = next(r for r in record["finalists"] if r["name"] == "finalist_1")
    assert row["vs_paper"]["verdict"] == expected
    assert row["vs_paper"]["lo"] <= row["vs_paper"]["diff"] <= row["vs_paper"]["hi"]
    assert row["vs_paper"]["diff"] == pytest.approx(np.mean(mine) - np.mean(paper))
    assert row["beats"]["fill_psnr"] == "yes" and row["n"] == 3
    said = {"better": "beats", "worse": "is worse than", "not separable": "is not separable from"}[expected]
    assert "finalist_1 (cosine" in record["answer"] and said in record["answer"]


def test_an_answer_whose_winner_does_not_beat_the_fill_says_so_first():
    record = _finalists_record([11.0, 11.2, 11.1], [11.0, 11.1, 11.2])  # the fill is at 12 dB
    assert record["answer"].startswith("the search's best configuration does not beat the no-model fill")


def test_difference_interval_is_welch_and_one_seed_has_none():
    diff, lo, hi = difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert diff == pytest.approx(2.0) and lo < 0 < hi  # 2 ± t(2) * 1/sqrt(3) * ... spans 0 with 3 seeds
    assert verdict(*difference([1.0], [0.0])[1:]) == "not separable"


def test_finalists_are_the_best_distinct_finished_configurations():
    table = pd.concat([_table([("a", "cosine", 0, 15.0), ("b", "cosine", 0, 14.0), ("c", "cosine", 0, 13.0)]),
                       _table([("s", "cosine", 0, 20.0)]).assign(step=10)])  # stopped early: never a finalist
    table.loc[table["trial_id"] == "b", "depth"] = 3
    # a and c share a configuration: c is not a finalist of its own while it does
    assert [f.source_trial for f in choose_finalists(table, "val_psnr", 5)] == ["a", "b"]
    chosen = choose_finalists(table, "val_psnr", 2)
    assert [f.source_trial for f in chosen] == ["a", "b"]
    table.loc[table["trial_id"] == "c", "depth"] = 4
    assert [f.source_trial for f in choose_finalists(table, "val_psnr", 5)] == ["a", "b", "c"]
    assert chosen[0].params["lr"] == 1e-3 and chosen[0].name == "finalist_1" and chosen[0].rank == 1


def test_finalist_trials_use_fresh_seeds_and_the_half_the_search_did_not_select_on():
    from tests.conftest import tiny_config

    cfg = replace(tiny_config(), data=replace(tiny_config().data, heldout="select"))
    trials = finalist_trials([Finalist("finalist_1", 1, "t", 1.0, {}), Finalist(PAPER, None, None, None, {})],
                             {"finalist_1": cfg, PAPER: cfg}, seeds=3, placement=Placement())
    assert len(trials) == 6 and {t.cfg.data.heldout for t in trials} == {"confirm"}
    for name in ("finalist_1", PAPER):
        seeds = [t.seed for t in trials if t.variant == name]
        assert len(set(seeds)) == 3 and 0 not in seeds  # the search trained every trial with seed 0
    assert all(t.cfg.run.steps == cfg.run.steps for t in trials)  # the same budget


def test_the_selection_and_confirmation_halves_are_disjoint_and_cover_the_held_out_items():
    from lmd.data.latents import heldout_slice

    for count in (16, 17, 1000):
        select, confirm = heldout_slice(count, "select"), heldout_slice(count, "confirm")
        assert select.stop == confirm.start and select.start == 0 and confirm.stop == count
        assert heldout_slice(count, "all") == slice(0, count)


def test_pareto_front_holds_exactly_the_non_dominated_points():
    rng = np.random.default_rng(0)
    points = pd.DataFrame({"val_psnr": rng.normal(14, 1, 60).round(1),
                           "encoder_gflops": rng.uniform(0, 1, 60).round(1)})
    front = pareto_front(points, [("val_psnr", "max"), ("encoder_gflops", "min")])
    for i, p in points.iterrows():
        dominated = ((points["val_psnr"] >= p["val_psnr"]) & (points["encoder_gflops"] <= p["encoder_gflops"])
                     & ((points["val_psnr"] > p["val_psnr"]) | (points["encoder_gflops"] < p["encoder_gflops"]))).any()
        assert front[i] == (not dominated)
    assert front.any() and not front.all()


def test_pareto_record_splits_finished_trials_into_front_and_dominated():
    table = _table([("a", "cosine", 0, 15.0), ("b", "cosine", 0, 14.0), ("c", "cosine", 0, 13.0)])
    table["encoder_gflops"] = [0.03, 0.01, 0.02]  # c: worse and dearer than b
    record = pareto_record(table, "val_psnr")
    assert [p["trial_id"] for p in record["front"]] == ["b", "a"]  # sorted by cost
    assert [p["trial_id"] for p in record["others"]] == ["c"]


def test_parameter_effects_are_in_the_objectives_units():
    rows = [(f"t{i}", "cosine", 0, 14.0 + (2.0 if i % 2 else 0.0)) for i in range(6)]
    table = _table(rows).assign(depth=[1, 2, 1, 2, 1, 2], decoder_depth=1)
    effects = parameter_effects(table, "val_psnr")
    assert effects["depth"] == pytest.approx(2.0) and "decoder_depth" not in effects  # one level: no effect


def test_search_writes_finalists_a_front_and_importances(search_run):
    proc, experiment = search_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    answer = next(line for line in lines if line.startswith("answer: "))
    record = json.loads((experiment / "finalists.json").read_text())
    assert answer == f"answer: {record['answer']}"
    names = [r["name"] for r in record["finalists"]]
    assert names == ["finalist_1", PAPER] and record["heldout"] == "confirm"
    finalists = pd.read_parquet(experiment / "finalists.parquet")
    search = pd.read_parquet(experiment / "results.parquet")
    assert set(search["seed"]) == {0} and set(finalists["seed"]) == {FINALIST_SEED0, FINALIST_SEED0 + 1}
    assert finalists.groupby("variant")["trial_id"].nunique().to_dict() == {"finalist_1": 2, PAPER: 2}
    # Scored on the other half: the finalist re-runs its search trial's configuration, on other items.
    plan = json.loads((experiment / "finalists_plan.json").read_text())
    assert plan["configs"]["finalist_1"]["data"]["heldout"] == "select"  # as searched; its trials use "confirm"
    state = [json.loads(p.read_text()) for p in (experiment / "finalists").glob("*/params.json")]
    assert {s["trial"]["cfg"]["data"]["heldout"] for s in state} == {"confirm"}
    for row in record["finalists"]:
        assert row["n"] == 2 and len(row["val_psnr"]["values"]) == 2
        assert {"fill_psnr", "ceiling_psnr"} <= set(row["references"])
    pareto = json.loads((experiment / "pareto.json").read_text())
    finished = search.sort_values("step").groupby("trial_id").tail(1)
    assert len(pareto["front"]) + len(pareto["others"]) == (finished["step"] == finished["total_steps"]).sum()
    points = pd.DataFrame(pareto["front"] + pareto["others"])
    on_front = pareto_front(points, [("val_psnr", "max"), ("encoder_gflops", "min")])
    assert on_front.tolist() == [True] * len(pareto["front"]) + [False] * len(pareto["others"])
    importances = json.loads((experiment / "importances.json").read_text())
    assert importances["objective"] == "val_psnr" and importances["importances"]


# A driver killed while its finalists train resumes them: each finalist trial once, none of the search rerun.
def test_a_search_killed_during_its_finalists_resumes_each_trial_once(tmp_path):
    args = [sys.executable, str(REPO / "tune" / "search.py"), "--samples", "2", "--budget", "0.01", "--evals", "2",
            "--finalists", "1", "--seeds", "2", *SMALL_DATA, "--storage", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    experiment, deadline = tmp_path / "search", time.monotonic() + 400

    def finalist_reports() -> int:
        return sum(1 for r in (experiment / "finalists").glob("*/result.json") if r.read_text().strip())

    while finalist_reports() < 1 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert finalist_reports() >= 1 and not (experiment / "finalists.json").exists(), "not killed during finalists"
    search_rows = (experiment / "results.parquet").read_bytes()
    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (experiment / "results.parquet").read_bytes() != b"" and search_rows
    finalists = pd.read_parquet(experiment / "finalists.parquet")
    assert finalists["trial_id"].nunique() == 4  # 2 configurations x 2 seeds, none twice
    assert not finalists.duplicated(["trial_id", "step"]).any()
    record = json.loads((experiment / "finalists.json").read_text())
    assert all(r["n"] == 2 for r in record["finalists"])
    assert len([p for p in experiment.iterdir() if p.is_dir() and p.name.count("_s0_")]) == 2  # search: 2 trials


def test_the_progress_lines_match_the_results_table_and_stay_bounded(search_run):
    import re

    proc, experiment = search_run
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("search: trials", "finalists: trials"))]
    search_lines = [line for line in lines if line.startswith("search:")]
    # Not a terminal: one line per trial's end (plus the run's end) and at most one per 30 s between them.
    assert 4 <= len(search_lines) <= 4 + 1 + 60
    last = re.match(r"search: trials (\d+)/(\d+) finished, (\d+) running; ([\d.]+) of ([\d.]+) TFLOP", search_lines[-1])
    assert last, search_lines[-1]
    table = pd.read_parquet(experiment / "results.parquet")
    spent = table.sort_values("step").groupby("trial_id")["train_flops"].last().sum() / 1e12
    assert int(last[1]) == int(last[2]) == table["trial_id"].nunique() and int(last[3]) == 0
    assert float(last[4]) == pytest.approx(spent, abs=0.006) and float(last[5]) == pytest.approx(spent, abs=0.006)
    final = [line for line in lines if line.startswith("finalists:")][-1]
    assert re.match(r"finalists: trials 4/4 finished, 0 running", final), final
