"""Writing a latent store (the format is `lmd.data.store`): identity, plan, atomic shards, manifest last, resume.

Writing is crash-safe: each shard goes to a hidden temp file, is fsynced and renamed into place (an
existing shard file is always complete), and a hidden ``.plan.json`` with the store's identity is
written first, so an interrupted `precompute_store` resumes, skipping finished shards, and ends with
the same bytes as an uninterrupted run. The manifest is written last: a store is complete once it
exists. `precompute_store` runs the steps in one process; `lmd.data.precompute` runs the same steps
as a Ray Data pipeline. This module never imports Ray.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from lmd import code_version
from lmd.data.location import Location, Where
from lmd.data.store import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PLAN_FILE,
    SCHEMA_KEY,
    StoreError,
    _plain,
    check_shard,
    differences,
    item_width,
    read_manifest,
    shard_name,
    store_classes,
    validate_store,
)
from lmd.io import TMP_PREFIX, read_json_object

log = logging.getLogger(__name__)


def _write_shard(root: Location, k: int, first_index: int, latents: np.ndarray, dtype: str,
                 labels: np.ndarray | None = None) -> None:
    """Write shard k atomically (`Location.write_parquet`): an existing shard file is always complete."""
    n, shape = latents.shape[0], list(latents.shape[1:])
    data = np.ascontiguousarray(latents, dtype=np.dtype(dtype).newbyteorder("<"))
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(item_width(shape, dtype)), n, [None, pa.py_buffer(data)])
    meta = json.dumps({"format": FORMAT_VERSION, "latent_shape": shape, "dtype": dtype}, sort_keys=True)
    fields = [("index", pa.int64()), ("latent", column.type)] + ([("label", pa.int64())] if labels is not None else [])
    schema = pa.schema(fields, metadata={SCHEMA_KEY: meta})
    arrays = [pa.array(np.arange(first_index, first_index + n, dtype=np.int64)), column]
    if labels is not None:
        arrays.append(pa.array(np.asarray(labels, dtype=np.int64)))
    table = pa.table(arrays, schema=schema)
    # Latents barely compress, and dictionaries/statistics of 1 KiB values only cost space.
    (root / shard_name(k)).write_parquet(table, compression="none", use_dictionary=False, write_statistics=["index"])


def encode_chunk(images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], start: int, stop: int,
                 dtype: str) -> np.ndarray:
    """Latents of items [start, stop) from their images [n, 3, H, W], checked and cast to `dtype` on the CPU."""
    if images.ndim != 4 or images.shape[0] != stop - start:
        raise ValueError(f"load_images({start}, {stop}) returned shape {tuple(images.shape)}, expected "
                         f"[{stop - start}, 3, H, W]")
    with torch.no_grad():
        latents = encode(images).detach().to("cpu", DTYPES[dtype])
    if latents.ndim != 4 or latents.shape[0] != stop - start:
        raise ValueError(f"encode(images[{start}:{stop}]) gave shape {tuple(latents.shape)}, expected "
                         f"[{stop - start}, C, h, w]")
    if not torch.isfinite(latents).all():
        raise StoreError(f"items [{start}, {stop}): latents are not finite in {dtype} (max |x| before the cast may "
                         "exceed its range; check the projector's scale)")
    return latents.numpy()


def chunks(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """The encode chunks of items [start, stop): they start at `start`, so a resumed shard is chunked alike
    (conv results can depend on the batch's composition)."""
    return [(a, min(stop, a + batch_size)) for a in range(start, stop, batch_size)]


def _encode_range(start: int, stop: int, load_images: Callable[[int, int], torch.Tensor],
                  encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int, dtype: str,
                  bar: tqdm) -> np.ndarray:
    """Latents of items [start, stop) in `dtype`, encoded chunk by chunk."""
    parts = []
    for a, b in chunks(start, stop, batch_size):
        parts.append(encode_chunk(load_images(a, b), encode, a, b, dtype))
        bar.update(b - a)
    return np.concatenate(parts)


def store_identity(*, projector: dict, source: dict, split: str, num_items: int, shard_size: int,
                   dtype: str = "float16", classes: Sequence[str] = ()) -> dict[str, Any]:
    """What determines a store's content, as plain JSON; a plan or manifest with another identity is refused."""
    if dtype not in DTYPES:
        raise StoreError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    for name, value in (("num_items", num_items), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise StoreError(f"{name}: {value!r} is not a positive int")
    try:
        return _plain({"projector": projector, "source": source, "split": split, "num_items": num_items,
                       "shard_size": shard_size, "dtype": dtype, "classes": list(classes)})
    except TypeError as err:
        raise StoreError(f"projector/source: not JSON-serialisable ({err})") from None


def shard_range(identity: dict[str, Any], k: int) -> tuple[int, int]:
    """Items [start, stop) of shard k."""
    size = identity["shard_size"]
    return k * size, min(identity["num_items"], (k + 1) * size)


def num_shards(identity: dict[str, Any]) -> int:
    return math.ceil(identity["num_items"] / identity["shard_size"])


def open_store(out_dir: Where, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Make `out_dir` ready to write the store `identity`; returns its manifest if it is already complete.

    A complete store with this identity is validated (footers, not checksums) and returned; one made
    for another identity, or a non-empty folder that holds no store, is refused without change.
    Otherwise the plan is written (or checked, on resume) and incomplete writes of a killed run removed.
    """
    root = Location.of(out_dir)
    manifest_path, plan_path = root / MANIFEST_FILE, root / PLAN_FILE
    if manifest_path.exists():
        manifest = read_manifest(root)
        made = {"projector": manifest["projector"], "source": manifest["source"], "split": manifest["split"],
                "num_items": manifest["count"], "shard_size": manifest["shard_size"], "dtype": manifest["dtype"],
                "classes": store_classes(manifest)}
        _refuse_other_identity(manifest_path, made, identity)
        validate_store(root, verify_checksums=False)
        log.info("store %s is complete (%d items); nothing to do", root, manifest["count"])
        return manifest
    if plan_path.exists():
        _refuse_other_identity(plan_path, read_json_object(plan_path, "plan", StoreError).get("identity", {}), identity)
        log.info("resuming the interrupted precompute of %s", root)
    else:
        if any(not name.startswith(TMP_PREFIX) for name in root.names()):
            raise StoreError(f"{root}: not empty and holds no store ({MANIFEST_FILE} or {PLAN_FILE}); refusing to "
                             "write into it")
        root.mkdir()
        plan_path.write_json({"format": FORMAT_VERSION, "identity": identity})
    for stale in root.stale_writes():  # from a killed run; never a complete file
        log.warning("removing incomplete write %s", stale)
        stale.unlink()
    return None


def pending_shards(out_dir: Where, identity: dict[str, Any]) -> tuple[list[int], list[int] | None]:
    """(shards still to encode, latent_shape of the finished ones): a shard file that fails `check_shard` is
    re-encoded."""
    root, latent_shape, todo = Location.of(out_dir), None, []
    for k in range(num_shards(identity)):
        start, stop = shard_range(identity, k)
        path = root / shard_name(k)
        if path.exists():
            try:
                latent_shape = check_shard(path, stop - start, latent_shape, identity["dtype"], start,
                                           len(identity["classes"]))
                continue
            except StoreError as err:
                log.warning("re-encoding shard %d: %s", k, err)
        todo.append(k)
    return todo, latent_shape


def write_shard(out_dir: Where, identity: dict[str, Any], k: int, latents: np.ndarray,
                labels: np.ndarray | torch.Tensor | None, latent_shape: list[int] | None) -> list[int]:
    """Check shard k's latents [n, C, h, w] (and labels [n]) against the store, write it atomically; returns
    its latent_shape, which every shard must share."""
    root = Location.of(out_dir)
    path, (start, stop) = root / shard_name(k), shard_range(identity, k)
    if latents.shape[0] != stop - start:
        raise StoreError(f"{path}: rows: {latents.shape[0]} latents for items [{start}, {stop})")
    if latent_shape is not None and list(latents.shape[1:]) != list(latent_shape):
        raise StoreError(f"{path}: latent_shape: encode gave {list(latents.shape[1:])}, earlier shards "
                         f"have {list(latent_shape)}")
    classes = identity["classes"]
    if bool(classes) != (labels is not None):
        raise StoreError(f"{path}: label: the store names {len(classes)} classes and labels were "
                         f"{'not ' if labels is None else ''}given")
    checked = _check_labels(labels, start, stop, len(classes), path) if labels is not None else None
    _write_shard(root, k, start, latents, identity["dtype"], checked)
    return list(latents.shape[1:])


def finish_store(out_dir: Where, identity: dict[str, Any], latent_shape: list[int]) -> dict[str, Any]:
    """Write the manifest (every shard's size and SHA-256) once all shards are written; the store is complete."""
    root = Location.of(out_dir)
    root.sync()
    shards = []
    for k in range(num_shards(identity)):
        start, stop = shard_range(identity, k)
        path = root / shard_name(k)
        shards.append({"file": path.name, "rows": stop - start, "bytes": path.size(), "sha256": path.sha256()})
    classes = identity["classes"]
    manifest = {"format": FORMAT_VERSION, "projector": identity["projector"], "source": identity["source"],
                "split": identity["split"], "latent_shape": latent_shape, "dtype": identity["dtype"],
                "count": identity["num_items"], "shard_size": identity["shard_size"], "shards": shards,
                "created_unix": time.time(), "code_version": code_version(),
                **({"classes": classes} if classes else {})}
    (root / MANIFEST_FILE).write_json(manifest)  # the store is complete from here on
    (root / PLAN_FILE).unlink()
    root.sync()
    log.info("wrote store %s: %d items in %d shards, latent_shape %s %s", root, identity["num_items"], len(shards),
             latent_shape, identity["dtype"])
    return manifest


def precompute_store(out_dir: Where, *, num_items: int, load_images: Callable[[int, int], torch.Tensor],
                     encode: Callable[[torch.Tensor], torch.Tensor], projector: dict, source: dict, split: str,
                     shard_size: int = 512, batch_size: int = 64, dtype: str = "float16",
                     progress: bool = True, load_labels: Callable[[int, int], torch.Tensor] | None = None,
                     classes: Sequence[str] = ()) -> dict[str, Any]:
    """Encode items [0, num_items) into a store at `out_dir` (resuming an interrupted run); returns the manifest.

    `load_images(start, stop)` gives images [n, 3, H, W] in [0, 1]; `encode` maps them to latents
    [n, C, h, w]. A labelled source passes `classes` and `load_labels(start, stop)` -> int64 [n].
    A complete store with the same identity is returned untouched; a store or plan with another
    identity (projector, source, split, num_items, shard_size, dtype, classes) is refused,
    naming the differing field, without modifying anything. One process; `lmd.data.precompute`
    is the same build as a Ray Data pipeline (the same steps below, the same bytes).
    """
    root = Location.of(out_dir)
    if bool(classes) != (load_labels is not None):
        raise StoreError("classes and load_labels: give both (a labelled source) or neither")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise StoreError(f"batch_size: {batch_size!r} is not a positive int")
    identity = store_identity(projector=projector, source=source, split=split, num_items=num_items,
                              shard_size=shard_size, dtype=dtype, classes=classes)
    manifest = open_store(root, identity)
    if manifest is not None:
        return manifest
    todo, latent_shape = pending_shards(root, identity)
    bar = tqdm(total=num_items, unit="img", desc=f"precompute {split}", disable=not progress)
    with bar:
        bar.update(num_items - sum(stop - start for start, stop in (shard_range(identity, k) for k in todo)))
        for k in todo:
            start, stop = shard_range(identity, k)
            latents = _encode_range(start, stop, load_images, encode, batch_size, dtype, bar)
            labels = load_labels(start, stop) if load_labels else None
            latent_shape = write_shard(root, identity, k, latents, labels, latent_shape)
    assert latent_shape is not None  # num_items >= 1: some shard was checked or written
    return finish_store(root, identity, latent_shape)


def _check_labels(labels: np.ndarray | torch.Tensor, start: int, stop: int, num_classes: int,
                  path: Location) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != stop - start:
        raise StoreError(f"{path}: label: load_labels({start}, {stop}) gave {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise StoreError(f"{path}: label: values outside [0, {num_classes}) for items [{start}, {stop})")
    return labels


def _refuse_other_identity(path: Location, made: Any, wanted: dict[str, Any]) -> None:
    problems = differences(made if isinstance(made, dict) else {}, wanted, both=True)
    if problems:
        raise StoreError(f"{path}: this store was made for another run: " + "; ".join(problems)
                         + f"; choose another out_dir or delete {path.parent}")
