"""One writer at a time: an exclusive lock per run directory, latent store or experiment. Standard library only.

    with hold(run_dir / LOCK_FILE, "run directory " + str(run_dir)):
        ...  # a second process asking for the same lock gets LockedError naming this one's pid

The lock is `fcntl.flock` on a small file that holds the owner's pid. The kernel drops it when the
owner's last descriptor closes, so a process killed by anything (`kill -9` included) leaves no stale
lock: the file stays, unlocked, and the next writer takes it. Locks are re-entrant within a process
(asking again for a lock this process holds returns the same one), so a trial restarted in the same
worker process, or a test, does not lock itself out. Local file systems only: for a URI (s3://...)
there is nothing to lock, and on NFS flock is only as good as the server's lock support.
"""

from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"  # inside a run directory or store; an experiment's is `.<name>.lock` beside it

_HELD: dict[str, weakref.ref[Lock]] = {}  # absolute path -> the lock this process holds on it


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names what is locked and that process's pid."""


class Lock:
    """A held lock; released by `release()`, by leaving its `with` block, when collected, or at process exit."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def holder_pid(path: str | Path) -> int | None:
    """The pid written in a lock file (None if unreadable); meaningful only while the file is locked."""
    try:
        return int(Path(path).read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _busy(path: Path, what: str) -> LockedError:
    pid = holder_pid(path)
    return LockedError(f"{what} is in use by process {pid if pid is not None else '(unknown)'} (lock {path}); "
                       "wait for it to end, or stop it")


def check_free(path: str | Path, what: str) -> None:
    """Raise LockedError now if another process holds the lock at `path`; creates nothing (a missing file is free).

    For refusing early, before slow start-up work; `hold` still takes the lock for real afterwards.
    """
    path = Path(path)
    ref = _HELD.get(os.path.abspath(path))
    if ref is not None and ref() is not None and ref().held:  # type: ignore[union-attr]
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _busy(path, what) from None
    finally:
        os.close(fd)


def hold(path: str | Path, what: str) -> Lock:
    """Take the exclusive lock at `path` (creating the file and its folder) or raise LockedError at once.

    `what` names the locked thing in the message, e.g. "run directory runs/demo".
    """
    path = Path(path)
    key = os.path.abspath(path)
    ref = _HELD.get(key)
    mine = ref() if ref is not None else None
    if mine is not None and mine.held:
        return mine
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise LockedError(f"{path}: cannot create the lock of {what} ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise _busy(path, what) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    lock = Lock(path, fd)
    _HELD[key] = weakref.ref(lock)
    return lock
