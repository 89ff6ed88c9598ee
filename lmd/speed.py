"""What makes a training step fast on its device, and the figures that say how fast it ran.

- `compile_model`: torch.compile with one static-shape graph per visible-token count, and CUDA
  graphs in the modes that capture them (`uses_cuda_graphs`); `compiled_graphs` counts the graphs.
- `place_on_device`: in-memory latents held on the GPU when they fit, so a step gathers its batch
  there instead of copying it from host memory; otherwise batches in pinned memory (asynchronous copies).
- `throughput`: samples/s, TFLOP/s and MFU over a log interval, as every metrics row carries them.

The engine (`lmd.engine`) calls these; nothing here holds state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from lmd.config import ModelConfig

log = logging.getLogger(__name__)

# In-memory latents move onto a GPU when they take at most this share of its free memory (the model, its
# activations and the optimizer keep the rest).
RESIDENT_SHARE = 0.25


def compile_model(module: torch.nn.Module, cfg: ModelConfig, mode: str = "default") -> Callable[..., Any]:
    """torch.compile, allowing one static-shape graph per visible-token count a schedule visits.

    `mode="reduce-overhead"` also captures each graph as a CUDA graph (on CUDA): a step is then one
    replay instead of hundreds of kernel launches, which is what a small model's step is made of.
    Static shapes (`dynamic=False`): the step passes one ratio per visible count (`masking.shape_ratio`), so
    each count gets its own graph with concrete sizes, instead of one symbolic-size graph that CUDA graphs
    and inductor's size-specialised kernels handle worse.
    """
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(8, cfg.num_patches + 1))
    return torch.compile(module, mode=mode, dynamic=False)


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether torch.compile's `mode` replays CUDA graphs on `device` (reduce-overhead and max-autotune do)."""
    if device.type != "cuda":
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs", False))


def compiled_graphs() -> int | None:
    """Graphs torch.compile has built in this process so far (None if torch no longer counts them where we look)."""
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def place_on_device(source: Any, device: torch.device) -> bool:
    """Ready a batch source for a CUDA device; returns whether its latents moved onto the GPU.

    In-memory latents move when they fit in `RESIDENT_SHARE` of the free memory, so a step gathers its
    batch there (no host gather, no per-step copy). Latents that stay on the host (a streamed store, or
    too large) hand out batches in pinned memory, so the engine's `.to(device, non_blocking=True)` is an
    asynchronous copy rather than a staged, blocking one.
    """
    if device.type != "cuda":
        return False
    move, latents = getattr(source, "to_device", None), getattr(source, "latents", None)
    if move is not None and latents is not None:
        free, _ = torch.cuda.mem_get_info(device)
        need = latents.numel() * latents.element_size()
        if need <= RESIDENT_SHARE * free:
            move(device)
            return True
        log.info("latents stay in host memory (%.0f MiB > %.0f%% of the GPU's %.0f MiB free); batches are pinned",
                 need / 2**20, 100 * RESIDENT_SHARE, free / 2**20)
    if hasattr(source, "pin_memory"):
        source.pin_memory = True
    return False


def throughput(before: tuple[int, float, float], now: tuple[int, float, float], batch_size: int,
               peak_flops: float | None = None) -> dict[str, float]:
    """Samples/s, achieved TFLOP/s and (when the device's peak is known) MFU over one log interval.

    `before` and `now` are (step, training seconds, training FLOPs) at the interval's ends. Training
    seconds exclude evaluation; the FLOPs are the model's matmuls (`lmd.flops`), as nanoGPT and DiT
    count them, so TFLOP/s over the device's peak is the model-FLOPs utilisation.
    """
    seconds = max(now[1] - before[1], 1e-9)
    achieved = (now[2] - before[2]) / seconds
    row = {"samples_per_s": round((now[0] - before[0]) * batch_size / seconds, 2),
           "tflops_per_s": round(achieved / 1e12, 6)}
    if peak_flops:
        row["mfu"] = round(achieved / peak_flops, 4)
    return row
