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

import re
from dataclasses import replace
from functools import lru_cache

import numpy as np
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


def evaluation_steps(cfg: TrainConfig, evals: int) -> frozenset[int]:
    """The steps that end `evals` equal fractions of the run's training FLOPs: for k = 1..evals, the first step
    after which the run has spent k/evals of its FLOPs (the last one is the run's last step)."""
    if evals <= 0:
        return frozenset()
    total = cfg.run.steps
    spent = np.cumsum([step_flops(cfg, mask_ratio(s, total, cfg.mask)) for s in range(total)])  # after step s + 1
    # A hair under each fraction, so float rounding never pushes a boundary one step late.
    marks = spent[-1] * np.arange(1, evals + 1) / evals * (1 - 1e-12)
    return frozenset(int(i) + 1 for i in np.searchsorted(spent, marks, side="left"))


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


def measure_flop_rate(cfg: TrainConfig, steps: int = 3, workers: int = 1) -> float:
    """Training FLOP/s of `cfg`'s model on this process's device and threads (random inputs, real steps).

    What `--budget-by time` converts seconds into steps with: measured once per variant, in the
    driver, at the schedule's two extreme ratios (averaged), after one warm-up step each (three with CUDA
    graphs). Each step is the one a trial's worker runs: its share of the global batch (`workers` ranks),
    under the run's autocast (bf16 on CUDA) and, with `run.compile`, compiled. Returns the rate of one worker.
    """
    import time

    from lmd.device import autocast_dtype
    from lmd.masking import shape_ratio
    from lmd.speed import compile_model, uses_cuda_graphs

    device = resolve_device(cfg.run.device)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    # Compiled as the trial's engine compiles it (its mode, one static graph per visible count, CUDA graphs).
    forward = compile_model(model, cfg.model, cfg.run.compile_mode) if cfg.run.compile else model
    graphs = cfg.run.compile and uses_cuda_graphs(cfg.run.compile_mode, device)
    amp = autocast_dtype(cfg.run.precision, device)
    m, b = cfg.model, max(1, cfg.data.batch_size // workers)
    latents = torch.randn(b, m.in_chans, m.latent_size, m.latent_size, device=device)
    seconds, flops = 0.0, 0.0
    # Untimed steps per ratio: the first compiles; under CUDA graphs the second records the graph (torch's graph
    # trees warm up eagerly on the first call, record on the second, replay after), so both stay untimed.
    warmup = 3 if graphs else 1
    # The ratios the schedule visits: a constant schedule only ever trains at its end ratio.
    for ratio in sorted({cfg.mask.end} if cfg.mask.scheduler == "constant" else {cfg.mask.start, cfg.mask.end}):
        for k in range(warmup + steps):
            started = time.perf_counter()
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _, _ = forward(latents, shape_ratio(m.num_patches, ratio) if cfg.run.compile else ratio,
                                     torch.rand(b, m.num_patches, device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= warmup:
                seconds += time.perf_counter() - started
                flops += b * train_flops_per_sample(m, ratio)
    return flops / seconds


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets: the denominator of MFU. Matched as whole
# words, longest first, so "H100 PCIe" is not read as the SXM part, nor "L40" as "L4".
GPU_PEAK_BF16 = {"H200": 989.4e12, "H200 NVL": 835.5e12, "H100": 989.4e12, "H100 PCIe": 756.5e12,
                 "H100 NVL": 835.5e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "L4": 121e12}


def peak_of(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its torch device name, None when it is not in `GPU_PEAK_BF16`."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return GPU_PEAK_BF16[key]
    return None


def device_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, its dense bf16 peak FLOP/s or None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_of(name)

