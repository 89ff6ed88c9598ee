"""`--compile` wherever a model trains: inside a Tune trial and under Ray Train (real inductor on CPU).

The engine-level checks (the compiled form wraps the DDP wrapper; compiled training matches eager) are
in test_engine.py with a codegen-free backend; here the real compiler runs where users run it, with a
constant mask ratio so each run compiles one shape. Every metrics row of a compiled run carries
`compiled_graphs`, the graphs torch.compile built in that process: > 0 proves the step ran compiled.
"""

from __future__ import annotations

import json
import os

import pytest
import ray

from lmd.config import ClusterConfig
from lmd.distributed import fit_distributed
from lmd.runtime import local_engine

from .conftest import SMALL_DATA, run_tune_script, tiny_config

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def test_a_tune_trial_trains_its_model_compiled(tmp_path):
    # Runs first, before this module starts a Ray of its own: the script starts its own local Ray.
    proc = run_tune_script("ablation.py", "--variants", "no_scheduler", "--seeds", "1", "--budget-by", "steps",
                           "--budget", "20", "--evals", "2", *SMALL_DATA, "--compile", "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = tmp_path / "ablation"
    args = json.loads((experiment / "args.json").read_text())
    assert args["compile"] is True and args["compile_mode"] == "default"
    (result,) = list(experiment.glob("*/result.json"))  # one trial
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert all(r["compiled_graphs"] >= 1 for r in rows)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_ray_train_workers_train_the_compiled_ddp_model_like_the_engine(local_ray, tmp_path):
    overrides = {"run.steps": 4, "run.log_every": 2, "mask.scheduler": "constant"}
    result = fit_distributed(tiny_config(**overrides, **{"run.compile": True}),
                             ClusterConfig(workers=2, storage=str(tmp_path / "ray"), name="compiled"))
    assert result.error is None, result.error
    assert result.metrics["compiled_graphs"] >= 1  # rank 0's process compiled the DDP-wrapped model
    eager = local_engine(tiny_config(**overrides), tmp_path / "eager")
    eager.fit()
    rows = [json.loads(line) for line in eager.metrics_path.read_text().splitlines()]
    assert "compiled_graphs" not in rows[-1]
    # Same batches and masks; the compiled kernels and the 2-way DDP mean round differently from eager.
    assert result.metrics["loss_last"] == pytest.approx(rows[-1]["loss_last"], rel=1e-4)
