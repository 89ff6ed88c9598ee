"""Hyperparameter search for LMD on Ray Tune with Optuna (TPE) and ASHA: `python tune/search.py`.

Searches the mask scheduler, its start / final ratio and ramp, encoder and decoder depth and the
learning rate, maximising `--metric`: the held-out linear-probe accuracy of the frozen encoder (the
paper's measure; default, needs a labelled dataset) or the held-out PSNR of decoded reconstructions.
The space is define-by-run, so conditional parameters are real: `constant` (when allowed) samples
neither a start ratio nor a ramp. The Optuna study lives in a journal file next to the Tune results,
so `optuna-dashboard <storage>/<name>/optuna.journal` opens it, and a resumed search keeps one study.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmd.config import ConfigError, build_config
from lmd.dashboard.page import render_after_experiment
from lmd.experiments.pictures import write_pictures
from lmd.experiments.results import tidy_table, write_table
from lmd.experiments.trial import (
    check_trial_placement,
    max_concurrent_trials,
    placement,
    run_trial,
    trial_dirname,
    trial_resources,
)

METRICS = ("val_probe_acc", "val_psnr")  # both: higher is better
MODE = "max"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=12, help="trials")
    p.add_argument("--budget", type=int, default=200, help="max steps per trial (ASHA stops weak ones earlier)")
    p.add_argument("--metric", choices=METRICS, default="val_probe_acc",
                   help="objective: linear-probe accuracy (default) or decoded PSNR, on held-out items")
    p.add_argument("--preset", default="mini_p1")
    p.add_argument("--projector", default="", help="default: the dataset's shipped projector")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-val", type=int, default=1000, help="held-out items (PSNR decodes the first 32 of them)")
    p.add_argument("--num-probe", type=int, default=1000, help="labelled training items the linear probe is fit on")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--end-range", nargs=2, type=float, default=[0.5, 0.9], metavar=("LOW", "HIGH"))
    p.add_argument("--depth-range", nargs=2, type=int, default=[1, 4], metavar=("LOW", "HIGH"))
    p.add_argument("--decoder-depth-range", nargs=2, type=int, default=[1, 3], metavar=("LOW", "HIGH"))
    p.add_argument("--lr-range", nargs=2, type=float, default=[3e-4, 3e-3], metavar=("LOW", "HIGH"))
    p.add_argument("--include-constant", action="store_true", help="also search the constant (MAE) schedule")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--address")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="data-parallel Ray Train workers per trial (>1: each trial fits a TorchTrainer)")
    p.add_argument("--storage", default="runs/tune")
    p.add_argument("--name", default="search")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def check_ranges(args: argparse.Namespace) -> None:
    for flag, (low, high), bounds in (("--end-range", args.end_range, (0.0, 1.0)),
                                      ("--depth-range", args.depth_range, (1, 64)),
                                      ("--decoder-depth-range", args.decoder_depth_range, (1, 64)),
                                      ("--lr-range", args.lr_range, (0.0, 1.0))):
        if not low < high:
            raise ConfigError(f"{flag} {low} {high}: empty or inverted range (LOW must be < HIGH)")
        if low < bounds[0] or high > bounds[1] or (flag != "--depth-range" and flag != "--decoder-depth-range"
                                                   and low <= 0):
            raise ConfigError(f"{flag} {low} {high}: outside {bounds}")
    if args.end_range[1] >= 1.0:
        raise ConfigError(f"--end-range {args.end_range[0]} {args.end_range[1]}: mask ratios must stay below 1")
    if args.samples < 1 or args.budget < 1:
        raise ConfigError(f"--samples={args.samples} / --budget={args.budget}: must be >= 1")
    check_trial_placement(args)


class SearchSpace:
    """Define-by-run space for OptunaSearch (a picklable class: Tune checkpoints the searcher).

    Suggests the searched params and returns the constant ones.
    """

    def __init__(self, args: argparse.Namespace, base: dict[str, Any], where: dict[str, Any]):
        self.schedulers = ["uniform", "piecewise", "cosine"] + (["constant"] if args.include_constant else [])
        self.end_range, self.lr_range = tuple(args.end_range), tuple(args.lr_range)
        self.depth_range, self.decoder_depth_range = tuple(args.depth_range), tuple(args.decoder_depth_range)
        self.base, self.where = base, where

    def __call__(self, trial: Any) -> dict[str, Any]:
        scheduler = trial.suggest_categorical("scheduler", self.schedulers)
        trial.suggest_float("mask_end", *self.end_range)
        if scheduler != "constant":  # conditional: a constant schedule has no start and no ramp
            trial.suggest_float("mask_start", 0.05, 0.4)
            trial.suggest_float("mask_ramp", 0.2, 1.0)
        trial.suggest_int("depth", *self.depth_range)
        trial.suggest_int("decoder_depth", *self.decoder_depth_range)
        trial.suggest_float("lr", *self.lr_range, log=True)
        return {"base": self.base, "placement": self.where}


def search_trial(params: dict[str, Any]) -> None:
    """Tune trainable: build the trial's TrainConfig from the sampled params, then run the engine."""
    base = params["base"]
    overrides = {**base, "mask.scheduler": params["scheduler"], "mask.end": params["mask_end"],
                 "model.depth": params["depth"], "model.decoder_depth": params["decoder_depth"],
                 "optim.lr": params["lr"]}
    if "mask_start" in params:
        overrides["mask.start"] = min(params["mask_start"], params["mask_end"])
        overrides["mask.ramp"] = params["mask_ramp"]
    cfg = build_config(overrides=overrides)
    run_trial({"cfg": cfg.to_dict(), "variant": params["scheduler"], "seed": base["run.seed"],
               **params.get("placement", {})})


def run(args: argparse.Namespace) -> int:
    import optuna
    import ray
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from lmd.data.images import ImageSourceError
    from lmd.data.latents import probe_set, resolve_store
    from lmd.data.store import StoreError
    from lmd.projector import ProjectorError

    try:
        check_ranges(args)
        if "://" in args.storage:
            raise ConfigError(f"--storage {args.storage}: the search keeps its Optuna journal beside the results, so "
                              "it needs a filesystem path (on a cluster: a mount every node sees)")
        from lmd.experiments.ablation import latent_projector

        base = {"model.preset": args.preset, "data.dataset": args.dataset, "data.projector": latent_projector(args),
                "data.resolution": args.resolution, "data.num_probe": args.num_probe,
                "data.num_train": args.num_train, "data.num_val": args.num_val, "data.batch_size": args.batch_size,
                "run.steps": args.budget, "run.seed": 0, "run.eval_every": args.eval_every,
                "run.log_every": args.eval_every, "run.ckpt_every": args.eval_every,
                "run.device": "cuda" if args.gpus_per_trial > 0 else "cpu"}
        root, _ = resolve_store(build_config(overrides=base))  # build/validate the store once, before any trial
        if args.metric == "val_probe_acc" and probe_set(root, args.num_probe) is None:
            raise ConfigError(f"--metric val_probe_acc: the {args.dataset!r} store is unlabelled or --num-probe is 0; "
                              "use a labelled dataset (fashion-mnist, mnist, class subfolders) or --metric val_psnr")
    except (ConfigError, StoreError, ProjectorError, ImageSourceError) as err:
        print(f"search: error: {err}", file=sys.stderr)
        return 2
    storage = str(Path(args.storage).resolve())
    experiment = Path(storage) / args.name
    if not args.resume and experiment.exists():
        print(f"search: error: {experiment} already holds a search: pass --resume or choose another --name",
              file=sys.stderr)
        return 2
    experiment.mkdir(parents=True, exist_ok=True)
    journal = JournalStorage(JournalFileBackend(str(experiment / "optuna.journal")))
    searcher = OptunaSearch(SearchSpace(args, base, placement(args)), metric=args.metric, mode=MODE,
                            study_name=args.name, storage=journal, sampler=optuna.samplers.TPESampler(seed=args.seed))
    scheduler = ASHAScheduler(time_attr="step", max_t=args.budget, grace_period=min(args.budget, 2 * args.eval_every),
                              reduction_factor=2)
    ray.init(address=args.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(search_trial, trial_resources)
        if args.resume and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            concurrent = max_concurrent_trials(args.workers_per_trial, args.cpus_per_trial, args.gpus_per_trial)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=args.metric, mode=MODE,
                                            num_samples=args.samples, max_concurrent_trials=concurrent,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=args.name, storage_path=storage, verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    table = tidy_table(results, devices_per_trial=args.gpus_per_trial or args.cpus_per_trial)
    write_table(table, experiment / "results.parquet")
    best = results.get_best_result(metric=args.metric, mode=MODE, scope="last")
    searched = {k: v for k, v in best.config.items() if k not in ("base", "placement")}
    print(f"best {args.metric}={best.metrics.get(args.metric):.3f} with {searched}")
    print(f"results: {experiment / 'results.parquet'}; Optuna study: {experiment / 'optuna.journal'}")
    (experiment / "args.json").write_text(json.dumps(vars(args), indent=2))
    write_pictures(results, table, experiment, pick="best")
    render_after_experiment(experiment)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))
