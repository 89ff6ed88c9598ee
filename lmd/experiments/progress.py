"""One progress display for a Tune run, so a slow experiment can be told from a hung one.

A Tune callback in the driver: trials finished / running / total, training TFLOP done of the
planned total, elapsed time and an estimate of the time left (from the TFLOP rate so far), and for
a search the best objective so far. On a terminal it is one tqdm line updated in place; otherwise
(a log file, CI) a plain line at most every `every` seconds and at each trial's end, so a long run's
log stays bounded and still shows it is alive.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ray.tune import Callback

from lmd.experiments.trial import PLANNED_FLOPS


class ProgressDisplay(Callback):
    """Progress of one Tune run: `total` trials of about `planned_tflops_each` TFLOP each (a search's trials plan
    their own FLOPs: their reports replace the estimate as they come), `metric`'s best (max) for a search."""

    def __init__(self, label: str, total: int, planned_tflops_each: float, metric: str | None = None,
                 every: float = 30.0, stream: TextIO | None = None) -> None:
        self.label, self.total, self.each, self.metric, self.every = label, total, planned_tflops_each, metric, every
        self._stream = stream  # None: the driver's stdout, looked up when shown (Tune pickles its callbacks)
        self.started = time.monotonic()
        self.last_line = -math.inf
        self.done_flops: dict[str, float] = {}  # trial id -> training FLOPs reported so far
        self.planned: dict[str, float] = {}  # trial id -> its planned FLOPs (from its reports)
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        self.best = -math.inf
        self._bar: Any = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def setup(self, **info: Any) -> None:
        """A run starts (or a restored one resumes): the clock starts here."""
        self.started, self.last_line = time.monotonic(), -math.inf

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None, "_stream": None}  # Tune saves its callbacks with the run

    # ------------------------------------------------------------------ numbers
    def tflops(self) -> tuple[float, float]:
        """(TFLOP done, TFLOP planned): finished trials count what they spent (an early stop spends less)."""
        done = sum(self.done_flops.values())
        open_trials = [t for t in self.planned if t not in self.finished and t not in self.failed]
        planned = done + sum(max(0.0, self.planned[t] - self.done_flops.get(t, 0.0)) for t in open_trials)
        unseen = max(0, self.total - len(self.planned))  # trials not reported yet: the estimate per trial
        return done / 1e12, planned / 1e12 + unseen * self.each

    def line(self, running: int) -> str:
        done, planned = self.tflops()
        elapsed = time.monotonic() - self.started
        left = elapsed * (planned - done) / done if done > 0 else math.nan
        text = (f"{self.label}: trials {len(self.finished)}/{self.total} finished, {running} running"
                + (f", {len(self.failed)} failed" if self.failed else "")
                + f"; {done:.2f} of {planned:.2f} TFLOP; elapsed {_clock(elapsed)}, left ~{_clock(left)}")
        if self.metric is not None and math.isfinite(self.best):
            text += f"; best {self.metric} {self.best:.3f}"
        return text

    # ------------------------------------------------------------------ Tune's hooks
    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any):
        if result.get("train_flops") is not None:
            self.done_flops[trial.trial_id] = float(result["train_flops"])
        if result.get(PLANNED_FLOPS) is not None:
            self.planned[trial.trial_id] = float(result[PLANNED_FLOPS])
        self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any):
        self.finished.add(trial.trial_id)
        value = (trial.last_result or {}).get(self.metric) if self.metric else None
        stopped = (trial.last_result or {}).get("step", 0) < (trial.last_result or {}).get("total_steps", 0)
        if value is not None and not stopped:  # a value at a smaller budget is not a final one
            self.best = max(self.best, float(value))
        self._show(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any):
        self.failed.add(trial.trial_id)
        self._show(trials, force=True)

    def on_experiment_end(self, trials: list[Any], **info: Any):
        self._show(trials, force=True)
        if self._bar is not None:
            self._bar.close()

    def _show(self, trials: list[Any], force: bool = False) -> None:
        ended = self.finished | self.failed  # Tune reports a trial's end before its status leaves RUNNING
        running = sum(1 for t in trials if getattr(t, "status", "") == "RUNNING" and t.trial_id not in ended)
        if self.stream.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=0, bar_format="{desc}", file=self.stream, leave=True)
            self._bar.set_description_str(self.line(running))
            return
        now = time.monotonic()
        if force or now - self.last_line >= self.every:
            self.last_line = now
            print(self.line(running), file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
