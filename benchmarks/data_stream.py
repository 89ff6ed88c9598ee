"""The streamed loader's delivery rate against what trainers consume, measured side by side in one run.

Builds a store of `--items` random 4x32x32 float16 latents (what 256 px images give under an f8c4
projector; default 200,000 items, 1.6 GB), then prints, on this machine:
  - the stream's start-up (Ray Data pipeline to first batch), seconds;
  - RayLatentStream (the engine's source: lanes, shuffle windows, one pipeline for the run) once
    started, samples/s, in total and per core, over `--steps` batches (spanning epochs if needed);
  - the Ray Data plain pass (read_parquet -> decode -> iter_torch_batches), samples/s;
  - the `small` preset's consumption on this CPU (train steps at the same batch size), samples/s;
and how many of this machine's cores feed one H100 training `base_p4` (16,000 samples/s at batch
1024, compiled, bf16: issue 14's measurement).

    python benchmarks/data_stream.py [--items 200000] [--batch-size 1024] [--steps 400] [--readers 2] [--store DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from lmd.config_build import build_config
from lmd.data.store_writer import precompute_store
from lmd.data.stream import RayLatentStream, ray_dataset
from lmd.runtime import local_engine

H100_BASE_P4 = 16_000  # samples/s, base_p4 compiled at batch 1024 on one H100 (issue 14's table)


def random_store(root: Path, items: int, shard_size: int = 512) -> None:  # `lmd precompute`'s default
    def load(start: int, stop: int) -> torch.Tensor:  # "images" that the identity encode below keeps
        return torch.randn(stop - start, 4, 32, 32, generator=torch.Generator().manual_seed(start))

    precompute_store(root, num_items=items, load_images=load, encode=lambda x: x, projector={"name": "random"},
                     source={"dataset": "random", "items": items}, split="train", shard_size=shard_size,
                     batch_size=shard_size, progress=False)


def engine_rate(batch_size: int, steps: int = 3) -> float:
    cfg = build_config(overrides={"model.preset": "small", "data.dataset": "synthetic", "data.batch_size": batch_size,
                                  "data.num_train": batch_size, "data.num_val": 1, "run.device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        engine = local_engine(cfg, tmp)
        latents, noise = engine.data.batch(0), engine.mask_noise(batch_size, 0)
        engine.train_step(latents, 0.75, noise)
        start = time.perf_counter()
        for _ in range(steps):
            engine.train_step(latents, 0.75, noise)
        return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000, help="latents in the benchmark store")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=400, help="batches timed after the first")
    parser.add_argument("--plain-steps", type=int, default=40, help="batches of the (slow) plain Ray Data pass")
    parser.add_argument("--readers", type=int, default=2, help="concurrent window-read tasks")
    parser.add_argument("--store", help="reuse (or build once into) this folder instead of a temporary one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bs, cores = args.batch_size, os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.store) if args.store else Path(tmp) / "store"
        start = time.perf_counter()
        if not (root / "manifest.json").is_file():
            random_store(root, args.items)
        print(f"store: {args.items} x 4x32x32 float16 in {root} ({time.perf_counter() - start:.0f} s to build)")
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            stream = RayLatentStream(root, bs, seed=0, readers=args.readers, total_steps=args.steps + 1)
            start = time.perf_counter()
            stream.batch(0)
            startup = time.perf_counter() - start
            start = time.perf_counter()
            for step in range(1, args.steps + 1):
                stream.batch(step)
            streamed = args.steps * bs / (time.perf_counter() - start)
            stream.close()

            seen, start = 0, time.perf_counter()
            for batch in ray_dataset(root).iter_torch_batches(batch_size=bs, drop_last=True):
                seen += batch["latent"].shape[0]
                if seen >= args.plain_steps * bs:
                    break
            plain = seen / (time.perf_counter() - start)
        finally:
            ray.shutdown()
    consume = engine_rate(min(bs, 256))  # samples/s barely depend on the batch here; 1024 takes minutes

    print(f"cores={cores} batch={bs} steps={args.steps} readers={args.readers} "
          f"(epoch = {stream.steps_per_epoch} batches)")
    print(f"{'what':<60}{'samples/s':>12}{'per core':>10}")
    rows = (("RayLatentStream once started (lanes, windows)", streamed),
            ("Ray Data plain pass (read_parquet, iter_torch_batches)", plain),
            ("`small` preset training on this CPU (consumes, batch 256)", consume),
            ("one H100 training base_p4 (consumes; issue 14)", H100_BASE_P4))
    for name, rate in rows:
        print(f"{name:<60}{rate:>12,.0f}{rate / cores:>10,.0f}")
    print(f"stream start-up (pipeline to first batch): {startup:.1f} s, paid once per run")
    print(f"stream / small-preset consumption: {streamed / consume:.1f}x; cores per H100 base_p4: "
          f"{H100_BASE_P4 / (streamed / cores):.1f}")


if __name__ == "__main__":
    main()
