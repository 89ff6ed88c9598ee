"""Optuna (TPE) + ASHA search over LMD's mask schedule, depths and learning rate on Ray Tune.

    python tune/search.py                                      # embedded defaults: local Ray, CPU
    python tune/search.py --samples 32 --budget 400 --metric val_psnr
    python tune/search.py --resume                             # continue an interrupted search
    python tune/search.py --samples 64 --budget 20000 --preset base_p4 --resolution 224 \
        --address auto --gpus-per-trial 1 --storage /shared/lmd-tune
    optuna-dashboard runs/tune/search/optuna.journal           # inspect the study

Searches (SearchSpace below) the mask scheduler, its start / final ratio and ramp, encoder and
decoder depth and the learning rate, maximising `--metric`: the held-out linear-probe accuracy of
the frozen encoder (the paper's measure; default, needs a labelled dataset) or the held-out PSNR
of decoded reconstructions. ASHA stops weak trials early. The space is define-by-run, so
conditional parameters are real: `constant` (with --include-constant) samples neither a start
ratio nor a ramp. The Optuna study lives in a journal file next to the Tune results, so a resumed
search keeps one study. Each scheduler's best trial is printed next to its references (the no-model
fill, the projector ceiling, the probe on raw inputs and on random encoders of its sampled geometry),
saying which it beats and which it does not. Writes <storage>/<name>/: results.parquet, optuna.journal,
references.json, pictures.parquet (each scheduler's best trial by --metric) and dashboard.html.
The parts below this script: lmd/experiments/ (search.py: checks and references; trial.py: what a
trial is and runs; driver.py: the rest).
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
from ray.tune.schedulers import ASHAScheduler

from lmd.config_build import build_config
from lmd.experiments.driver import (
    DefaultsHelp,
    ExperimentSpec,
    add_shared_flags,
    check_start,
    finish,
    fit,
    usage_errors,
    write_results,
)
from lmd.experiments.results import REFERENCES_FILE
from lmd.experiments.search import (
    JOURNAL_FILE,
    ResumableOptunaSearch,
    best_trial,
    check_search,
    reference_report,
    search_base,
    search_references,
)
from lmd.experiments.trial import Placement, TrialBase, TrialSpec, concurrent_trials, trial_dirname
from lmd.io import write_json_atomic

PROG = "search"
METRICS = ("val_probe_acc", "val_psnr")  # both: higher is better
MODE = "max"
# What a resumed search must share with the one it continues (the rest only places or names it).
EXPERIMENT_ARGS = ("samples", "budget", "metric", "preset", "projector", "dataset", "resolution", "num_train",
                   "num_val", "num_probe", "batch_size", "end_range", "depth_range", "decoder_depth_range", "lr_range",
                   "include_constant", "eval_every", "seed", "workers_per_trial", "loader", "latents")


@dataclass(frozen=True)
class SearchSpace:
    """Optuna's define-by-run space (picklable: Tune checkpoints the searcher with it).

    Samples this trial's values, then returns its TrialSpec (the fixed base with them applied) as
    a constant beside them: every trial's Tune config holds a TrialSpec under "trial".
    """

    base: dict[str, Any]  # dotted TrainConfig overrides every trial shares (search_base)
    placement: Placement
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
        cfg = build_config(overrides={**self.base, **sampled})
        return {"trial": TrialSpec(scheduler, cfg, self.placement).to_dict()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelp)
    p.add_argument("--samples", type=int, default=12, help="trials")
    p.add_argument("--budget", type=int, default=200,
                   help="max steps per trial, not TFLOP as in tune/ablation.py (ASHA stops weak ones earlier)")
    p.add_argument("--metric", choices=METRICS, default="val_probe_acc",
                   help="objective: linear-probe accuracy (default) or decoded PSNR, on held-out items")
    p.add_argument("--end-range", nargs=2, type=float, default=[0.5, 0.9], metavar=("LOW", "HIGH"))
    p.add_argument("--depth-range", nargs=2, type=int, default=[1, 4], metavar=("LOW", "HIGH"))
    p.add_argument("--decoder-depth-range", nargs=2, type=int, default=[1, 3], metavar=("LOW", "HIGH"))
    p.add_argument("--lr-range", nargs=2, type=float, default=[3e-4, 3e-3], metavar=("LOW", "HIGH"))
    p.add_argument("--include-constant", action="store_true", help="also search the constant (MAE) schedule")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--latents", default="", metavar="STORE",
                   help="search on a store made by `lmd precompute` (a folder every node sees, or s3://...); it must "
                        "match --preset, --projector and --resolution (checked and hashed once, before any trial)")
    add_shared_flags(p, name="search")  # the data, the placement, --storage/--name/--resume: as the ablation
    return p.parse_args(argv)


def experiment(args: argparse.Namespace) -> tuple[ExperimentSpec, TrialBase]:
    """The typed, validated experiment these flags describe (a bad value raises ConfigError naming its flag)."""
    exp = ExperimentSpec.from_flags(PROG, args)
    base = TrialBase.from_flags(args)
    ranges = {"--end-range": args.end_range, "--depth-range": args.depth_range,
              "--decoder-depth-range": args.decoder_depth_range, "--lr-range": args.lr_range}
    check_search(ranges, args.samples, args.budget, exp)
    return exp.validate(args.batch_size), base.validate()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with usage_errors(PROG):  # bad input: one line, exit code 2
        exp, base = experiment(args)
        check_start(exp, vars(args), EXPERIMENT_ARGS)  # a free folder, or a resume of the same search
        fixed = search_base(base, exp.placement(), args.budget, args.eval_every, args.metric)  # builds the store
    schedulers = ("uniform", "piecewise", "cosine") + (("constant",) if args.include_constant else ())
    space = SearchSpace(fixed, exp.placement(), schedulers=schedulers,
                        end_range=tuple(args.end_range), depth_range=tuple(args.depth_range),
                        decoder_depth_range=tuple(args.decoder_depth_range), lr_range=tuple(args.lr_range))

    def new_tuner(trainable: type[tune.Trainable]) -> tune.Tuner:
        journal = JournalStorage(JournalFileBackend(str(exp.folder / JOURNAL_FILE)))
        # OptunaSearch that, resumed, reuses the Optuna trials a killed driver had asked for but Tune never saved.
        searcher = ResumableOptunaSearch(space, metric=args.metric, mode=MODE, study_name=exp.name, storage=journal,
                                         sampler=optuna.samplers.TPESampler(seed=args.seed))
        scheduler = ASHAScheduler(time_attr="step", max_t=args.budget,
                                  grace_period=min(args.budget, 2 * args.eval_every), reduction_factor=2)
        return tune.Tuner(
            trainable,  # lmd.experiments.trial.run_trial with each trial's own resources
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=args.metric, mode=MODE,
                                        num_samples=args.samples,
                                        max_concurrent_trials=concurrent_trials(exp.placement()),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=exp.name, storage_path=exp.storage_path, verbose=0))

    results = fit(exp, new_tuner, vars(args))  # restores the Tuner (and its searcher) with --resume
    table = write_results(results, exp)
    print(best_trial(results, args.metric, MODE))
    if not table.empty:  # every best trial next to the no-model references (references.json, for the dashboard)
        references = search_references(results, table, args.metric)
        write_json_atomic(exp.folder / REFERENCES_FILE, {"references": references})
        print("\n".join(reference_report(table, args.metric, references)))
    print(f"Optuna study: {exp.folder / JOURNAL_FILE}")
    return finish(results, table, exp, pick="best", metric=args.metric)  # each scheduler's best trial's pictures


if __name__ == "__main__":
    # Tune pickles the searcher, SearchSpace included. Run through the module `search` (tune/ is sys.path[0]),
    # not as __main__, SearchSpace is pickled by reference, so a resumed search unpickles this very class.
    from search import main as search_main

    sys.exit(search_main())
