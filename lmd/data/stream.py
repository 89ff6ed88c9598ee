"""Streaming a latent store through Ray Data: each rank reads its own part, in a batch order fixed by (seed, step).

`ray_dataset` is the plain read: the manifest's shards -> decoded rows ``{"latent": float32 [C, h, w],
"index": int64}``. `RayLatentStream` is the engine's batch source: one Ray Data pipeline for the whole
run whose tasks read the shards of this rank's lanes (`lmd.data.lanes.StreamPlan`), one shuffle
window per task, and hand back this rank's slice of every global batch, in the store's dtype
(float16 latents travel at half the bytes; the engine casts on the device).

Why the order is exact: a task's output is a pure function of (plan, epoch, window), and the
pipeline preserves task order, so the batch at step t does not depend on how Ray cut or scheduled
the work, on the cluster's size, or on the number of ranks. Resuming at step t starts the pipeline
at t's window and drops the steps before t inside it: nothing is read twice.

Why memory is bounded: at most `readers` window tasks run per rank, and the pipeline's object-store
budget holds a few windows; a rank never holds more than that, whatever the store's size.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from lmd.data.lanes import StreamPlan
from lmd.data.location import Location, Where
from lmd.data.memory import host_copy
from lmd.data.store import StoreError, decode_latents, item_width, validate_store

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


def _read_shards(root: Location, manifest: dict[str, Any]) -> ray.data.Dataset:
    import ray.data

    # Ray 2.60 resolves a list of paths on 8 threads that each try `import fsspec.implementations.http`;
    # without aiohttp that import fails and concurrent importers get a bogus ImportError. Reading the
    # directory (one seed path) avoids the race; any other Parquet file or folder in it is skipped, so
    # exactly the manifest's shards are read (Ray itself ignores hidden names: the plan, temp files).
    root = root.absolute()
    wanted = {shard["file"] for shard in manifest["shards"]}
    others = [root / name for name in root.names() if name not in wanted and not name.startswith((".", "_"))]
    skip = [other.fs_path for other in others if other.is_dir() or other.name.endswith(".parquet")]
    ds = ray.data.read_parquet(root.fs_path, filesystem=root.filesystem, partitioning=None,
                               file_extensions=["parquet"], skip_paths=skip or None)
    # Blocks in file order (read) and in key order (sort): rows then come in a defined order.
    ds.context.execution_options.preserve_order = True
    return ds


def ray_dataset(store_dir: Where, *, verify_checksums: bool = False) -> ray.data.Dataset:
    """The store as a Ray Dataset of rows {"latent": np.float32 [C, h, w], "index": int64}, in item order.

    The manifest, footers and schemas are checked first (shard checksums too, if asked); Ray must
    already be initialised.
    """
    _require_ray()
    manifest = validate_store(store_dir, verify_checksums=verify_checksums)
    ds = _read_shards(Location.of(store_dir), manifest)
    return ds.map_batches(_decode, batch_format="pyarrow", zero_copy_batch=True,
                          fn_kwargs={"latent_shape": manifest["latent_shape"], "dtype": manifest["dtype"]})



# ---------------------------------------------------------------------------------------------- windows
def _shard_rows(path: Location, rows: int, first: int, width: int, size: int,
                mtime_ns: int | None = None) -> np.ndarray:
    """Shard `path`'s latents as raw bytes [rows, width], after checking it is the shard the manifest names and,
    when `mtime_ns` is given, the file the stream opened (a re-encoded shard has the same size: shards are
    fixed-width and uncompressed)."""
    try:
        actual, modified = path.stat()
        if actual != size:
            raise StoreError(f"{path}: bytes: {actual}, manifest says {size} (replaced or truncated mid-run)")
        # An object store may list times in ms and HEAD them in whole seconds: there, compare whole seconds.
        scale = 1 if path.is_local else 10**9
        if mtime_ns is not None and modified is not None and modified // scale != mtime_ns // scale:
            raise StoreError(f"{path}: modified at {modified} ns, {mtime_ns} ns when the stream opened the store "
                             "(replaced mid-run)")
        table = path.parquet().read(columns=["index", "latent"])
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: Parquet unreadable ({type(err).__name__}: {err})") from None
    column = table["latent"].combine_chunks()
    if column.type != pa.binary(width) or column.null_count or len(column) != rows:
        raise StoreError(f"{path}: latent: {len(column)} rows of {column.type}, manifest expects {rows} rows of "
                         f"fixed_size_binary[{width}]")
    index = table["index"].to_numpy()
    if index[0] != first or index[-1] != first + rows - 1:
        raise StoreError(f"{path}: index: items [{index[0]}, {index[-1]}], expected [{first}, {first + rows - 1}] "
                         "(a shard of another store?)")
    return np.frombuffer(column.buffers()[1], dtype=np.uint8, count=rows * width,
                         offset=column.offset * width).reshape(rows, width)


def reader_options() -> dict[str, Any]:
    """Ray options of each read task: one CPU anywhere, or, inside a placement group (a Tune trial, a Ray
    Train worker), no CPU and this node.

    Ray Data's tasks do not run in the bundles of the placement group they are started from (Ray 2.60:
    a trial reserving [{CPU: 1}, {CPU: 1}] on a 2-CPU Ray left its read task pending with the second
    bundle idle). A reader asking for a CPU then waits for one outside every group, which never comes
    when trials or workers hold them all. So there the group's own CPUs pay for its reads: the readers
    (`readers` per stream: I/O and a byte copy each) ask for none and are held to the node of the
    process that reserved them (Ray's default `ray.io/node-id` label), not spread onto CPUs other
    trials hold.
    """
    import ray

    if ray.util.get_current_placement_group() is None:
        return {"num_cpus": 1}
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def _read_window(task: dict[str, np.ndarray], root: Location, plan: StreamPlan, lanes: range,
                 shards: list[dict[str, Any]], width: int) -> dict[str, np.ndarray]:
    """One Ray Data task: this rank's rows of one shuffle window, [steps * local_batch] in step order."""
    epoch, window, skip, stop = (int(task[k][0]) for k in ("epoch", "window", "skip", "stop"))
    ids = plan.window_ids(epoch, window, lanes)[skip:stop].reshape(-1)  # [n] item ids, consumption order
    starts = np.cumsum([0] + [s["rows"] for s in shards])
    shard_of = np.searchsorted(starts, ids, side="right") - 1
    out = np.empty((len(ids), width), dtype=np.uint8)
    for k in np.unique(shard_of):  # each shard the window touches is read once
        shard, mine = shards[k], shard_of == k
        rows = _shard_rows(root / shard["file"], shard["rows"], int(starts[k]), width, shard["bytes"],
                           shard.get("mtime_ns"))
        out[mine] = rows[ids[mine] - starts[k]]
    return {"latent": out, "index": ids}


def _store_error(err: BaseException) -> StoreError | None:
    """The StoreError a Ray task raised, if that is what ended the pipeline (Ray wraps it in a RayTaskError)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return None
        inner = getattr(seen, "cause", None)  # RayTaskError(StoreError) is itself a StoreError: unwrap it first
        if isinstance(inner, BaseException):
            seen = inner
            continue
        if isinstance(seen, StoreError):
            return StoreError(str(seen).splitlines()[0])  # Ray appends its retry advice on later lines
        seen = seen.__cause__ or seen.__context__
    return None


class RayLatentStream:
    """The engine's batch source over a store in Parquet: this rank's slice of each global batch, via Ray Data.

    `batch(step)` is a pure function of (store, batch_size, seed, lanes, window_items, step) and of
    nothing about the cluster: consecutive steps read one long-lived pipeline, built at the first
    call and covering every step up to `total_steps` (so epochs flow without a restart); any other
    step (a resume, a jump back) rebuilds it from that step's window. Call `validate_store` with the
    run's expectations before building one (here only the store's own consistency is checked; pass
    verify_checksums=True to hash the shards as well). Each task re-checks the shards it reads, so a
    shard replaced mid-run stops the run with a StoreError naming the file.
    """

    def __init__(self, store_dir: Where, batch_size: int, seed: int, shuffle: bool = True, *,
                 lanes: int = 8, window_items: int = 2048, rank: int = 0, world_size: int = 1,
                 total_steps: int | None = None, readers: int = 2, verify_checksums: bool = False):
        _require_ray()
        self.store_dir = Location.of(store_dir).absolute()
        self.manifest = validate_store(self.store_dir, verify_checksums=verify_checksums)
        listed = self.store_dir.files()  # each shard's modification time now: its read tasks check it is unchanged
        self.shards = [{**shard, "mtime_ns": listed.get(shard["file"], (0, None))[1]}
                       for shard in self.manifest["shards"]]
        self.count: int = self.manifest["count"]
        try:
            self.plan = StreamPlan(tuple(s["rows"] for s in self.manifest["shards"]), batch_size, seed, lanes,
                                   window_items, shuffle)
            self.lanes = self.plan.rank_lanes(rank, world_size)
        except ValueError as err:
            raise StoreError(f"{self.store_dir}: {err}") from None
        if readers < 1:
            raise ValueError(f"readers={readers}: must be >= 1")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.total_steps, self.readers = total_steps, readers
        self.width = item_width(self.manifest["latent_shape"], self.manifest["dtype"])
        self._iter: Any = None
        self.pin_memory = False  # batches in page-locked memory, for an asynchronous copy to a GPU (lmd.speed)
        self._next_step, self._end_step = -1, -1

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        # A live Ray iterator cannot travel (e.g. to a Ray Train worker); the receiver rebuilds it.
        return {**self.__dict__, "_iter": None, "_next_step": -1, "_end_step": -1}

    def _windows(self, step: int) -> tuple[list[dict[str, int]], int]:
        """Window tasks from `step` to the pipeline's end (`total_steps`, at least the end of step's epoch)."""
        plan, spe = self.plan, self.plan.steps_per_epoch
        end = max(self.total_steps or 0, (step // spe + 1) * spe)
        tasks, at = [], step
        while at < end:
            epoch, window, skip = plan.locate(at)
            stop = min(plan.window_steps, spe - window * plan.window_steps, skip + end - at)
            tasks.append({"epoch": epoch, "window": window, "skip": skip, "stop": stop})
            at += stop - skip
        return tasks, end

    def _open(self, step: int) -> None:
        import ray.data
        from ray.data import ExecutionResources

        self.close()
        _require_ray()
        tasks, self._end_step = self._windows(step)
        if step % self.steps_per_epoch:
            log.info("starting the latent stream mid-epoch at step %d", step)
        window_bytes = self.plan.window_steps * self.local_batch * self.width
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds.context.enable_progress_bars = False  # the run's log has its own progress rows
        ds.context.execution_options.preserve_order = True  # task order is batch order
        ds.context.raise_original_map_exception = True  # a StoreError arrives as itself, not as UserCodeException
        # A few windows in flight, whatever the store's size: this bounds the rank's memory.
        ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=(self.readers + 2) * window_bytes)
        ds = ds.map_batches(_read_window, batch_size=1, batch_format="numpy", **reader_options(),
                            compute=ray.data.TaskPoolStrategy(size=self.readers),
                            fn_kwargs={"root": self.store_dir, "plan": self.plan, "lanes": self.lanes,
                                       "shards": self.shards, "width": self.width})
        self._iter = iter(ds.iter_batches(batch_size=self.local_batch, batch_format="numpy", prefetch_batches=2))
        self._next_step = step

    def close(self) -> None:
        """Stop the live pipeline; the next `batch` call rebuilds what it needs."""
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter, self._next_step = None, -1

    def batch_with_index(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the batch at global `step` ([local_batch, C, h, w] in the store's dtype) and
        the store index of each row."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        if self._iter is None or step != self._next_step or step >= self._end_step:
            self._open(step)
        try:
            out = next(self._iter)
        except StopIteration:  # the tasks cover every step up to _end_step; this is a Ray-side fault
            self.close()
            raise RuntimeError(f"{self.store_dir}: the Ray Data stream ended early at step {step}") from None
        except Exception as err:
            self.close()
            cause = _store_error(err)
            if cause is not None:
                raise cause from None  # one line naming the shard, not a page of Ray task tracebacks
            raise
        self._next_step = step + 1
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        latents = out["latent"].view(dtype).reshape(-1, *self.manifest["latent_shape"])
        # Ray hands out read-only views of its object store; the copy is the rank's own batch (page-locked
        # when the run's GPU reads it: see `pin_memory`).
        return host_copy(latents, pinned=self.pin_memory), torch.from_numpy(out["index"].copy())

    def batch(self, step: int) -> torch.Tensor:
        """This rank's rows of the batch at global `step`: [local_batch, C, h, w] in the store's dtype."""
        return self.batch_with_index(step)[0]
