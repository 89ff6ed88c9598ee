"""Assembling a training process at its entry point: process-wide settings, then the engine's parts.

The engine takes everything it uses as arguments (data, device, model wrapper, reporter) and
changes no global state; this module is where an entry point sets the process up
(`setup_runtime`) and where a single-process run (`lmd train`, a one-worker Tune trial, a
benchmark) makes the engine's parts (`local_engine`). The Ray Train worker (`lmd.distributed`)
calls `setup_runtime` too and makes the parts from its dataset shard instead.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lmd.config import TrainConfig
from lmd.data.latents import prepare_data
from lmd.device import resolve_device
from lmd.engine import Engine, Reporter, RunDirError
from lmd.locks import LOCK_FILE, LockedError, hold


def setup_runtime(cfg: TrainConfig, device: torch.device | None = None, threads: int | None = None) -> torch.device:
    """The process-wide settings of a training process, in one place. Returns the device to train on.

    Seeds Python, NumPy and torch from `run.seed` (the engine's own randomness is explicit
    generators; this covers anything else); enables TF32 for the fp32 matmuls on CUDA (the bf16
    autocast covers the model; TF32 covers evaluation and optimizer-side matmuls); and sets torch's
    CPU threads when the caller knows its share of the machine (a Tune trial's CPUs).
    """
    device = device or resolve_device(cfg.run.device)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    torch.manual_seed(cfg.run.seed)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    return device


def local_engine(cfg: TrainConfig, run_dir: str | Path, reporter: Reporter | None = None,
                 threads: int | None = None, verify_checksums: bool = True) -> Engine:
    """The engine of a single-process run: data from the run's store (or synthetic), on the run's device.

    The store is validated against the run; `verify_checksums=False` skips hashing its shards, for
    callers whose driver hashed them once already (Tune trials: a store on S3 would otherwise be
    downloaded once per trial just to hash it).

    A streamed store (`data.loader=ray`) starts or joins Ray here, at the entry point, not in the engine.
    The run directory is locked (`<run_dir>/.lock`) for as long as the engine lives: a second process
    training into it is refused with RunDirError naming the first one's pid.
    """
    device = setup_runtime(cfg, threads=threads)
    data = prepare_data(cfg, verify_checksums=verify_checksums)
    try:  # after the data, so a bad store or dataset leaves the run directory untouched
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission: the engine's own wording
        raise RunDirError(f"run dir {run_dir}: cannot write there ({err.strerror or err})") from None
    try:
        lock = hold(Path(run_dir) / LOCK_FILE, f"run directory {run_dir}")
    except LockedError as err:
        raise RunDirError(str(err)) from None
    engine = Engine(cfg, run_dir, data, device, reporter=reporter)
    engine.run_lock = lock  # released when the engine is collected, or when the process ends however it ends
    return engine
