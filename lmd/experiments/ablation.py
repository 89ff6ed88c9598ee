"""The LMD paper's ablation as Ray Tune trials, at equal compute: `python tune/ablation.py`.

Variants (shared/DESIGN.md): full LMD with each scheduler; without projector (pixel space + cosine);
without scheduler (latents + constant 0.75 = MAE on latents); pixel MAE as published (pixel space +
constant 0.75, patches 4x as many tokens as the latent's: 16 px at 224 px, 4 px on 32 px
Fashion-MNIST), the baseline; and the equal-token pixel contrast (pixel MAE with the latent's
token count), which shows how much of a latent speed-up is only fewer tokens.

Every variant gets the same training budget in FLOPs (`--budget-by flops`, the default; or the same
device seconds with `--budget-by time`, or the same steps with `--budget-by steps` for contrast),
several seeds, and evaluations spread over its run (held-out PSNR of decoded reconstructions, masked
MSE and the linear probe). References computed once (no-model fill, projector ceiling, probe on raw
inputs and on a random encoder) sit beside every result. Time-to-target is measured on samples,
FLOPs (the headline) and wall seconds, against the baseline's mean final `--target-metric`.

Embedded defaults: local Ray, CPU, labelled Fashion-MNIST (Debian's dataset-fashion-mnist) at 32 px
encoded by the shipped lmd-f8c4-fmnist projector. Flags scale it to a cluster (--address,
--gpus-per-trial, --dataset, --preset, --resolution, --budget, --seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmd.checkpoint import write_json_atomic
from lmd.config import DATASET_PROJECTORS, DEFAULT_PROJECTOR, LATENT_FACTOR, ConfigError, TrainConfig, build_config
from lmd.experiments.references import compute_references, write_references
from lmd.experiments.results import REFERENCES_FILE, read_references, tidy_table, write_table
from lmd.experiments.summary import TARGET_METRICS, format_summary, summarize, verdicts
from lmd.experiments.trial import (
    check_trial_placement,
    max_concurrent_trials,
    placement,
    run_trial,
    trial_dirname,
    trial_resources,
)
from lmd.flops import measure_flop_rate, run_flops, steps_for_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    space: str  # "latent" (the projector's latents) or "pixel" (identity projector)
    scheduler: str
    tokens: str = "mae"  # pixel space only: "mae" = 4x the latent's token count, "equal" = the same count
    about: str = ""


VARIANTS: dict[str, Variant] = {
    "lmd_cosine": Variant("latent", "cosine", about="full LMD, the official cosine scheduler"),
    "lmd_uniform": Variant("latent", "uniform", about="full LMD, linear scheduler"),
    "lmd_piecewise": Variant("latent", "piecewise", about="full LMD, piecewise scheduler"),
    "no_projector": Variant("pixel", "cosine", about="LMD without the projector: pixel patches as MAE, cosine"),
    "no_scheduler": Variant("latent", "constant", about="LMD without the scheduler: MAE on latents"),
    "pixel_mae": Variant("pixel", "constant", about="MAE as published: pixel patches, 4x the latent's tokens"),
    "pixel_mae_equal_tokens": Variant("pixel", "constant", tokens="equal",
                                      about="contrast: pixel MAE with the latent's token count (bigger patches)"),
}
BASELINE = "pixel_mae"
BUDGET_UNITS = {"flops": "TFLOP", "time": "device seconds", "steps": "steps"}
BUDGET_FILE = "budget.json"  # what each variant was given; a resumed experiment reuses its steps
# What a resumed experiment must share with the one it continues (the rest only places or names it).
EXPERIMENT_ARGS = ("variants", "seeds", "budget_by", "budget", "evals", "preset", "dataset", "projector", "resolution",
                   "batch_size", "num_train", "num_val", "num_probe", "target_metric", "workers_per_trial")


def _fail(message: str) -> None:
    print(f"ablation: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/ablation.py", description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget-by", choices=list(BUDGET_UNITS), default="flops",
                   help="equal training FLOPs (default), equal device seconds, or equal steps (contrast)")
    p.add_argument("--budget", type=float, default=1.6,
                   help="per trial: TFLOP (--budget-by flops), device seconds (time) or steps (steps)")
    p.add_argument("--evals", type=int, default=4, help="evaluations spread evenly over each trial")
    p.add_argument("--target-metric", choices=TARGET_METRICS, default="val_psnr",  # comparable across spaces
                   help="the metric time-to-target is measured on (target: the baseline's mean final value)")
    p.add_argument("--preset", default="mini_p1")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--projector", default="", help="latent variants' projector (default: the dataset's shipped one)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-val", type=int, default=1000, help="held-out items (PSNR decodes the first 32 of them)")
    p.add_argument("--num-probe", type=int, default=1000, help="labelled training items the linear probe is fit on")
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


def latent_projector(args: argparse.Namespace) -> str:
    return args.projector or DATASET_PROJECTORS.get(args.dataset, DEFAULT_PROJECTOR)


def variant_config(args: argparse.Namespace, variant: Variant, steps: int, seed: int) -> TrainConfig:
    """The TrainConfig of one trial. Pixel variants keep the preset's transformer and change the input."""
    from lmd.model import PRESETS

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset={args.preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    overrides: dict[str, Any] = {
        "model.preset": args.preset, "data.dataset": args.dataset, "data.resolution": args.resolution,
        "data.batch_size": args.batch_size, "data.num_train": args.num_train, "data.num_val": args.num_val,
        "data.num_probe": args.num_probe, "mask.scheduler": variant.scheduler, "run.steps": steps, "run.seed": seed,
        "run.device": "cuda" if args.gpus_per_trial > 0 else "cpu",
        "data.projector": latent_projector(args) if variant.space == "latent" else "identity"}
    if variant.space == "pixel":
        # A latent patch of p covers p * f image pixels; half that side gives 4x the tokens (MAE as published).
        scale = LATENT_FACTOR if variant.tokens == "equal" else LATENT_FACTOR // 2
        overrides["model.patch_size"] = PRESETS[args.preset].patch_size * scale
    every = max(1, math.ceil(steps / args.evals))
    overrides.update({"run.eval_every": every, "run.log_every": every, "run.ckpt_every": every})
    return build_config(overrides=overrides)


def budget_steps(args: argparse.Namespace) -> dict[str, int]:
    """Steps per variant that spend the same budget: FLOPs, device seconds (measured rate) or steps."""
    out = {}
    for name in args.variants:
        cfg = variant_config(args, VARIANTS[name], steps=1, seed=0)
        if args.budget_by == "steps":
            out[name] = int(args.budget)
        elif args.budget_by == "flops":
            out[name] = steps_for_flops(cfg, args.budget * 1e12)
        else:  # time: the FLOPs this variant computes in `budget` seconds, at its rate measured here
            out[name] = steps_for_flops(cfg, args.budget * _rate_as_a_trial(cfg, args))
    return out


def _rate_as_a_trial(cfg: TrainConfig, args: argparse.Namespace) -> float:
    """FLOP/s measured with the threads one trial worker gets (Ray gives a 1-CPU trial one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(args.cpus_per_trial / args.workers_per_trial)))
    try:
        return measure_flop_rate(cfg) * args.workers_per_trial
    finally:
        torch.set_num_threads(threads)


def trial_configs(args: argparse.Namespace, steps: dict[str, int]) -> list[dict[str, Any]]:
    trials = []
    for name in args.variants:
        for seed in range(args.seeds):
            cfg = variant_config(args, VARIANTS[name], steps[name], seed)
            trials.append({"cfg": cfg.to_dict(), "variant": name, "seed": seed, **placement(args)})
    return trials


def check_args(args: argparse.Namespace) -> None:
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.seeds < 1 or args.evals < 1:
        raise ConfigError(f"--seeds={args.seeds} / --evals={args.evals}: must be >= 1")
    if not args.budget > 0 or not math.isfinite(args.budget):
        raise ConfigError(f"--budget={args.budget}: must be a positive number of {BUDGET_UNITS[args.budget_by]}")
    if args.budget_by == "steps" and not float(args.budget).is_integer():
        raise ConfigError(f"--budget={args.budget}: --budget-by steps needs a whole number of steps")
    check_trial_placement(args)


def _saved_steps(experiment: Path) -> dict[str, int] | None:
    path = experiment / BUDGET_FILE
    if not path.is_file():
        return None
    return {name: int(v["steps"]) for name, v in json.loads(path.read_text())["variants"].items()}


def check_resume(args: argparse.Namespace, experiment: Path) -> None:
    """A resumed experiment must be the same experiment: refuse changed grid-defining arguments by name."""
    saved_path = experiment / "args.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    changed = [f"--{k.replace('_', '-')}: was {saved.get(k)!r}, now {getattr(args, k)!r}" for k in EXPERIMENT_ARGS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        _fail(f"{experiment}: --resume with different arguments ({'; '.join(changed)}); rerun with the "
              "original ones or choose another --name")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import tune

    from lmd.dashboard.page import render_after_experiment
    from lmd.data.images import ImageSourceError
    from lmd.data.latents import probe_set, resolve_store
    from lmd.data.store import StoreError
    from lmd.engine import RunDirError
    from lmd.projector import ProjectorError

    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    experiment = Path(storage) / args.name
    try:
        check_args(args)
        if not args.resume and experiment.exists():
            _fail(f"{experiment} already holds an experiment: pass --resume to continue it, or choose another --name")
        if args.resume:
            if not tune.Tuner.can_restore(str(experiment)):
                _fail(f"{experiment}: no experiment to resume")
            check_resume(args, experiment)
        seed0 = {name: variant_config(args, VARIANTS[name], steps=1, seed=0) for name in args.variants}
        # Stores are built (or reused) once here, not by every trial; each trial then checks its own.
        for projector in sorted({c.data.projector for c in seed0.values()}):
            root, _ = resolve_store(next(c for c in seed0.values() if c.data.projector == projector))
            if args.target_metric == "val_probe_acc" and probe_set(root, args.num_probe) is None:
                raise ConfigError(f"--target-metric val_probe_acc: the {args.dataset!r} store {root} is unlabelled "
                                  "or --num-probe is 0; use a labelled dataset (fashion-mnist, mnist, class "
                                  "subfolders) or --target-metric val_psnr")
        # A resumed experiment keeps the steps it started with (a time budget's measured rates vary).
        saved_steps = _saved_steps(experiment) if args.resume else None
        steps = saved_steps or budget_steps(args)
        trials = trial_configs(args, steps)
        references_path = experiment / REFERENCES_FILE
        references = read_references(references_path) if args.resume else []
        if not references:
            references = compute_references({t["variant"]: TrainConfig.from_dict(t["cfg"]) for t in trials
                                             if t["seed"] == 0}, seeds=range(args.seeds))
    except (ConfigError, StoreError, ProjectorError, ImageSourceError, RunDirError, ValueError) as err:
        _fail(str(err).splitlines()[0])
    budget = budget_record(args, trials)
    print(format_budget(budget), flush=True)
    if args.address:
        from lmd.cli import _check_reachable

        _check_reachable(args.address)
    ray.init(address=args.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    # Only now, with everything that can fail on bad input behind us, does the experiment folder appear:
    # a failed start leaves nothing that would block a rerun.
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "args.json").write_text(json.dumps(vars(args), indent=2))
    write_json_atomic(experiment / BUDGET_FILE, budget)
    write_references(references, references_path)
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
    summary = summarize(table, BASELINE, args.target_metric, references)
    print(format_summary(summary), flush=True)
    write_summary(summary, budget, references, experiment / "summary.json")
    print(f"results: {experiment / 'results.parquet'} ({len(table)} rows, {table['trial_id'].nunique()} trials)")
    from lmd.experiments.pictures import write_pictures

    write_pictures(results, table, experiment)
    render_after_experiment(experiment)
    if errors:
        print(f"ablation: {len(errors)} trial(s) failed: {str(errors[0]).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def budget_record(args: argparse.Namespace, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """What each variant was given: steps, samples and training FLOPs (equal within one step's FLOPs)."""
    from lmd.flops import projector_encode_flops
    from lmd.projector import load_projector

    per_variant = {}
    for t in trials:
        if t["seed"] == 0:
            cfg = TrainConfig.from_dict(t["cfg"])
            per_variant[t["variant"]] = {"steps": cfg.run.steps, "samples": cfg.run.steps * cfg.data.batch_size,
                                         "train_tflops": run_flops(cfg) / 1e12, "tokens": cfg.model.num_patches,
                                         "patch_size": cfg.model.patch_size, "projector": cfg.data.projector,
                                         "about": VARIANTS[t["variant"]].about}
    projector = latent_projector(args)
    encode = projector_encode_flops(load_projector(projector), args.resolution) if args.resolution else float("nan")
    return {"budget_by": args.budget_by, "budget": args.budget, "unit": BUDGET_UNITS[args.budget_by],
            "variants": per_variant,
            "projector_encode_gflop_per_image": {projector: encode / 1e9},
            "note": "training FLOPs count the transformer only; latents are encoded once before training "
                    "(projector_encode_gflop_per_image x the store's items, not per step)"}


def format_budget(budget: dict[str, Any]) -> str:
    lines = [f"budget: {budget['budget']:g} {budget['unit']} per trial (--budget-by {budget['budget_by']})",
             f"{'variant':<24}{'tokens':>7}{'steps':>8}{'samples':>10}{'TFLOP':>9}"]
    for name, v in budget["variants"].items():
        lines.append(f"{name:<24}{v['tokens']:>7}{v['steps']:>8}{v['samples']:>10}{v['train_tflops']:>9.3f}")
    for name, gflop in budget["projector_encode_gflop_per_image"].items():
        lines.append(f"one-time latent encoding with {name}: {gflop:.4f} GFLOP per image (not in the budget)")
    return "\n".join(lines)


def write_summary(summary: Any, budget: dict[str, Any], references: list[dict[str, Any]], path: Path) -> None:
    write_json_atomic(path, {**summary.attrs, "budget": budget, "variants": summary.to_dict("records"),
                             "references": references, "verdicts": verdicts(summary) if not summary.empty else []})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    return run(parse_args(argv))
