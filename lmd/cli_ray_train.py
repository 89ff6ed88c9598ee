"""`lmd train --workers N`: a Ray Train run from the command line (lmd.distributed does the training).

Around `fit_distributed`: one driver per run (a lock beside the run's storage), resources checked before Ray
waits for them, and every failure as one `lmd: error:` line, including a run whose workers failed on every
attempt (Train V2 raises `TrainingFailedError` from fit()): its line names the lowest rank's own error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmd.config import ClusterConfig, TrainConfig
from lmd.entry import EXIT_RUNTIME, EXIT_USAGE, fail, init_ray, shutdown_ray


def train_on_ray(cfg: TrainConfig, cluster: ClusterConfig, address: str | None) -> int:
    """`lmd train --workers N`: lock the run, check the cluster's resources, fit, print the result line."""
    from ray.train import TrainingFailedError

    from lmd.data.images import ImageSourceError
    from lmd.data.store import StoreError
    from lmd.distributed import fit_distributed, run_name
    from lmd.entry import NotEnoughResources, check_cluster_resources, local_ray
    from lmd.io import storage_uri
    from lmd.locks import LockedError, hold
    from lmd.projector import ProjectorError

    cluster.validate(cfg)
    failed = ""
    w, c, g = cluster.workers, cluster.cpus_per_worker, cluster.gpus_per_worker
    if g and local_ray(address) and torch_gpus() < w * g:  # a local Ray never grows: it would wait forever
        fail(f"--workers={w} x --gpus-per-worker={g:g}: this machine has {torch_gpus()} GPUs", EXIT_USAGE)
    try:  # two drivers of one run would both resume it and overwrite each other's checkpoints
        lock = hold(Path(storage_uri(cluster.storage)) / f".{cluster.name or run_name(cfg)}.lock",
                    f"run {cluster.name or run_name(cfg)}") if "://" not in cluster.storage else None
    except LockedError as err:
        fail(str(err), EXIT_RUNTIME)
    except OSError as err:
        fail(f"--storage={cluster.storage}: cannot write there ({err.strerror or err})", EXIT_RUNTIME)
    init_ray(address)  # a wrong address: ClusterUnreachable, one line from main()
    try:
        need = {"CPU": (f"--workers={w} x --cpus-per-worker={c:g}", w * c),
                "GPU": (f"--workers={w} x --gpus-per-worker={g:g}", w * g)}
        warning = check_cluster_resources(need, address, "this run")
        if warning:
            print(f"lmd: warning: {warning}", file=sys.stderr)
        result = fit_distributed(cfg, cluster)
    except NotEnoughResources as err:
        fail(str(err), EXIT_USAGE)
    except TrainingFailedError as err:  # Train V2's fit() raises once its FailureConfig is spent
        failed = f"training failed after --max-failures={cluster.max_failures} restarts: {_first_cause(err)}"
    except (StoreError, ProjectorError, ImageSourceError) as err:
        fail(str(err), EXIT_RUNTIME)
    finally:
        shutdown_ray()  # first: Ray flushes the workers' forwarded logs then, so the error below is the last line
        if lock is not None:
            lock.release()
    if failed:
        fail(failed, EXIT_RUNTIME)
    print(json.dumps({"run": str(result.path), "step": result.metrics.get("step"),
                      "final_loss": result.metrics.get("loss_last"),
                      "checkpoint": result.checkpoint.path if result.checkpoint else None,
                      "workers": result.metrics.get("workers"), "num_nodes": result.metrics.get("num_nodes")}))
    return 0


def _first_cause(err: BaseException) -> str:
    """One line for a failed Train run: the lowest rank's own error (Ray wraps it with its traceback)."""
    failures = getattr(err, "worker_failures", None) or {}
    cause: BaseException = failures[min(failures)] if failures else err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    # A wrapped worker error ends with the original "Type: message" line after its traceback.
    named = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
    where = f"rank {min(failures)}: " if failures else ""
    return where + (named[-1] if named else type(cause).__name__)


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()
