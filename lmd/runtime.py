"""Assembling a training process at its entry point: process-wide settings, then the engine's parts.

The engine takes everything it uses as arguments (data, device, model wrapper, reporter); this is
where a single-process entry point (`lmd train`, a one-worker Tune trial, a benchmark) makes them.
The Ray Train worker (`lmd.distributed`) makes the same parts from its dataset shard instead.
"""

from __future__ import annotations

from pathlib import Path

from lmd.config import TrainConfig
from lmd.engine import Engine, Reporter


def local_engine(cfg: TrainConfig, run_dir: str | Path, reporter: Reporter | None = None) -> Engine:
    """The engine of a single-process run: data from the run's store (or synthetic), on the run's device."""
    return Engine(cfg, run_dir, reporter=reporter)
