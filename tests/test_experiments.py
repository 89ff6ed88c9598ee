"""The ablation and the search on real Ray Tune + Optuna, at tiny budgets: results, resume, bad input."""

from __future__ import annotations

import importlib.util
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

from lmd.experiments.results import COLUMNS
from lmd.experiments.summary import crossing, format_summary, log_interval, speedup, summarize, verdicts
from tests.conftest import SMALL_RUN, SMALL_SEARCH, run_tune_script, tune_script

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
    steps = table.groupby("trial_id")["step"].apply(list)
    assert all(s == sorted(set(s)) for s in steps)  # each report once
    # Evaluations at equal fractions of each trial's FLOPs: pixel MAE's constant ratio gives steps 10 and 20; the
    # cosine schedule's dearer early steps spend half its FLOPs before step 10 (its rows also log step 10).
    evals = table.dropna(subset=["val_psnr"]).groupby("trial_id")["step"].apply(list)
    assert all(evals[t] == [10, 20] for t in evals.index if t.startswith("pixel_mae"))
    assert all(evals[t][0] < 10 and evals[t][1] == 20 for t in evals.index if t.startswith("lmd_cosine"))
    assert all(steps[t] == [evals[t][0], 10, 20] for t in steps.index if t.startswith("lmd_cosine"))
    assert table["val_psnr"].dropna().between(5, 60).all() and (table["device_seconds"] > 0).all()
    assert (table["workers"] == 1).all() and set(table["projector"]) == {"lmd-f8c4-fmnist", "identity"}
    assert set(zip(table["variant"], table["scheduler"], strict=True)) == {("lmd_cosine", "cosine"),
                                                                          ("pixel_mae", "constant")}
    # Pixel MAE as published: 4x the latent's tokens (32 px, 4 px patches = 64 against a 4x4 latent's 16).
    assert dict(zip(table["variant"], table["tokens"], strict=True)) == {"lmd_cosine": 16, "pixel_mae": 64}
    evals = table.dropna(subset=["val_psnr"])
    assert evals["val_probe_acc"].between(0, 1).all() and (table["train_flops"] > 0).all()
    # The FLOPs column is cumulative and grows with the step.
    assert (table.sort_values("step").groupby("trial_id")["train_flops"].diff().dropna() > 0).all()
    summary = json.loads((experiment / "summary.json").read_text())
    rows = summary["variants"]
    assert {r["variant"] for r in rows} == {"lmd_cosine", "pixel_mae"} and all(r["seeds"] == 2 for r in rows)
    assert summary["target_metric"] == "val_psnr" and summary["baseline"] == "pixel_mae"
    # Every variant is shown with its references: the no-model fill and ceiling (PSNR), raw-input and
    # random-encoder probes, with a verdict against each.
    kinds = {(r["reference"], r["variant"]) for r in summary["references"]}
    assert kinds == {(k, v) for k in ("fill", "ceiling", "raw_probe", "random_probe")
                     for v in ("lmd_cosine", "pixel_mae")}
    random = [r for r in summary["references"] if r["reference"] == "random_probe"]
    assert all(r["n"] == 2 and 0 < r["mean"] <= 1 for r in random)  # one random encoder per seed
    for r in rows:
        assert r["beats_fill"] in ("yes", "no") and r["beats_random_probe"] in ("yes", "no")
        assert 5 < r["fill_psnr"] < 30 and r["ceiling_psnr"] > r["fill_psnr"]
    assert summary["budget"]["budget_by"] == "steps" and summary["budget"]["variants"]["pixel_mae"]["steps"] == 20
    assert "time to the target val_psnr" in proc.stdout and "lmd_cosine" in proc.stdout
    assert f"dashboard: {experiment / 'dashboard.html'}" in proc.stdout


def _two_variant_rows(pixel_psnr=((10.0, 12.0), (11.0, 13.0)), lmd_gain=2.0) -> list[dict]:
    """Two seeds x two evaluations (steps 10, 20) of pixel MAE and lmd_cosine. Pixel MAE costs 4x the FLOPs per step
    of the latent variant, and its clock runs 2x slower; lmd's PSNR is pixel MAE's + `lmd_gain`."""
    rows = []
    for seed, (early, late) in enumerate(pixel_psnr):
        for step, psnr in ((10, early), (20, late)):
            common = {"seed": seed, "step": step, "samples_seen": step, "val_masked_mse_fixed": 0.1, "total_steps": 20}
            rows.append({**common, "trial_id": f"pix{seed}", "variant": "pixel_mae", "train_flops": step * 4e10,
                         "wall_seconds": step / 5, "device_seconds": step / 5, "val_psnr": psnr})
            rows.append({**common, "trial_id": f"lmd{seed}", "variant": "lmd_cosine", "train_flops": step * 1e10,
                         "wall_seconds": step / 10, "device_seconds": step / 10, "val_psnr": psnr + lmd_gain})
    return rows


def test_device_seconds_use_the_devices_each_trial_held():
    """A resumed experiment keeps each trial on the resources it started with, whatever its flags now say: each
    row's own "devices" tag (from its TrialSpec) prices its wall seconds; rows without one fall back to the flags."""
    from types import SimpleNamespace

    from lmd.experiments.results import tidy_table

    def result(name: str, devices: float | None) -> SimpleNamespace:
        rows = pd.DataFrame({"variant": ["v"], "seed": [0], "step": [10], "samples_seen": [10], "wall_seconds": [30.0],
                             **({"devices": [devices]} if devices is not None else {})})
        return SimpleNamespace(metrics_dataframe=rows, path=f"/exp/{name}")

    table = tidy_table([result("two_gpus", 2.0), result("untagged", None)], devices_per_trial=4.0).set_index("trial_id")
    assert table.loc["two_gpus", "device_seconds"] == 60.0 and table.loc["untagged", "device_seconds"] == 120.0


def test_summary_statistics_and_time_to_target_at_equal_compute():
    rows = _two_variant_rows(lmd_gain=0.5)
    refs = [{"reference": "fill", "variant": v, "metric": "val_psnr", "mean": 12.9, "ci95": 0.0, "n": 1}
            for v in ("pixel_mae", "lmd_cosine")]
    summary = summarize(pd.DataFrame(rows), references=refs).set_index("variant")
    # The target is the level every baseline seed reaches: its worst final (12 dB, not the mean 12.5 that seed 0
    # would never reach).
    assert summary.attrs["target"] == pytest.approx(12.0)
    assert summary.loc["pixel_mae", "psnr"] == pytest.approx(12.5)
    assert summary.loc["pixel_mae", "psnr_ci95"] == pytest.approx(12.706 * 0.5, rel=1e-3)  # t(0.975, 1) * s / sqrt(2)
    # Interpolated crossings of 12 dB: pixel seed 0 at step 20 (its final), seed 1 at step 15 (11 -> 13); lmd seed 0
    # (10.5 -> 12.5) at step 17.5, seed 1 (11.5 -> 13.5) at step 12.5.
    assert summary.loc["pixel_mae", "reached_target"] == "2/2" and summary.loc["lmd_cosine", "reached_target"] == "2/2"
    assert summary.loc["lmd_cosine", "samples_to_target"] == pytest.approx(math.sqrt(17.5 * 12.5))
    assert summary.loc["lmd_cosine", "tflops_to_target"] == pytest.approx(math.sqrt(0.175 * 0.125))
    assert summary.loc["lmd_cosine", "speedup_tflops"] == pytest.approx(math.sqrt(0.8 * 0.6) / math.sqrt(0.175 * 0.125))
    assert summary.loc["lmd_cosine", "speedup_samples"] == pytest.approx(math.sqrt(20 * 15) / math.sqrt(17.5 * 12.5))
    assert summary.loc["pixel_mae", "speedup_tflops_lo"] == 1.0  # the baseline against itself, exactly
    assert summary.loc["lmd_cosine", "speedup_tflops_lo"] < summary.loc["lmd_cosine", "speedup_tflops"]
    assert summary.loc["lmd_cosine", "censoring"] == "" and summary.loc["lmd_cosine", "first_eval_crossings"] == 0
    # A t-interval over two seeds reaches far; its upper end is capped at what the trials spent (0.8 TFLOP).
    assert summary.loc["pixel_mae", "tflops_to_target_hi"] == pytest.approx(0.8)
    # References: lmd (13.0 +- 6.4) does not beat a 12.9 dB fill with non-overlapping intervals.
    assert summary.loc["lmd_cosine", "fill_psnr"] == 12.9 and summary.loc["lmd_cosine", "beats_fill"] == "no"
    # The target (12 dB) lies below the fill (12.9 dB): reaching it shows no learning, and the summary says so
    # (for the variant; the baseline's own target is its "does not beat" verdict).
    said = verdicts(summarize(pd.DataFrame(rows), references=refs))
    assert [v for v in said if "is within or below" in v] == [
        "lmd_cosine: the target 12.000 is within or below its no-model fill (12.900): reaching it does not show "
        "learning, so its time-to-target measures where its input space starts, not a speed-up"]
    low_fill = [{**r, "mean": 11.9} for r in refs]  # a target above the reference: nothing to say
    assert not [v for v in verdicts(summarize(pd.DataFrame(rows), references=low_fill)) if "is within or below" in v]


def test_on_a_twin_of_the_baseline_every_baseline_seed_reaches_the_worst_final_but_not_the_mean():
    """benchmarks/target_null.py's simulated ablations: the worst-final target is reached by every baseline seed, so
    the twin's speed-up is never censored for want of baseline seeds; a mean-final target always leaves one short."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("target_null", REPO / "benchmarks" / "target_null.py")
    null = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(null)
    rng = np.random.default_rng(1)
    for _ in range(5):
        table = null.simulated_ablation(rng, seeds=3, seed_sd=0.3, eval_sd=0.1)
        worst = summarize(table).set_index("variant")
        mean = summarize(table, target=null.mean_final(table)).set_index("variant")
        assert worst.loc["pixel_mae", "reached_target"] == "3/3"
        assert mean.loc["pixel_mae", "reached_target"] in ("1/3", "2/3")
        assert mean.loc["twin", "censoring"] in ("lower", "both")


def test_first_evaluation_crossings_print_an_upper_bound_and_a_one_sided_claim():
    # lmd (+2 dB) is at 12 and 13 dB at its first evaluation: both seeds meet the 12 dB target there.
    summary = summarize(pd.DataFrame(_two_variant_rows(lmd_gain=2.0)))
    lmd = summary.set_index("variant").loc["lmd_cosine"]
    assert lmd["first_eval_crossings"] == 2 and lmd["censoring"] == "lower"
    printed = format_summary(summary)
    assert "<= 0.100" in printed  # the time is only bounded: no interval over two identical bounds
    claim = next(v for v in verdicts(summary) if v.startswith("lmd_cosine: FLOPs speedup"))
    assert "at least 1x; 3x is not excluded (a lower bound" in claim and "below 3x" not in claim


def test_trials_cut_short_of_their_budget_are_left_out_and_named():
    rows = [r for r in _two_variant_rows() if not (r["trial_id"] == "pix1" and r["step"] == 20)]
    summary = summarize(pd.DataFrame(rows)).set_index("variant")
    assert summary.attrs["incomplete"] == ["pix1"]
    assert summary.loc["pixel_mae", "seeds"] == 1 and summary.loc["pixel_mae", "psnr"] == pytest.approx(12.0)
    assert "left out 1 trial(s) that stopped before the end of their budget: pix1" in format_summary(
        summarize(pd.DataFrame(rows)))


def test_without_the_baseline_there_is_no_target_and_the_summary_says_why():
    rows = [r for r in _two_variant_rows() if r["variant"] != "pixel_mae"]
    summary = summarize(pd.DataFrame(rows))
    printed = format_summary(summary)
    assert math.isnan(summary.attrs["target"])
    assert "no time to target: the baseline pixel_mae has no finished trial with val_psnr" in printed
    assert "nan" not in printed.split("no time to target")[1] and "FLOPs speedup" not in printed


@pytest.mark.parametrize("lo, hi, bound, claim", [
    (1.2, 2.0, "", "at least 1x but below 3x"),
    (0.8, 2.0, "", "spans 1x (not separable from the baseline)"),
    (1.4, 3.5, "", "above 1x, and 3x lies within its interval"),
    (0.8, 3.5, "", "spans 1x (not separable from the baseline)"),
    (1.2, 2.0, "lower", "at least 1x; 3x is not excluded"),  # a lower bound cannot exclude 3x
    (3.2, 5.0, "lower", "above 3x"),
    (0.5, 0.9, "lower", "no claim: its interval reaches below 1x"),  # nor show a slowdown
    (1.2, 2.0, "upper", "below 3x; faster than 1x is not shown"),  # an upper bound cannot show "at least 1x"
    (0.5, 0.9, "upper", "below 1x"),
    (3.2, 5.0, "upper", "no claim: its interval reaches above 3x"),
    (1.2, 2.0, "both", "no claim: censored both ways"),
])
def test_a_censored_speedup_claims_only_what_its_side_supports(lo, hi, bound, claim):
    from lmd.experiments.summary import speedup_claim

    assert speedup_claim(lo, hi, bound).startswith(claim)


def test_time_intervals_are_positive_and_speedups_are_ratios_of_geometric_means():
    centre, lo, hi = log_interval(pd.Series([1.0, 100.0]))  # a t-interval on these values would go negative
    assert centre == pytest.approx(10.0) and 0 < lo < centre < hi
    ratio, lo, hi = speedup(pd.Series([8.0, 8.2, 7.9]), pd.Series([2.0, 2.1, 1.9]))
    assert ratio == pytest.approx((8.0 * 8.2 * 7.9) ** (1 / 3) / (2.0 * 2.1 * 1.9) ** (1 / 3))
    assert 3.0 < lo < ratio < hi < 5.0
    ratio, lo, hi = speedup(pd.Series([1.0, 50.0]), pd.Series([2.0, 3.0]))  # noisy: wide, but positive
    assert 0 < lo < 1 < hi


def test_censoring_says_which_way_a_speedup_is_biased():
    from lmd.experiments.summary import bound_of

    clean = {"first": 0, "missed": 0}
    assert bound_of(clean, clean) == ""
    assert bound_of({"first": 1, "missed": 0}, clean) == "lower"  # the variant was faster than measured
    assert bound_of(clean, {"first": 0, "missed": 1}) == "lower"  # the baseline's slowest seed is missing
    assert bound_of({"first": 0, "missed": 1}, clean) == "upper"  # the variant's slowest seed is missing
    assert bound_of(clean, {"first": 1, "missed": 0}) == "upper"  # the baseline was faster than measured
    assert bound_of({"first": 1, "missed": 1}, clean) == "both"


def test_crossing_follows_the_metric_direction():
    trial = pd.DataFrame({"step": [1, 2, 3], "x": [10.0, 20.0, 30.0], "val_psnr": [9.0, 11.0, 13.0],
                          "val_masked_mse_fixed": [0.5, 0.3, 0.1]})
    assert crossing(trial, "val_psnr", 12.0, "x") == pytest.approx(25.0)
    assert crossing(trial, "val_masked_mse_fixed", 0.4, "x") == pytest.approx(15.0)  # lower is better
    assert math.isnan(crossing(trial, "val_psnr", 14.0, "x"))


def test_every_variant_gets_the_same_flops_budget():
    from lmd.experiments.ablation import budget_steps, trial_specs
    from lmd.flops import run_flops

    script = tune_script("ablation")
    exp, spec = script.experiment(script.parse_args([]))  # the default experiment
    steps = budget_steps(spec, exp.placement())
    flops = {t.variant: run_flops(t.cfg) for t in trial_specs(spec, steps, exp.placement())}
    assert set(flops) == set(script.VARIANTS)
    for variant, spent in flops.items():
        assert spent == pytest.approx(spec.budget * 1e12, rel=0.05), variant
    # ...which means unequal steps: the latent variants' 16 tokens are ~4x cheaper than MAE's 64 at the same
    # ratio; a scheduler that starts at 0.15 (many visible tokens) makes LMD's early steps dearer.
    assert steps["no_scheduler"] > 3.5 * steps["pixel_mae"]
    assert 2 * steps["pixel_mae"] < steps["lmd_cosine"] < steps["no_scheduler"]
    exp, spec = script.experiment(script.parse_args(["--budget-by", "steps", "--budget", "50"]))
    assert set(budget_steps(spec, exp.placement()).values()) == {50}


def test_a_time_budget_buys_each_variant_steps_at_its_measured_rate(monkeypatch):
    import lmd.experiments.ablation as ablation
    from lmd.flops import measure_flop_rate, steps_for_flops

    script = tune_script("ablation")
    exp, spec = script.experiment(script.parse_args(["--budget-by", "time", "--budget", "2", "--batch-size", "16",
                                                     "--variants", "no_scheduler", "pixel_mae"]))
    # The rate is measured for real, on real steps...
    rate = measure_flop_rate(ablation.variant_config(spec, "pixel_mae", steps=1, seed=0, device="cpu"), steps=1)
    assert 0 < rate < math.inf
    # ...and each variant's steps are what its rate pays for in the budget's seconds, through its own FLOPs per
    # step. At one rate for both (two wall-clock rates on a shared machine would make the comparison below a coin
    # toss: tiny steps are overhead-bound), the same seconds buy more cheap 16-token steps than MAE's 64-token ones.
    from lmd.experiments.budget import Budget

    monkeypatch.setattr(Budget, "flop_rate", lambda self, cfg: 5e9)
    steps = ablation.budget_steps(spec, exp.placement())
    for name, count in steps.items():
        assert count == steps_for_flops(ablation.variant_config(spec, name, steps=1, seed=0, device="cpu"), 2 * 5e9)
    assert steps["no_scheduler"] > steps["pixel_mae"] >= 1


def test_a_trial_spec_is_one_shape_read_back_as_written():
    from lmd.experiments.trial import Placement, TrialSpec, TrialSpecError, trial_resources
    from tests.conftest import tiny_config

    spec = TrialSpec("lmd_cosine", tiny_config(**{"run.seed": 2}), Placement(workers=2, cpus=3.0, train_storage="/x"))
    raw = json.loads(json.dumps(spec.to_dict()))  # what Tune keeps in its experiment state
    assert TrialSpec.from_dict(raw) == spec and raw["seed"] == spec.seed == 2
    assert trial_resources({"trial": raw}).bundles == [{"CPU": 0.01}]  # a multi-worker trial reserves its driver
    one = TrialSpec("pixel_mae", tiny_config(), Placement(cpus=2.0, gpus=0.5)).to_dict()
    assert trial_resources({"trial": one}).bundles == [{"CPU": 2.0, "GPU": 0.5}]
    old = {"cfg": spec.cfg.to_dict(), "variant": "lmd_cosine", "seed": 0, "workers": 1}  # the layout before TrialSpec
    with pytest.raises(TrialSpecError, match="not a TrialSpec"):
        TrialSpec.from_dict(old)
    assert spec.cfg.data.loader == "auto" and TrialSpec.from_dict(raw).cfg.data.loader == "auto"
    version_1 = TrialSpec.from_dict({**raw, "version": 1})  # saved before trials kept their loader: memory, as then
    assert version_1.cfg.data.loader == "memory" and version_1.cfg.model == spec.cfg.model


def test_the_search_space_samples_scalars_and_returns_their_trial_spec():
    from lmd.experiments.budget import Budget
    from lmd.experiments.trial import Placement, TrialBase, TrialSpec

    script = tune_script("search")
    base = TrialBase(preset="tiny", dataset="synthetic", projector="", resolution=128, batch_size=8, num_train=64,
                     num_val=16, num_probe=0).overrides("cpu")
    space = script.SearchSpace({**base, "run.steps": 1}, Placement(cpus=2.0), Budget("steps", 20), evals=2,
                               schedulers=("cosine", "constant"), end_range=(0.5, 0.9), depth_range=(1, 3),
                               decoder_depth_range=(1, 2), lr_range=(1e-4, 1e-3))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        spec = TrialSpec.from_dict(space(trial)["trial"])
        p, m = trial.params, spec.cfg.mask
        seen.add(p["scheduler"])
        assert spec.variant == m.scheduler == p["scheduler"] and spec.placement == Placement(cpus=2.0)
        assert m.end == p["mask_end"] and spec.cfg.model.depth == p["depth"] and spec.cfg.optim.lr == p["lr"]
        assert ("mask_start" in p) == (p["scheduler"] != "constant")  # conditional: constant has no start
        assert m.start <= m.end and spec.cfg.run.steps == 20 and spec.cfg.run.evals == 2
    assert seen == {"cosine", "constant"}


def _define_by_run(trial: optuna.Trial) -> None:
    trial.suggest_categorical("scheduler", ["cosine", "constant"])
    trial.suggest_float("lr", 1e-4, 1e-3, log=True)


def _study(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    """The trials of the study in tmp_path's journal, as a fresh reader sees them."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    return optuna.load_study(study_name="search", storage=storage).get_trials(deepcopy=False)


def _resumable_searcher(tmp_path: Path):
    """A ResumableOptunaSearch over tmp_path's journal, as tune/search.py builds one (a fresh one per driver)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from lmd.experiments.search import ResumableOptunaSearch

    journal = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    return ResumableOptunaSearch(_define_by_run, metric="val_psnr", mode="max", study_name="search",
                                 storage=journal, sampler=optuna.samplers.TPESampler(seed=0))


def test_a_resumed_search_gives_the_optuna_trial_its_killed_driver_asked_to_the_next_tune_trial(tmp_path):
    first = _resumable_searcher(tmp_path)
    first.suggest("t0"), first.suggest("t1")
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    asked = first.suggest("t2")  # asked, then the driver is killed before Tune saves again
    resumed = _resumable_searcher(tmp_path)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.suggest("t3") == asked  # the orphan, its values replayed
    resumed.suggest("t4")
    for tune_trial in ("t0", "t1", "t3", "t4"):  # every Tune trial of the resumed search ends
        resumed.on_trial_complete(tune_trial, {"val_psnr": 10.0, "training_iteration": 1})
    trials = _study(tmp_path)
    # t0, t1, t2 = t3, t4: one Optuna trial per Tune trial, none left RUNNING without one.
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4


def test_a_trial_tune_saved_but_its_searcher_did_not_gets_its_optuna_trial_back(tmp_path):
    first = _resumable_searcher(tmp_path)
    first.suggest("aaa0")
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("bbb1")  # Tune writes its trials (bbb1 among them), then is killed before saving the searcher:
    (tmp_path / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [
        json.dumps({"trial_id": "aaa0"}), json.dumps({"trial_id": "bbb1"})]}))
    first.suggest("ccc2")  # ...and this one Tune never saved at all
    resumed = _resumable_searcher(tmp_path)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("bbb1", {"val_psnr": 9.0, "training_iteration": 1})  # plain OptunaSearch: KeyError
    asked = resumed.suggest("ddd3")
    for tune_trial, value in (("aaa0", 10.0), ("bbb1", 11.0), ("ddd3", 12.0)):
        resumed.on_trial_complete(tune_trial, {"val_psnr": value, "training_iteration": 1})
    trials = _study(tmp_path)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3  # ccc2's trial went to ddd3
    assert [t.value for t in trials] == [10.0, 11.0, 12.0]
    assert [t.user_attrs["tune_trial_id"] for t in trials] == ["aaa0", "bbb1", "ddd3"]
    assert asked == {**trials[2].params}


def test_a_trial_asha_stopped_goes_to_optuna_as_pruned_with_its_intermediate_values(tmp_path):
    searcher = _resumable_searcher(tmp_path)
    searcher.suggest("stopped"), searcher.suggest("finished")
    for step, value in ((10, 9.0), (20, 10.0)):
        searcher.on_trial_result("stopped", {"val_psnr": value, "training_iteration": step // 10})
    searcher.on_trial_complete("stopped", {"val_psnr": 10.0, "step": 20, "total_steps": 40, "training_iteration": 2})
    searcher.on_trial_complete("finished", {"val_psnr": 11.0, "step": 40, "total_steps": 40, "training_iteration": 4})
    stopped, finished = _study(tmp_path)
    assert stopped.state == optuna.trial.TrialState.PRUNED  # (Optuna keeps its last intermediate value as its value)
    assert stopped.intermediate_values == {1: 9.0, 2: 10.0}  # what TPE ranks a pruned trial by
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.value == 11.0


def test_both_scripts_share_the_placement_and_data_flags():
    ablation, search = (tune_script(name).parse_args([]) for name in ("ablation", "search"))
    shared = ("preset", "dataset", "projector", "resolution", "batch_size", "num_train", "num_val", "num_probe",
              "address", "gpus_per_trial", "cpus_per_trial", "workers_per_trial", "storage", "resume")
    assert {k: vars(ablation)[k] for k in shared} == {k: vars(search)[k] for k in shared}


@pytest.mark.parametrize(("args", "message"), [
    (["--variants", "lmd_cosine", "nope"], "--variants: unknown nope"),
    (["--seeds", "0"], "--seeds=0"),
    (["--workers-per-trial", "2", "--gpus-per-trial", "1"], "0.5 GPU per worker"),
    (["--budget", "-1"], "--budget=-1.0: must be a positive number of TFLOP"),
    (["--dataset", "bundled", "--target-metric", "val_probe_acc", "--num-train", "32", "--num-val", "8",
      "--batch-size", "16"], "is unlabelled or --num-probe is 0"),
])
def test_ablation_bad_input_is_one_line(tmp_path, args, message):
    proc = _run("ablation.py", *args, "--storage", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ablation: error:") and message in proc.stderr


def test_a_failed_start_leaves_nothing_that_blocks_a_rerun(tmp_path):
    args = ["--variants", "pixel_mae", "--seeds", "1", *SMALL, "--address", "127.0.0.1:9", "--storage", str(tmp_path)]
    proc = _run("ablation.py", *args)
    assert proc.returncode == 1 and "no Ray cluster reachable" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "ablation").exists()  # a rerun needs no --resume, and --resume is not a dead end


def test_search_bad_range_is_refused(tmp_path):
    proc = _run("search.py", "--end-range", "0.9", "0.5", "--storage", str(tmp_path))
    assert proc.returncode == 2 and "--end-range 0.9 0.5: empty or inverted range" in proc.stderr


def test_search_checks_its_address_and_leaves_nothing_on_a_failed_start(tmp_path):
    proc = _run("search.py", "--samples", "1", *SMALL_SEARCH, "--address", "127.0.0.1:9", "--storage", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("search: error: --address=127.0.0.1:9: no Ray cluster")
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("script", ["ablation", "search"])
def test_resuming_an_experiment_of_the_old_layout_is_one_line(tmp_path, script):
    old = tmp_path / script
    old.mkdir()
    (old / "tuner.pkl").write_bytes(b"")  # Tune's state: restorable as far as Tune can tell
    (old / "args.json").write_text(json.dumps({"name": script, "seeds": 2}))  # flags only, no layout
    proc = _run(f"{script}.py", "--resume", "--storage", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{script}: error: {old}: started by an older tune/{script}.py (its trials are not TrialSpecs), so it cannot "
        "be resumed: choose another --name (analysis/dashboard.py still reads its results)"]
    nothing = _run(f"{script}.py", "--resume", "--name", "absent", "--storage", str(tmp_path))
    assert nothing.returncode == 2
    assert nothing.stderr.strip().endswith(f"{tmp_path / 'absent'}: no experiment to resume")


# Extended tier: Tune's resume after a driver kill is in the default suite through the search and the
# multi-worker trial tests; this one adds that finished trials are not rerun.
@pytest.mark.extended
def test_killed_ablation_resumes_without_rerunning_finished_trials(tmp_path):
    # Three trials on two CPUs: the third waits, so a kill after the first finishes leaves both kinds.
    args = [sys.executable, str(REPO / "tune" / "ablation.py"), "--variants", "lmd_cosine", "--seeds", "3",
            "--budget-by", "steps", "--budget", "40", "--evals", "4", "--num-train", "128", "--num-val", "16",
            "--num-probe", "64", "--batch-size", "16", "--storage", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    experiment, deadline = tmp_path / "ablation", time.monotonic() + 300

    def finished_trials() -> set[str]:
        """Trial folders Tune's experiment state (what a resume reads) records as finished. A trial whose last
        row is written but whose end Tune had not saved before the kill is unfinished, and rightly resumed."""
        done = set()
        for state in experiment.glob("experiment_state-*.json"):
            try:
                trials = json.loads(state.read_text())["trial_data"]
            except (ValueError, KeyError):  # being replaced
                continue
            done |= {t["relative_logdir"] for t in map(json.loads, (data for data, _ in trials))
                     if t["status"] == "TERMINATED"}
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
    # --resume with a different grid is refused by name instead of silently running the old one.
    changed = subprocess.run([*args, "--resume", "--evals", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "--evals: was 4, now 2" in changed.stderr.strip().splitlines()[-1]

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


def _search_table(rows: list[tuple[str, str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["trial_id", "variant", "step", "val_psnr", "val_probe_acc"])


def test_a_search_picks_each_schedulers_best_trial_by_its_own_metric():
    from lmd.experiments.pictures import representative_trials

    # a: better PSNR, worse probe; b: the reverse; c's last probe row lacks PSNR (a probe-only evaluation).
    table = _search_table([("a", "cosine", 10, 12.0, 0.70), ("a", "cosine", 20, 14.0, 0.72),
                           ("b", "cosine", 10, 11.0, 0.74), ("b", "cosine", 20, 13.0, 0.80),
                           ("c", "uniform", 10, 10.0, 0.60), ("c", "uniform", 20, math.nan, 0.90)])
    assert representative_trials(table, "best", "val_psnr") == {"cosine": "a", "uniform": "c"}
    assert representative_trials(table, "best", "val_probe_acc") == {"cosine": "b", "uniform": "c"}


def test_a_trial_stopped_early_is_not_a_best_trial_unless_none_of_its_scheduler_finished():
    from lmd.experiments.pictures import representative_trials
    from lmd.experiments.search import reference_report

    # a: stopped by ASHA at step 10 of 20 with the highest value; b: finished, lower. uniform: only a stopped trial.
    table = _search_table([("a", "cosine", 10, 15.0, 0.80), ("b", "cosine", 10, 12.0, 0.70),
                           ("b", "cosine", 20, 14.0, 0.75), ("c", "uniform", 10, 13.0, 0.72)]).assign(total_steps=20)
    assert representative_trials(table, "best", "val_psnr") == {"cosine": "b", "uniform": "c"}
    report = dict(line.strip().split(" ", 1) for line in reference_report(table, "val_psnr", [])[1:])
    assert report["cosine"].startswith("(b): PSNR 14.00 dB")
    assert report["uniform"].startswith("(c, stopped early at step 10 of 20: no trial of it finished): PSNR 13.00 dB")


def test_the_search_report_says_which_references_a_best_trial_beats_and_which_are_missing():
    from lmd.experiments.search import reference_report

    table = _search_table([("a", "cosine", 20, 14.0, 0.80), ("b", "uniform", 20, 9.0, 0.76),
                           ("c", "piecewise", 20, 13.0, math.nan)])

    def record(reference: str, variant: str, mean: float, ci95: float = 0.0) -> dict:
        return {"reference": reference, "variant": variant, "metric": "", "mean": mean, "ci95": ci95, "n": 3}

    references = [record("fill", "cosine", 11.6), record("ceiling", "cosine", 26.2),
                  record("raw_probe", "cosine", 0.77), record("random_probe", "cosine", 0.78, 0.03),
                  record("fill", "uniform", 11.6), record("raw_probe", "uniform", 0.77),
                  record("random_probe", "uniform", 0.75, 0.005), record("fill", "piecewise", 11.6)]
    lines = reference_report(table, "val_psnr", references)
    assert lines[0].startswith("each scheduler's best trial by val_psnr (among those that trained to the end")
    assert "on this same validation split, its margin over a reference is optimistic" in lines[0]
    report = dict(line.strip().split(" ", 1) for line in lines[1:])
    # 0.80 lies inside the random encoders' 0.78 ± 0.03: not beaten, though above the mean
    assert report["cosine"] == ("(a): PSNR 14.00 dB (no-model fill 11.60, ceiling 26.20); probe 0.800 (random encoder "
                                "0.780 ± 0.030, raw inputs 0.770): beats the no-model fill, the probe on raw inputs; "
                                "does not beat a random encoder of its geometry")
    assert report["uniform"].endswith("(no-model fill 11.60, ceiling -); probe 0.760 (random encoder 0.750 ± 0.005, "
                                      "raw inputs 0.770): beats a random encoder of its geometry; does not beat the "
                                      "no-model fill, the probe on raw inputs")
    # no probe recorded: nothing said about probes
    assert report["piecewise"] == "(c): PSNR 13.00 dB (no-model fill 11.60, ceiling -): beats the no-model fill"
    # references that could not be computed are named as missing, never counted as beaten
    bare = dict(line.strip().split(" ", 1) for line in reference_report(table, "val_psnr", [])[1:])
    assert bare["cosine"].endswith(": no reference for the no-model fill, a random encoder of its geometry, the probe "
                                   "on raw inputs")


def test_search_shows_each_schedulers_best_trial_next_to_its_references(search_run):
    proc, experiment = search_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(experiment / "results.parquet")
    final = table.dropna(subset=["val_psnr"]).sort_values("step").groupby("trial_id").tail(1)
    best = {v: g.sort_values(["val_psnr", "trial_id"])["trial_id"].iloc[-1] for v, g in final.groupby("variant")}

    records = json.loads((experiment / "references.json").read_text())["references"]
    kinds = {(r["variant"], r["reference"]): r for r in records}
    assert set(kinds) == {(v, ref) for v in best for ref in ("fill", "ceiling", "raw_probe", "random_probe")}
    assert all(kinds[(v, "random_probe")]["n"] == 3 for v in best)  # three random initialisations of its geometry

    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("each scheduler's best trial by val_psnr"))
    report = dict(line.strip().split(" ", 1) for line in lines[start + 1:start + 1 + len(best)])
    assert set(report) == set(best)
    for variant, text in report.items():
        row = final.set_index("trial_id").loc[best[variant]]
        assert text.startswith(f"({best[variant]}): PSNR {row['val_psnr']:.2f} dB"), text
        rand = kinds[(variant, "random_probe")]
        below_random = row["val_probe_acc"] <= rand["mean"] + rand["ci95"]
        below_fill = row["val_psnr"] <= kinds[(variant, "fill")]["mean"]
        assert ("does not beat" in text and "a random encoder of its geometry" in text.split("does not beat")[1]) \
            == below_random, text
        assert ("does not beat" in text and "the no-model fill" in text.split("does not beat")[1]) == below_fill, text

    pictures = pd.read_parquet(experiment / "pictures.parquet")  # each scheduler's best trial by the search metric
    assert dict(pictures.groupby("variant")["trial_id"].first()) == best


def test_multi_worker_trial_survives_a_driver_kill_and_trains_like_the_engine(tmp_path):
    """Driver-function pattern: each trial fits a 2-worker TorchTrainer whose rows reach Tune. The driver is
    killed after the Train run's first checkpoint; --resume refits the same run, which continues from it
    and replays the rows the new driver never saw. The result equals the single-process engine's."""
    from lmd.experiments.ablation import budget_steps, trial_specs
    from lmd.runtime import local_engine

    flags = ["--variants", "lmd_cosine", "--seeds", "1", "--budget-by", "steps", "--budget", "40", "--evals", "4",
             "--num-train", "128", "--num-val", "16", "--num-probe", "64", "--batch-size", "16",
             "--workers-per-trial", "2", "--storage", str(tmp_path)]
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
    # None lost, none twice: training rows every 10 steps, and 4 evaluations at equal fractions of the FLOPs (the
    # cosine schedule's dear early steps put the first before step 10).
    assert table.index.is_unique and {10, 20, 30, 40} <= set(table.index) and (table["workers"] == 2).all()
    evals = table.dropna(subset=["val_psnr"]).index.tolist()
    assert len(evals) == 4 and evals[0] < 10 and evals[-1] == 40

    script = tune_script("ablation")
    exp, spec = script.experiment(script.parse_args(flags))
    cfg = trial_specs(spec, budget_steps(spec, exp.placement()), exp.placement())[0].cfg
    rows = []
    local_engine(cfg, tmp_path / "single", reporter=lambda row, _ckpt: rows.append(row)).fit()
    single = pd.DataFrame(rows).set_index("step")
    assert table.index.tolist() == single.index.tolist()
    assert table["loss"].to_numpy() == pytest.approx(single["loss"].to_numpy(), rel=1e-4)
    assert table["val_psnr"].dropna().to_numpy() == pytest.approx(single["val_psnr"].dropna().to_numpy(), abs=0.05)


# Extended tier: both resume races it can hit (a trial Tune never saved; a trial Tune saved but its searcher did not)
# are tested deterministically above, without a driver kill.
@pytest.mark.extended
def test_killed_search_resumes_with_each_optuna_trial_once(tmp_path):
    args = [sys.executable, str(REPO / "tune" / "search.py"), "--samples", "3", "--budget-by", "steps", "--budget",
            "40", "--evals", "4", "--finalists", "0", "--num-train", "128", "--num-val", "16", "--num-probe", "64",
            "--batch-size", "16", "--storage", str(tmp_path)]
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
    changed = subprocess.run([*args, "--resume", "--samples", "4"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert changed.returncode == 2 and "--samples: was 3, now 4" in changed.stderr.strip().splitlines()[-1]
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


def test_experiment_help_shows_defaults_its_text_does_not_already_give():
    for script, shown in (("tune/search.py", ["sampler seed (default: 0)", "fresh seeds per finalist (default: 3)"]),
                          ("tune/ablation.py", ["(time) or steps (steps) (default: 1.6)", "--seeds SEEDS default: 3",
                                                "--preset PRESET default: mini_p1"])):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
        text = " ".join(proc.stdout.split())  # argparse wraps lines
        assert proc.returncode == 0 and all(s in text for s in shown), (script, text)
        assert "(default: )" not in text and "(default) (default" not in text, text
