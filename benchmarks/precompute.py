"""`lmd precompute` speed: the Ray Data pipeline against the one-process path, side by side on the same inputs.

Prints images/s of both (each from the call to the written manifests, so the pipeline's start-up
counts; joining Ray does not), their ratio (issue 12's goal: >= 1.8x on 2 CPU cores, >= 2,000
images/s at 128 px on one GPU), the pipeline's rate per encoder, whether both wrote the same bytes,
and with --profile where the one-process time goes (image reads, encodes, shard writes).

    python benchmarks/precompute.py                      # bundled crops, 128 px, 192 + 64 items, CPU, 2 runs each
    python benchmarks/precompute.py --profile            # and the one-process time split
    python benchmarks/precompute.py --device cuda --items 8192 --num-val 1024 --batch-size 256
    python benchmarks/precompute.py --one-process --device cuda --items 4096 --profile   # no Ray (a lent GPU)

`--one-process` times only the one-process path (with --profile, its split), without Ray: on one
GPU it is the encoder's own rate, which bounds what the pipeline's single GPU encoder can deliver.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmd.data import precompute
from lmd.data.images import image_source
from lmd.data.location import Location
from lmd.data.store_writer import _write_shard, chunks, encode_chunk, precompute_store
from lmd.entry import init_ray
from lmd.projector import load_projector


def one_process(root: Path, args: argparse.Namespace) -> float:
    """Seconds for today's path (`lmd.data.latents.build_store`, with the encode on `--device`)."""
    projector = load_projector(args.projector, device=_device(args.device))
    start = time.perf_counter()
    for split, num in (("train", args.items), ("val", args.num_val)):
        source = image_source(args.dataset, split, args.resolution, num)
        precompute_store(root / split, num_items=len(source), load_images=source.images,
                         encode=lambda x: projector.encode(x.to(_device(args.device))), projector=projector.info(),
                         source=source.describe(), split=split, shard_size=args.shard_size,
                         batch_size=args.batch_size, progress=False,
                         load_labels=source.labels if source.classes else None, classes=source.classes)
    return time.perf_counter() - start


def pipeline(root: Path, args: argparse.Namespace, pool: precompute.EncoderPool) -> float:
    projector = load_projector(args.projector)
    start = time.perf_counter()
    precompute.build_store(root, args.dataset, projector, args.resolution, args.items, args.num_val, pool=pool,
                           shard_size=args.shard_size, batch_size=args.batch_size, progress=False)
    return time.perf_counter() - start


def profile(args: argparse.Namespace) -> dict[str, float]:
    """Seconds spent reading images, encoding and writing shards by the one-process path's steps."""
    device = _device(args.device)
    projector = load_projector(args.projector, device=device)
    source = image_source(args.dataset, "train", args.resolution, args.items)
    spent = {"read": 0.0, "encode": 0.0, "write": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for k, start in enumerate(range(0, len(source), args.shard_size)):
            parts = []
            for a, b in chunks(start, min(len(source), start + args.shard_size), args.batch_size):
                t0 = time.perf_counter()
                images = source.images(a, b)
                t1 = time.perf_counter()
                parts.append(encode_chunk(images, lambda x: projector.encode(x.to(device)), a, b, "float16"))
                t2 = time.perf_counter()
                spent["read"], spent["encode"] = spent["read"] + t1 - t0, spent["encode"] + t2 - t1
            t0 = time.perf_counter()
            _write_shard(Location.of(tmp), k, start, np.concatenate(parts), "float16")
            spent["write"] += time.perf_counter() - t0
    return spent


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    return files == sorted(p.relative_to(b) for p in b.rglob("*.parquet")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _device(device: str) -> str:
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def single_one_process(args: argparse.Namespace) -> None:
    """The one-process path alone, best of `--repeats` (its first run also loads the projector's kernels)."""
    total = args.items + args.num_val
    seconds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            seconds.append(one_process(Path(tmp) / "single", args))
    device = _device(args.device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} torch threads"
    print(f"# {args.dataset} {args.resolution} px, {total} items, {args.projector}, batch {args.batch_size}, {name}")
    print(f"one process       {total / min(seconds):9.1f} images/s  (best of {args.repeats}: {min(seconds):.1f} s)")
    if args.profile:
        _print_profile(args)


def _print_profile(args: argparse.Namespace) -> None:
    spent = profile(args)
    busy = sum(spent.values())
    print("one-process time split (train split): " + ", ".join(
        f"{k} {v:.1f} s ({100 * v / busy:.0f}%, {args.items / v:.0f} images/s)" for k, v in spent.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bundled")
    parser.add_argument("--projector", default="lmd-f8c4")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--items", type=int, default=192, help="training items")
    parser.add_argument("--num-val", type=int, default=64, help="held-out items")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encoders", type=int, help="pipeline encoders (default: one per GPU, else one per CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--address", help="Ray cluster (default: a local Ray on this machine)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path, in ABBA order (mean reported)")
    parser.add_argument("--profile", action="store_true", help="also time the one-process path's steps")
    parser.add_argument("--one-process", action="store_true", help="only the one-process path (no Ray needed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one_process:
        single_one_process(args)
        return

    init_ray(args.address, log_to_driver=False)
    import ray

    pool = precompute.encoder_pool(args.encoders, args.device, ray.cluster_resources())
    total = args.items + args.num_val
    # ABBA order (one process, pipeline, pipeline, one process, ...): a load that drifts during the run
    # (other jobs on a shared machine) weighs on both alike.
    order = [("single", "pipe"), ("pipe", "single")]
    spent = {"single": 0.0, "pipe": 0.0}
    identical = True
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for path in order[r % 2]:
                run = one_process if path == "single" else lambda root, a: pipeline(root, a, pool)
                spent[path] += run(Path(tmp) / path, args)
            identical = identical and same_bytes(Path(tmp) / "single", Path(tmp) / "pipe")
        # The pipeline's fixed cost (actors and workers importing torch, Ray Data planning): a 2-item build.
        startup_s = pipeline(Path(tmp) / "startup", argparse.Namespace(**{**vars(args), "items": 1, "num_val": 1}),
                             pool)
    ray.shutdown()
    single_s, pipe_s = spent["single"] / args.repeats, spent["pipe"] / args.repeats

    single, pipe = total / single_s, total / pipe_s
    print(f"# {args.dataset} {args.resolution} px, {total} items, {args.projector}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads in one process; pipeline: {pool.size} encoders on "
          f"{pool.device} ({pool.num_cpus:g} CPU, {pool.num_gpus:g} GPU each)")
    print(f"one process       {single:9.1f} images/s  ({single_s:.1f} s a run, mean of {args.repeats})")
    print(f"Ray Data pipeline {pipe:9.1f} images/s  ({pipe_s:.1f} s a run, mean of {args.repeats})")
    print(f"ratio             {pipe / single:9.2f}x")
    print(f"per encoder       {pipe / pool.size:9.1f} images/s")
    steady = total / max(pipe_s - startup_s, 1e-9)
    print(f"pipeline start-up {startup_s:9.1f} s (a 2-item build); past it {steady:.1f} images/s, "
          f"{steady / single:.2f}x the one process")
    print(f"same shard bytes  {'yes' if identical else 'NO'}")
    if args.profile:
        _print_profile(args)


if __name__ == "__main__":
    main()
