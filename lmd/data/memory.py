"""Latents held in memory, with a batch order that is a pure function of (seed, step).

`InMemoryLatents.batch(step)` needs no iterator state: the permutation of epoch e is drawn from
a generator seeded with (seed, e). The data position of a run is therefore just its step count,
which is what makes stop + resume bit-identical to an uninterrupted run.

`host_buffer` / `host_copy` give host batches, page-locked when a GPU will read them.

`synthetic_latents` makes the `--dataset synthetic` fields (loop tests without images or projector):
smooth, spatially correlated 4-channel fields (a per-sample offset plus random low-frequency
plane waves with mixed channels), so that masked patches are predictable from visible neighbours the way real
image latents are, and a model that learns shows a falling loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def synthetic_latents(num: int, channels: int, size: int, seed: int, waves: int = 6) -> torch.Tensor:
    """[num, channels, size, size] float32 fields with roughly unit variance, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]
    freq = torch.randint(-2, 3, (num, waves, 2), generator=g).float()  # up to 2 cycles per side
    phase = torch.rand(num, waves, 1, 1, generator=g) * 2 * math.pi
    amp = torch.randn(num, waves, 1, 1, generator=g) / math.sqrt(waves)
    arg = 2 * math.pi * (freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy) + phase
    waves_ = amp * torch.cos(arg)  # [num, W, S, S]
    mix = torch.randn(num, channels, waves, generator=g) / math.sqrt(waves)  # correlated channels
    fields = torch.einsum("ncw,nwhv->nchv", mix, waves_ * math.sqrt(waves))
    fields = fields + torch.randn(num, channels, 1, 1, generator=g)  # per-sample "colour" offset
    return (fields / fields.std().clamp_min(1e-6)).contiguous()


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An empty host tensor for one batch. Pinned (page-locked) memory lets `.to("cuda", non_blocking=True)`
    return at once instead of staging through a pageable copy; torch's caching host allocator reuses the
    block only after the copy that read it has finished, so a fresh buffer per step costs no allocation."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def host_copy(array: np.ndarray, pinned: bool) -> torch.Tensor:
    """A host tensor holding its own copy of `array` (pinned when asked: see `host_buffer`)."""
    if not pinned:
        return torch.from_numpy(np.array(array))
    out = host_buffer(array.shape, torch.from_numpy(np.empty(0, array.dtype)).dtype, pinned=True)
    np.copyto(out.numpy(), array)
    return out


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Item indices of epoch `epoch` in the in-memory training order (streamed stores use `lmd.data.lanes`)."""
    if not shuffle:
        return torch.arange(count)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g)


class InMemoryLatents:
    """A tensor of latents [N, C, H, W] served as fixed-size, epoch-shuffled batches.

    With `world_size` > 1, `batch(step)` is rank `rank`'s slice of the global batch (every rank draws
    the same global order), like the streamed source, so the engine never slices a batch itself.
    """

    def __init__(self, latents: torch.Tensor, batch_size: int, seed: int, labels: torch.Tensor | None = None, *,
                 rank: int = 0, world_size: int = 1):
        if latents.ndim != 4:
            raise ValueError(f"latents must be [N, C, H, W], got shape {tuple(latents.shape)}")
        if batch_size > latents.shape[0]:
            raise ValueError(f"batch_size={batch_size} exceeds the {latents.shape[0]} samples available")
        if labels is not None and labels.shape != latents.shape[:1]:
            raise ValueError(f"labels must be [{latents.shape[0]}], got shape {tuple(labels.shape)}")
        if world_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: batch_size={batch_size} must split evenly")
        self.latents = latents
        self.rank, self.world_size = rank, world_size
        self.labels = labels  # [N] int64 class of each item, for labelled stores
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = latents.shape[0] // batch_size  # drop the ragged tail each epoch
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        self._perm_on_latents = self._perm  # the same order where the latents are (a GPU once `to_device`)
        # Host batches land in page-locked memory, so their copy to a GPU is asynchronous (lmd.speed sets
        # this for a CUDA run whose latents stay on the host).
        self.pin_memory = False

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to_device(self, device: torch.device) -> None:
        """Hold the latents on `device`, so a step gathers its batch there: no host gather, no host-to-device
        copy per step (one copy of the order per epoch). The batches are the same values."""
        self.latents = self.latents.to(device)
        self._perm_on_latents = self._perm.to(device)

    def _permutation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's order (host) and the same order on the latents' device."""
        if epoch != self._perm_epoch:  # cache: consecutive steps share an epoch
            self._perm = epoch_order(self.latents.shape[0], self.seed, epoch)
            self._perm_on_latents = self._perm.to(self.latents.device)
            self._perm_epoch = epoch
        return self._perm, self._perm_on_latents

    def _positions(self, step: int) -> tuple[int, slice]:
        epoch, index = divmod(step, self.steps_per_epoch)
        local = self.batch_size // self.world_size
        start = index * self.batch_size + self.rank * local
        return epoch, slice(start, start + local)

    def batch_ids(self, step: int) -> torch.Tensor:
        """Item indices (on the host) of this rank's part of the batch at global `step`: [batch_size // world_size]."""
        epoch, rows = self._positions(step)
        return self._permutation(epoch)[0][rows]

    def batch(self, step: int) -> torch.Tensor:
        """This rank's part of the batch consumed at global `step`: [batch_size // world_size, C, H, W], on the
        latents' device."""
        epoch, rows = self._positions(step)
        ids = self._permutation(epoch)[1][rows]
        if not self.pin_memory:
            return self.latents[ids]
        out = host_buffer((len(ids), *self.latents.shape[1:]), self.latents.dtype, pinned=True)
        return torch.index_select(self.latents, 0, ids, out=out)

    def labelled_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [B, C, H, W], labels [B]) of global `step`: the same items as `batch(step)`."""
        if self.labels is None:
            raise ValueError("these latents carry no labels (an unlabelled store)")
        ids = self.batch_ids(step)
        return self.latents[ids.to(self.latents.device)], self.labels[ids]
