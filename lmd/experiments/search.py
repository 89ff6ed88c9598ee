"""The search below tune/search.py: its checks, the fixed part of every sampled trial, the best trial's line.

tune/search.py holds the flags, the Optuna define-by-run space and the Tuner (OptunaSearch with
TPE, ASHA). The Optuna study lives in a journal file next to the Tune results (JOURNAL_FILE), so
`optuna-dashboard <storage>/<name>/optuna.journal` opens it and a resumed search keeps one study,
with one Optuna trial per Tune trial (ResumableOptunaSearch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from lmd.config import ConfigError, build_config
from lmd.experiments.driver import ExperimentSpec, build_stores
from lmd.experiments.trial import Placement, TrialBase

JOURNAL_FILE = "optuna.journal"
# Range flag -> (lowest LOW, highest HIGH, LOW must be > 0): ratios and learning rates are positive.
RANGE_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "--end-range": (0.0, 1.0, True), "--depth-range": (1, 64, False), "--decoder-depth-range": (1, 64, False),
    "--lr-range": (0.0, 1.0, True)}


def check_search(ranges: Mapping[str, Sequence[float]], samples: int, budget: int, exp: ExperimentSpec) -> None:
    """The search's own flags (ranges by flag name, samples, budget) and storage; ConfigError names the flag."""
    for flag, (low, high) in ranges.items():
        lowest, highest, positive = RANGE_BOUNDS[flag]
        if not low < high:
            raise ConfigError(f"{flag} {low} {high}: empty or inverted range (LOW must be < HIGH)")
        if low < lowest or high > highest or (positive and low <= 0):
            raise ConfigError(f"{flag} {low} {high}: outside ({lowest}, {highest})")
    low, high = ranges["--end-range"]
    if high >= 1.0:
        raise ConfigError(f"--end-range {low} {high}: mask ratios must stay below 1")
    if samples < 1 or budget < 1:
        raise ConfigError(f"--samples={samples} / --budget={budget}: must be >= 1")
    if "://" in exp.storage:
        raise ConfigError(f"--storage {exp.storage}: the search keeps its Optuna journal beside the results, so it "
                          "needs a filesystem path (on a cluster: a mount every node sees)")


def search_base(base: TrialBase, placement: Placement, steps: int, eval_every: int, metric: str) -> dict[str, Any]:
    """The fixed part of every sampled trial's TrainConfig, as dotted overrides; its store is built here, once."""
    overrides = {**base.overrides(placement.device), "run.steps": steps, "run.seed": 0, "run.eval_every": eval_every,
                 "run.log_every": eval_every, "run.ckpt_every": eval_every}
    build_stores([build_config(overrides=overrides)], metric, "--metric")
    return overrides


def best_trial(results: Any, metric: str, mode: str) -> str:
    """One line: the best trial's final `metric` and the values Optuna sampled for it."""
    try:
        best = results.get_best_result(metric=metric, mode=mode, scope="last")
    except RuntimeError:
        return f"best: no trial reported {metric}"
    value = best.metrics.get(metric) if best.metrics else None
    sampled = {k: v for k, v in best.config.items() if k != "trial"}  # "trial": the TrialSpec built from them
    return f"best {metric}={value if value is not None else math.nan:.3f} with {sampled}"


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose resume hands out the Optuna trials asked but never saved in Tune's state.

    Tune asks the searcher for a trial and saves its own state (trials, searcher) a moment later; a
    driver killed in between leaves a RUNNING trial in the study's journal that no Tune trial knows.
    Plain OptunaSearch asks a new one on resume, so the study holds that orphan for ever; this one
    gives the orphan to the next new Tune trial, and Optuna replays its values (a parameter already
    suggested in a trial keeps its value).
    """

    _orphans: tuple[int, ...] = ()  # Optuna trial ids asked before the restore, known to no Tune trial

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {trial._trial_id for trial in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._orphans = tuple(t._trial_id for t in running if t._trial_id not in known)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self._ot_trials and self._orphans:
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, self._orphans[0])
            self._orphans = self._orphans[1:]
        return super().suggest(trial_id)
