"""Input pipeline speed against the engine's appetite, measured side by side in one run.

Prints, on this machine:
  - precompute: bundled-photo crops -> lmd-f8c4 latents -> Parquet shards, images/s;
  - Ray Data, one plain pass (read_parquet -> decode -> iter_torch_batches), samples/s;
  - RayLatentStream, the engine's deterministic per-epoch-shuffled stream (with next-epoch
    prefetch), samples/s over several epochs including each epoch's pipeline build;
  - the in-memory loader (what `--loader auto` picks for stores that fit in RAM), samples/s;
  - the engine's consumption for the `small` preset (train steps, samples/s);
and each loader's rate divided by the engine's (goal >= 10: the model, not the data, is the limit).

    python benchmarks/data_stream.py [--items 2048] [--epochs 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import ray
import torch

from lmd.config import build_config
from lmd.data.latents import build_store
from lmd.data.memory import InMemoryLatents
from lmd.data.store import read_store
from lmd.data.stream import RayLatentStream, ray_dataset
from lmd.projector import load_projector
from lmd.runtime import local_engine


def engine_rate(batch_size: int, steps: int = 15) -> float:
    cfg = build_config(overrides={"model.preset": "small", "data.dataset": "synthetic", "data.batch_size": batch_size,
                                  "data.num_train": batch_size, "data.num_val": 1, "run.device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        engine = local_engine(cfg, tmp)
        latents, noise = engine.data.batch(0), engine.mask_noise(batch_size, 0)
        for _ in range(3):
            engine.train_step(latents, 0.75, noise)
        start = time.perf_counter()
        for _ in range(steps):
            engine.train_step(latents, 0.75, noise)
        return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2048, help="training crops in the benchmark store")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bs = args.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        projector = load_projector("lmd-f8c4")
        start = time.perf_counter()
        build_store(root, "bundled", projector, 128, args.items, 64, progress=False)
        precompute = (args.items + 64) / (time.perf_counter() - start)

        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            start, seen = time.perf_counter(), 0
            for batch in ray_dataset(root / "train").iter_torch_batches(batch_size=bs, drop_last=True):
                seen += batch["latent"].shape[0]
            raw = seen / (time.perf_counter() - start)

            stream = RayLatentStream(root / "train", bs, seed=0)
            steps = stream.steps_per_epoch * args.epochs
            start = time.perf_counter()
            for step in range(steps):
                stream.batch(step)
            streamed = steps * bs / (time.perf_counter() - start)
            stream.close()
        finally:
            ray.shutdown()

        memory = InMemoryLatents(read_store(root / "train"), bs, seed=0)
        start = time.perf_counter()
        for step in range(steps):
            memory.batch(step)
        in_memory = steps * bs / (time.perf_counter() - start)

    consume = engine_rate(bs)
    print(f"threads={torch.get_num_threads()} items={args.items} batch={bs} epochs={args.epochs}")
    print(f"{'stage':<44}{'rate':>14}{'/ engine':>10}")
    print(f"{'precompute (crop + encode + write), images/s':<44}{precompute:>14.1f}{'':>10}")
    rows = (("Ray Data plain pass, samples/s", raw), ("RayLatentStream (shuffled epochs), samples/s", streamed),
            ("in-memory loader, samples/s", in_memory), ("engine consumption, small preset", consume))
    for name, rate in rows:
        print(f"{name:<44}{rate:>14.1f}{rate / consume:>9.1f}x")


if __name__ == "__main__":
    main()
