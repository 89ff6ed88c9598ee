"""Ray Train scaling on this machine, measured side by side in one run.

Runs the same training (synthetic latents in memory, so the input pipeline is out of the picture)
three ways and compares the training loop's own throughput (samples seen / loop wall seconds,
as the engine reports them; Ray start-up is excluded and printed separately):
  - the single-process engine, one thread (what one Ray worker with one CPU gets);
  - Ray Train, 1 worker: overhead = 1 - (Ray 1 worker / engine)   (goal <= 10%);
  - Ray Train, 2 workers, global batch split in two:  speedup = 2 workers / 1 worker (goal >= 1.6x).

    python benchmarks/scaling.py [--preset small] [--steps 60] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import ray  # noqa: E402
import torch  # noqa: E402

from lmd.config import ClusterConfig  # noqa: E402
from lmd.config_build import build_config  # noqa: E402
from lmd.distributed import fit_distributed  # noqa: E402
from lmd.runtime import local_engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    cfg = build_config(overrides={
        "model.preset": args.preset, "data.dataset": "synthetic", "data.batch_size": args.batch_size,
        "data.num_train": 1024, "data.num_val": 64, "run.steps": args.steps, "run.log_every": 10,
        "run.eval_every": args.steps, "run.ckpt_every": args.steps, "run.device": "cpu"})

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        engine = local_engine(cfg, Path(tmp) / "engine")
        engine.fit()
        last = json.loads((Path(tmp) / "engine" / "metrics.jsonl").read_text().splitlines()[-1])
        rows["engine, 1 thread"] = (last["samples_seen"] / last["wall_seconds"], 0.0)

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for workers in (1, 2):
                start = time.perf_counter()
                result = fit_distributed(cfg, ClusterConfig(workers=workers, storage=f"{tmp}/ray", name=f"w{workers}"))
                total = time.perf_counter() - start
                m = result.metrics
                rate = m["samples_seen"] / m["wall_seconds"]
                rows[f"Ray Train, {workers} worker(s)"] = (rate, total - m["wall_seconds"])
        finally:
            ray.shutdown()

    print(f"preset={args.preset} steps={args.steps} global batch={args.batch_size} cpus={os.cpu_count()}")
    print(f"{'run':<26}{'samples/s':>12}{'start-up + teardown s':>24}")
    for name, (rate, overhead_s) in rows.items():
        print(f"{name:<26}{rate:>12.1f}{overhead_s:>24.1f}")
    engine_rate, one, two = (r[0] for r in rows.values())
    print(f"Ray Train 1 worker vs engine: {one / engine_rate:.3f}x (overhead {100 * (1 - one / engine_rate):.1f}%)")
    print(f"Ray Train 2 workers vs 1 worker: {two / one:.2f}x")


if __name__ == "__main__":
    main()
