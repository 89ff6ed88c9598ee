"""The streamed batch order: which store items every rank trains on at every step (numpy only).

A store too large for one worker's memory cannot be shuffled as one permutation without every
worker reading all of it, so the streamed order is a *block shuffle with a local window*, built so
that each rank reads only its own part of the store and the global batch does not depend on how
many ranks share it:

1. Epoch e permutes the store's shards (the blocks) with a generator seeded by (seed, e) and
   concatenates their items: the epoch's sequence S_e, N items.
2. S_e is cut into `lanes` contiguous lanes of L = N // lanes items (the last N % lanes are dropped).
3. A lane is consumed `lane_batch = batch_size // lanes` items per step, in windows of
   `window_steps` steps; the items of one window are permuted with a generator seeded by
   (seed, e, lane, window), which mixes the few shards a window spans. An epoch has
   L // lane_batch steps (the lane's ragged tail is dropped).
4. The global batch of step t is lane 0's items, then lane 1's, ..., then lane V-1's. With W ranks
   (W divides lanes), rank r owns lanes [r*V/W, (r+1)*V/W): its part of the global batch is exactly
   the slice [r*B/W, (r+1)*B/W) that data parallelism gives it, and it reads only its lanes' shards.

So the batch at step t is a pure function of (shard sizes, batch_size, seed, lanes, window_steps, t),
whatever the worker count, and a resumed run continues at the same data position. What it gives
up against `InMemoryLatents`' full permutation (see the README): a batch mixes `lanes` regions of
the store, each a window of a few shards, instead of items drawn from the whole store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StreamPlan:
    shard_rows: tuple[int, ...]  # items of each shard, in index order (shard k starts at sum(shard_rows[:k]))
    batch_size: int  # the global batch
    seed: int
    lanes: int = 8
    window_items: int = 2048  # items of one lane per shuffle window (rounded to whole steps)
    shuffle: bool = True
    _starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = tuple(int(r) for r in self.shard_rows)
        if not rows or min(rows) < 1:
            raise ValueError(f"shard_rows={self.shard_rows!r}: need at least one shard, each with >= 1 item")
        if self.lanes < 1 or self.batch_size < 1 or self.batch_size % self.lanes:
            raise ValueError(f"batch_size={self.batch_size}: must be a positive multiple of lanes={self.lanes} "
                             "(every lane gives the same number of items to each batch)")
        object.__setattr__(self, "shard_rows", rows)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size={self.batch_size}: the store's {self.count} items cut into {self.lanes} "
                             f"lanes give {self.lane_len} items per lane, fewer than one lane batch of "
                             f"{self.lane_batch}")
        if self.window_items < 1:
            raise ValueError(f"window_items={self.window_items}: must be >= 1")
        object.__setattr__(self, "_starts", np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64))

    # ------------------------------------------------------------------ sizes
    @property
    def count(self) -> int:
        return sum(self.shard_rows)

    @property
    def lane_len(self) -> int:
        return self.count // self.lanes

    @property
    def lane_batch(self) -> int:
        return self.batch_size // self.lanes

    @property
    def steps_per_epoch(self) -> int:
        return self.lane_len // self.lane_batch

    @property
    def window_steps(self) -> int:
        return max(1, self.window_items // self.lane_batch)

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.steps_per_epoch // self.window_steps)

    def rank_lanes(self, rank: int, world_size: int) -> range:
        """The lanes rank `rank` of `world_size` reads (its contiguous slice of every global batch)."""
        if world_size < 1 or self.lanes % world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: the world size must divide lanes={self.lanes}")
        per = self.lanes // world_size
        return range(rank * per, (rank + 1) * per)

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, window, step within the window) of global `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        window, offset = divmod(position, self.window_steps)
        return epoch, window, offset

    # ------------------------------------------------------------------ item ids
    def _sequence(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Item ids at `positions` of the epoch's sequence S_e (shards in permuted order, concatenated)."""
        rows = np.asarray(self.shard_rows, dtype=np.int64)
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(rows)) if self.shuffle
                 else np.arange(len(rows)))
        ends = np.cumsum(rows[order])  # end of each permuted shard within S_e
        j = np.searchsorted(ends, positions, side="right")  # which permuted shard holds each position
        return self._starts[order[j]] + positions - (ends[j] - rows[order[j]])

    def window_ids(self, epoch: int, window: int, lanes: Sequence[int]) -> np.ndarray:
        """Item ids of `window` of `epoch` for `lanes`: [steps in the window, len(lanes) * lane_batch], row s
        being those lanes' part of the window's s-th batch (lane-major within the row)."""
        first = window * self.window_steps
        steps = min(self.window_steps, self.steps_per_epoch - first)
        if steps < 1 or epoch < 0:
            raise ValueError(f"epoch {epoch} window {window}: outside the epoch's {self.windows_per_epoch} windows")
        b = self.lane_batch
        out = np.empty((steps, len(lanes), b), dtype=np.int64)
        for k, lane in enumerate(lanes):
            start = lane * self.lane_len + first * b
            ids = self._sequence(epoch, np.arange(start, start + steps * b, dtype=np.int64))
            if self.shuffle:
                ids = np.random.default_rng([self.seed, epoch, lane, window]).permutation(ids)
            out[:, k, :] = ids.reshape(steps, b)
        return out.reshape(steps, len(lanes) * b)

    def batch_ids(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Item ids of rank `rank`'s part of the global batch at `step` ([batch_size // world_size])."""
        epoch, window, offset = self.locate(step)
        return self.window_ids(epoch, window, self.rank_lanes(rank, world_size))[offset]
