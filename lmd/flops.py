"""Training compute on a deterministic axis: FLOPs per step and per run, and budgets in FLOPs.

Every figure is the model's matmul FLOPs (`lmd.model.train_flops_per_sample`, forward + backward)
times the global batch, at the step's scheduled mask ratio: a scheduler that starts easy (few
masked, many visible tokens) makes early steps dearer than MAE's constant 0.75. The projector's
encoding is not in it: latents are computed once, before training (`projector_encode_flops` gives
that one-time cost per image, reported beside the budgets).

An equal-compute comparison gives every variant the same FLOPs: `steps_for_flops` finds the step
count whose whole schedule spends the budget (the schedule stretches with the run's length, so the
answer is found by bisection on the total, not by dividing).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch

from lmd.config import ModelConfig, TrainConfig
from lmd.device import resolve_device
from lmd.masking import mask_ratio, num_visible
from lmd.model import build_model, train_flops_per_sample
from lmd.optim import build_optimizer


@lru_cache(maxsize=4096)
def _per_sample(model: ModelConfig, keep: int) -> float:
    # FLOPs depend on the ratio only through the visible-token count: cache by that.
    length = model.num_patches
    return train_flops_per_sample(model, 1.0 - keep / length)


def step_flops(cfg: TrainConfig, ratio: float) -> float:
    """Training FLOPs of one step at mask `ratio` over the global batch."""
    keep = num_visible(cfg.model.num_patches, ratio)
    return cfg.data.batch_size * _per_sample(cfg.model, keep)


def train_flops_until(cfg: TrainConfig, step: int) -> float:
    """FLOPs spent by steps [0, step) of a run of `cfg.run.steps` steps."""
    total = cfg.run.steps
    return float(sum(step_flops(cfg, mask_ratio(s, total, cfg.mask)) for s in range(step)))


def run_flops(cfg: TrainConfig) -> float:
    """FLOPs of the whole run."""
    return train_flops_until(cfg, cfg.run.steps)


def steps_for_flops(cfg: TrainConfig, budget: float, max_steps: int = 10_000_000) -> int:
    """The fewest steps whose run (schedule stretched to that length) spends at least `budget` FLOPs.

    Run FLOPs grow with the step count whatever the schedule, so bisection finds it; the result
    overshoots the budget by less than one step's FLOPs.
    """
    if budget <= 0:
        raise ValueError(f"FLOP budget {budget!r}: must be > 0")

    def spent(steps: int) -> float:
        return run_flops(replace(cfg, run=replace(cfg.run, steps=steps)))

    low, high = 1, 1
    while spent(high) < budget:
        low, high = high, high * 2
        if high > max_steps:
            raise ValueError(f"FLOP budget {budget:.3g} needs more than {max_steps} steps of {cfg.model.preset}")
    while low < high:
        mid = (low + high) // 2
        if spent(mid) >= budget:
            high = mid
        else:
            low = mid + 1
    return high


@torch.no_grad()
def projector_encode_flops(projector: torch.nn.Module, resolution: int) -> float:
    """FLOPs of encoding one image with `projector` (counted by torch's FlopCounterMode; 0 for identity)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        projector.encode(torch.zeros(1, 3, resolution, resolution))
    return float(counter.get_total_flops())


def measure_flop_rate(cfg: TrainConfig, steps: int = 3) -> float:
    """Training FLOP/s of `cfg`'s model on this process's device and threads (random inputs, real steps).

    What `--budget-by time` converts seconds into steps with: measured once per variant, in the
    driver, at the schedule's two extreme ratios (averaged), after one warm-up step each.
    """
    import time

    device = resolve_device(cfg.run.device)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    m, b = cfg.model, cfg.data.batch_size
    latents = torch.randn(b, m.in_chans, m.latent_size, m.latent_size, device=device)
    seconds, flops = 0.0, 0.0
    # The ratios the schedule visits: a constant schedule only ever trains at its end ratio.
    for ratio in sorted({cfg.mask.end} if cfg.mask.scheduler == "constant" else {cfg.mask.start, cfg.mask.end}):
        for k in range(steps + 1):
            started = time.perf_counter()
            loss, _, _ = model(latents, ratio, torch.rand(b, m.num_patches, device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k:  # the first step warms up
                seconds += time.perf_counter() - started
                flops += step_flops(cfg, ratio)
    return flops / seconds


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets: the denominator of MFU.
GPU_PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, its dense bf16 peak FLOP/s or None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)

