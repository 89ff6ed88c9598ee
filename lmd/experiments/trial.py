"""What one Tune trial is (`TrialSpec`) and how it runs: the same engine loop, in two shapes.

Both experiments put `TrialSpec.to_dict()` under "trial" in each trial's Tune config (the
ablation as a grid, the search from its Optuna space); `run_trial`, `trial_resources` and
`trial_dirname` read it back, so a resumed trial keeps the config and resources it started with.

- One worker: the engine runs in the trial's own process (a function trainable). A TorchTrainer
  per trial costs 7-9 s more start-up than a function trial on a small machine (benchmarks/trial_startup.py).
  Checkpoints are the engine's verified format, handed to `tune.report`; a restored trial continues
  from its latest one at the exact step.
- Several workers: the trial is Ray's driver function for Tune over Train. It fits a data-parallel
  TorchTrainer (lmd.distributed) whose rows reach Tune through TuneReportCallback; the trial holds
  almost nothing itself (TRIAL_DRIVER_CPUS) and Ray Train places the workers.

Either way each process gets its data as `data.loader` resolves (`auto`: a store that fits in memory
is loaded once, a larger one streamed through Ray Data, whose read tasks ride on the trial's or the
worker's own reservation: `lmd.data.stream.reader_options`). Specs of version 1 (before trials kept
their loader) always loaded into memory, and still do when such a trial is resumed.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lmd.checkpoint import adopt_checkpoint
from lmd.config import PRESETS, ConfigError, TrainConfig, dataset_projector

# A tag on every row: the trial's planned training FLOPs (early stopping's clock and the progress display read it).
PLANNED_FLOPS = "planned_flops"
TRIAL_DRIVER_CPUS = 0.01  # a multi-worker trial only drives its TorchTrainer (Ray refuses 0)
TRIAL_SPEC_VERSION = 2  # "version" in TrialSpec.to_dict(): a config of another shape is refused by name
# Version 1 specs are read too: the same shape, but their trials always loaded the store into memory, so a
# resumed one keeps doing so (streaming would change its data order mid-run).
READABLE_SPEC_VERSIONS = (1, TRIAL_SPEC_VERSION)


class TrialSpecError(ValueError):
    """A Tune trial config that is not a TrialSpec of this version (e.g. an experiment of an older layout)."""


@dataclass(frozen=True)
class Placement:
    """Where one trial runs: the resources it asks Tune for and, with several workers, its Ray Train run."""

    workers: int = 1  # > 1: a data-parallel TorchTrainer per trial, the resources split evenly over its workers
    cpus: float = 1.0  # per trial
    gpus: float = 0.0  # per trial; whole GPUs per worker when workers > 1
    train_storage: str = ""  # multi-worker trials: where their Train runs live (<experiment>/train)
    max_failures: int = 1  # multi-worker trials: restarts of the Train run from its latest checkpoint

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


@dataclass(frozen=True)
class TrialSpec:
    """One trial: what it trains (variant, the TrainConfig, whose run.seed is the seed) and where (placement)."""

    variant: str  # the ablation's variant name, the search's scheduler: the results table's `variant`
    cfg: TrainConfig
    placement: Placement = field(default_factory=Placement)

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values for Tune's param space (and its experiment state)."""
        return {"version": TRIAL_SPEC_VERSION, "variant": self.variant, "seed": self.seed, "cfg": self.cfg.to_dict(),
                "placement": asdict(self.placement)}

    @classmethod
    def from_dict(cls, raw: Any) -> TrialSpec:
        if not isinstance(raw, dict) or raw.get("version") not in READABLE_SPEC_VERSIONS:
            raise TrialSpecError(f"a trial config that is not a TrialSpec of version {TRIAL_SPEC_VERSION} (an "
                                 "experiment of an older layout?)")
        cfg = TrainConfig.from_dict(raw["cfg"])
        if raw["version"] == 1:
            cfg = replace(cfg, data=replace(cfg.data, loader="memory"))
        return cls(variant=str(raw["variant"]), cfg=cfg, placement=Placement(**raw["placement"]))


@dataclass(frozen=True)
class TrialBase:
    """What every trial of an experiment shares (the flags of the same name): the model preset and the data.

    The ablation's variants and the search's sampled values change the rest of the TrainConfig.
    """

    preset: str
    dataset: str
    projector: str  # latent trials' projector; "" = the dataset's shipped one
    resolution: int
    batch_size: int
    num_train: int
    num_val: int
    num_probe: int
    compile: bool = False  # torch.compile each trial's model (under Ray Train too)
    compile_mode: str = "default"  # reduce-overhead: CUDA graphs on GPU trials
    loader: str = "auto"  # data.loader: memory for a store that fits, else each trial streams it (Ray Data)
    latents: str = ""  # the search's --latents: a store made by `lmd precompute` (local or s3://); "" = built here

    @classmethod
    def from_flags(cls, args: Any) -> TrialBase:
        """The flags `add_shared_flags` defines, as the ablation and the search both read them."""
        return cls(preset=args.preset, dataset=args.dataset, projector=args.projector, resolution=args.resolution,
                   batch_size=args.batch_size, num_train=args.num_train, num_val=args.num_val,
                   num_probe=args.num_probe, compile=args.compile, compile_mode=args.compile_mode,
                   loader=args.loader, latents=vars(args).get("latents", ""))  # --latents: the search's flag only

    @property
    def latent_projector(self) -> str:
        return self.projector or dataset_projector(self.dataset)

    def validate(self) -> TrialBase:
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset={self.preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
        return self

    def overrides(self, device: str) -> dict[str, Any]:
        """Dotted TrainConfig overrides (`build_config`) of a latent trial on `device`."""
        return {"model.preset": self.preset, "data.dataset": self.dataset, "data.projector": self.latent_projector,
                "data.resolution": self.resolution, "data.batch_size": self.batch_size,
                "data.num_train": self.num_train, "data.num_val": self.num_val, "data.num_probe": self.num_probe,
                "run.device": device, "run.compile": self.compile, "run.compile_mode": self.compile_mode,
                "data.loader": self.loader, **({"data.latents": self.latents} if self.latents else {})}


def check_placement(placement: Placement, batch_size: int) -> None:
    """Shared by the ablation and the search: per-trial resources and worker count, named by their flags."""
    workers, cpus, gpus = placement.workers, placement.cpus, placement.gpus
    if workers < 1:
        raise ConfigError(f"--workers-per-trial={workers}: must be >= 1")
    if cpus <= 0 or gpus < 0:
        raise ConfigError(f"--cpus-per-trial={cpus} / --gpus-per-trial={gpus}: must be > 0 and >= 0")
    gpus_per_worker = gpus / workers
    if workers > 1 and gpus_per_worker and (gpus_per_worker < 1 or not gpus_per_worker.is_integer()):
        raise ConfigError(f"--gpus-per-trial={gpus} over --workers-per-trial={workers} gives {gpus_per_worker:g} GPU "
                          "per worker: data-parallel workers need whole GPUs (NCCL cannot share one device between "
                          "ranks)")
    if batch_size % workers:
        raise ConfigError(f"--batch-size={batch_size}: must be divisible by --workers-per-trial={workers} (each "
                          "worker trains an equal slice of the global batch)")


def trial_resources(config: dict[str, Any]) -> Any:
    """Tune's resource request, read from each trial's own TrialSpec (a callable for `tune.with_resources`).

    Reading it from the trial, not the command line, keeps a resumed trial on the resources it
    started with. A multi-worker trial reserves only its driver; Ray Train reserves its workers.
    """
    from ray.tune import PlacementGroupFactory

    where = Placement(**config["trial"]["placement"])
    if where.workers > 1:
        return PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPUS}])
    return PlacementGroupFactory([{"CPU": where.cpus, **({"GPU": where.gpus} if where.gpus else {})}])


def concurrent_trials(placement: Placement) -> int:
    """As many trials as the cluster's CPUs (and GPUs, when trials use them) hold at once. Needs Ray started."""
    import ray

    total = ray.cluster_resources()
    cpus = placement.cpus + (TRIAL_DRIVER_CPUS if placement.workers > 1 else 0.0)  # a multi-worker trial's driver
    fits = [int(total.get("CPU", 1) // cpus)]
    if placement.gpus > 0:
        fits.append(int(total.get("GPU", 0) // placement.gpus))
    return max(1, min(fits))


def trial_dirname(trial: Any) -> str:
    """Short, readable trial folders, `<variant>_s<seed>_<id>` (Tune's default embeds the whole flattened config)."""
    spec = trial.config.get("trial", {})
    return f"{spec.get('variant', 'trial')}_s{spec.get('seed', 0)}_{trial.trial_id}"


def trial_tags(spec: TrialSpec) -> dict[str, Any]:
    """Columns added to every reported row: what the trial is, so results read without its config, and what one
    of its wall seconds costs in device seconds (its GPUs, else its CPUs: the resources `trial_resources` gives
    it from its own spec, which a resumed experiment keeps whatever its flags say now)."""
    from lmd.flops import run_flops
    from lmd.model import encoder_flops_per_sample

    cfg, m, where = spec.cfg, spec.cfg.mask, spec.placement
    return {"variant": spec.variant, "seed": spec.seed, "scheduler": m.scheduler, "mask_start": m.start,
            "mask_end": m.end, "mask_ramp": m.ramp, "projector": cfg.data.projector, "preset": cfg.model.preset,
            "total_steps": cfg.run.steps, "patch_size": cfg.model.patch_size, "tokens": cfg.model.num_patches,
            "depth": cfg.model.depth, "decoder_depth": cfg.model.decoder_depth, "peak_lr": cfg.optim.lr,
            "encoder_gflops": encoder_flops_per_sample(cfg.model) / 1e9, "devices": float(where.gpus or where.cpus),
            PLANNED_FLOPS: run_flops(cfg)}


def run_trial(config: dict[str, Any]) -> None:
    """Tune trainable of both experiments: the TrialSpec under "trial", run in one of two shapes by its workers."""
    spec = TrialSpec.from_dict(config["trial"])
    if spec.placement.workers > 1:
        _run_distributed_trial(spec)
    else:
        _run_local_trial(spec)


def _run_local_trial(spec: TrialSpec) -> None:
    from ray import tune

    from lmd.engine import CHECKPOINT_DIR
    from lmd.runtime import local_engine

    # data.loader as the experiment set it: `auto` holds a small store in memory and streams a large one
    # through Ray Data, whose reads ride on this trial's reserved CPUs (`lmd.data.stream.reader_options`).
    cfg = replace(spec.cfg, run=replace(spec.cfg.run, keep_last=1))
    tags = trial_tags(spec)
    scratch = Path(tempfile.mkdtemp(prefix="lmd-trial-"))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            adopt_checkpoint(Path(restored), scratch / CHECKPOINT_DIR)

    def report(row: dict[str, Any], ckpt: Path | None) -> None:
        saved = tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        tune.report({**row, **tags}, checkpoint=saved)

    # The experiment's driver hashed each store before any trial started (`build_stores`), as `fit_distributed`
    # does for its workers: a trial checks the manifest, footers and sizes, and hashes nothing again.
    engine = local_engine(cfg, scratch, reporter=report, verify_checksums=False)
    try:
        engine.fit(resume=checkpoint is not None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_distributed_trial(spec: TrialSpec) -> None:
    """The Train run is named after the trial and stored under the experiment (`train_storage`), so a
    restored trial refits the same run and Ray Train resumes it from its latest checkpoint.
    Per-trial CPUs and GPUs are split evenly over the workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lmd.config import ClusterConfig
    from lmd.distributed import fit_distributed

    cfg = spec.cfg  # each worker holds its store in memory or streams its lanes, as data.loader resolves
    where = spec.placement
    cluster = ClusterConfig(workers=where.workers, cpus_per_worker=where.cpus / where.workers,
                            gpus_per_worker=where.gpus / where.workers, storage=where.train_storage,
                            name=tune.get_context().get_trial_id(), max_failures=where.max_failures)
    # Train V2's fit() raises TrainingFailedError once the run's FailureConfig is spent: the trial then fails with it
    # (and Tune's own FailureConfig decides whether it is retried).
    fit_distributed(cfg, cluster, callbacks=[TuneReportCallback()], tags=trial_tags(spec), replay_history=True,
                    verify_checksums=False)  # the experiment's driver hashed the store (`build_stores`)
