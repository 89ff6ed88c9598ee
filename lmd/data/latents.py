"""From a run's DataConfig to training batches: build or reuse the latent store, validate it, open it.

`prepare_data(cfg)` is the one place that decides where a run's latents come from:
synthetic fields in memory, or a Parquet store (`data.latents`, or a default store cached under
`$LMD_CACHE` / `~/.cache/lmd` and built on first use) that is validated against the run's projector
and model geometry *before* training, then streamed by Ray Data or loaded into memory.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmd.config import ConfigError, TrainConfig
from lmd.data.images import image_source
from lmd.data.location import Location
from lmd.data.memory import InMemoryLatents, synthetic_latents
from lmd.data.store import (
    StoreError,
    read_labels,
    read_manifest,
    read_store,
    store_classes,
    validate_store,
)
from lmd.data.store_writer import precompute_store
from lmd.data.verified import cache_root
from lmd.locks import LOCK_FILE, LockedError, hold
from lmd.probe import ProbeSet
from lmd.projector import Projector, load_projector

log = logging.getLogger(__name__)

SYNTHETIC_SEED = 1234  # the synthetic dataset does not change with the run seed
SPLITS = ("train", "val")
PSNR_IMAGES = 32  # held-out images decoded at each evaluation (decoding is the slow part on CPU)


@dataclass
class RunData:
    train: Any  # a BatchSource: .batch(step) -> [B, C, H, W]
    val: torch.Tensor  # [N, C, H, W] held-out latents, in memory for evaluation
    projector: Projector | None
    store: Location | None  # a local folder or an object-store URI
    val_images: torch.Tensor | None = None  # the first held-out images, for decoded PSNR
    probe: ProbeSet | None = None  # labelled train/held-out items for the linear probe (labelled stores)


def _dataset_tag(dataset: str) -> str:
    return dataset if dataset in ("bundled", "mnist", "fashion-mnist") else Path(dataset).resolve().name


def default_store_dir(dataset: str, resolution: int, num_train: int, num_val: int, projector: Projector) -> Path:
    """Cache folder named by everything that determines the store's content."""
    name = (f"{_dataset_tag(dataset)}-r{resolution}-n{num_train}-v{num_val}-{projector.name}-"
            f"{projector.checksum()[:12]}")
    return cache_root() / "stores" / name


def build_store(root: Path, dataset: str, projector: Projector, resolution: int, num_train: int | None,
                num_val: int | None, shard_size: int = 512, batch_size: int = 64, progress: bool = True) -> Path:
    """Precompute `root/train` and `root/val` (resuming an interrupted build; a finished one is reused).

    Both sources are opened first, so a size the dataset cannot give is refused before any encoding;
    the store is locked while it is written (a second builder is refused naming the first one's pid).
    """
    info = projector.info()
    sources = {split: image_source(dataset, split, resolution, num) for split, num in (("train", num_train),
                                                                                      ("val", num_val))}
    try:
        lock = hold(root / LOCK_FILE, f"latent store {root}")
    except LockedError as err:
        raise StoreError(str(err)) from None
    except OSError as err:
        raise StoreError(f"{root}: cannot write the store there ({err.strerror or err})") from None
    with lock:
        for split, source in sources.items():
            precompute_store(root / split, num_items=len(source), load_images=source.images,
                             encode=projector.encode, projector=info, source=source.describe(), split=split,
                             shard_size=shard_size, batch_size=batch_size, progress=progress,
                             load_labels=source.labels if source.classes else None, classes=source.classes)
    return root


def expected_store(cfg: TrainConfig, projector: Projector) -> dict[str, Any]:
    """What the run needs from a store: this projector, and latents shaped like the model's input."""
    m = cfg.model
    return {"projector": projector.info(), "latent_shape": [m.in_chans, m.latent_size, m.latent_size]}


def resolve_store(cfg: TrainConfig, progress: bool = True,
                  verify_checksums: bool = True) -> tuple[Location, Projector]:
    """The run's store folder (built first if it is the cached default), validated against the run."""
    d = cfg.data
    projector = load_projector(d.projector)
    if d.latents:
        try:
            root = Location.of(d.latents)
        except ValueError as err:  # a URI pyarrow cannot open: one line, as every store problem
            raise StoreError(str(err)) from None
    else:
        root = default_store_dir(d.dataset, d.resolution, d.num_train, d.num_val, projector)
        if not (root / "train" / "manifest.json").is_file() or not (root / "val" / "manifest.json").is_file():
            log.info("building the latent store %s (once; later runs reuse it)", root)
            build_store(root, d.dataset, projector, d.resolution, d.num_train, d.num_val, progress=progress)
        root = Location.of(root)
    expect = expected_store(cfg, projector)
    try:
        for split in SPLITS:
            if not (root / split).is_dir():
                raise StoreError(f"{root / split}: missing; a latent store has train/ and val/ (see `lmd precompute`)")
            validate_store(root / split, **expect, verify_checksums=verify_checksums)
    except OSError as err:  # storage refused (bucket, credentials, network): one line naming the store
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise StoreError(f"{root}: cannot read the store there ({detail})") from None
    count = read_manifest(root / "train")["count"]
    if count < d.batch_size:
        raise StoreError(f"{root / 'train' / 'manifest.json'}: count={count} is smaller than "
                         f"data.batch_size={d.batch_size}")
    return root, projector


def resolve_loader(loader: str, manifest: dict[str, Any], memory_limit_mb: int) -> str:
    """`auto`: memory when the decoded float32 latents fit in `memory_limit_mb`, else the Ray Data stream.

    Why: a store that fits is shuffled as one permutation per epoch and costs no Ray start-up (the
    stream's pipeline takes 5-9 s to deliver its first batch on 2 cores, benchmarks/data_stream.py);
    a larger one is streamed, each worker reading only its own lanes.
    """
    if loader != "auto":
        return loader
    decoded_mb = manifest["count"] * math.prod(manifest["latent_shape"]) * 4 / 2**20
    return "memory" if decoded_mb <= memory_limit_mb else "ray"


def check_stream_split(cfg: TrainConfig, workers: int, workers_flag: str) -> None:
    """A streamed run's batch takes whole lanes, and each of its `workers` reads whole lanes (ConfigError)."""
    d = cfg.data
    if d.batch_size % d.stream_lanes or d.stream_lanes % workers:
        raise ConfigError(f"data.stream_lanes={d.stream_lanes}: must divide data.batch_size={d.batch_size} and be "
                          f"divisible by {workers_flag}={workers} (the store is streamed: each worker reads whole "
                          "lanes)")


def synthetic_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) synthetic latents shaped for the model; the same for every run seed."""
    d, m = cfg.data, cfg.model
    train = synthetic_latents(d.num_train, m.in_chans, m.latent_size, seed=SYNTHETIC_SEED)
    return train, synthetic_latents(d.num_val, m.in_chans, m.latent_size, seed=SYNTHETIC_SEED + 1)


def prepare_data(cfg: TrainConfig, progress: bool = True, *, rank: int = 0, world_size: int = 1,
                 verify_checksums: bool = True) -> RunData:
    """The run's data; under data parallelism, the batch source of rank `rank` of `world_size`.

    Ray Train workers pass verify_checksums=False: the driver hashed the store once before they started.
    """
    d = cfg.data
    if d.dataset == "synthetic":
        train, val = synthetic_data(cfg)
        return RunData(InMemoryLatents(train, d.batch_size, seed=cfg.run.seed, rank=rank, world_size=world_size),
                       val, None, None)

    root, projector = resolve_store(cfg, progress, verify_checksums=verify_checksums)
    manifest = read_manifest(root / "train")
    count = manifest["count"]
    val = read_store(root / "val", validate=False)[heldout_slice(read_manifest(root / "val")["count"], d.heldout)]
    loader = resolve_loader(d.loader, manifest, d.memory_limit_mb)
    if loader == "ray":
        from lmd.data.stream import RayLatentStream
        from lmd.entry import init_ray

        init_ray(log_to_driver=False)  # local Ray, or the cluster named by RAY_ADDRESS (no-op under Train/Tune)
        train = RayLatentStream(root / "train", d.batch_size, seed=cfg.run.seed, lanes=d.stream_lanes,
                                window_items=d.stream_window, rank=rank, world_size=world_size,
                                total_steps=cfg.run.steps)
    else:
        train = InMemoryLatents(read_store(root / "train", validate=False), d.batch_size, seed=cfg.run.seed,
                                rank=rank, world_size=world_size)
    log.info("latents: %s (%d train items, %d val) via %s", root, count, val.shape[0], loader)
    start = heldout_slice(read_manifest(root / "val")["count"], d.heldout).start
    return RunData(train, val, projector, root, val_images(root, min(PSNR_IMAGES, val.shape[0]), start=start),
                   probe_set(root, d.num_probe, train=getattr(train, "latents", None), val=val, heldout=d.heldout))


def heldout_slice(count: int, part: str) -> slice:
    """The held-out items of `part` (config.HELDOUT_PARTS) among a val store's `count`: all, or the first or the
    second half (the half a search selects on, and the one its finalists are scored on)."""
    half = count // 2
    return {"all": slice(0, count), "select": slice(0, half), "confirm": slice(half, count)}[part]


def probe_set(root: Location, num_probe: int, train: torch.Tensor | None = None,
              val: torch.Tensor | None = None, heldout: str = "all") -> ProbeSet | None:
    """The first `num_probe` training items and the `heldout` part of the held-out items of a labelled store,
    with labels.

    None when the store is unlabelled or the probe is off (`num_probe=0`). `train` / `val` reuse
    latents already in memory instead of reading them again (`val`: already that part).
    """
    manifest = read_manifest(root / "train")
    classes = store_classes(manifest)
    if not num_probe or not classes:
        return None
    if classes != store_classes(read_manifest(root / "val")):
        raise StoreError(f"{root / 'val' / 'manifest.json'}: classes differ from {root / 'train'}'s")
    num = min(num_probe, manifest["count"])
    if num < 10:
        log.warning("%s: only %d labelled training items: no linear probe (it needs >= 10)", root / "train", num)
        return None
    # A copy of the in-memory slice: a view would keep the whole host tensor alive once the engine has
    # moved the training latents to the GPU.
    train = train[:num].clone() if train is not None else read_store(root / "train", validate=False, limit=num)
    part = heldout_slice(read_manifest(root / "val")["count"], heldout)
    val = val if val is not None else read_store(root / "val", validate=False)[part]
    return ProbeSet(train=train[:num], train_labels=read_labels(root / "train")[:num], val=val,
                    val_labels=read_labels(root / "val")[part], num_classes=len(classes))


def val_images(root: Location, num: int, start: int = 0) -> torch.Tensor | None:
    """`num` held-out images the val store was made from, from item `start` (re-rendered deterministically)."""
    source = read_manifest(root / "val")["source"]
    try:
        images = image_source(source["dataset"], "val", source["resolution"], source.get("num_items"),
                              source.get("seed", 0))
    except (KeyError, ValueError, OSError) as err:  # e.g. a user store whose image folder moved
        log.warning("no held-out images for PSNR (%s); reporting latent metrics only", err)
        return None
    # The images must be the ones the store was made from (a file added to the folder, another Fashion-MNIST,
    # another rendering): every field the manifest recorded must still hold, else PSNR compares unlike images.
    now = json.loads(json.dumps(images.describe()))  # as it would read back from a manifest
    changed = [f"{key}: store has {value!r}, the source now gives {now.get(key)!r}" for key, value in source.items()
               if now.get(key) != value]
    if changed:
        raise StoreError(f"{root / 'val' / 'manifest.json'}: source: the held-out images are no longer those the "
                         f"store was made from ({'; '.join(changed)}); rebuild the store")
    return images.images(start, start + num)
