"""The LMD paper's ablation as Ray Tune trials: `python tune/ablation.py`.

Variants (shared/DESIGN.md): full LMD with each scheduler, without projector (pixel space +
cosine), without scheduler (latents + constant 0.75 = MAE on latents) and pixel MAE (pixel space +
constant 0.75, the baseline). Each runs for the same step budget with several seeds; the held-out
PSNR of decoded reconstructions makes latent and pixel variants comparable, and time-to-target asks
how long each variant needs to reach pixel MAE's final quality.

Embedded defaults run on local Ray, the bundled photos and the shipped projector, on CPU. Flags
scale it to a cluster (--address, --gpus-per-trial, --dataset, --preset, --budget, --seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from lmd.config import ConfigError, TrainConfig, build_config
from lmd.dashboard.page import render_after_experiment
from lmd.experiments.pictures import write_pictures
from lmd.experiments.results import format_summary, summarize, tidy_table, write_table
from lmd.experiments.trial import (
    check_trial_placement,
    max_concurrent_trials,
    placement,
    run_trial,
    trial_dirname,
    trial_resources,
)

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, str]] = {
    "lmd_cosine": {"data.projector": "lmd-f8c4", "mask.scheduler": "cosine"},
    "lmd_uniform": {"data.projector": "lmd-f8c4", "mask.scheduler": "uniform"},
    "lmd_piecewise": {"data.projector": "lmd-f8c4", "mask.scheduler": "piecewise"},
    "no_projector": {"data.projector": "identity", "mask.scheduler": "cosine"},
    "no_scheduler": {"data.projector": "lmd-f8c4", "mask.scheduler": "constant"},
    "pixel_mae": {"data.projector": "identity", "mask.scheduler": "constant"},
}
BASELINE = "pixel_mae"


def _fail(message: str) -> None:
    print(f"ablation: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/ablation.py", description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=300, help="training steps per trial (the same for every variant)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dataset", default="bundled")
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-val", type=int, default=256, help="held-out items (PSNR decodes the first 32 of them)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--address", help="Ray cluster address (default: local Ray)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="data-parallel Ray Train workers per trial (>1: each trial fits a TorchTrainer; "
                        "the trial's CPUs/GPUs are split over its workers)")
    p.add_argument("--storage", default="runs/tune")
    p.add_argument("--name", default="ablation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment of this --name")
    return p.parse_args(argv)


def trial_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.seeds < 1 or args.budget < 1:
        raise ConfigError(f"--seeds={args.seeds} / --budget={args.budget}: must be >= 1")
    check_trial_placement(args)
    trials = []
    for variant in args.variants:
        for seed in range(args.seeds):
            cfg = build_config(overrides={
                "model.preset": args.preset, "data.dataset": args.dataset, "data.resolution": args.resolution,
                "data.batch_size": args.batch_size, "data.num_train": args.num_train, "data.num_val": args.num_val,
                "run.steps": args.budget,
                "run.seed": seed, "run.eval_every": args.eval_every, "run.log_every": args.eval_every,
                "run.ckpt_every": args.eval_every, "run.device": "cuda" if args.gpus_per_trial > 0 else "cpu",
                **VARIANTS[variant]})
            trials.append({"cfg": cfg.to_dict(), "variant": variant, "seed": seed, **placement(args)})
    return trials


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import tune

    from lmd.data.latents import resolve_store

    try:
        trials = trial_configs(args)
    except ConfigError as err:
        _fail(str(err))
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    experiment = Path(storage) / args.name
    if not args.resume and experiment.exists():
        _fail(f"{experiment} already holds an experiment: pass --resume to continue it, or choose another --name")
    if args.resume and not tune.Tuner.can_restore(str(experiment)):
        _fail(f"{experiment}: no experiment to resume")

    # Stores are built (or reused) once here, not by every trial; each trial then checks its own.
    for projector in sorted({t["cfg"]["data"]["projector"] for t in trials}):
        resolve_store(TrainConfig.from_dict(next(t["cfg"] for t in trials if t["cfg"]["data"]["projector"] ==
                                                 projector)))
    if args.address:
        from lmd.cli import _check_reachable

        _check_reachable(args.address)
    ray.init(address=args.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(run_trial, trial_resources)
        if args.resume:
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(trials)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=max_concurrent_trials(args.workers_per_trial, args.cpus_per_trial,
                                                                args.gpus_per_trial),
                    trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=args.name, storage_path=storage,
                                          failure_config=tune.FailureConfig(max_failures=1), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    errors = [r.error for r in results if r.error is not None]
    table = tidy_table(results, devices_per_trial=args.gpus_per_trial or args.cpus_per_trial)
    write_table(table, experiment / "results.parquet")
    summary = summarize(table, BASELINE)
    print(format_summary(summary))
    summary.to_json(experiment / "summary.json", orient="records", indent=2)
    (experiment / "args.json").write_text(json.dumps(vars(args), indent=2))
    print(f"results: {experiment / 'results.parquet'} ({len(table)} rows, {table['trial_id'].nunique()} trials)")
    write_pictures(results, table, experiment)
    render_after_experiment(experiment)
    if errors:
        print(f"ablation: {len(errors)} trial(s) failed: {str(errors[0]).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    return run(parse_args(argv))
