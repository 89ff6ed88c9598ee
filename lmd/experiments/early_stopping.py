"""Early stopping for the search that is fair to mask-ratio curricula: ASHA with rungs in training FLOPs, within a
scheduler type, never judging a curriculum at a rung it reaches mid-ramp.

Why (measured with `python benchmarks/rung_agreement.py` on an ablation evaluated at eight equal FLOP
fractions): evaluated at the final mask ratio, a curriculum still ramping looks worse than it will
be. Across scheduler types the ranking at half the budget agreed with the final one in 76% of
pairs, and ASHA in one shared bracket would have stopped 80% of the curricula that finished in the
top half (none of the constant ones); within one scheduler type, agreement reached 97% from 5/8.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from lmd.experiments.trial import PLANNED_FLOPS

SPENT = "budget_spent"  # the rungs' clock: the fraction of its planned training FLOPs (PLANNED_FLOPS) spent


class ScheduleFairASHA(FIFOScheduler):
    """ASHA (asynchronous successive halving) fair to mask-ratio curricula.

    - Rungs are in training FLOPs: the clock is the fraction of its planned FLOPs a trial has spent
      (equal FLOPs across trials under --budget-by flops; depth and schedule change the FLOPs of a step,
      so a clock in steps would compare a deep trial at 3x the compute of a shallow one).
    - A trial is compared only with trials of its own scheduler type, and only at rungs it reaches
      after its ramp has ended (its mask ratio at its final one): evaluated at the final ratio, a
      curriculum still mid-ramp looks worse than it will be, and would be stopped for being mid-ramp.
    - Rungs at `grace`, `grace * rf`, ... of the budget; at each, a trial below the rung's top 1/rf stops.
    Each scheduler type gets its own ASHA bracket (Ray's, unchanged), fed the SPENT clock.
    """

    def __init__(self, metric: str, mode: str, grace: float, reduction_factor: float = 2.0) -> None:
        super().__init__()
        self._metric, self._mode = metric, mode
        self._grace, self._rf = grace, reduction_factor
        self._groups: dict[str, ASHAScheduler] = {}
        self._group_of: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # metric and mode are given at construction

    def _asha(self, group: str) -> ASHAScheduler:
        if group not in self._groups:
            self._groups[group] = ASHAScheduler(time_attr=SPENT, metric=self._metric, mode=self._mode, max_t=1.0,
                                                grace_period=self._grace, reduction_factor=self._rf)
        return self._groups[group]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        group = str(trial.config.get("trial", {}).get("variant", ""))
        self._group_of[trial.trial_id] = group
        self._asha(group).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if trial.trial_id not in self._group_of:
            return TrialScheduler.CONTINUE
        asha = self._asha(self._group_of[trial.trial_id])
        clocked = with_clock(result)
        if clocked is None:
            if mid_ramp(result):
                self._exempt(asha, trial.trial_id, result)
            return TrialScheduler.CONTINUE
        if clocked[SPENT] >= 1.0:
            # Its last report: the trial ends by itself. Ray's ASHA would STOP it here, which kills a multi-worker
            # trial's driver while its Train run shuts down, and its workers' CPUs were never given back (the next
            # multi-worker trial waited for them for ever). Its value reaches ASHA's rungs in on_trial_complete.
            return TrialScheduler.CONTINUE
        with warnings.catch_warnings():  # a rung whose every record is an exemption (NaN) has no cutoff: no stop
            warnings.simplefilter("ignore", RuntimeWarning)
            return asha.on_trial_result(tune_controller, trial, clocked)

    @staticmethod
    def _exempt(asha: ASHAScheduler, trial_id: str, result: Mapping[str, Any]) -> None:
        """A trial mid-ramp at a rung is never judged at that rung: it is recorded there as NaN (ASHA's cutoff is a
        nanpercentile, so NaN counts for no one). Without this, ASHA would judge it at that rung with its value at
        a later evaluation, more trained than the values it is compared with. Reads ASHA's bracket bookkeeping
        (`_trial_info`, `_rungs`); tests/test_search.py checks the behaviour against Ray's own brackets."""
        bracket = asha._trial_info.get(trial_id)
        spent = result["train_flops"] / result[PLANNED_FLOPS] * (1 + 1e-9)
        for milestone, recorded in getattr(bracket, "_rungs", []):
            if spent >= milestone and trial_id not in recorded:
                recorded[trial_id] = math.nan

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        group = self._group_of.pop(trial.trial_id, None)
        if group is None:
            return
        asha = self._asha(group)
        clocked = with_clock(result)
        if clocked is not None:
            asha.on_trial_complete(tune_controller, trial, clocked)
        else:
            asha._trial_info.pop(trial.trial_id, None)  # what ASHA's own on_trial_remove does

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        group = self._group_of.pop(trial.trial_id, None)
        if group is not None:
            self._asha(group)._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.on_trial_remove(tune_controller, trial)


CLOCK_FIELDS = ("train_flops", PLANNED_FLOPS, "mask_ratio", "mask_end")


def mid_ramp(result: Mapping[str, Any]) -> bool:
    """Whether a report is from a curriculum still below its final mask ratio."""
    return all(result.get(k) is not None for k in CLOCK_FIELDS) and result["mask_ratio"] < result["mask_end"] - 1e-6


def with_clock(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """`result` with the rungs' clock (SPENT) when it may be judged at a rung: an evaluation of a trial whose ramp
    has ended. None otherwise (a row without the clock's fields, or a curriculum still mid-ramp)."""
    if any(result.get(k) is None for k in CLOCK_FIELDS) or mid_ramp(result):
        return None
    # A hair over: an evaluation at k/E of the FLOPs is placed within float rounding of it, and ASHA compares a rung
    # only once the clock reaches it (a rung missed by 1e-12 would be judged at the next evaluation instead).
    return {**result, SPENT: result["train_flops"] / result[PLANNED_FLOPS] * (1 + 1e-9)}
