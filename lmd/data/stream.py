"""Streaming a latent store through Ray Data, with a batch order that is a pure function of (seed, step).

`ray_dataset` is the plain read: the manifest's shards -> decoded rows ``{"latent": float32 [C, h, w],
"index": int64}``. `RayLatentStream` is the engine's batch source on top of it.

How the order is made exact: the order of epoch e is the same permutation `InMemoryLatents` draws
(`lmd.data.memory.epoch_order`), so the two sources give identical batches.
Each row gets its position in that permutation as a sort key, and ``Dataset.sort`` on that key (with
fixed range boundaries, so no sampling) puts the rows in that order. A sort is a semantic guarantee,
unlike ``random_shuffle(seed=...)``, whose output depends on how Ray happened to cut the data into
blocks (and so on the cluster's CPU count); here the batch at step t does not depend on the cluster.
Resuming mid-epoch at position i drops the rows before ``i * batch_size`` before the sort, so nothing
is read twice, and the iterator then starts exactly at batch i.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lmd.data.memory import epoch_order
from lmd.data.store import decode_latents, validate_store

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


def _require_ray() -> None:
    import ray

    # Ray Data would start a default local cluster on its own; a run must choose its cluster.
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init(...) (or run under Ray Train/Tune) before "
                           "streaming a latent store")


def _decode(batch: pa.Table, latent_shape: list[int], dtype: str) -> dict[str, np.ndarray]:
    return {"latent": decode_latents(batch["latent"], latent_shape, dtype),
            "index": batch["index"].to_numpy()}


def _keep_and_key(batch: pa.Table, rank: np.ndarray, start: int, stop: int) -> pa.Table:
    """Attach each row's position in the epoch order; keep positions [start, stop)."""
    key = rank[batch["index"].to_numpy()]
    batch = batch.append_column("key", pa.array(key))
    return batch.filter(pc.and_(pc.greater_equal(batch["key"], start), pc.less(batch["key"], stop)))


def _read_shards(root: Path, manifest: dict[str, Any]) -> ray.data.Dataset:
    import ray.data

    # Ray 2.60 resolves a list of paths on 8 threads that each try `import fsspec.implementations.http`;
    # without aiohttp that import fails and concurrent importers get a bogus ImportError. Reading the
    # directory (one seed path) avoids the race; any other Parquet file or folder in it is skipped, so
    # exactly the manifest's shards are read (Ray itself ignores hidden names: the plan, temp files).
    root = root.resolve()
    wanted = {shard["file"] for shard in manifest["shards"]}
    skip = [str(p) for p in root.iterdir() if p.name not in wanted and not p.name.startswith((".", "_"))
            and (p.is_dir() or p.suffix == ".parquet")]
    ds = ray.data.read_parquet(str(root), partitioning=None, file_extensions=["parquet"], skip_paths=skip or None)
    # Blocks in file order (read) and in key order (sort): rows then come in a defined order.
    ds.context.execution_options.preserve_order = True
    return ds


def ray_dataset(store_dir: str | Path, *, verify_checksums: bool = False) -> ray.data.Dataset:
    """The store as a Ray Dataset of rows {"latent": np.float32 [C, h, w], "index": int64}, in item order.

    The manifest, footers and schemas are checked first (shard checksums too, if asked); Ray must
    already be initialised.
    """
    _require_ray()
    manifest = validate_store(store_dir, verify_checksums=verify_checksums)
    ds = _read_shards(Path(store_dir), manifest)
    return ds.map_batches(_decode, batch_format="pyarrow", zero_copy_batch=True,
                          fn_kwargs={"latent_shape": manifest["latent_shape"], "dtype": manifest["dtype"]})


class RayLatentStream:
    """Engine-facing batch source that streams the store through Ray Data.

    `batch(step)` is a pure function of (store, batch_size, seed, step): consecutive steps reuse one
    live iterator; any other step (a resume, a jump back) rebuilds that epoch's pipeline starting at
    the step's batch. Each epoch drops its ragged tail (``count % batch_size`` items). Call
    `validate_store` with the run's expectations before building one (only the store's own
    consistency is checked here; pass verify_checksums=True to hash the shards as well).
    """

    def __init__(self, store_dir: str | Path, batch_size: int, seed: int, shuffle: bool = True, *,
                 verify_checksums: bool = False, prefetch: bool = True):
        _require_ray()
        self.store_dir = Path(store_dir)
        self.manifest = validate_store(self.store_dir, verify_checksums=verify_checksums)
        self.count: int = self.manifest["count"]
        if not 1 <= batch_size <= self.count:
            raise ValueError(f"batch_size={batch_size}: must be in [1, {self.count}] (the store's item count)")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = self.count // batch_size
        self.prefetch = prefetch
        self._iter: Any = None
        self._next_step = -1
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future] | None = None  # (epoch, future of its materialized dataset)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        # A live Ray iterator cannot travel (e.g. to a Ray Train worker); the receiver rebuilds it.
        return {**self.__dict__, "_iter": None, "_next_step": -1, "_pool": None, "_ahead": None}

    def _pipeline(self, epoch: int, position: int) -> ray.data.Dataset:
        """Rows of `epoch` from batch `position` on, in the epoch's order, decoded."""
        order = epoch_order(self.count, self.seed, epoch, self.shuffle).numpy()
        rank = np.empty(self.count, dtype=np.int64)
        rank[order] = np.arange(self.count)  # rank[item] = its position in the epoch
        start, stop = position * self.batch_size, self.steps_per_epoch * self.batch_size
        ds = _read_shards(self.store_dir, self.manifest)
        ds.context.enable_progress_bars = False  # one pipeline per epoch: bars would flood the run's log
        ds = ds.map_batches(_keep_and_key, batch_format="pyarrow", fn_kwargs={"rank": rank, "start": start,
                                                                              "stop": stop})
        # Fixed, evenly spaced boundaries: about one output block per shard, and no sampling pass.
        parts = max(1, min(len(self.manifest["shards"]), stop - start))
        bounds = sorted({start + (stop - start) * j // parts for j in range(1, parts)})
        ds = ds.sort("key", boundaries=bounds or None)
        return ds.map_batches(_decode, batch_format="pyarrow", zero_copy_batch=True,
                              fn_kwargs={"latent_shape": self.manifest["latent_shape"],
                                         "dtype": self.manifest["dtype"]})

    def _open(self, step: int) -> None:
        self._end_epoch()
        _require_ray()
        epoch, position = divmod(step, self.steps_per_epoch)
        if position:
            log.info("starting the latent stream mid-epoch: epoch %d, batch %d", epoch, position)
        if position == 0 and self._ahead is not None and self._ahead[0] == epoch:
            ds = self._ahead[1].result()  # built while the previous epoch trained
        else:
            ds = self._pipeline(epoch, position)
        self._ahead = None
        if self.prefetch:
            # Each epoch's sort pipeline takes seconds to schedule on a small machine: build the
            # next one in the background (materialised into the object store) while this one trains.
            self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmd-prefetch")
            self._ahead = (epoch + 1, self._pool.submit(lambda: self._pipeline(epoch + 1, 0).materialize()))
        self._iter = iter(ds.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device="cpu"))

    def _end_epoch(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter, self._next_step = None, -1

    def close(self) -> None:
        """Stop the live pipeline and any prefetch; the next `batch` call rebuilds what it needs."""
        self._end_epoch()
        if self._ahead is not None:
            self._ahead[1].cancel()
            try:
                self._ahead[1].result()  # let a running build finish before Ray may be shut down
            except Exception:  # noqa: BLE001 - a cancelled or failed prefetch is simply dropped
                pass
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def batch_with_index(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at global `step` ([batch_size, C, h, w] float32) and the store index of each row."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        if self._iter is None or step != self._next_step:
            self._open(step)
        try:
            out = next(self._iter)
        except StopIteration:  # the pipeline guarantees steps_per_epoch batches; this is a Ray-side fault
            self._end_epoch()
            raise RuntimeError(f"{self.store_dir}: Ray Data ended epoch early at step {step}") from None
        self._next_step = step + 1
        if self._next_step % self.steps_per_epoch == 0:
            self._end_epoch()  # epoch done: release its pipeline; the next step opens the prefetched one
        return out["latent"], out["index"]

    def batch(self, step: int) -> torch.Tensor:
        """The batch consumed at global `step`: [batch_size, C, h, w] float32."""
        return self.batch_with_index(step)[0]
