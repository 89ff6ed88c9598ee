"""The Ray Train shell around the engine: data-parallel LMD training on a Ray cluster.

Three small layers, Ray outermost: `fit_distributed` (driver) builds a `TorchTrainer`;
`train_loop_per_worker` turns a worker's Ray Data shard into the engine's batch source, wraps the
model in DDP and runs `Engine.fit`; the engine's reporter hook turns each log row into
`ray.train.report`, attaching the checkpoint rank 0 just wrote (the engine's own verified format,
copied into the run's storage by Ray).

Data: each worker opens the store itself from a path all nodes see (shared storage). Streamed
(`loader=ray`), a worker's Ray Data pipeline reads only the shards of its own lanes
(`lmd.data.lanes`; Ray Data places the read tasks) and moves only its slice of each global batch to its device; in
memory (small stores), every worker holds the store and takes its slice of the same global order.

Determinism: either way the global batch and mask noise of a step do not depend on the worker
count, so the update equals the single-process engine's (up to the all-reduce's summation order),
and a restart (worker failure or a rerun of the same run name) resumes at the exact step, LR, data
position and mask-scheduler position of the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmd.checkpoint import adopt_checkpoint, read_manifest, resume_point, set_aside
from lmd.config import ClusterConfig, TrainConfig
from lmd.data.latents import prepare_data
from lmd.engine import CHECKPOINT_DIR, Engine
from lmd.io import storage_uri
from lmd.runtime import setup_runtime

log = logging.getLogger(__name__)


def _reporter(placement: dict[str, Any]):
    def report(row: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        ray.train.report({**row, **placement}, checkpoint=ckpt,
                         checkpoint_dir_name=checkpoint.name if checkpoint else None)

    return report


def _placement(world: int) -> dict[str, Any]:
    """Where the workers run (node ids gathered from every rank), reported with the metrics."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world > 1 and torch.distributed.is_initialized():
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node)
    return {"workers": world, "num_nodes": len(set(nodes)), "worker_nodes": ",".join(nodes)}


def _log_to_driver() -> None:
    """The engine's progress (and its resume point) on the worker's stderr, which Ray forwards to the driver."""
    lmd_log = logging.getLogger("lmd")
    if not lmd_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        lmd_log.addHandler(handler)
        lmd_log.setLevel(logging.INFO)
        lmd_log.propagate = False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    _log_to_driver()
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = setup_runtime(cfg, device=ray.train.torch.get_device())
    # Each worker opens the store itself, from a path every node sees: streamed (only its own lanes, read
    # by Ray Data tasks) or in memory, with the projector and probe set.
    data = prepare_data(cfg, progress=False, rank=rank, world_size=world, verify_checksums=False)

    # Engine checkpoints are written to worker-local scratch, then handed to Ray, which copies
    # them into the run's storage; on a restart the latest one comes back the same way.
    scratch = Path(tempfile.mkdtemp(prefix=f"lmd-rank{rank}-"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("fallback_checkpoint"):  # Ray's own record was torn: see below
        checkpoint = ray.train.Checkpoint.from_directory(config["fallback_checkpoint"])
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            adopted = adopt_checkpoint(Path(restored), scratch / CHECKPOINT_DIR)
        if config.get("replay_history"):
            history = read_manifest(adopted).get("history", [])
    local_cfg = replace(cfg, run=replace(cfg.run, keep_last=1))  # storage keeps the history, not scratch
    report = _reporter({**_placement(world), **config.get("tags", {})})
    engine = Engine(local_cfg, scratch, data, device, wrap_model=ray.train.torch.prepare_model,  # DDP when world > 1
                    reporter=report, rank=rank, world_size=world)
    for row in history:  # every rank reports (a collective), without a checkpoint: rows up to the resume step
        report(row, None)
    try:
        engine.fit(resume=checkpoint is not None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints


def _recover_torn_snapshot(run: Path) -> str | None:
    """When a killed driver left Ray's checkpoint record torn, resume from our newest verified checkpoint instead.

    Ray 2.60 rewrites that record in place (truncate, then write), so a SIGKILL in between leaves it
    empty and every rerun would fail in Ray's controller. The engine's checkpoints carry their own
    manifest and checksums, so the newest one that verifies is a sound resume point: the torn record is
    kept aside (`.rejected-torn`) and the workers adopt that checkpoint (the fallback in
    `train_loop_per_worker`); Ray starts a fresh record from there.
    """
    snapshot = run / RAY_SNAPSHOT
    if not snapshot.is_file():
        return None
    try:
        json.loads(snapshot.read_text())
        return None
    except (ValueError, UnicodeDecodeError):
        pass
    moved = set_aside(snapshot, "rejected-torn")
    point = resume_point(run)
    if point is None:
        log.warning("%s: torn by a crash (kept as %s) and no checkpoint to resume from: starting over", snapshot,
                    moved.name)
        return None
    log.warning("%s: torn by a crash (kept as %s); resuming from the newest verified checkpoint %s", snapshot,
                moved.name, point[0].name)
    return str(point[0])


def run_name(cfg: TrainConfig) -> str:
    """Stable (no timestamp): rerunning the same command resumes the same run."""
    return f"lmd-{cfg.model.preset}-{cfg.mask.scheduler}-s{cfg.run.seed}"


def fit_distributed(cfg: TrainConfig, cluster: ClusterConfig, callbacks: list | None = None,
                    tags: dict[str, Any] | None = None, replay_history: bool = False,
                    verify_checksums: bool = True) -> Any:
    """Train with Ray Train; returns the `ray.train.Result`. Rerunning with the same name resumes.

    `callbacks` (e.g. Tune's TuneReportCallback), `tags` (extra columns on every reported row) and
    `replay_history` serve the Tune driver-function pattern: a Tune trial that fits a multi-worker
    TorchTrainer. A Tune trial restarted after a driver crash starts with an empty history, so a
    resumed run first re-reports the rows up to its checkpoint (each row is kept once by step).
    `verify_checksums=False` (a Tune trial, whose experiment driver hashed the store) skips hashing it here.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster.validate(cfg)
    if cfg.data.dataset != "synthetic":
        from lmd.data.latents import check_stream_split, resolve_loader, resolve_store
        from lmd.data.store import read_manifest

        # Built once and checked against the run (hashed, unless the caller did) before any worker starts.
        root, _ = resolve_store(cfg, verify_checksums=verify_checksums)
        if root.is_local:
            # The workers open the store the driver checked, by its absolute path: they run in other working
            # directories (a relative --latents named nothing there), and with the default cache each one would
            # otherwise build its own copy, racing the others on its node for the store's lock. On a multi-node
            # cluster the path must be on storage every node sees (or an s3:// store).
            cfg = replace(cfg, data=replace(cfg.data, latents=str(root.local_path.absolute())))
        loader = resolve_loader(cfg.data.loader, read_manifest(root / "train"), cfg.data.memory_limit_mb)
        if loader == "ray":  # each worker reads whole lanes (a worker's reads ask for no CPU: reader_options)
            check_stream_split(cfg, cluster.workers, "--workers")
    storage = storage_uri(cluster.storage)
    name = cluster.name or run_name(cfg)
    fallback = _recover_torn_snapshot(Path(storage) / name) if "://" not in storage else None
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=cfg.run.keep_last,
        checkpoint_score_attribute="val_masked_mse_fixed" if cluster.keep_best else None,
        checkpoint_score_order="min")
    use_gpu = cluster.gpus_per_worker > 0
    resources = {"CPU": cluster.cpus_per_worker, **({"GPU": cluster.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "tags": tags or {}, "replay_history": replay_history,
                           "fallback_checkpoint": fallback},
        scaling_config=ray.train.ScalingConfig(num_workers=cluster.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy="STRICT_SPREAD" if cluster.spread else "PACK"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
                                       checkpoint_config=checkpoint_config, callbacks=callbacks or []),
    )
    return trainer.fit()
