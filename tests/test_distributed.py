"""Ray Train on real Ray (CPU): equivalence with the engine, worker and driver crashes, a two-node cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from lmd.checkpoint import latest_checkpoint, load_checkpoint
from lmd.config import ClusterConfig
from lmd.distributed import fit_distributed
from lmd.runtime import local_engine

from .conftest import local_ray, ray_train_workers, tiny_config

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # ~2 s less per report gap (ENV.md)


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=4) as ray:
        yield ray


def _final_model(result) -> dict[str, torch.Tensor]:
    assert result.error is None, result.error
    state, _ = load_checkpoint(Path(result.checkpoint.path))
    return state["model"]


def _engine_model(cfg, run_dir) -> dict[str, torch.Tensor]:
    engine = local_engine(cfg, run_dir)
    engine.fit()
    return engine.model.state_dict()


def test_one_worker_is_bit_identical_to_the_single_process_engine(ray_session, tmp_path):
    cfg = tiny_config(**{"run.steps": 20})
    result = fit_distributed(cfg, ClusterConfig(workers=1, storage=str(tmp_path / "ray"), name="eq1"))
    assert result.metrics["step"] == 20 and result.metrics["workers"] == 1
    reference, distributed = _engine_model(cfg, tmp_path / "local"), _final_model(result)
    assert all(torch.equal(distributed[k], reference[k]) for k in reference)

    # A driver killed while Ray rewrote its checkpoint record leaves it empty (Ray writes it in place), and the
    # copy of the newest checkpoint may be unfinished: the rerun resumes from the newest verified one (step 10)
    # and ends where the uninterrupted run did.
    run = tmp_path / "ray" / "eq1"
    (run / "checkpoint_manager_snapshot.json").write_text("")
    (run / "step_00000020" / "manifest.json").unlink()
    rerun = fit_distributed(cfg, ClusterConfig(workers=1, storage=str(tmp_path / "ray"), name="eq1"))
    assert (run / "checkpoint_manager_snapshot.json.rejected-torn").is_file()
    assert (run / "step_00000020.rejected-unverified").is_dir()
    recovered = _final_model(rerun)
    assert rerun.metrics["step"] == 20 and all(torch.equal(recovered[k], reference[k]) for k in reference)


def test_two_workers_compute_the_single_process_update_up_to_rounding(ray_session, tmp_path):
    cfg = tiny_config(**{"run.steps": 20})
    result = fit_distributed(cfg, ClusterConfig(workers=2, storage=str(tmp_path / "ray"), name="eq2"))
    engine = local_engine(cfg, tmp_path / "local")
    engine.fit()
    # Same global batch and masks, sliced per worker; the DDP mean of two equal slices is the full-batch
    # mean, but summed in another order: ~1e-7 relative gradient differences, which Adam's per-parameter
    # normalisation lets grow to ~3e-4 in a few weights over 20 steps. The loss agrees to ~1e-6.
    local_last = json.loads((tmp_path / "local" / "metrics.jsonl").read_text().splitlines()[-1])["loss_last"]
    assert result.metrics["loss_last"] == pytest.approx(local_last, rel=1e-5)
    distributed, reference = _final_model(result), engine.model.state_dict()
    assert all(torch.allclose(distributed[k], reference[k], rtol=0, atol=2e-3) for k in reference)


def test_killing_a_worker_mid_run_recovers_from_the_last_checkpoint(ray_session, tmp_path):
    cfg = tiny_config(**{"run.steps": 160, "run.ckpt_every": 20, "run.log_every": 10, "run.eval_every": 80})
    storage, killed = tmp_path / "ray", []

    def kill_a_worker():
        deadline = time.monotonic() + 120
        while not (storage / "kill" / "step_00000040").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = ray_train_workers(os.getpid())  # this test's workers only (another test may train beside it)
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    result = fit_distributed(cfg, ClusterConfig(workers=2, storage=str(storage), name="kill", max_failures=2))
    killer.join()
    assert killed, "no worker was found to kill"
    assert result.metrics["step"] == 160
    straight = fit_distributed(cfg, ClusterConfig(workers=2, storage=str(storage), name="straight"))
    # Resumed from a checkpoint with the exact step, LR, scheduler position, RNG and data position, on the
    # same number of workers (same all-reduce order): bit-identical to the uninterrupted run.
    recovered, reference = _final_model(result), _final_model(straight)
    assert all(torch.equal(recovered[k], reference[k]) for k in reference)
    assert result.metrics["loss_last"] == straight.metrics["loss_last"]


def _cli(*args: str, **popen) -> list[str]:
    return [sys.executable, "-m", "lmd.cli", "train", "--dataset", "synthetic", "--preset", "tiny",
            "--batch-size", "8", "--num-train", "64", "--num-val", "16", *args]


# Extended tier: a torn record after a driver kill is covered deterministically above, and driver kills of
# Tune trials that run Ray Train by test_experiments' multi-worker test.
@pytest.mark.extended
def test_killed_driver_resumes_at_the_last_checkpoint(tmp_path):
    storage = tmp_path / "ray"
    args = _cli("--workers", "1", "--steps", "600", "--ckpt-every", "50", "--log-every", "25", "--eval-every", "300",
                "--storage", str(storage), "--name", "drv")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own group: the local Ray it started dies with it
    deadline = time.monotonic() + 180
    while not (storage / "drv" / "step_00000100").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = ray_train_workers(driver.pid)  # before the kill: orphans no longer descend from the driver
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    # The orphaned worker may train on (and checkpoint) until Ray notices its driver is gone: wait it out.
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline + 60, "orphaned Ray Train worker never exited"
        time.sleep(0.2)
    newest = latest_checkpoint(storage / "drv")  # complete checkpoints only (they carry a manifest)
    assert newest is not None and newest.name != "step_00000600", "the run ended before the driver was killed"
    complete = {int(p.name.split("_")[1]) for p in (storage / "drv").glob("step_*") if (p / "manifest.json").is_file()}

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in rerun.stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, resumed
    step = int(resumed[0].rsplit("(step ", 1)[1].rstrip(")"))
    # Resumed from a complete checkpoint in storage: the newest one, or the one before it when the driver
    # died after the newest was copied but before Ray registered it. Steps after it are redone once;
    # nothing before it is lost.
    newest_step = int(newest.name.split("_")[1])
    assert step in (newest_step, newest_step - 50) and step in complete, (step, newest_step, complete)
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["step"] == 600


@pytest.fixture(scope="module")
def two_node_cluster():
    port = "6391"
    env = {**os.environ, "RAY_BIN": str(Path(sys.executable).parent / "ray")}
    script = str(REPO / "cluster" / "local_cluster.sh")
    subprocess.run([script, "stop", port], env=env, check=False)
    started = subprocess.run([script, "start", port, "2"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip()
    subprocess.run([script, "stop", port], env=env, check=False)


def test_two_workers_train_on_two_nodes_of_a_real_cluster(two_node_cluster, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_cli("--workers", "2", "--spread", "--address", two_node_cluster, "--steps", "20",
                               "--storage", str(tmp_path / "ray"), "--name", "nodes"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["num_nodes"] == 2 and summary["step"] == 20

    # The ablation on the same cluster through --address, each trial a 2-worker TorchTrainer: 1.5 CPUs per
    # worker cannot share one 2-CPU node, so every trial spans both nodes.
    ablation = subprocess.run(
        [sys.executable, str(REPO / "tune" / "ablation.py"), "--address", two_node_cluster, "--variants", "lmd_cosine",
         "--seeds", "1", "--budget-by", "steps", "--budget", "20", "--evals", "2", "--num-train", "128",
         "--num-val", "16", "--num-probe", "64", "--batch-size", "16", "--workers-per-trial", "2",
         "--cpus-per-trial", "3", "--storage", str(tmp_path / "tune")],
        env=env, capture_output=True, text=True, timeout=300)
    assert ablation.returncode == 0, ablation.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "tune" / "ablation" / "results.parquet")
    # Rows every 10 steps and 2 evaluations at equal FLOP fractions (the cosine schedule's first is before step 10).
    evals = table.dropna(subset=["val_psnr"])["step"].tolist()
    assert {10, 20} <= set(table["step"]) and len(evals) == 2 and evals[0] < 10 and evals[1] == 20
    assert (table["workers"] == 2).all() and (table["num_nodes"] == 2).all()


# A driver on the two-node cluster: one placement group holds every CPU of each node, and a task inside each
# group runs a Ray Data map with the options `RayLatentStream` gives its read tasks (`reader_options`).
# Prints, per group, the node its task ran on and the nodes its read tasks ran on.
_READS_IN_GROUPS = """
import json, sys, time
import numpy as np
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from lmd.data.stream import reader_options

ray.init(address=sys.argv[1], log_to_driver=False)
cpus = int(sys.argv[2])

def node_of_task(batch):
    return {"node": np.array([ray.get_runtime_context().get_node_id()] * len(batch["i"]))}

@ray.remote(num_cpus=cpus)
def reads_from_here():
    ds = ray.data.from_items([{"i": i} for i in range(8)], override_num_blocks=8)
    ds = ds.map_batches(node_of_task, batch_size=1, compute=ray.data.TaskPoolStrategy(size=2), **reader_options())
    return ray.get_runtime_context().get_node_id(), sorted({str(row["node"]) for row in ds.iter_rows()})

nodes = [node for node in ray.nodes() if node["Alive"]]
deadline = time.monotonic() + 120  # the previous test's jobs may still be handing their CPUs back
while ray.available_resources().get("CPU", 0) < cpus * len(nodes) and time.monotonic() < deadline:
    time.sleep(0.5)
groups = [placement_group([{"CPU": cpus}], strategy="STRICT_PACK") for _ in nodes]
ray.get([group.ready() for group in groups], timeout=120)
capture = [PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True) for group in groups]
print(json.dumps(ray.get([reads_from_here.options(scheduling_strategy=c).remote() for c in capture], timeout=180)))
"""


def test_read_tasks_started_inside_a_placement_group_run_on_its_node(two_node_cluster):
    # The multi-node half of `reader_options`: with every CPU of both nodes held by placement groups (a
    # trial or a Train worker per node), read tasks asking for no CPU still run, and each group's reads
    # run on its own node, not on CPUs another group holds.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _READS_IN_GROUPS, two_node_cluster, "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len({node for node, _ in placed}) == 2, placed  # one group per node
    assert all(readers == [node] for node, readers in placed), placed


def test_workers_open_a_relative_store_and_a_failed_run_ends_in_one_line(tmp_path):
    """Ray Train workers run in other working directories: they get the store the driver checked by its absolute
    path. The run then diverges (a huge learning rate) on every attempt: Train V2's fit() raises, and the CLI
    says so in one line naming the rank's own error (which also shows that rank read the relative store)."""
    from lmd.data.latents import build_store
    from lmd.projector import IdentityProjector

    build_store(tmp_path / "store", "bundled", IdentityProjector(), 32, num_train=32, num_val=8, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "lmd.cli", "train", "--workers", "2", "--latents", "store", "--projector", "identity",
         "--resolution", "32", "--preset", "tiny", "--patch-size", "4", "--batch-size", "8", "--num-train", "32",
         "--num-val", "8", "--steps", "10", "--log-every", "2", "--lr", "1e6", "--max-failures", "0",
         "--storage", str(tmp_path / "runs"), "--name", "diverges"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmd: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"lmd: error: training failed after --max-failures=0 restarts: rank \d: loss became (nan|inf) "
                        r"before step \d+; stopped without saving\. Last good checkpoint: none\. .*", errors[0]), errors
    # Ray forwards the workers' own logs (their traceback among them) above it; the verdict is the last line.
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


def test_unreachable_address_is_one_clear_line():
    proc = subprocess.run(_cli("--workers", "1", "--address", "127.0.0.1:1"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "lmd: error: --address=127.0.0.1:1: no Ray cluster reachable there ([Errno 111] Connection refused)"]


def test_batch_must_split_evenly_across_workers(capsys):
    from lmd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workers", "3", "--batch-size", "8", "--dataset", "synthetic"])
    assert exit_info.value.code == 2
    assert "data.batch_size=8: must be divisible by --workers=3" in capsys.readouterr().err
