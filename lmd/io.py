"""Files that are never half-written, and read back with errors that name them. Torch-free.

Every file the project writes for later (checkpoints, store shards and manifests, results tables,
pictures, dashboards, projector weights, run configs and metrics) goes through `atomic_path`: the
bytes go to a hidden temporary file in the same folder (same file system, so the rename is atomic),
which is fsynced, renamed over the target, and the folder fsynced, so a crash leaves either the old
file or the new one, never a torn one, and a stale temporary file is recognisable by its prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # every temporary file or folder starts with this; sweepers remove what a crash left


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the folder's entry list is what a rename changes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def temp_path(path: Path) -> Path:
    """A hidden, unique sibling of `path` (same folder, so renaming it over `path` is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is fsynced and renamed over `path`, else removed.

        with atomic_path(out / "results.parquet") as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def replaces_only(path: str | Path, magic: bytes, what: str) -> None:
    """Refuse (FileExistsError naming it) to write `what` over an existing file that does not start with `magic`
    (a file of another kind: an output must never replace an input), or over a folder."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path}: is a folder, not {what}")
    if path.exists():
        with path.open("rb") as f:
            head = f.read(len(magic))
        if head != magic:
            raise FileExistsError(f"{path}: exists and is not {what}; refusing to replace it")


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """JSON (indented, sorted keys) written atomically: readers never see a partial file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Any, what: str, error: type[Exception]) -> dict[str, Any]:
    """A JSON object from `path` (a path, or anything with `read_text`, e.g. `lmd.data.location.Location`); any
    failure raises `error` with one line naming the file and `what` it is."""
    path = Path(path) if isinstance(path, str | os.PathLike) else path
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} missing") from None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(payload, dict):
        raise error(f"{path}: {what} is not a JSON object")
    return payload


def shown_uri(where: Any) -> str:
    """`where` as a message may show it: a URI without its credentials or query string (`s3://KEY:SECRET@bucket/x`
    -> `s3://bucket/x`); a path as it is. Every message that names a storage location goes through this."""
    text = str(where)
    if "://" not in text:
        return text
    scheme, rest = text.split("://", 1)
    authority, _, key = rest.split("?", 1)[0].partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}/{key}"


def has_credentials(where: Any) -> bool:
    """Whether a URI carries credentials in its authority (`scheme://user:secret@host/...`)."""
    text = str(where)
    return "://" in text and "@" in text.split("://", 1)[1].split("?", 1)[0].partition("/")[0]


def storage_uri(storage: str) -> str:
    """A Ray storage location as Ray wants it: URIs (s3://, gs://, ...) as given, local paths absolute."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())
