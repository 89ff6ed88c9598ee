"""Object-store shards hashed once per machine and store version, not once per run.

`validate_store(verify_checksums=True)` hashes every shard. For a local store that is a read at disk
speed; for a store in S3 it is a download of the whole store, which every `lmd train --latents s3://...`
would pay again before its first step. So after an object-store store has been hashed here, this
machine records what it hashed: the store's URI, the manifest's digest, and each shard's size and
modification time as the object store reports them. A later validation whose shards show the same
sizes and times skips the hashing (manifest, sizes, footers and schema are still checked every time,
and each streaming task re-checks the shards it reads).

Why only object stores: an object cannot change without a new modification time (S3 and GCS replace
objects whole), whereas a local file can rot or be patched in place under an unchanged mtime; local
stores are hashed every time. A record is one small JSON file under `$LMD_CACHE/verified/`, written
atomically; an unreadable record counts as absent.

Stamps come from a listing of the store's folder (`Location.files`). Object stores report modification
times from their own clock, in whole seconds (S3's HEAD; listings may add milliseconds): an object
replaced within the same second, at the same size, could show the same stamp. So a store is recorded only when
each shard's time is `SETTLE_SECONDS` older than the moment its stamps were read (on this machine's
clock, allowing for skew): any replacement after that moment carries a later time. A store written a
moment ago is therefore hashed again on its next use, and recorded once it has settled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lmd.data.location import Location
from lmd.io import write_bytes_atomic

Stamps = list[tuple[str, int, int]]  # (shard file, bytes, modification time in ns), in manifest order
SETTLE_SECONDS = 60.0  # > the stores' 1 s time resolution plus any clock skew between them and this machine


def cache_root() -> Path:
    """The machine's cache folder (`$LMD_CACHE`, default ~/.cache/lmd): default stores and these records."""
    return Path(os.environ.get("LMD_CACHE", Path.home() / ".cache" / "lmd"))


def shard_stamps(manifest: dict[str, Any], listed: dict[str, tuple[int, int | None]]) -> Stamps | None:
    """Each shard's (file, size, mtime) from a listing of its folder (`Location.files`), or None when the
    store reports no times."""
    stamps = [(shard["file"], *listed[shard["file"]]) for shard in manifest["shards"]]
    return None if any(mtime is None for _, _, mtime in stamps) else stamps


def _endpoint(root: Location) -> list[Any]:
    """Which service the store lives on: the same `s3://bucket/key` on two endpoints is two stores."""
    fs = root.filesystem
    args = fs.__reduce__()[1]  # pyarrow pickles a filesystem by its options
    options = args[0] if args and isinstance(args[0], dict) else {}
    return [fs.type_name, *(str(options.get(k, "")) for k in ("endpoint_override", "region", "scheme"))]


def _record_path(root: Location, manifest: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps([str(root), _endpoint(root), manifest], sort_keys=True).encode()).hexdigest()
    return cache_root() / "verified" / f"{key[:32]}.json"


def verified_before(root: Location, manifest: dict[str, Any], stamps: Stamps | None) -> bool:
    """Whether this machine hashed these exact objects of this store version before (object stores only)."""
    if root.is_local or stamps is None:
        return False
    try:
        record = json.loads(_record_path(root, manifest).read_text())
        return [tuple(s) for s in record["stamps"]] == stamps
    except (OSError, ValueError, TypeError, KeyError):  # unreadable or not a record: hash again
        return False


def record_verified(root: Location, manifest: dict[str, Any], stamps: Stamps | None, read_at: int) -> bool:
    """Remember that these objects hashed to the manifest's checksums, once they have settled (see the
    module's note); returns whether it recorded them. A no-op for local stores."""
    if root.is_local or stamps is None or any(read_at - mtime < SETTLE_SECONDS * 1e9 for _, _, mtime in stamps):
        return False
    path = _record_path(root, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps({"store": str(root), "stamps": stamps}).encode())
    return True
