"""`--compile` wherever a model trains: inside a Tune trial and under Ray Train (real inductor on CPU).

The engine-level checks (the compiled form wraps the DDP wrapper; one graph per visible count;
compiled training matches eager) are in test_engine.py with a codegen-free backend; here the real
compiler runs where users run it, with a constant mask ratio so each run compiles one shape. Every
metrics row of a compiled run carries `compiled_graphs`, the graphs torch.compile built since the
run started: > 0 proves the step ran compiled in that process.
"""

from __future__ import annotations

import json
import os

import pytest

from lmd.config import ClusterConfig
from lmd.distributed import fit_distributed
from lmd.experiments.trial import Placement, TrialSpec, run_trial
from lmd.runtime import local_engine

from .conftest import local_ray, tiny_config
from .test_experiments import tune_script

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.mark.parametrize("script", ["ablation", "search"])
def test_the_experiment_scripts_pass_compile_to_every_trial(script):
    module = tune_script(script)
    args = module.parse_args(["--compile", "--compile-mode", "reduce-overhead"])
    spec = module.experiment(args)[1]  # the ablation's AblationSpec, the search's TrialBase
    base = spec.base if script == "ablation" else spec
    assert (base.compile, base.compile_mode) == (True, "reduce-overhead")
    overrides = base.overrides("cpu")
    assert (overrides["run.compile"], overrides["run.compile_mode"]) == (True, "reduce-overhead")
    assert base.overrides("cpu") != type(base).from_flags(module.parse_args([])).overrides("cpu")  # off by default


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=4) as ray:
        yield ray


def test_a_tune_trial_trains_its_model_compiled(ray_session, tmp_path):
    from ray import tune

    cfg = tiny_config(**{"run.steps": 10, "run.log_every": 5, "mask.scheduler": "constant", "run.compile": True})
    trial = TrialSpec("no_scheduler", cfg, Placement())
    results = tune.Tuner(run_trial, param_space={"trial": trial.to_dict()},
                         run_config=tune.RunConfig(storage_path=str(tmp_path), name="compiled")).fit()
    (result,) = results
    assert result.error is None, result.error
    rows = result.metrics_dataframe
    assert rows["step"].tolist() == [5, 10]
    assert (rows["compiled_graphs"] == 1).all()  # one ratio, one graph, built in the trial's process


def test_two_ray_train_workers_train_the_compiled_ddp_model_like_the_engine(ray_session, tmp_path):
    overrides = {"run.steps": 2, "run.log_every": 2, "mask.scheduler": "constant"}
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
