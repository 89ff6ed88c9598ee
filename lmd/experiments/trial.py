"""Tune trials over the same engine loop, in two shapes chosen by `workers` in the trial config.

- One worker: the engine runs in the trial's own process (a function trainable). A TorchTrainer
  per trial costs ~20 s of start-up on a small machine, a function trial well under a second.
  Checkpoints are the engine's verified format, handed to `tune.report`; a restored trial continues
  from its latest one at the exact step.
- Several workers: the trial is Ray's driver function for Tune over Train. It fits a data-parallel
  TorchTrainer (lmd.distributed) whose rows reach Tune through TuneReportCallback; the trial holds
  almost nothing itself (TRIAL_DRIVER_CPUS) and Ray Train places the workers.

Either way each process loads the (small, pre-built) latent store into memory once, instead of
streaming it with Ray Data: read tasks would otherwise wait behind trials that hold every CPU.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmd.checkpoint import adopt_checkpoint
from lmd.config import ConfigError, TrainConfig
from lmd.engine import CHECKPOINT_DIR, Engine

TRIAL_DRIVER_CPUS = 0.01  # a multi-worker trial only drives its TorchTrainer (Ray refuses 0)


def _placement_of(config: dict[str, Any]) -> dict[str, Any]:
    """The placement keys of a trial config, wherever the experiment put them (ablation: under "trial";
    search: under "placement"); older single-worker trial configs have none."""
    config = config.get("trial", config)
    return config.get("placement", config)


def trial_resources(config: dict[str, Any]) -> Any:
    """Tune's resource request, read from each trial's own config (a callable for `tune.with_resources`).

    Reading it from the config, not the command line, keeps a resumed trial on the resources it
    started with. A multi-worker trial reserves only its driver; Ray Train reserves its workers.
    """
    from ray.tune import PlacementGroupFactory

    where = _placement_of(config)
    if where.get("workers", 1) > 1:
        return PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPUS}])
    gpus = where.get("gpus_per_trial", 0.0)
    return PlacementGroupFactory([{"CPU": where.get("cpus_per_trial", 1.0), **({"GPU": gpus} if gpus else {})}])


def max_concurrent_trials(workers: int, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """As many trials as the cluster's CPUs (and GPUs, when trials use them) hold at once."""
    import ray

    total = ray.cluster_resources()
    cpus = cpus_per_trial + (TRIAL_DRIVER_CPUS if workers > 1 else 0.0)  # a multi-worker trial's driver too
    fits = [int(total.get("CPU", 1) // cpus)]
    if gpus_per_trial > 0:
        fits.append(int(total.get("GPU", 0) // gpus_per_trial))
    return max(1, min(fits))


def check_trial_placement(args: argparse.Namespace) -> None:
    """Shared by the ablation and the search: per-trial resources and worker count."""
    if args.workers_per_trial < 1:
        raise ConfigError(f"--workers-per-trial={args.workers_per_trial}: must be >= 1")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ConfigError(f"--cpus-per-trial={args.cpus_per_trial} / --gpus-per-trial={args.gpus_per_trial}: "
                          "must be > 0 and >= 0")
    gpus_per_worker = args.gpus_per_trial / args.workers_per_trial
    if args.workers_per_trial > 1 and gpus_per_worker and (gpus_per_worker < 1 or not gpus_per_worker.is_integer()):
        raise ConfigError(f"--gpus-per-trial={args.gpus_per_trial} over --workers-per-trial={args.workers_per_trial}"
                          f" gives {gpus_per_worker:g} GPU per worker: data-parallel workers need whole GPUs "
                          "(NCCL cannot share one device between ranks)")
    if args.batch_size % args.workers_per_trial:
        raise ConfigError(f"--batch-size={args.batch_size}: must be divisible by --workers-per-trial="
                          f"{args.workers_per_trial} (each worker trains an equal slice of the global batch)")


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """The placement keys every trial config carries (workers, per-trial resources, the Train runs' storage)."""
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    return {"workers": args.workers_per_trial, "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial, "train_storage": f"{storage}/{args.name}/train"}


def trial_tags(config: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """Columns added to every reported row: what the trial is, so results read without its config."""
    tags = {key: config[key] for key in ("variant", "seed") if key in config}
    m = cfg.mask
    return {**tags, "scheduler": m.scheduler, "mask_start": m.start, "mask_end": m.end, "mask_ramp": m.ramp,
            "projector": cfg.data.projector, "preset": cfg.model.preset, "total_steps": cfg.run.steps,
            "patch_size": cfg.model.patch_size, "tokens": cfg.model.num_patches}


def trial_dirname(trial: Any) -> str:
    """Short, readable trial folders (Tune's default embeds the whole flattened config)."""
    config = trial.config.get("trial", trial.config)
    label = config.get("variant") or config.get("scheduler") or "trial"
    seed = f"_s{config['seed']}" if "seed" in config else ""
    return f"{label}{seed}_{trial.trial_id}"


def run_trial(config: dict[str, Any]) -> None:
    """Tune trainable for every trial: dispatches on the trial's worker count."""
    config = config.get("trial", config)  # grid-searched trials arrive under "trial"
    if _placement_of(config).get("workers", 1) > 1:
        _run_distributed_trial(config)
    else:
        _run_local_trial(config)


def _run_local_trial(config: dict[str, Any]) -> None:
    from ray import tune

    cfg = TrainConfig.from_dict(config["cfg"])
    cfg = replace(cfg, data=replace(cfg.data, loader="memory"), run=replace(cfg.run, keep_last=1))
    tags = trial_tags(config, cfg)
    scratch = Path(tempfile.mkdtemp(prefix="lmd-trial-"))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            adopt_checkpoint(Path(restored), scratch / CHECKPOINT_DIR)

    def report(row: dict[str, Any], ckpt: Path | None) -> None:
        saved = tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        tune.report({**row, **tags}, checkpoint=saved)

    engine = Engine(cfg, scratch, reporter=report)
    try:
        engine.fit(resume=checkpoint is not None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_distributed_trial(config: dict[str, Any]) -> None:
    """The Train run is named after the trial and stored under the experiment (`train_storage`), so a
    restored trial refits the same run and Ray Train resumes it from its latest checkpoint.
    Per-trial CPUs and GPUs are split evenly over the workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lmd.config import ClusterConfig
    from lmd.distributed import fit_distributed

    cfg = TrainConfig.from_dict(config["cfg"])
    cfg = replace(cfg, data=replace(cfg.data, loader="memory"))  # workers read the small store themselves
    tags = trial_tags(config, cfg)
    where = _placement_of(config)
    workers = where["workers"]
    cluster = ClusterConfig(workers=workers, cpus_per_worker=where.get("cpus_per_trial", 1.0 * workers) / workers,
                            gpus_per_worker=where.get("gpus_per_trial", 0.0) / workers,
                            storage=where["train_storage"],
                            name=tune.get_context().get_trial_id(), max_failures=where.get("max_failures", 1))
    result = fit_distributed(cfg, cluster, callbacks=[TuneReportCallback()], tags=tags, replay_history=True)
    if result.error is not None:
        raise result.error
