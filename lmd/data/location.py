"""Where a latent store lives: a local folder, or a folder in an object store (`s3://bucket/prefix`, `gs://...`).

`Location` is the one path type the store's code uses, so a store is written, checked and streamed
the same way wherever it is. A cluster without a shared file system (`cluster/gpu.yaml`) keeps its
stores in S3: every node, and every Ray Data read task, opens the same URI.

Writes are atomic on both kinds:
- a local file is written to a hidden temp file, fsynced and renamed into place (`lmd.io`);
- an object is uploaded from bytes already complete in memory, in one write, and S3/GCS show an
  object only once its upload completes. pyarrow has no abort: an upload that fails mid-write is
  completed by the stream's close, so a torn object is possible in principle; a store's readers
  check every shard's size, checksum and footer against the manifest (written last), which is
  what catches one.

What an object store does not give: a lock. Two builders of one store on S3 are not detected (a
local store is `flock`ed, `lmd.locks`); start one build per store.

URIs accept pyarrow's options as a query string, e.g. an S3-compatible server:
`s3://bucket/stores/fmnist?endpoint_override=host:9000&scheme=http`. Credentials come from the
environment (AWS_* variables, an instance role); a URI with a user part is refused, because URIs
are saved with a run (config.json, checkpoints). Messages show `scheme://bucket/key`, never the
query string.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lmd.io import TMP_PREFIX, atomic_path, fsync_dir, has_credentials, sha256_file, shown_uri, write_bytes_atomic


def is_uri(where: str | Path | Location) -> bool:
    """True for `scheme://...` (an object store); `file://` counts as local."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


class Location:
    """A file or folder, local or in an object store, with the few operations a store needs.

    Local locations wrap a `Path` (fsync and rename make writes atomic); remote ones a pyarrow
    filesystem and its path (`bucket/key`). `str()` names the location for messages. Picklable, so a
    Ray task can be handed one.
    """

    __slots__ = ("_local", "_fs", "_path", "_scheme")

    def __init__(self, local: Path | None, fs: pafs.FileSystem | None = None, path: str = "", scheme: str = ""):
        self._local, self._fs, self._path, self._scheme = local, fs, path.rstrip("/"), scheme

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        """A local path, `file://` path or object-store URI as a Location (a Location is returned as is)."""
        if isinstance(where, Location):
            return where
        if not is_uri(where):
            text = str(where)
            if text.startswith("file://"):  # file:///abs and file://localhost/abs name the same absolute path
                text = "/" + text.removeprefix("file://").removeprefix("localhost/").lstrip("/")
            return cls(Path(text).expanduser())
        uri = str(where)
        scheme = uri.split("://", 1)[0]
        shown = shown_uri(uri)  # no credentials, no query
        if has_credentials(uri):
            # A URI is written to config.json, checkpoints and Ray's run records: a secret in it would be too.
            raise ValueError(f"{shown}: credentials in the URI are refused (they would be saved with the run); set "
                             "them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or use an "
                             "instance role")
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError, OSError) as err:
            detail = (str(err).splitlines() or [type(err).__name__])[0].replace(uri, shown)
            raise ValueError(f"{shown}: not a storage URI pyarrow can open ({detail})") from None
        return cls(None, fs, path, scheme.lower())

    # ------------------------------------------------------------------ naming
    @property
    def is_local(self) -> bool:
        return self._local is not None

    @property
    def local_path(self) -> Path:
        if self._local is None:
            raise ValueError(f"{self}: not a local path")
        return self._local

    def __truediv__(self, name: str) -> Location:
        if self._local is not None:
            return Location(self._local / name)
        return Location(None, self._fs, f"{self._path}/{name}", self._scheme)

    def __str__(self) -> str:
        return str(self._local) if self._local is not None else f"{self._scheme}://{self._path}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        # Same name and, for object stores, the same filesystem (endpoint, region): s3://b/k on two endpoints differ.
        return (isinstance(other, Location) and str(self) == str(other)
                and (self._fs is None) == (other._fs is None) and (self._fs is None or self._fs.equals(other._fs)))

    def __hash__(self) -> int:
        return hash(str(self))

    def __getstate__(self) -> tuple[Any, ...]:
        return self._local, self._fs, self._path, self._scheme

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._local, self._fs, self._path, self._scheme = state

    @property
    def name(self) -> str:
        return self._local.name if self._local is not None else self._path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self._local is not None:
            return Location(self._local.parent)
        return Location(None, self._fs, self._path.rsplit("/", 1)[0], self._scheme)

    @property
    def filesystem(self) -> pafs.FileSystem | None:
        """The pyarrow filesystem to hand a reader (None for a local path: the reader's default)."""
        return self._fs

    @property
    def fs_path(self) -> str:
        """The path within `filesystem` (a local path as a string; `bucket/key` in an object store)."""
        return str(self._local) if self._local is not None else self._path

    def absolute(self) -> Location:
        """Local paths made absolute (a Ray worker may run in another directory); URIs unchanged."""
        return Location(self._local.resolve()) if self._local is not None else self

    # ------------------------------------------------------------------ reading
    def _info(self) -> pafs.FileInfo:
        return self._fs.get_file_info(self._path)

    def is_file(self) -> bool:
        return self._local.is_file() if self._local is not None else self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A local folder; in an object store, a prefix that holds at least one object."""
        return self._local.is_dir() if self._local is not None else self._info().type == pafs.FileType.Directory

    def exists(self) -> bool:
        return self._local.exists() if self._local is not None else self._info().type != pafs.FileType.NotFound

    def size(self) -> int:
        """Bytes of the file (FileNotFoundError when there is none)."""
        return self.stat()[0]

    def stat(self) -> tuple[int, int | None]:
        """(bytes, modification time in ns or None) of the file, from one stat or HEAD (FileNotFoundError when
        there is none)."""
        if self._local is not None:
            st = self._local.stat()
            return st.st_size, st.st_mtime_ns
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such object")
        return int(info.size), info.mtime_ns

    def names(self) -> list[str]:
        """Names directly inside this folder ([] when there is none)."""
        if self._local is not None:
            return sorted(p.name for p in self._local.iterdir()) if self._local.is_dir() else []
        selector = pafs.FileSelector(self._path, allow_not_found=True)
        return sorted(info.base_name for info in self._fs.get_file_info(selector))

    def files(self) -> dict[str, tuple[int, int | None]]:
        """{name: (bytes, modification time in ns or None)} of the files directly in this folder, from one
        listing: in an object store one LIST request per 1,000 objects instead of a HEAD per object."""
        if self._local is not None:
            if not self._local.is_dir():
                return {}
            found = {}
            with os.scandir(self._local) as entries:
                for entry in entries:
                    try:
                        if entry.is_file():
                            st = entry.stat()
                            found[entry.name] = (st.st_size, st.st_mtime_ns)
                    except FileNotFoundError:  # renamed away since the listing (a writer's temp file)
                        continue
            return found
        selector = pafs.FileSelector(self._path, allow_not_found=True)
        return {info.base_name: (int(info.size), info.mtime_ns) for info in self._fs.get_file_info(selector)
                if info.type == pafs.FileType.File}

    def read_bytes(self) -> bytes:
        if self._local is not None:
            return self._local.read_bytes()
        with self._fs.open_input_stream(self._path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def sha256(self) -> str:
        if self._local is not None:
            return sha256_file(self._local)
        digest = hashlib.sha256()
        with self._fs.open_input_stream(self._path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def parquet(self) -> pq.ParquetFile:
        """The Parquet file opened for reading (footer read; columns read on demand)."""
        if self._local is not None:
            return pq.ParquetFile(self._local)
        return pq.ParquetFile(self._fs.open_input_file(self._path))

    # ------------------------------------------------------------------ writing (each one atomic)
    def mkdir(self) -> None:
        """Create the folder (object stores have none: a no-op there)."""
        if self._local is not None:
            self._local.mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        if self._local is not None:
            write_bytes_atomic(self._local, data)
            return
        with self._fs.open_output_stream(self._path) as f:  # visible only once the upload completes
            f.write(data)

    def write_json(self, payload: Any) -> None:
        """JSON (indented, sorted keys), as `lmd.io.write_json_atomic` writes it."""
        self.write_bytes((json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def write_parquet(self, table: pa.Table, **options: Any) -> None:
        """`pq.write_table(table, ..., **options)`, atomically."""
        if self._local is not None:
            with atomic_path(self._local) as tmp:
                pq.write_table(table, tmp, **options)
            return
        buffer = pa.BufferOutputStream()  # the whole file first: a failing Parquet writer never starts an upload
        pq.write_table(table, buffer, **options)
        self.write_bytes(buffer.getvalue().to_pybytes())

    def unlink(self, missing_ok: bool = True) -> None:
        if self._local is not None:
            self._local.unlink(missing_ok=missing_ok)
            return
        try:
            self._fs.delete_file(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def sync(self) -> None:
        """Make renames inside this local folder durable (object stores: each upload already is)."""
        if self._local is not None:
            fsync_dir(self._local)

    def stale_writes(self) -> list[Location]:
        """Temp files a killed writer left in this folder (local only: an upload never leaves one)."""
        return [self / name for name in self.names() if name.startswith(TMP_PREFIX)] if self.is_local else []


Where = str | Path | Location  # what the store's functions accept for a file or folder
