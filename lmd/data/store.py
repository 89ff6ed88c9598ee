"""The latent store: precomputed projector latents of one split, as Parquet shards plus a manifest.

A store directory holds one split of one image source encoded by one projector::

    manifest.json          written last: format, projector, source, split, latent_shape, dtype, count,
                           shard_size, shards [{file, rows, bytes, sha256}], created_unix, code_version
    shard-00000.parquet    items [0, shard_size); shard k holds [k*shard_size, min(count, (k+1)*shard_size))

Each shard has two columns, no nulls, and ``lmd = {"format": 1, "latent_shape": [C, h, w], "dtype": ...}``
(JSON) in its Parquet schema metadata:

    index    int64                              the source item index, ascending
    latent   fixed_size_binary(C*h*w*itemsize)  one latent's little-endian C-order bytes in `dtype`
    label    int64 (labelled stores only)       the item's class, in [0, len(manifest.classes))

A labelled store names its classes in the manifest (`classes`, index = label); an unlabelled one
has no `classes` (or an empty list) and no label column. Labels travel with the latents, so a store
alone is enough to train and to linear-probe.

Readers decode the bytes with `np.frombuffer`: nothing is ever unpickled. Writing (crash-safe,
resumable) is `lmd.data.store_writer`. `validate_store` only ever reads. `read_store` loads a store with
pyarrow alone; the Ray Data reader (`ray_dataset`, `RayLatentStream`) is `lmd.data.stream`: this module
never imports Ray.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmd.data.location import Location, Where
from lmd.data.verified import record_verified, shard_stamps, verified_before
from lmd.io import read_json_object

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PLAN_FILE = ".plan.json"  # hidden: Ray Data's file listing skips it
SCHEMA_KEY = b"lmd"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_MANIFEST_FIELDS = ("format", "projector", "source", "split", "latent_shape", "dtype", "count", "shard_size",
                    "shards")
_SHARD_FIELDS = ("file", "rows", "bytes", "sha256")
_ABSENT = "<absent>"


class StoreError(ValueError):
    """A store is missing, truncated, corrupt or does not match the run; the message names the file and the field."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def item_width(latent_shape: Sequence[int], dtype: str) -> int:
    """Bytes of one latent: prod(latent_shape) * itemsize."""
    return math.prod(latent_shape) * np.dtype(dtype).itemsize


def decode_latents(column: pa.Array | pa.ChunkedArray, latent_shape: Sequence[int], dtype: str) -> np.ndarray:
    """fixed_size_binary latents -> float32 [n, *latent_shape], straight from the Arrow buffer."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = item_width(latent_shape, dtype)
    if column.null_count or column.type != pa.binary(width):
        raise StoreError(f"latent column is {column.type} with {column.null_count} nulls, expected "
                         f"fixed_size_binary[{width}] without nulls")
    n = len(column)
    elems = math.prod(latent_shape)
    # Slices of an Arrow array keep the parent buffer: start at the slice's offset.
    raw = np.frombuffer(column.buffers()[1], dtype=np.dtype(dtype).newbyteorder("<"), count=n * elems,
                        offset=column.offset * width)
    return raw.reshape(n, *latent_shape).astype(np.float32)


def _plain(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(value))


def differences(have: dict[str, Any], want: dict[str, Any], both: bool = False, prefix: str = "") -> list[str]:
    """'field: store has X, run expects Y' for each key of `want` (and of `have`, if `both`) that differs."""
    keys = list(want) + ([k for k in have if k not in want] if both else [])
    out = []
    for key in keys:
        actual, expected = have.get(key, _ABSENT), want.get(key, _ABSENT)
        if isinstance(actual, dict) and isinstance(expected, dict):
            out += differences(actual, expected, both, f"{prefix}{key}.")
        elif actual != expected:
            out.append(f"{prefix}{key}: store has {actual!r}, run expects {expected!r}")
    return out


def read_manifest(store_dir: Where) -> dict[str, Any]:
    """The manifest, checked for structure and internal consistency (no shard is opened)."""
    path = Location.of(store_dir) / MANIFEST_FILE
    if not path.is_file() and (Location.of(store_dir) / PLAN_FILE).is_file():
        raise StoreError(f"{path}: manifest missing: precompute of this store was interrupted; rerun it to finish")
    manifest = read_json_object(path, "manifest", StoreError)
    for key in _MANIFEST_FIELDS:
        if key not in manifest:
            raise StoreError(f"{path}: manifest lacks field {key!r}")
    if manifest["format"] != FORMAT_VERSION:
        raise StoreError(f"{path}: format: store has {manifest['format']!r}, this code reads {FORMAT_VERSION}")
    shape, dtype, count, size = (manifest[k] for k in ("latent_shape", "dtype", "count", "shard_size"))
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise StoreError(f"{path}: latent_shape: {shape!r} is not a list of positive ints")
    if dtype not in DTYPES:
        raise StoreError(f"{path}: dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    for key in ("count", "shard_size"):
        if not isinstance(manifest[key], int) or manifest[key] < 1:
            raise StoreError(f"{path}: {key}: {manifest[key]!r} is not a positive int")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise StoreError(f"{path}: shards: not a list of objects")
    for k, shard in enumerate(shards):
        for key in _SHARD_FIELDS:
            if key not in shard:
                raise StoreError(f"{path}: shards[{k}] lacks field {key!r}")
        if not isinstance(shard["rows"], int) or not isinstance(shard["bytes"], int):
            raise StoreError(f"{path}: shards[{k}]: rows and bytes must be ints")
        # Fixed names: a manifest can never point a reader outside the store directory.
        if shard["file"] != shard_name(k):
            raise StoreError(f"{path}: shards[{k}].file: {shard['file']!r}, expected {shard_name(k)!r}")
    if sum(s["rows"] for s in shards) != count:
        raise StoreError(f"{path}: count: {count} is not the sum of shards[].rows ({sum(s['rows'] for s in shards)})")
    if len(shards) != math.ceil(count / size):
        raise StoreError(f"{path}: shards: {len(shards)} listed, count {count} / shard_size {size} needs "
                         f"{math.ceil(count / size)}")
    for k, shard in enumerate(shards):
        if shard["rows"] != min(size, count - k * size):
            raise StoreError(f"{path}: shards[{k}].rows: {shard['rows']}, expected {min(size, count - k * size)}")
    return manifest


def store_classes(manifest: dict[str, Any]) -> list[str]:
    """The class names of a labelled store ([] when unlabelled)."""
    return list(manifest.get("classes") or [])


def check_shard(path: Where, rows: int, latent_shape: Sequence[int] | None, dtype: str, first_index: int,
                num_classes: int = 0) -> list[int]:
    """Check a shard's Parquet footer, schema, row count, index and (labelled stores) label column;
    returns its latent_shape."""
    path = Location.of(path)
    try:
        pf = path.parquet()
        schema = pf.schema_arrow
        num_rows = pf.metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: Parquet unreadable ({type(err).__name__}: {err})") from None
    try:
        meta = json.loads((schema.metadata or {})[SCHEMA_KEY])
        shard_shape, shard_dtype = list(meta["latent_shape"]), meta["dtype"]
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{path}: schema: metadata {SCHEMA_KEY.decode()!r} missing or malformed") from None
    if shard_dtype != dtype or (latent_shape is not None and shard_shape != list(latent_shape)):
        raise StoreError(f"{path}: schema: metadata {SCHEMA_KEY.decode()!r} says latent_shape {shard_shape} "
                         f"dtype {shard_dtype}, expected {list(latent_shape or shard_shape)} {dtype}")
    width = item_width(shard_shape, dtype)
    for name, expected in (("index", pa.int64()), ("latent", pa.binary(width))):
        if schema.get_field_index(name) < 0:
            raise StoreError(f"{path}: schema: column {name!r} missing")
        if schema.field(name).type != expected:
            raise StoreError(f"{path}: schema: column {name!r} is {schema.field(name).type}, expected {expected} "
                             f"(latent_shape {shard_shape} x {dtype})")
    if num_rows != rows:
        raise StoreError(f"{path}: rows: Parquet has {num_rows}, manifest says {rows}")
    try:
        index = pf.read(columns=["index"])["index"].to_numpy()
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: index: unreadable ({type(err).__name__}: {err})") from None
    if not np.array_equal(index, np.arange(first_index, first_index + rows)):
        raise StoreError(f"{path}: index: not the items [{first_index}, {first_index + rows}) in order")
    if num_classes:
        if schema.get_field_index("label") < 0 or schema.field("label").type != pa.int64():
            raise StoreError(f"{path}: schema: column 'label' missing or not int64 (the manifest names "
                             f"{num_classes} classes)")
        labels = _read_column(path, "label", pf)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise StoreError(f"{path}: label: values outside [0, {num_classes}) (min {labels.min()}, "
                             f"max {labels.max()})")
    return shard_shape


def _read_column(path: Where, name: str, pf: pq.ParquetFile | None = None) -> np.ndarray:
    path = Location.of(path)
    try:
        column = (pf or path.parquet()).read(columns=[name])[name]
        if column.null_count:
            raise StoreError(f"{path}: {name}: {column.null_count} nulls")
        return column.to_numpy()
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: {name}: unreadable ({type(err).__name__}: {err})") from None


def validate_store(store_dir: Where, *, projector: dict | None = None, latent_shape: Sequence[int] | None = None,
                   dtype: str | None = None, verify_checksums: bool = True) -> dict[str, Any]:
    """Check a store against its manifest and the run's expectations; returns the manifest.

    Read-only. Raises StoreError naming the file and the field. Expectations come first (the usual
    mistake is a store made by another projector); `verify_checksums=False` skips hashing the shards
    (footer, schema, rows and index are still checked).
    """
    root = Location.of(store_dir)
    manifest = read_manifest(root)
    path = root / MANIFEST_FILE
    problems = differences({"projector": manifest["projector"]}, {"projector": _plain(projector)}) if projector else []
    if latent_shape is not None and manifest["latent_shape"] != [int(d) for d in latent_shape]:
        problems.append(f"latent_shape: store has {manifest['latent_shape']}, run expects {list(latent_shape)}")
    if dtype is not None and manifest["dtype"] != dtype:
        problems.append(f"dtype: store has {manifest['dtype']!r}, run expects {dtype!r}")
    if problems:
        raise StoreError(f"{path}: " + "; ".join(problems))
    read_at = time.time_ns()  # this machine's clock just before the store reported its objects' times
    listed = root.files()  # sizes and times of every shard in one listing (S3: not a HEAD per object)
    for k, shard in enumerate(manifest["shards"]):
        if shard["file"] not in listed:
            raise StoreError(f"{root / shard['file']}: shard missing (manifest shards[{k}].file names it)")
    stamps = shard_stamps(manifest, listed) if verify_checksums and not root.is_local else None
    hash_shards = verify_checksums and not verified_before(root, manifest, stamps)  # an S3 store: once per machine
    for k, shard in enumerate(manifest["shards"]):
        file = root / shard["file"]
        size = listed[shard["file"]][0]
        if size != shard["bytes"]:
            raise StoreError(f"{file}: bytes: truncated or overwritten: {size} bytes, manifest says {shard['bytes']}")
        if hash_shards:
            digest = file.sha256()
            if digest != shard["sha256"]:
                raise StoreError(f"{file}: sha256: corrupt: {digest[:12]}... does not match manifest "
                                 f"{str(shard['sha256'])[:12]}...")
        check_shard(file, shard["rows"], manifest["latent_shape"], manifest["dtype"], k * manifest["shard_size"],
                    len(store_classes(manifest)))
    if hash_shards:
        record_verified(root, manifest, stamps, read_at)
    return manifest


def read_store(store_dir: Where, *, validate: bool = True, limit: int | None = None,
               **expect: Any) -> torch.Tensor:
    """All latents [N, C, h, w] (or the first `limit`) float32 in item-index order, read with pyarrow only.

    `expect` takes validate_store's keywords (projector, latent_shape, dtype, verify_checksums).
    With `limit` only the shards holding those items are read (a probe on a streamed store).
    """
    root = Location.of(store_dir)
    manifest = validate_store(root, **expect) if validate else read_manifest(root)
    shape, dtype = manifest["latent_shape"], manifest["dtype"]
    count = manifest["count"] if limit is None else min(limit, manifest["count"])
    out = np.empty((count, *shape), dtype=np.float32)
    start = 0
    for shard in manifest["shards"]:
        if start >= count:
            break
        file = root / shard["file"]
        try:
            column = file.parquet().read(columns=["latent"])["latent"]
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{file}: Parquet unreadable ({type(err).__name__}: {err})") from None
        take = min(len(column), count - start)
        out[start:start + take] = decode_latents(column.slice(0, take), shape, dtype)
        start += take
    return torch.from_numpy(out)


def read_labels(store_dir: Where) -> torch.Tensor:
    """The labels [N] int64 of a labelled store in item-index order (the store is validated by the caller)."""
    root = Location.of(store_dir)
    manifest = read_manifest(root)
    if not store_classes(manifest):
        raise StoreError(f"{root / MANIFEST_FILE}: classes: the store is unlabelled (made from "
                         f"{manifest['source'].get('dataset', '?')!r}); a linear probe needs a labelled dataset "
                         "such as fashion-mnist")
    parts = [_read_column(root / shard["file"], "label") for shard in manifest["shards"]]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))
