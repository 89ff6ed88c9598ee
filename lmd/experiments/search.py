"""The search below tune/search.py: its checks, the fixed part of every sampled trial, early stopping that is fair
to curricula, the Optuna searcher that resumes, the finalist phase and each scheduler's best trial next to its
references.

tune/search.py holds the flags, the Optuna define-by-run space and the Tuners (OptunaSearch with
TPE or NSGA-II, `ScheduleFairASHA`). The Optuna study lives in a journal file next to the Tune
results (JOURNAL_FILE), so `optuna-dashboard <storage>/<name>/optuna.journal` opens it and a resumed
search keeps one study, with one Optuna trial per Tune trial (ResumableOptunaSearch). What the
finalist phase computes from the tables is lmd.experiments.finalists.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray.tune.search.optuna import OptunaSearch

from lmd.config import ConfigError, TrainConfig
from lmd.config_build import build_config
from lmd.experiments.budget import Budget, with_steps
from lmd.experiments.driver import ExperimentSpec, build_stores
from lmd.experiments.finalists import (
    FINALISTS_PLAN_FILE,
    IMPORTANCES_FILE,
    PAPER,
    PARETO_FILE,
    Finalist,
    choose_finalists,
    finalist_seeds,
    format_finalists,
    format_importances,
    format_pareto,
    importances_record,
    json_safe,
    parameter_effects,
    pareto_record,
    seed_spread,
)
from lmd.experiments.pictures import representative_trials
from lmd.experiments.results import (
    REFERENCES_FILE,
    complete_trials,
    final_rows,
    reference_columns,
    stopped_short,
    trial_id_of,
)
from lmd.experiments.summary import beats
from lmd.experiments.trial import Placement, TrialBase, TrialSpec
from lmd.io import read_json_object, shown_uri, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"
# Random initialisations of a best trial's encoder probed for its reference: enough for an interval.
REFERENCE_SEEDS = (0, 1, 2)
# Range flag -> (lowest LOW, highest HIGH, LOW must be > 0): ratios and learning rates are positive.
RANGE_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "--end-range": (0.0, 1.0, True), "--depth-range": (1, 64, False), "--decoder-depth-range": (1, 64, False),
    "--lr-range": (0.0, 1.0, True)}


def check_search(ranges: Mapping[str, Sequence[float]], samples: int, finalists: int, seeds: int, grace: float,
                 exp: ExperimentSpec) -> None:
    """The search's own flags (ranges by flag name, counts, the first rung) and storage; ConfigError names the flag."""
    for flag, (low, high) in ranges.items():
        lowest, highest, positive = RANGE_BOUNDS[flag]
        if not low < high:
            raise ConfigError(f"{flag} {low} {high}: empty or inverted range (LOW must be < HIGH)")
        if low < lowest or high > highest or (positive and low <= 0):
            raise ConfigError(f"{flag} {low} {high}: outside ({lowest}, {highest})")
    low, high = ranges["--end-range"]
    if high >= 1.0:
        raise ConfigError(f"--end-range {low} {high}: mask ratios must stay below 1")
    if samples < 1:
        raise ConfigError(f"--samples={samples}: must be >= 1")
    if finalists < 0 or (finalists > 0 and seeds < 2):
        raise ConfigError(f"--finalists={finalists} / --seeds={seeds}: finalists must be >= 0, and re-run with >= 2 "
                          "seeds (an interval needs two)")
    if not 0.0 < grace <= 1.0:
        raise ConfigError(f"--grace={grace}: the first rung is a fraction of the budget in (0, 1]")
    if "://" in exp.storage:
        raise ConfigError(f"--storage {shown_uri(exp.storage)}: the search keeps its Optuna journal beside the "
                          "results, so it needs a filesystem path (on a cluster: a mount every node sees)")


def search_base(base: TrialBase, placement: Placement, metric: str) -> dict[str, Any]:
    """The fixed part of every sampled trial's TrainConfig, as dotted overrides; its store is built here, once.
    Search trials are scored on the half of the held-out items the search selects on ("select")."""
    overrides = {**base.overrides(placement.device), "run.steps": 1, "run.seed": 0, "data.heldout": "select"}
    build_stores([build_config(overrides=overrides)], metric, "--metric", placement.workers)
    return overrides


def budgeted(cfg: TrainConfig, budget: Budget, evals: int) -> TrainConfig:
    """`cfg` with the steps that spend `budget` (its own FLOPs per step and schedule) and `evals` evaluations at
    equal fractions of its training FLOPs. Every row it reports is an evaluation: Tune checks that each result
    carries the objective the searcher and early stopping read."""
    cfg = with_steps(cfg, budget.steps_for(cfg), evals)
    return replace(cfg, run=replace(cfg.run, log_every=cfg.run.steps))


def paper_config(fixed: dict[str, Any], budget: Budget, evals: int) -> TrainConfig:
    """The paper's configuration on the search's data and budget: the official cosine 0.15 -> 0.75 over 2/3 of
    training (the MaskConfig defaults), the preset's depths and the default learning rate."""
    return budgeted(build_config(overrides={**fixed, "mask.scheduler": "cosine"}), budget, evals)


def finalist_trials(finalists: Sequence[Finalist], configs: Mapping[str, TrainConfig], seeds: int,
                    placement: Placement) -> list[TrialSpec]:
    """Each finalist's configuration (name -> its search trial's TrainConfig, or the paper's) re-run with fresh
    seeds and scored on the held-out half the search did not select on ("confirm")."""
    trials = []
    for f in finalists:
        cfg = configs[f.name]
        for seed in finalist_seeds(seeds):
            run = replace(cfg, run=replace(cfg.run, seed=seed), data=replace(cfg.data, heldout="confirm"))
            trials.append(TrialSpec(f.name, run.validate(), placement))
    return trials


def source_configs(results: Any, finalists: Sequence[Finalist]) -> dict[str, TrainConfig]:
    """finalist name -> the TrainConfig of the search trial it re-runs (from that trial's TrialSpec)."""
    by_trial = {trial_id_of(r): r.config["trial"] for r in results if r.path and "trial" in (r.config or {})}
    out = {}
    for f in finalists:
        if f.source_trial not in by_trial:
            raise ConfigError(f"finalist {f.name}: its search trial {f.source_trial} has no config in the results")
        out[f.name] = TrialSpec.from_dict(by_trial[f.source_trial]).cfg
    return out


TUNE_TRIAL_ATTR = "tune_trial_id"  # user attribute: which Tune trial an Optuna trial was asked for


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that resumes with one Optuna trial per Tune trial, wherever the driver was killed.

    Tune saves its trials, then the searcher, a moment later, and asks the searcher for trials in
    between. Each Optuna trial records the Tune trial it was asked for (a user attribute, in the
    study's journal at once), so a restore can tell, for each RUNNING Optuna trial its saved state
    does not know, which of two kills left it:
    - Tune saved the trial but not the searcher: Tune resumes that trial, and it gets its Optuna
      trial back (plain OptunaSearch fails with a KeyError on its first report);
    - Tune never saved the trial: no Tune trial will come back for it, so the next new Tune trial
      gets it, and Optuna replays its values (plain OptunaSearch leaves it RUNNING for ever).
    """

    _orphans: tuple[int, ...] = ()  # Optuna trial ids asked before the restore, known to no Tune trial

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Optuna is told only evaluations (training rows carry no objective; OptunaSearch would raise KeyError)."""
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if all(result.get(m) is not None for m in metrics):
            super().on_trial_result(trial_id, result)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {trial._trial_id for trial in self._ot_trials.values()}
        saved = _tune_state_text(Path(checkpoint_path).parent)
        orphans = []
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t._trial_id in known:
                continue
            tune_id = t.user_attrs.get(TUNE_TRIAL_ATTR)
            if isinstance(tune_id, str) and re.search(rf"(?<![0-9A-Za-z_]){re.escape(tune_id)}(?![0-9A-Za-z_])",
                                                      saved):
                self._ot_trials[tune_id] = optuna.Trial(self._ot_study, t._trial_id)
            else:
                orphans.append(t._trial_id)
        self._orphans = tuple(orphans)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """A trial the scheduler (ASHA) stopped before its budget's end goes to Optuna as PRUNED: its last value
        is from a smaller budget, and Optuna's TPE ranks pruned trials by their intermediate values (reported at
        every evaluation), where plain OptunaSearch would record that value as a finished trial's."""
        stopped = (result is not None and not error and trial_id not in self._completed_trials
                   and trial_id in self._ot_trials and stopped_short(result))
        if not stopped:
            super().on_trial_complete(trial_id, result, error)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self._ot_trials and self._orphans:
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, self._orphans[0])
            self._orphans = self._orphans[1:]
        params = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return params


def _tune_state_text(folder: Path) -> str:
    """The text of Tune's saved experiment state in `folder` (every trial it will resume is named there)."""
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("experiment_state-*.json")))


def search_references(results: Any, table: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """lmd.experiments.references records for each scheduler's best trial (by `metric`), keyed by the
    scheduler: the fill at its patch grid, the projector ceiling, the probe on raw inputs and on random
    encoders of the best trial's sampled geometry (REFERENCE_SEEDS initialisations).

    Best effort, like the pictures: the trials have run, and a problem here (a store gone, a trial
    without its config) is reported and leaves the references empty instead of losing the results."""
    from lmd.experiments.references import compute_references

    chosen = representative_trials(table, "best", metric)
    configs = {trial_id_of(r): r.config["trial"] for r in results  # only the chosen trials' are parsed
               if r.path and trial_id_of(r) in chosen.values() and "trial" in (r.config or {})}
    try:
        specs = {scheduler: TrialSpec.from_dict(configs[t]).cfg for scheduler, t in chosen.items() if t in configs}
        return compute_references(specs, seeds=REFERENCE_SEEDS)
    except Exception as err:  # noqa: BLE001 - reported; the report then says which references are missing
        log.warning("references: not computed (%s: %s)", type(err).__name__, err)
        print(f"references: not computed ({type(err).__name__}: {err})")
        return []


# (reference column, what the report calls it, the trial's column it judges); the ceiling is shown, not judged:
# no model on the projector's latents can beat it.
JUDGED = (("fill_psnr", "the no-model fill", "val_psnr"),
          ("random_probe_acc", "a random encoder of its geometry", "val_probe_acc"),
          ("raw_probe_acc", "the probe on raw inputs", "val_probe_acc"))


def reference_report(table: pd.DataFrame, metric: str, references: list[dict[str, Any]]) -> list[str]:
    """Each scheduler's best trial next to its references, and in words which references it beats.

    A single trial has no interval of its own: it beats a reference when it lies above the reference's
    interval (the random encoders' 95% interval; the fill and the raw probe are single numbers)."""
    final = final_rows(table, metric).set_index("trial_id")
    refs = reference_columns(references).set_index("variant") if references else pd.DataFrame()
    lines = [f"each scheduler's best trial by {metric} (among those that trained to the end of the budget), next "
             "to its references. Picked as the best of its scheduler's trials on this same validation split, its "
             "margin over a reference is optimistic:"]
    for scheduler, trial_id in sorted(representative_trials(table, "best", metric).items()):
        row = final.loc[trial_id]
        ref = refs.loc[scheduler] if scheduler in refs.index else pd.Series(dtype=float)
        value = {column: float(row.get(column, math.nan)) for column in ("val_psnr", "val_probe_acc")}
        known = {column: float(ref.get(column, math.nan)) for column in refs.columns} | value
        stopped = (f", stopped early at step {int(row['step'])} of {int(row['total_steps'])}: no trial of it finished"
                   if stopped_short(row) else "")
        text = (f"  {scheduler} ({trial_id}{stopped}): PSNR {_shown(known, 'val_psnr', '.2f')} dB (no-model fill "
                f"{_shown(known, 'fill_psnr', '.2f')}, ceiling {_shown(known, 'ceiling_psnr', '.2f')})")
        if not math.isnan(value["val_probe_acc"]):
            text += (f"; probe {value['val_probe_acc']:.3f} (random encoder {_shown(known, 'random_probe_acc', '.3f')}"
                     f" ± {_shown(known, 'random_probe_acc_ci95', '.3f')}, raw inputs "
                     f"{_shown(known, 'raw_probe_acc', '.3f')})")
        verdicts: dict[str, list[str]] = {"yes": [], "no": [], "n/a": []}
        for column, name, mine in JUDGED:
            if math.isnan(value[mine]):
                continue  # not recorded by this search (a PSNR-only or probe-only store): nothing to judge
            ref_half = known.get(f"{column}_ci95", 0.0)
            verdicts[beats(value[mine], 0.0, known.get(column, math.nan),
                           0.0 if math.isnan(ref_half) else ref_half)].append(name)
        said = [f"{word} {', '.join(names)}" for word, names in
                (("beats", verdicts["yes"]), ("does not beat", verdicts["no"]), ("no reference for", verdicts["n/a"]))
                if names]
        lines.append(text + (": " + "; ".join(said) if said else ""))
    return lines


def _shown(numbers: dict[str, float], column: str, fmt: str) -> str:
    number = numbers.get(column, math.nan)
    return "-" if math.isnan(number) else format(number, fmt)


def plan_finalists(folder: Path, results: Any, table: pd.DataFrame, metric: str, count: int,
                   paper: TrainConfig) -> tuple[list[Finalist], dict[str, TrainConfig]]:
    """The finalists and their configurations: the `count` best of the search's table and the paper's, or, on
    --resume, the ones a killed driver chose (FINALISTS_PLAN_FILE, written before their first trial)."""
    path = folder / FINALISTS_PLAN_FILE
    if path.is_file():
        saved = read_json_object(path, "the finalist plan", ConfigError)
        try:
            return ([Finalist.from_dict(f) for f in saved["finalists"]],
                    {name: TrainConfig.from_dict(raw) for name, raw in saved["configs"].items()})
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ConfigError(f"{path}: not a finalist plan ({type(err).__name__}: {err}); remove it to choose the "
                              "finalists again from the search's results") from None
    chosen = choose_finalists(table, metric, count)
    configs = {**source_configs(results, chosen), PAPER: paper}
    params = {"scheduler": paper.mask.scheduler, "mask_start": paper.mask.start, "mask_end": paper.mask.end,
              "mask_ramp": paper.mask.ramp, "depth": paper.model.depth, "decoder_depth": paper.model.decoder_depth,
              "lr": paper.optim.lr}
    finalists = [*chosen, Finalist(PAPER, None, None, None, params)]
    write_json_atomic(path, {"finalists": [f.to_dict() for f in finalists],
                             "configs": {name: cfg.to_dict() for name, cfg in configs.items()}})
    return finalists, configs


def report(exp: ExperimentSpec, results: Any, table: pd.DataFrame, record: dict[str, Any] | None, metric: str,
           objectives: bool) -> None:
    """Print (and write) the answer first, then the front, the importances and each scheduler's best search trial
    next to its references."""
    if record is not None:
        print(format_finalists(record))
    else:
        print("answer: none: no finalist phase (--finalists 0); the search trials below are one seed each, picked "
              "on the split they are scored on")
    if objectives:
        pareto = pareto_record(table, metric)
        write_json_atomic(exp.folder / PARETO_FILE, json_safe(pareto))
        print(format_pareto(pareto))
    done, _ = complete_trials(table)
    imp = importances_record(study_importances(exp, objectives), parameter_effects(table, metric), metric,
                             trials=int(done.dropna(subset=[metric])["trial_id"].nunique()),
                             evaluator="FanovaImportanceEvaluator",
                             seed_spread=seed_spread(record) if record is not None else None)
    write_json_atomic(exp.folder / IMPORTANCES_FILE, json_safe(imp))
    print(format_importances(imp))
    references = search_references(results, table, metric)  # on the selection half, for each best trial
    write_json_atomic(exp.folder / REFERENCES_FILE, {"references": references})
    print("\n".join(reference_report(table, metric, references)))


def study_importances(exp: ExperimentSpec, objectives: bool) -> dict[str, float]:
    """fANOVA importances of the parameters every trial has, over the study's completed trials (on the first
    objective); {} with fewer than two, or when fANOVA cannot fit them (e.g. every trial has one value)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        journal = JournalStorage(JournalFileBackend(str(exp.folder / JOURNAL_FILE)))
        study = optuna.load_study(study_name=exp.name, storage=journal)
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) < 2:
            return {}
        shared = sorted(set.intersection(*(set(t.params) for t in complete)))
        return dict(get_param_importances(study, params=shared, evaluator=FanovaImportanceEvaluator(seed=0),
                                          target=(lambda t: t.values[0]) if objectives else None))
    except (RuntimeError, ValueError, KeyError) as err:
        print(f"importances: not computed ({type(err).__name__}: {err})")
        return {}
