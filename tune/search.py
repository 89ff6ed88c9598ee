"""Optuna search over LMD's mask schedule, depths and learning rate on Ray Tune, at equal compute, with an answer.

    python tune/search.py                                      # embedded defaults: local Ray, CPU
    python tune/search.py --samples 32 --budget 8 --finalists 5 --seeds 5
    python tune/search.py --objectives                         # quality against encoder inference FLOPs: a front
    python tune/search.py --resume                             # continue an interrupted search (either phase)
    python tune/search.py --samples 64 --budget 2000 --preset base_p4 --resolution 224 \
        --address auto --gpus-per-trial 1 --storage /shared/lmd-tune
    optuna-dashboard runs/tune/search/optuna.journal           # inspect the study

Two phases. **Search**: Optuna (TPE; NSGA-II with --sampler nsga2) samples the mask scheduler, its
start / final ratio and ramp, encoder and decoder depth and the learning rate; every trial gets the
same budget (`--budget-by flops|time|steps` and `--budget` as in tune/ablation.py: by default the
same training FLOPs, so each sampled configuration trains for the steps its own depths and schedule
spend in that budget), evaluates `--evals` times at equal fractions of its FLOPs and is scored on
one half of the held-out items. Early stopping (`ScheduleFairASHA`) has rungs in training FLOPs and
compares a trial only with trials of its own scheduler type once its ramp has ended, so a curriculum
is not stopped for being mid-ramp. **Finalists**: the `--finalists` best configurations and the
paper's (cosine 0.15 -> 0.75 over 2/3 of training) are re-run with `--seeds` fresh seeds at the same
budget and scored on the other held-out half, which nothing was selected on: mean and 95% interval of
the objective, the probe and PSNR, next to the no-model references, and a verdict against the
paper's configuration (better / worse / not separable). With `--objectives` the encoder's inference
FLOPs per image is a second objective (no early stopping: a front needs full-budget values) and
the Pareto front is written. Parameter importances are printed beside the finalists' seed noise.

Writes <storage>/<name>/: results.parquet (search trials), finalists.parquet, finalists.json (the
answer), importances.json, pareto.json (--objectives), optuna.journal, references.json (each
scheduler's best search trial), pictures.parquet and dashboard.html. The parts below this script:
lmd/experiments/ (search.py: checks, early stopping, the searcher, the finalist trials; finalists.py:
the answer from the tables; budget.py: what a budget is; trial.py: what a trial is and runs; driver.py:
the rest).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune

from lmd.config import SCHEDULERS, ConfigError
from lmd.config_build import build_config
from lmd.entry import EXIT_RUNTIME, fail
from lmd.experiments.budget import BUDGET_BY_HELP, BUDGET_HELP, BUDGET_UNITS, Budget
from lmd.experiments.driver import (
    DefaultsHelp,
    ExperimentSpec,
    add_shared_flags,
    check_start,
    experiment_session,
    finish,
    run_tuner,
    usage_errors,
    write_results,
)
from lmd.experiments.early_stopping import ScheduleFairASHA
from lmd.experiments.finalists import (
    ENCODER_COST,
    FINALISTS_FILE,
    FINALISTS_RESULTS_FILE,
    FINALISTS_RUN,
    Finalist,
    finalist_seeds,
    finalists_record,
    json_safe,
)
from lmd.experiments.progress import ProgressDisplay
from lmd.experiments.results import ShrinkingResults, tidy_table, write_table
from lmd.experiments.search import (
    JOURNAL_FILE,
    ResumableOptunaSearch,
    budgeted,
    check_search,
    finalist_trials,
    paper_config,
    plan_finalists,
    report,
    search_base,
)
from lmd.experiments.trial import Placement, TrialBase, TrialSpec, concurrent_trials, trial_dirname
from lmd.flops import run_flops
from lmd.io import write_json_atomic

PROG = "search"
METRICS = ("val_psnr", "val_probe_acc")  # both: higher is better
MODE = "max"
SAMPLERS = ("tpe", "nsga2")
# What a resumed search must share with the one it continues (the rest only places or names it).
EXPERIMENT_ARGS = ("samples", "budget_by", "budget", "evals", "metric", "grace", "finalists", "seeds", "objectives",
                   "sampler", "preset", "projector", "dataset", "resolution", "num_train", "num_val", "num_probe",
                   "batch_size", "end_range", "depth_range", "decoder_depth_range", "lr_range", "include_constant",
                   "seed", "workers_per_trial", "loader", "latents")


@dataclass(frozen=True)
class SearchSpace:
    """Optuna's define-by-run space (picklable: Tune checkpoints the searcher with it).

    Samples this trial's values, plans its steps from its own FLOPs per step and schedule (so every
    trial spends the same budget), then returns its TrialSpec as a constant beside them: every
    trial's Tune config holds a TrialSpec under "trial".
    """

    base: dict[str, Any]  # dotted TrainConfig overrides every trial shares (search_base)
    placement: Placement
    budget: Budget
    evals: int
    schedulers: tuple[str, ...]
    end_range: tuple[float, float]
    depth_range: tuple[int, int]
    decoder_depth_range: tuple[int, int]
    lr_range: tuple[float, float]

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        scheduler = trial.suggest_categorical("scheduler", self.schedulers)
        end = trial.suggest_float("mask_end", *self.end_range)
        sampled: dict[str, Any] = {"mask.scheduler": scheduler, "mask.end": end}
        if scheduler != "constant":  # conditional: a constant schedule has no start and no ramp
            sampled["mask.start"] = min(trial.suggest_float("mask_start", 0.05, 0.4), end)
            sampled["mask.ramp"] = trial.suggest_float("mask_ramp", 0.2, 1.0)
        sampled["model.depth"] = trial.suggest_int("depth", *self.depth_range)
        sampled["model.decoder_depth"] = trial.suggest_int("decoder_depth", *self.decoder_depth_range)
        sampled["optim.lr"] = trial.suggest_float("lr", *self.lr_range, log=True)
        cfg = budgeted(build_config(overrides={**self.base, **sampled}), self.budget, self.evals)
        return {"trial": TrialSpec(scheduler, cfg, self.placement).to_dict()}

    def geometries(self) -> list[Any]:
        """One config per depth pair the space can sample (a time budget measures each one's rate up front)."""
        return [build_config(overrides={**self.base, "model.depth": d, "model.decoder_depth": dd})
                for d in range(self.depth_range[0], self.depth_range[1] + 1)
                for dd in range(self.decoder_depth_range[0], self.decoder_depth_range[1] + 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelp)
    p.add_argument("--samples", type=int, default=10, help="search trials (Optuna samples)")
    p.add_argument("--budget-by", choices=list(BUDGET_UNITS), default="flops", help=BUDGET_BY_HELP)
    p.add_argument("--budget", type=float, default=1.6, help=BUDGET_HELP)
    p.add_argument("--evals", type=int, default=4, help="evaluations per trial, at equal fractions of its training "
                   "FLOPs (the early-stopping rungs fall on them)")
    p.add_argument("--metric", choices=METRICS, default="val_psnr",
                   help="objective, on held-out items: decoded PSNR (default: it separates at small budgets) or the "
                        "linear probe (the paper's measure; it leaves its random-encoder band only at ~20-40 TFLOP "
                        "per trial here); both are reported on every row")
    p.add_argument("--grace", type=float, default=0.5,
                   help="first early-stopping rung, as a fraction of the budget (then x2); 1 = no early stopping")
    p.add_argument("--finalists", type=int, default=3,
                   help="best configurations re-run with --seeds fresh seeds beside the paper's (0 = no finalists)")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds per finalist")
    p.add_argument("--objectives", action="store_true",
                   help="also minimise the encoder's inference FLOPs per image (multi-objective: a Pareto front; "
                        "no early stopping)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (both handle two objectives)")
    p.add_argument("--end-range", nargs=2, type=float, default=[0.5, 0.9], metavar=("LOW", "HIGH"))
    p.add_argument("--depth-range", nargs=2, type=int, default=[1, 4], metavar=("LOW", "HIGH"))
    p.add_argument("--decoder-depth-range", nargs=2, type=int, default=[1, 3], metavar=("LOW", "HIGH"))
    p.add_argument("--lr-range", nargs=2, type=float, default=[3e-4, 3e-3], metavar=("LOW", "HIGH"))
    p.add_argument("--include-constant", action="store_true", help="also search the constant (MAE) schedule")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--latents", default="", metavar="STORE",
                   help="search on a store made by `lmd precompute` (a folder every node sees, or s3://...); it must "
                        "match --preset, --projector and --resolution (checked and hashed once, before any trial)")
    add_shared_flags(p, name="search")  # the data, the placement, --storage/--name/--resume: as the ablation
    return p.parse_args(argv)


def experiment(args: argparse.Namespace) -> tuple[ExperimentSpec, TrialBase, Budget]:
    """The typed, validated experiment these flags describe (a bad value raises ConfigError naming its flag)."""
    exp = ExperimentSpec.from_flags(PROG, args)
    base = TrialBase.from_flags(args)
    ranges = {"--end-range": args.end_range, "--depth-range": args.depth_range,
              "--decoder-depth-range": args.decoder_depth_range, "--lr-range": args.lr_range}
    check_search(ranges, args.samples, args.finalists, args.seeds, args.grace, exp)
    if args.evals < 1:
        raise ConfigError(f"--evals={args.evals}: must be >= 1")
    budget = Budget(args.budget_by, args.budget, workers=args.workers_per_trial, cpus=args.cpus_per_trial)
    return exp.validate(args.batch_size), base.validate(), budget.validate()


def sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with usage_errors(PROG):  # bad input: one line, exit code 2
        exp, base, budget = experiment(args)
        check_start(exp, vars(args), EXPERIMENT_ARGS)  # a free folder, or a resume of the same search
        placement = exp.placement()
        fixed = search_base(base, placement, args.metric)  # builds the store
        # Every curriculum; the constant schedule (MAE's) only when asked for.
        schedulers = tuple(s for s in SCHEDULERS if s != "constant" or args.include_constant)
        space = SearchSpace(fixed, placement, budget, args.evals, schedulers=schedulers,
                            end_range=tuple(args.end_range), depth_range=tuple(args.depth_range),
                            decoder_depth_range=tuple(args.decoder_depth_range), lr_range=tuple(args.lr_range))
        budget.measure_rates(space.geometries())  # a time budget: every depth pair's rate, before trials share the CPUs
        paper = paper_config(fixed, budget, args.evals)  # planned now: a budget too small for it is refused here
    print(f"budget: {budget.amount:g} {budget.unit} per trial (--budget-by {budget.by}); the paper's configuration "
          f"trains {paper.run.steps} steps in it", flush=True)
    planned_each = run_flops(paper) / 1e12  # every trial plans about this (its own steps spend the same budget)
    metrics: str | list[str] = [args.metric, ENCODER_COST] if args.objectives else args.metric
    modes: str | list[str] = [MODE, "min"] if args.objectives else MODE

    def new_search(trainable: type[tune.Trainable]) -> tune.Tuner:
        journal = JournalStorage(JournalFileBackend(str(exp.folder / JOURNAL_FILE)))
        # OptunaSearch that, resumed, reuses the Optuna trials a killed driver had asked for but Tune never saved.
        searcher = ResumableOptunaSearch(space, metric=metrics, mode=modes, study_name=exp.name, storage=journal,
                                         sampler=sampler(args.sampler, args.seed))
        # A Pareto front needs every trial's full-budget values: no early stopping with two objectives.
        scheduler = (tune.schedulers.FIFOScheduler() if args.objectives or args.grace >= 1.0
                     else ScheduleFairASHA(args.metric, MODE, grace=args.grace))
        return tune.Tuner(
            trainable,  # lmd.experiments.trial.run_trial with each trial's own resources
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=args.samples,
                                        max_concurrent_trials=concurrent_trials(placement),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=exp.name, storage_path=exp.storage_path, verbose=0,
                                      callbacks=[ProgressDisplay("search", args.samples, planned_each, args.metric)]))

    with experiment_session(exp, vars(args)):
        results = run_tuner(exp.storage_path, exp.name, new_search, PROG)  # restored with --resume
        table = write_results(results, exp)
        record = None
        if args.finalists and not table.empty:
            finalists = plan_finalists(exp.folder, results, table, args.metric, args.finalists, paper)
            record = run_finalists(exp, finalists, args, placement)
    if not table.empty:  # the answer first, then how it was reached
        report(exp, results, table, record, args.metric, args.objectives)
    print(f"Optuna study: {exp.folder / JOURNAL_FILE}")
    code = finish(results, table, exp, pick="best", metric=args.metric)  # each scheduler's best trial's pictures
    if record is not None and record.get("failed_trials"):
        print(f"{PROG}: {record['failed_trials']} finalist trial(s) failed (see {exp.folder / FINALISTS_RUN})",
              file=sys.stderr)
        return code or 1
    return code


def run_finalists(exp: ExperimentSpec, plan: tuple[list[Finalist], dict[str, Any]], args: argparse.Namespace,
                  placement: Placement) -> dict[str, Any]:
    """The finalist phase (a Tune run of its own inside the experiment folder, resumed like the search): each
    finalist and the paper's configuration x fresh seeds; its table, references and finalists.json."""
    from lmd.experiments.references import compute_references

    finalists, configs = plan
    trials = finalist_trials(finalists, configs, args.seeds, placement)
    print(f"finalists: {', '.join(f.name for f in finalists)} x {args.seeds} fresh seeds "
          f"({len(trials)} trials, scored on the held-out half the search did not select on)", flush=True)

    def new_grid(trainable: type[tune.Trainable]) -> tune.Tuner:
        return tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(placement),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=FINALISTS_RUN, storage_path=str(exp.folder),
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                      callbacks=[ProgressDisplay("finalists", len(trials),
                                                                 run_flops(trials[0].cfg) / 1e12)]))

    results = run_tuner(str(exp.folder), FINALISTS_RUN, new_grid, PROG)
    table = tidy_table(results, devices_per_trial=exp.devices_per_trial)
    try:
        write_table(table, exp.folder / FINALISTS_RESULTS_FILE)
    except ShrinkingResults as err:
        fail(str(err), EXIT_RUNTIME, PROG)
    confirm = {t.variant: t.cfg for t in trials if t.seed == finalist_seeds(1)[0]}
    references = compute_references(confirm, seeds=finalist_seeds(args.seeds))
    record = finalists_record(table, finalists, args.metric, finalist_seeds(args.seeds), references,
                              Budget(args.budget_by, args.budget).record())
    errors = [r.error for r in results if r.error is not None]
    if errors:
        record["failed_trials"] = len(errors)
    write_json_atomic(exp.folder / FINALISTS_FILE, json_safe(record))
    return record


if __name__ == "__main__":
    # Tune pickles the searcher, SearchSpace included. Run through the module `search` (tune/ is sys.path[0]),
    # not as __main__, SearchSpace is pickled by reference, so a resumed search unpickles this very class.
    from search import main as search_main

    sys.exit(search_main())
