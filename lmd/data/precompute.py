"""`lmd precompute` as a Ray Data pipeline: parallel image reads, a pool of encoder actors, atomic shards.

The same build as the one-process `lmd.data.store_writer.precompute_store`, through the same steps of
store.py (`store_identity`, `open_store`, `pending_shards`, `write_shard`, `finish_store`), so the
plan, the refusal of another store, the shard checks and the manifest have one definition, and the
same inputs give the same shard bytes and manifest (but `created_unix`)::

    (shard, start, stop) chunks of the shards still to encode: batch_size items from each shard's start,
    as `precompute_store` chunks them (conv results can depend on the batch's composition)
      -> map(_read_chunk)            CPU tasks: the chunk's images float32 [n, 3, H, W] (and labels [n])
      -> map_batches(_Encoder)       a fixed pool of actors holding the projector, one chunk per call,
                                     one GPU each when the cluster has GPUs: latents [n, C, h, w] in `dtype`
      -> driver                      gathers each shard's chunks and writes it atomically; manifest last

Shards are written by the driver: latents are ~48x smaller than the images at f8c4 (fp16), so the
write is cheap, and the store lands where the command runs. Ray must already be initialised
(`lmd.entry.init_ray`); on a cluster every node must be able to open the image source (the named
datasets, or the image folder at the same path).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmd.data.images import ImageSource, ImageSourceError, image_source
from lmd.data.location import Location, Where
from lmd.data.store import StoreError
from lmd.data.store_writer import (
    chunks,
    encode_chunk,
    finish_store,
    open_store,
    pending_shards,
    shard_range,
    store_identity,
    write_shard,
)
from lmd.projector import Projector

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A read or encode task of the pipeline failed; the message is the task's own error, in one line."""


NAMED_DATASETS = ("bundled", "fashion-mnist", "mnist")
# A CPU encoder declares half a CPU: reads cost 4x less than encodes or better (128 px, lmd-f8c4:
# benchmarks/precompute.py --profile), so one single-threaded encoder per core keeps the cores busy
# while a CPU stays declared for the reads (a whole CPU per encoder would hold every CPU and starve them).
CPU_ENCODER_CPUS = 0.5


@dataclass(frozen=True)
class EncoderPool:
    """The encoder actors (how many, what each reserves) and what each read task reserves."""

    size: int
    num_cpus: float
    num_gpus: float
    read_cpus: float = 1.0

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def encoder_pool(encoders: int | None, device: str, resources: dict[str, float]) -> EncoderPool:
    """The pool for a cluster with `resources` (ray.cluster_resources()): one encoder per GPU, else one per CPU.

    `device` is auto (GPUs when the cluster has some), cpu or cuda. Raises ValueError naming the flag.
    """
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device={device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not gpus:
        raise ValueError("--device=cuda: the Ray cluster has no GPUs")
    if encoders is not None and encoders < 1:
        raise ValueError(f"--encoders={encoders}: must be >= 1")
    if gpus and device != "cpu":
        size = encoders or gpus
        if size > gpus:
            raise ValueError(f"--encoders={size}: one GPU per encoder, the cluster has {gpus}")
        return EncoderPool(size, 1.0, 1.0)
    # Reads take a whole CPU: resources unlike the encoders' also keep Ray Data from fusing the reads
    # into the encoder actors. Only a 1-CPU cluster shares its other half with them (and fuses).
    read_cpus = 1.0 if cpus >= 1.5 else CPU_ENCODER_CPUS
    most = max(1, int((cpus - read_cpus) / CPU_ENCODER_CPUS))
    size = encoders or min(most, max(1, int(cpus)))
    if size > most:
        raise ValueError(f"--encoders={size}: {CPU_ENCODER_CPUS} CPU each and {read_cpus:g} for the reads: the "
                         f"cluster's {cpus:g} CPUs hold at most {most}")
    return EncoderPool(size, CPU_ENCODER_CPUS, 0.0, read_cpus)


def _dataset_for_workers(dataset: str) -> str:
    """Image folders by absolute path: Ray workers need not share the driver's working directory."""
    return dataset if dataset in NAMED_DATASETS else str(Path(dataset).resolve())


def _comparable(description: dict[str, Any]) -> str:
    """A source's description without its path, as JSON: what must agree between driver and workers."""
    return json.dumps({k: v for k, v in description.items() if k != "dataset"}, sort_keys=True)


@lru_cache(maxsize=4)
def _open_source(dataset: str, split: str, resolution: int, num: int | None, expected: str) -> ImageSource:
    """The image source, opened once per worker process and checked against the driver's."""
    source = image_source(dataset, split, resolution, num)
    if _comparable(source.describe()) != expected:
        raise ImageSourceError(f"{dataset} ({split}): this worker sees other images than the driver "
                               f"({_comparable(source.describe())[:200]} vs {expected[:200]})")
    return source


def _read_chunk(row: dict[str, Any], *, sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One chunk's images float32 [n, 3, H, W] in [0, 1] (and labels int64 [n]); a CPU task.

    `sources[split]` holds image_source's arguments and the driver's description of it.
    """
    spec = sources[row["split"]]
    source = _open_source(spec["dataset"], row["split"], spec["resolution"], spec["num"], spec["expected"])
    start, stop = int(row["start"]), int(row["stop"])
    out = {**row, "images": source.images(start, stop).numpy()}
    if spec["labelled"]:
        out["labels"] = np.asarray(source.labels(start, stop), dtype=np.int64)
    return out


class _Encoder:
    """An actor holding the projector: one chunk's images -> its latents in `dtype` on the CPU."""

    def __init__(self, projector: list[Any], dtype: str, device: str, threads: int):
        import ray

        if device == "cpu":
            torch.set_num_threads(threads)  # what the actor reserved, not every core of the node
        # [ref]: the driver puts the weights in the object store once; a nested ref is not resolved by
        # Ray, so each actor fetches them here instead of carrying a pickled module in its arguments.
        self.projector = ray.get(projector[0]).to(device).eval()
        self.dtype, self.device = dtype, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # batch_size=1: exactly one chunk per call, so each chunk is encoded as one batch.
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        images = torch.from_numpy(np.array(batch["images"][0], dtype=np.float32)).to(self.device)  # a writable copy
        latents = encode_chunk(images, self.projector.encode, start, stop, self.dtype)  # [n, C, h, w]
        out = {key: value for key, value in batch.items() if key != "images"}
        return {**out, "latents": latents[None]}


@dataclass
class _Split:
    """One split's store being written: its identity and what is left to encode."""

    root: Location
    identity: dict[str, Any]
    source: ImageSource
    num: int | None  # image_source's `num`, as the workers reopen it
    todo: list[int]
    latent_shape: list[int] | None


@dataclass
class Build:
    """What a build still has to encode: made without Ray (`plan_build`), run on Ray (`run_build`)."""

    dataset: str
    resolution: int
    projector: Projector
    batch_size: int
    splits: dict[str, _Split]  # the splits whose store is not complete yet

    def chunks(self) -> list[dict[str, Any]]:
        """One row per encode chunk of every pending shard: {split, shard, start, stop}."""
        return [{"split": split, "shard": k, "start": a, "stop": b} for split, s in self.splits.items()
                for k in s.todo for a, b in chunks(*shard_range(s.identity, k), self.batch_size)]


def plan_build(root: Where, dataset: str, projector: Projector, resolution: int, num_train: int | None,
               num_val: int | None, *, shard_size: int = 512, batch_size: int = 64,
               dtype: str = "float16") -> Build:
    """Open `root/train` and `root/val` as `precompute_store` does (plan written, another store refused,
    finished shards checked); nothing here needs Ray, so a bad dataset or a refused store fails at once."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise StoreError(f"batch_size: {batch_size!r} is not a positive int")
    root = Location.of(root)
    info, splits = projector.info(), {}
    for split, num in (("train", num_train), ("val", num_val)):
        source = image_source(dataset, split, resolution, num)
        identity = store_identity(projector=info, source=source.describe(), split=split, num_items=len(source),
                                  shard_size=shard_size, dtype=dtype, classes=source.classes)
        if open_store(root / split, identity) is None:  # not complete yet
            splits[split] = _Split(root / split, identity, source, num, *pending_shards(root / split, identity))
    return Build(dataset, resolution, projector, batch_size, splits)


def run_build(build: Build, pool: EncoderPool | None, progress: bool = True) -> None:
    """Encode and write the pending shards of `build` in one Ray Data pipeline, then each split's manifest.

    Ray must be initialised (`lmd.entry.init_ray`) and `pool` given when there are shards to encode.
    """
    import ray

    specs = build.chunks()
    if specs and (pool is None or not ray.is_initialized()):
        raise RuntimeError("run_build: shards to encode need an initialised Ray (lmd.entry.init_ray) and a pool")
    total = sum(s.identity["num_items"] for s in build.splits.values())
    with tqdm(total=total, initial=total - sum(r["stop"] - r["start"] for r in specs), unit="img",
              desc=f"precompute {'+'.join(build.splits)}", disable=not progress or not build.splits) as bar:
        if specs:
            sources = {split: {"dataset": _dataset_for_workers(build.dataset), "resolution": build.resolution,
                               "num": s.num, "expected": _comparable(s.source.describe()),
                               "labelled": bool(s.source.classes)} for split, s in build.splits.items()}
            dtype = next(iter(build.splits.values())).identity["dtype"]
            ds = _pipeline(specs, sources, build.projector, pool, dtype)
            _write_shards(ds, build.splits, build.batch_size, bar)
    for s in build.splits.values():
        assert s.latent_shape is not None  # num_items >= 1: some shard was checked or written
        finish_store(s.root, s.identity, s.latent_shape)


def _rows(ds: Any) -> Iterator[dict[str, Any]]:
    """The pipeline's rows; a failed task raises PipelineError with the task's own error line."""
    import ray.exceptions

    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as err:
        raise PipelineError(_task_error(str(err))) from None


def _task_error(report: str) -> str:
    """The first `module.Error: message` line of Ray's report of a failed task, without Ray's own wrappers;
    our errors (lmd.*) lose the class name, as their messages name the file or item."""
    for line in report.splitlines():
        match = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", line.strip())
        if match and not match[1].startswith("ray."):
            return match[2] if match[1].startswith("lmd.") else line.strip()
    return f"a pipeline task failed: {report.strip().splitlines()[-1] if report.strip() else 'no report'}"


def build_store(root: Where, dataset: str, projector: Projector, resolution: int, num_train: int | None,
                num_val: int | None, *, pool: EncoderPool, shard_size: int = 512, batch_size: int = 64,
                dtype: str = "float16", progress: bool = True) -> Location:
    """`lmd.data.latents.build_store` as one Ray Data pipeline over both splits: `root/train` and `root/val`.

    Resumes an interrupted build (finished shards are checked and skipped) and leaves a complete
    store untouched, exactly like `precompute_store`. Ray must be initialised.
    """
    run_build(plan_build(root, dataset, projector, resolution, num_train, num_val, shard_size=shard_size,
                         batch_size=batch_size, dtype=dtype), pool, progress)
    return Location.of(root)


def _pipeline(specs: list[dict[str, Any]], sources: dict[str, dict[str, Any]], projector: Projector,
              pool: EncoderPool, dtype: str) -> Any:
    import ray
    import ray.data

    # One chunk per block, so reads run as parallel tasks, one chunk each.
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    ds.context.enable_progress_bars = False  # the driver's bar counts images
    ds = ds.map(_read_chunk, fn_kwargs={"sources": sources}, num_cpus=pool.read_cpus)
    return ds.map_batches(_Encoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=pool.size),
                          num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
                          fn_constructor_kwargs={"projector": [ray.put(projector.cpu())], "dtype": dtype,
                                                 "device": pool.device,
                                                 "threads": max(1, math.floor(pool.num_cpus))})


def _write_shards(ds: Any, splits: dict[str, _Split], batch_size: int, bar: tqdm) -> None:
    """Write each shard once all its chunks came back (they arrive in any order)."""
    expected = {(split, k): len(chunks(*shard_range(s.identity, k), batch_size))
                for split, s in splits.items() for k in s.todo}
    parts: dict[tuple[str, int], dict[int, dict[str, Any]]] = {key: {} for key in expected}
    for row in _rows(ds):
        key = (str(row["split"]), int(row["shard"]))
        parts[key][int(row["start"])] = row
        bar.update(int(row["stop"]) - int(row["start"]))
        if len(parts[key]) < expected[key]:
            continue
        s, rows = splits[key[0]], parts.pop(key)
        ordered = [rows[a] for a in sorted(rows)]
        latents = np.concatenate([np.asarray(r["latents"]) for r in ordered])  # [rows, C, h, w]
        labels = np.concatenate([np.asarray(r["labels"]) for r in ordered]) if s.identity["classes"] else None
        s.latent_shape = write_shard(s.root, s.identity, key[1], latents, labels, s.latent_shape)
    if parts:  # the pipeline ended without some chunks: never write a manifest over missing shards
        raise RuntimeError(f"shards {sorted(parts)} incomplete after the pipeline ended")
