"""Atomic, verified checkpoints.

Layout under a run's ``checkpoints/`` folder::

    step_00000100/state.pt        torch.save of plain tensors/dicts (loadable with weights_only=True)
    step_00000100/manifest.json   step, sha256 and size of state.pt, config, code version

A checkpoint is written into a hidden temporary folder, fsynced, and renamed into place, so a
crash mid-write never leaves a half checkpoint that looks complete: readers only see folders that
carry a manifest, and a stale temporary folder is ignored (and swept by the next writer); pruning
renames before deleting, for the same reason. On load the size and checksum are verified before
unpickling anything, and failures name the file. Resume (`resume_point`) takes the newest
checkpoint that verifies and sets aside, by renaming, whatever it skips: nothing is deleted that
this run did not write.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmd.io import TMP_PREFIX, fsync_dir, read_json_object, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
_PREFIX = "step_"
_STEP_NAME = re.compile(r"step_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or incompatible; the message names the file."""


def _write_state(state: dict[str, Any], path: Path) -> None:
    with path.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class CheckpointScan:
    """What a run's checkpoints/ folder holds, sorted into what resume may use and what it must not touch."""

    complete: list[Path] = field(default_factory=list)  # step_NNNNNNNN folders with a manifest, oldest first
    unverified: list[Path] = field(default_factory=list)  # step_NNNNNNNN folders without one (never read)
    unknown: list[Path] = field(default_factory=list)  # anything else but temporary writes (ignored)


def scan_checkpoints(root: Path) -> CheckpointScan:
    scan = CheckpointScan()
    if not root.is_dir():
        return scan
    for p in sorted(root.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            continue
        if not (p.is_dir() and _STEP_NAME.fullmatch(p.name)):
            scan.unknown.append(p)
        elif (p / MANIFEST_FILE).is_file():
            scan.complete.append(p)
        else:
            scan.unverified.append(p)
    scan.complete.sort(key=lambda p: int(p.name[len(_PREFIX):]))
    return scan


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (step_NNNNNNNN folders with a manifest) under `root`, oldest first."""
    return scan_checkpoints(root).complete


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def set_aside(path: Path, reason: str) -> Path:
    """Rename a folder resume must not use (nor overwrite) out of the way, keeping its bytes: nothing is deleted."""
    target = path.with_name(f"{path.name}.{reason}")
    if target.exists():
        target = path.with_name(f"{path.name}.{reason}-{uuid.uuid4().hex[:8]}")
    os.rename(path, target)
    return target


def resume_point(root: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that verifies, loaded: (folder, state, manifest); None when there is nothing at all.

    Says loudly what it skips and why. Only once a checkpoint verifies is anything moved: what is newer
    than it and was skipped (a checkpoint that fails verification, or a step folder without a manifest:
    an interrupted write or prune, or an edit) is renamed aside (`<name>.rejected-corrupt`,
    `<name>.rejected-unverified`), so the resumed run never overwrites bytes it did not write. When none
    verifies, the refusal leaves every folder exactly as it found it, so the next --resume refuses
    again instead of starting over. A folder that holds only what an earlier resume set aside is refused
    too: starting from step 0 there would look like a resume. Unknown entries are reported and left alone.
    """
    scan = scan_checkpoints(root)
    set_aside_before = [p for p in scan.unknown if ".rejected-" in p.name]
    for path in scan.unknown:
        if path not in set_aside_before:
            log.warning("%s: not a checkpoint of this run (expected step_NNNNNNNN folders); ignored", path)
    failures: list[tuple[Path, str]] = []
    for path in reversed(scan.complete):
        try:
            state, manifest = load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            failures.append((path, str(err)))
            continue
        step = int(path.name[len(_PREFIX):])
        for bad, why in failures:  # newer than the one resumed from: the run will write these steps again
            log.warning("not resuming from %s: %s; kept as %s", bad.name, why, set_aside(bad, "rejected-corrupt").name)
        for bad in scan.unverified:
            if int(bad.name[len(_PREFIX):]) > step:
                log.warning("%s: has no %s (an interrupted write or prune, or an edit): not used, kept as %s", bad,
                            MANIFEST_FILE, set_aside(bad, "rejected-unverified").name)
        return path, state, manifest
    if scan.unverified or scan.complete:  # there was something to resume from, and none of it verifies
        newest = failures[0][1] if failures else f"{scan.unverified[-1]}: no {MANIFEST_FILE}"
        raise CheckpointError(f"no checkpoint under {root} verifies (newest: {newest}); nothing was changed: restore "
                              "one, or start a new --run-dir")
    if set_aside_before:
        raise CheckpointError(f"{root}: holds only checkpoints set aside earlier ({set_aside_before[-1].name}); "
                              "nothing to resume from: restore one (rename it back), or start a new --run-dir")
    return None


def save_checkpoint(root: Path, step: int, state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Write `state` as checkpoint `step` atomically, then prune to the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_state(state, tmp / STATE_FILE)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "file": STATE_FILE,
            "sha256": sha256_file(tmp / STATE_FILE),
            "bytes": (tmp / STATE_FILE).stat().st_size,
            "created_unix": time.time(),
            **meta,
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        fsync_dir(tmp)
        if final.exists():  # not written by this run (resume sets aside what it does not use): keep its bytes
            log.warning("%s exists; kept as %s", final, set_aside(final, "replaced").name)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep_last]:
        # Renamed to a temporary name first: a kill mid-delete leaves a folder the next sweep removes,
        # never a step folder that has lost its manifest but kept its state.
        doomed = root / f"{TMP_PREFIX}prune-{old.name}-{uuid.uuid4().hex}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def sweep_stale(root: Path) -> None:
    """Remove temporary folders left by writes that were killed midway."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                log.warning("removing incomplete checkpoint write %s", p)
                shutil.rmtree(p, ignore_errors=True)


def adopt_checkpoint(source: Path, root: Path) -> Path:
    """Copy a checkpoint folder handed back by Ray (any name, e.g. a temp download) into `root`,
    named by its manifest's step, so `latest_checkpoint(root)` and a resume find it."""
    step = read_manifest(source)["step"]
    target = root / f"{_PREFIX}{step:08d}"
    shutil.copytree(source, target)
    return target


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST_FILE
    manifest = read_json_object(path, "manifest", CheckpointError)
    for key in ("format", "step", "sha256", "bytes"):
        if key not in manifest:
            raise CheckpointError(f"{path}: manifest lacks field {key!r}")
    if manifest["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format={manifest['format']!r}, this code reads {FORMAT_VERSION}")
    return manifest


def load_checkpoint(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Verify and load a checkpoint. Returns (state, manifest); raises CheckpointError naming the file."""
    manifest = read_manifest(ckpt_dir)
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (manifest of step {manifest['step']} names it)")
    size = path.stat().st_size
    if size != manifest["bytes"]:
        raise CheckpointError(f"{path}: truncated or overwritten: {size} bytes, manifest says "
                              f"{manifest['bytes']}")
    digest = sha256_file(path)
    if digest != manifest["sha256"]:
        raise CheckpointError(f"{path}: corrupt: sha256 {digest[:12]}... does not match manifest "
                              f"{manifest['sha256'][:12]}...; delete {ckpt_dir} to resume from the "
                              "previous checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # checksum matched but content unreadable: wrong writer or version
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {err})") from None
    return state, manifest
