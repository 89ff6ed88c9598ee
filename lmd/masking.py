"""Mask-ratio schedulers (LMD's "masking diffusion scheduler") and per-sample random masking.

Everything here is a pure function: the ratio depends only on (step, total_steps, MaskConfig), so
a resumed run continues its schedule exactly, and the mask depends only on the noise it is given.
Formulas: docs/DESIGN.md, "Mask-ratio schedulers"; the official piecewise bug (absolute step in
the third segment) is deliberately not reproduced.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lmd.config import ConfigError, MaskConfig

if TYPE_CHECKING:  # the schedules are pure Python: the dashboard draws them without importing torch
    import torch

COSINE_OFFSET = 0.008  # the `s` of the improved-DDPM cosine schedule used by the official code


def _progress(step: int, total_steps: int, ramp: float) -> float:
    """u in [0, 1]: how far through the ramp `step` is."""
    ramp_steps = ramp * total_steps
    return min(max(step / ramp_steps, 0.0), 1.0) if ramp_steps > 0 else 1.0


def _uniform(u: float, start: float, end: float) -> float:
    return start + (end - start) * u


def _piecewise(u: float, start: float, end: float) -> float:
    # Easy (start -> mid over the first quarter), plateau at mid, then mid -> end over the second half.
    mid = start + (5 / 12) * (end - start)
    if u <= 0.25:
        return start + (mid - start) * (u / 0.25)
    if u <= 0.5:
        return mid
    return mid + (end - mid) * ((u - 0.5) / 0.5)


def _cosine(u: float, start: float, end: float) -> float:
    s = COSINE_OFFSET

    def f(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return start + (end - start) * (1.0 - f(u) / f(0.0))


def _constant(u: float, start: float, end: float) -> float:
    return end


_SCHEDULES = {"uniform": _uniform, "piecewise": _piecewise, "cosine": _cosine, "constant": _constant}


def mask_ratio(step: int, total_steps: int, cfg: MaskConfig) -> float:
    """The mask ratio at `step` of a `total_steps` run; holds at `cfg.end` after the ramp."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r}: must be > 0")
    u = _progress(step, total_steps, cfg.ramp)
    ratio = _SCHEDULES[cfg.scheduler](u, cfg.start, cfg.end)
    return min(max(ratio, cfg.start), cfg.end)  # guard float round-off at the segment joints


def schedule_table(total_steps: int, cfg: MaskConfig, points: int = 21) -> list[tuple[int, float]]:
    """(step, ratio) rows at `points` evenly spaced steps including 0 and total_steps (0 = every step)."""
    if points < 0:
        raise ConfigError(f"--points={points}: must be >= 0 (0 = every step)")
    if points == 0 or points > total_steps + 1:
        steps = range(total_steps + 1)
    else:
        steps = sorted({round(i * total_steps / (points - 1)) for i in range(points)}) if points > 1 else [0]
    return [(s, mask_ratio(s, total_steps, cfg)) for s in steps]


def num_visible(num_patches: int, ratio: float) -> int:
    """How many patches stay visible at `ratio`: round(L * (1 - ratio)), kept within [1, L - 1].

    Rounding makes the kept count (and so every tensor shape in the step) piecewise constant in
    the ratio: a schedule visits at most L - 1 distinct shapes, which keeps compiled kernels
    reusable. At least one patch is visible (the encoder needs input) and at least one masked
    (the loss needs a target).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio!r} outside [0, 1)")
    return min(max(round(num_patches * (1.0 - ratio)), 1), num_patches - 1)


def shape_ratio(num_patches: int, ratio: float) -> float:
    """The ratio that stands for `ratio` in a step: 1 - num_visible / L, the same visible count.

    A schedule's ratios are continuous, its shapes are not: passing one float per visible count lets
    torch.compile build one static graph per count (and recompile never for a mere change of ratio).
    """
    return 1.0 - num_visible(num_patches, ratio) / num_patches


def random_masking(
    x: torch.Tensor, keep: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (as in MAE).

    x: [N, L, D] tokens; keep: visible count per sample; noise: [N, L] uniform noise, drawn here
    when None. Callers that need reproducible masks pass noise from their own generator, which
    also keeps the RNG outside a compiled graph.
    Returns x_visible [N, keep, D], mask [N, L] (1 = masked, 0 = visible, in original order), and
    ids_restore [N, L] that puts the shuffled sequence back in order.
    """
    import torch

    n, length, dim = x.shape
    if noise is None:
        noise = torch.rand(n, length, device=x.device)  # [N, L]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first `keep` are visible
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore
