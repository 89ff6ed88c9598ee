"""The ablation below tune/ablation.py: variants at equal compute -> trials, references and budget records.

tune/ablation.py holds the variants table, the flags and the Tuner. This module turns an
`AblationSpec` into what the Tuner runs and what the summary reads: each variant's TrainConfig
(pixel variants keep the preset's transformer and change only the input and patch size), the
steps that spend the same budget (FLOPs by default, or device seconds, or steps for contrast), the
TrialSpecs (variants x seeds), the references computed once (lmd.experiments.references), and the
budget record, budget table and summary file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmd.config import LATENT_FACTOR, PRESETS, ConfigError, TrainConfig
from lmd.config_build import build_config
from lmd.experiments.budget import Budget, with_steps
from lmd.experiments.driver import ExperimentSpec, build_stores
from lmd.experiments.results import REFERENCES_FILE, read_references
from lmd.experiments.summary import TARGET_METRICS, verdicts
from lmd.experiments.trial import Placement, TrialBase, TrialSpec
from lmd.flops import run_flops
from lmd.io import read_json_object, write_json_atomic

BUDGET_FILE = "budget.json"  # what each variant was given; a resumed experiment reuses its steps
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Variant:
    """One row of the variants table: what a variant changes against the preset's latent LMD."""

    space: str  # "latent" (the projector's latents) or "pixel" (identity projector)
    scheduler: str
    tokens: str = "mae"  # pixel space only: "mae" = 4x the latent's token count, "equal" = the same count
    about: str = ""


@dataclass(frozen=True)
class AblationSpec:
    """What the ablation compares and at what budget: all of it must match when an experiment is resumed."""

    variants: dict[str, Variant]  # the variants run, by name (a subset of the script's table)
    seeds: int
    budget_by: str  # a key of lmd.experiments.budget.BUDGET_UNITS
    budget: float  # per trial, in that unit
    evals: int  # evaluations at equal fractions of each trial's FLOPs
    target_metric: str  # what time-to-target is measured on
    base: TrialBase

    def validate(self) -> AblationSpec:
        if self.seeds < 1 or self.evals < 1:
            raise ConfigError(f"--seeds={self.seeds} / --evals={self.evals}: must be >= 1")
        Budget(self.budget_by, self.budget).validate()
        if self.target_metric not in TARGET_METRICS:
            raise ConfigError(f"--target-metric={self.target_metric!r}: choose one of {', '.join(TARGET_METRICS)}")
        self.base.validate()
        return self


def pick_variants(table: dict[str, Variant], names: list[str]) -> dict[str, Variant]:
    """The named rows of the variants table, in the order given; an unknown name raises ConfigError."""
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
    return {name: table[name] for name in names}


def variant_config(spec: AblationSpec, name: str, steps: int, seed: int, device: str) -> TrainConfig:
    """The TrainConfig of one trial. Pixel variants keep the preset's transformer and change the input."""
    variant = spec.variants[name]
    overrides: dict[str, Any] = {**spec.base.overrides(device), "mask.scheduler": variant.scheduler,
                                 "run.steps": steps, "run.seed": seed}
    if variant.space == "pixel":
        overrides["data.projector"] = "identity"
        # A latent patch of p covers p * f image pixels; half that side gives 4x the tokens (MAE as published).
        scale = LATENT_FACTOR if variant.tokens == "equal" else LATENT_FACTOR // 2
        overrides["model.patch_size"] = PRESETS[spec.base.preset].patch_size * scale
    return with_steps(build_config(overrides=overrides), steps, spec.evals)


def budget_steps(spec: AblationSpec, placement: Placement) -> dict[str, int]:
    """Steps per variant that spend the same budget: FLOPs, device seconds (measured rate) or steps."""
    budget = Budget(spec.budget_by, spec.budget, workers=placement.workers, cpus=placement.cpus)
    return {name: budget.steps_for(variant_config(spec, name, steps=1, seed=0, device=placement.device))
            for name in spec.variants}


def trial_specs(spec: AblationSpec, steps: dict[str, int], placement: Placement) -> list[TrialSpec]:
    """Variants x seeds, each variant at its budget's steps."""
    return [TrialSpec(name, variant_config(spec, name, steps[name], seed, placement.device), placement)
            for name in spec.variants for seed in range(spec.seeds)]


@dataclass(frozen=True)
class AblationPlan:
    """Everything decided before Ray starts: the trials, their references and what each variant was given."""

    trials: list[TrialSpec]
    references: list[dict[str, Any]]  # lmd.experiments.references records
    budget: dict[str, Any]  # budget.json, and summary.json's "budget"

    def records(self) -> dict[str, Any]:
        """The files the experiment folder gets when it is created: file name -> JSON payload."""
        return {BUDGET_FILE: self.budget, REFERENCES_FILE: {"references": self.references}}  # as read_references reads


def plan_ablation(spec: AblationSpec, exp: ExperimentSpec) -> AblationPlan:
    """Stores built once, steps per variant (a resumed experiment keeps its own), the trials and references."""
    from lmd.experiments.references import compute_references

    placement = exp.placement()
    seed0 = [variant_config(spec, name, steps=1, seed=0, device=placement.device) for name in spec.variants]
    build_stores(seed0, spec.target_metric, "--target-metric", placement.workers)  # once here, not by every trial
    # A resumed experiment keeps the steps it started with (a time budget's measured rates vary).
    steps = (saved_steps(exp.folder) if exp.resume else None) or budget_steps(spec, placement)
    trials = trial_specs(spec, steps, placement)
    references = read_references(exp.folder / REFERENCES_FILE) if exp.resume else []
    if not references:
        references = compute_references({t.variant: t.cfg for t in trials if t.seed == 0}, seeds=range(spec.seeds))
    return AblationPlan(trials, references, budget_record(spec, trials))


def saved_steps(experiment: Path) -> dict[str, int] | None:
    """The steps per variant an experiment recorded in its budget.json (None without one)."""
    path = experiment / BUDGET_FILE
    if not path.is_file():
        return None
    budget = read_json_object(path, "the experiment's budget", ConfigError)
    try:
        return {name: int(v["steps"]) for name, v in budget["variants"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path}: no steps per variant ({type(err).__name__}: {err})") from None


def budget_record(spec: AblationSpec, trials: list[TrialSpec]) -> dict[str, Any]:
    """What each variant was given: steps, samples and training FLOPs (equal within one step's FLOPs)."""
    from lmd.flops import projector_encode_flops
    from lmd.projector import load_projector

    per_variant = {}
    for t in trials:
        if t.seed == 0:
            cfg = t.cfg
            per_variant[t.variant] = {"steps": cfg.run.steps, "samples": cfg.run.steps * cfg.data.batch_size,
                                      "train_tflops": run_flops(cfg) / 1e12, "tokens": cfg.model.num_patches,
                                      "patch_size": cfg.model.patch_size, "projector": cfg.data.projector,
                                      "about": spec.variants[t.variant].about}
    projector, resolution = spec.base.latent_projector, spec.base.resolution
    encode = projector_encode_flops(load_projector(projector), resolution) if resolution else float("nan")
    return {**Budget(spec.budget_by, spec.budget).record(), "variants": per_variant,
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
    """summary.json: the summary's attrs (target, baseline), the budget, one row per variant, references, verdicts."""
    write_json_atomic(path, {**summary.attrs, "budget": budget, "variants": summary.to_dict("records"),
                             "references": references, "verdicts": verdicts(summary) if not summary.empty else []})
