"""What `--budget-by` and `--budget` mean, for the ablation and the search alike: one trial's compute.

A budget is a number in one of three units (`BUDGET_UNITS`): training TFLOP (`flops`, the
default: deterministic), device seconds (`time`: converted to FLOPs at each configuration's rate
measured here with one trial's threads), or steps (`steps`: the unequal comparison, for contrast).
`Budget.steps_for(cfg)` is the step count that spends it for one TrainConfig: a configuration's
FLOPs per step depend on its depths and on its mask schedule (a schedule that starts easy has
dearer early steps), so two configurations of one budget get different step counts and the same
training FLOPs (within one step's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from lmd.config import ConfigError, TrainConfig

BUDGET_UNITS = {"flops": "TFLOP", "time": "device seconds", "steps": "steps"}
BUDGET_HELP = "per trial: TFLOP (--budget-by flops), device seconds (time) or steps (steps)"
BUDGET_BY_HELP = "equal training FLOPs (default), equal device seconds, or equal steps (contrast)"


@dataclass(frozen=True)
class Budget:
    """One trial's budget: `amount` in BUDGET_UNITS[`by`]; with `by="time"`, `workers`, `cpus`: the trial's share."""

    by: str = "flops"
    amount: float = 1.6
    workers: int = 1  # the trial's data-parallel workers (a time budget's rate is measured per worker)
    cpus: float = 1.0  # the trial's CPUs (a time budget's rate is measured with as many threads per worker)
    # Measured FLOP/s by model geometry, so a search measures each depth pair once (a time budget only).
    _rates: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def unit(self) -> str:
        return BUDGET_UNITS[self.by]

    def validate(self) -> Budget:
        if self.by not in BUDGET_UNITS:
            raise ConfigError(f"--budget-by={self.by!r}: choose one of {', '.join(BUDGET_UNITS)}")
        if not self.amount > 0 or not math.isfinite(self.amount):
            raise ConfigError(f"--budget={self.amount}: must be a positive number of {self.unit}")
        if self.by == "steps" and not float(self.amount).is_integer():
            raise ConfigError(f"--budget={self.amount}: --budget-by steps needs a whole number of steps")
        return self

    def steps_for(self, cfg: TrainConfig) -> int:
        """Steps of `cfg` (its schedule stretched to that length) that spend this budget."""
        from lmd.flops import steps_for_flops

        if self.by == "steps":
            return int(self.amount)
        if self.by == "flops":
            return steps_for_flops(cfg, self.amount * 1e12)
        return steps_for_flops(cfg, self.amount * self.flop_rate(cfg))  # time: the FLOPs of `amount` seconds

    def flop_rate(self, cfg: TrainConfig) -> float:
        """FLOP/s of one trial of `cfg`, measured once per model geometry with the threads one trial worker gets
        (Ray gives a 1-CPU trial one thread), the trial's autocast, compile mode and per-worker batch."""
        import json

        import torch

        from lmd.flops import measure_flop_rate

        # By geometry only: a search measures every depth pair before its trials start (`measure_rates`), not while
        # they share the machine; the schedule moves the rate less (it is measured at its start and end ratios).
        key = json.dumps(cfg.to_dict()["model"], sort_keys=True)
        if key not in self._rates:
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, int(self.cpus / self.workers)))
            try:
                self._rates[key] = measure_flop_rate(cfg, workers=self.workers) * self.workers
            finally:
                torch.set_num_threads(threads)
        return self._rates[key]

    def measure_rates(self, configs: list[TrainConfig]) -> None:
        """A time budget's FLOP rates of `configs`' geometries, measured now (a no-op for other budgets)."""
        if self.by == "time":
            for cfg in configs:
                self.flop_rate(cfg)

    def record(self) -> dict[str, Any]:
        """The budget as budget.json and finalists.json write it."""
        return {"budget_by": self.by, "budget": self.amount, "unit": self.unit}


def with_steps(cfg: TrainConfig, steps: int, evals: int) -> TrainConfig:
    """`cfg` for a run of `steps` steps with `evals` evaluations (each checkpointed) at equal fractions of its
    training FLOPs, so every configuration's curve is sampled at the same compute whatever its schedule; training
    rows are logged at the same count, spaced in steps."""
    every = max(1, math.ceil(steps / evals))
    return replace(cfg, run=replace(cfg.run, steps=steps, evals=min(evals, steps), log_every=every,
                                    ckpt_every=steps)).validate()
