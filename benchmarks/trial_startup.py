"""Start-up cost of one Tune trial: a function trial vs the driver-function pattern, side by side.

Why the ablation runs single-worker trials as plain function trials and only multi-worker trials
through a TorchTrainer: this measures, in one Ray session on this machine, the seconds from
`Tuner.fit()` to a trial's first report and to the end of the fit, for the same 2-step engine run
(synthetic latents, so no store is read):
  - function trial: the engine in the trial's process (lmd.experiments.trial, workers=1);
  - driver function with 1 and with 2 workers: the trial fits a TorchTrainer with TuneReportCallback.

    python benchmarks/trial_startup.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import ray  # noqa: E402
from ray import tune  # noqa: E402

from lmd.config_build import build_config  # noqa: E402
from lmd.entry import init_ray  # noqa: E402
from lmd.experiments import trial as trials  # noqa: E402


class FirstReport(tune.Callback):
    """Driver-side clock of the first result Tune receives."""

    def __init__(self):
        self.at: float | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001 - Tune's signature
        self.at = self.at or time.perf_counter()


def trial_config(workers: int, storage: str, name: str) -> dict[str, Any]:
    cfg = build_config(overrides={"model.preset": "tiny", "data.dataset": "synthetic", "data.batch_size": 16,
                                  "data.num_train": 64, "data.num_val": 16, "run.steps": 2, "run.log_every": 1,
                                  "run.eval_every": 2, "run.ckpt_every": 2, "run.device": "cpu"})
    placement = trials.Placement(workers=workers, cpus=0.5 * workers if workers > 1 else 1.0,
                                 train_storage=f"{storage}/{name}/train")
    return {"trial": trials.TrialSpec(f"w{workers}", cfg, placement).to_dict()}


def driver_fn(config: dict[str, Any]) -> None:
    """The driver-function pattern on its own: the trial fits a TorchTrainer (what run_trial does for workers > 1)."""
    trials._run_distributed_trial(trials.TrialSpec.from_dict(config["trial"]))


def time_trial(trainable: Any, resources: Any, config: dict[str, Any], storage: str, name: str) -> tuple[float, float]:
    """(seconds to the first report, seconds to the end of the fit)."""
    clock = FirstReport()
    tuner = tune.Tuner(tune.with_resources(trainable, resources), param_space=config,
                       run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[clock]))
    started = time.perf_counter()
    result = tuner.fit()[0]
    ended = time.perf_counter()
    if result.error is not None:
        raise result.error
    return clock.at - started, ended - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    init_ray(log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="lmd-startup-")
    kinds = {  # label: (trainable, resources, workers)
        "function trial": (trials.run_trial, trials.trial_resources, 1),
        "driver fn, 1 worker": (driver_fn, {"cpu": trials.TRIAL_DRIVER_CPUS}, 1),
        "driver fn, 2 workers": (trials.run_trial, trials.trial_resources, 2),
    }
    rows = {}
    for k, (label, (trainable, resources, workers)) in enumerate(kinds.items()):
        rows[label] = min(time_trial(trainable, resources, trial_config(workers, storage, f"k{k}r{r}"), storage,
                                     f"k{k}r{r}") for r in range(args.repeats))
    base = rows["function trial"]
    print(f"{'trial kind':<24}{'to first report s':>19}{'ratio':>8}{'to end s':>11}{'ratio':>8}")
    for label, (first, end) in rows.items():
        print(f"{label:<24}{first:>19.2f}{first / base[0]:>7.1f}x{end:>11.2f}{end / base[1]:>7.1f}x")
    print(f"(best of {args.repeats}; Ray already started; this machine: {os.cpu_count()} CPUs)")
    ray.shutdown()


if __name__ == "__main__":
    main()
