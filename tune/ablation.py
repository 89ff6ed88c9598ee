"""The LMD paper's ablation on Ray Tune: variants x seeds at equal compute, time-to-target against pixel MAE.

    python tune/ablation.py                                   # embedded defaults: local Ray, CPU
    python tune/ablation.py --resume                          # continue an interrupted run
    python tune/ablation.py --variants lmd_cosine pixel_mae --seeds 5 --budget 8 --target-metric val_probe_acc
    python tune/ablation.py --budget-by time --budget 60      # the same device seconds per trial instead of FLOPs
    python tune/ablation.py --address auto --gpus-per-trial 1 --preset base_p4 --resolution 224 \
        --dataset /data/imagenet --budget 20000 --seeds 3 --storage /mnt/shared/lmd-ray   # a path every node sees

Every variant (the table below) gets the same training budget: the same FLOPs (`--budget-by
flops`, the default), device seconds (`time`) or steps (`steps`, for contrast), several seeds, and
`--evals` evaluations spread over its run (held-out PSNR of decoded reconstructions, masked MSE,
the linear probe). References computed once (no-model fill, projector ceiling, probe on raw inputs
and on a random encoder) sit beside every result. Time-to-target is measured on samples, FLOPs (the
headline) and wall seconds against the baseline's worst final `--target-metric` over seeds.

Writes <storage>/<name>/: results.parquet (one row per trial x report), budget.json,
references.json, summary.json, pictures.parquet and dashboard.html, and prints the summary.
Embedded defaults: labelled Fashion-MNIST (Debian's dataset-fashion-mnist) at 32 px encoded by the
shipped lmd-f8c4-fmnist projector. The parts below this script: lmd/experiments/ (ablation.py:
configs and budgets; trial.py: what a trial is and runs; driver.py: what the search shares).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lmd.experiments.ablation import (
    SUMMARY_FILE,
    AblationSpec,
    Variant,
    format_budget,
    pick_variants,
    plan_ablation,
    write_summary,
)
from lmd.experiments.budget import BUDGET_BY_HELP, BUDGET_HELP, BUDGET_UNITS
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
from lmd.experiments.progress import ProgressDisplay
from lmd.experiments.summary import BASELINE, TARGET_METRICS, format_summary, summarize
from lmd.experiments.trial import TrialBase, concurrent_trials, trial_dirname

PROG = "ablation"
VARIANTS: dict[str, Variant] = {
    "lmd_cosine": Variant("latent", "cosine", about="full LMD, the official cosine scheduler"),
    "lmd_uniform": Variant("latent", "uniform", about="full LMD, linear scheduler"),
    "lmd_piecewise": Variant("latent", "piecewise", about="full LMD, piecewise scheduler"),
    "no_projector": Variant("pixel", "cosine", about="LMD without the projector: pixel patches as MAE, cosine"),
    "no_scheduler": Variant("latent", "constant", about="LMD without the scheduler: MAE on latents"),
    # The baseline: MAE as published, pixel patches with 4x the latent's tokens (16 px at 224 px, 4 px at 32 px).
    BASELINE: Variant("pixel", "constant", about="MAE as published: pixel patches, 4x the latent's tokens"),
    # Pixel MAE with the latent's token count: how much of a latent speed-up is only fewer tokens.
    "pixel_mae_equal_tokens": Variant("pixel", "constant", tokens="equal",
                                      about="contrast: pixel MAE with the latent's token count (bigger patches)"),
}
# What a resumed experiment must share with the one it continues (the rest only places or names it).
EXPERIMENT_ARGS = ("variants", "seeds", "budget_by", "budget", "evals", "preset", "dataset", "projector", "resolution",
                   "batch_size", "num_train", "num_val", "num_probe", "target_metric", "workers_per_trial", "loader")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/ablation.py", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelp)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget-by", choices=list(BUDGET_UNITS), default="flops", help=BUDGET_BY_HELP)
    p.add_argument("--budget", type=float, default=1.6, help=BUDGET_HELP)
    p.add_argument("--evals", type=int, default=4,
                   help="evaluations per trial, at equal fractions of its training FLOPs")
    p.add_argument("--target-metric", choices=TARGET_METRICS, default="val_psnr",  # comparable across spaces
                   help="the metric time-to-target is measured on (target: the baseline's worst final over seeds)")
    add_shared_flags(p, name="ablation")  # the data, the placement, --storage/--name/--resume: as the search
    return p.parse_args(argv)


def experiment(args: argparse.Namespace) -> tuple[ExperimentSpec, AblationSpec]:
    """The typed, validated experiment these flags describe (a bad value raises ConfigError naming its flag)."""
    exp = ExperimentSpec.from_flags(PROG, args)
    base = TrialBase.from_flags(args)
    ablation = AblationSpec(variants=pick_variants(VARIANTS, args.variants), seeds=args.seeds,
                            budget_by=args.budget_by, budget=args.budget, evals=args.evals,
                            target_metric=args.target_metric, base=base)
    return exp.validate(args.batch_size), ablation.validate()


def main(argv: list[str] | None = None) -> int:
    # Ray is imported where the Tuner is built: the table and flags above are also read, through
    # `experiment`, by benchmarks/ablation_engine.py on machines without Ray.
    from ray import tune

    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    with usage_errors(PROG):  # bad input: one line, exit code 2
        exp, ablation = experiment(args)
        check_start(exp, vars(args), EXPERIMENT_ARGS)  # a free folder, or a resume of the same experiment
        plan = plan_ablation(ablation, exp)  # stores, steps per variant, the trials and their references
    print(format_budget(plan.budget), flush=True)
    planned_each = sum(v["train_tflops"] for v in plan.budget["variants"].values()) / len(plan.budget["variants"])

    def new_tuner(trainable: type[tune.Trainable]) -> tune.Tuner:
        return tune.Tuner(
            trainable,  # lmd.experiments.trial.run_trial with each trial's own resources
            param_space={"trial": tune.grid_search([trial.to_dict() for trial in plan.trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(exp.placement()),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=exp.name, storage_path=exp.storage_path,
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                      callbacks=[ProgressDisplay("ablation", len(plan.trials), planned_each)]))

    results = fit(exp, new_tuner, vars(args), records=plan.records())  # restores the Tuner with --resume
    table = write_results(results, exp)
    summary = summarize(table, BASELINE, args.target_metric, plan.references)
    print(format_summary(summary), flush=True)
    write_summary(summary, plan.budget, plan.references, exp.folder / SUMMARY_FILE)
    return finish(results, table, exp, pick="median")  # pictures of each variant's median seed, the dashboard


if __name__ == "__main__":
    sys.exit(main())
