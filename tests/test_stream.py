"""The streamed loader: the lane plan (pure), its Ray Data pipeline, and data-parallel training that streams.

Stores here hold synthetic 3x16x16 "images" under the identity projector (pixel space), so a run
needs neither photos nor a trained projector and every byte is known.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmd.checkpoint import load_checkpoint
from lmd.config import ClusterConfig, ConfigError
from lmd.data.lanes import StreamPlan
from lmd.data.memory import synthetic_latents
from lmd.data.store import StoreError, read_store
from lmd.data.store_writer import precompute_store
from lmd.distributed import fit_distributed
from lmd.projector import load_projector
from lmd.runtime import local_engine

from .conftest import local_ray, ray_train_workers, tiny_config

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


# ---------------------------------------------------------------------------------------------- the plan
def test_plan_serves_each_item_at_most_once_per_epoch_whatever_the_worker_count():
    plan = StreamPlan((50,) * 9 + (30,), batch_size=32, seed=7, lanes=8, window_items=12)
    assert (plan.count, plan.lane_len, plan.lane_batch, plan.steps_per_epoch) == (480, 60, 4, 15)
    for epoch in range(2):
        ids = np.concatenate([plan.batch_ids(epoch * 15 + i) for i in range(15)])
        assert len(ids) == len(set(ids.tolist())) == 480 and ids.min() >= 0 and ids.max() < 480
    for step in (0, 14, 15, 29):
        for world in (2, 4, 8):  # each rank's lanes are its slice of the global batch
            parts = [plan.batch_ids(step, rank, world) for rank in range(world)]
            assert np.array_equal(np.concatenate(parts), plan.batch_ids(step))
    # Epochs, seeds and shuffling change the order; a window mixes items from several shards.
    assert not np.array_equal(plan.batch_ids(0), plan.batch_ids(15))
    other = StreamPlan((50,) * 9 + (30,), batch_size=32, seed=8, lanes=8, window_items=12)
    assert not np.array_equal(plan.batch_ids(0), other.batch_ids(0))
    assert len(set((plan.batch_ids(0) // 50).tolist())) >= 4  # a batch draws on several regions of the store
    plain = StreamPlan((50,) * 9 + (30,), batch_size=32, seed=7, lanes=8, window_items=12, shuffle=False)
    assert plain.batch_ids(1).tolist() == [p for lane in range(8) for p in range(lane * 60 + 4, lane * 60 + 8)]


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 30}, "multiple of lanes=8"),
    ({"batch_size": 800}, "fewer than one lane batch"),
    ({"window_items": 0}, "window_items=0"),
])
def test_plan_refuses_sizes_it_cannot_serve(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamPlan((50,) * 10, **{"batch_size": 32, "seed": 0, "lanes": 8, **kwargs})
    with pytest.raises(ValueError, match="must divide lanes=8"):
        StreamPlan((50,) * 10, batch_size=32, seed=0).rank_lanes(0, 3)


# ---------------------------------------------------------------------------------------------- stores
def make_pixel_store(root: Path, count: int, shard_size: int, size: int = 16) -> Path:
    """A store of `count` smooth synthetic 3 x size x size images under the identity projector."""
    projector = load_projector("identity")
    images = (synthetic_latents(count, 3, size, seed=11) * 0.15 + 0.5).clamp(0, 1)
    for split, n in (("train", count), ("val", 16)):
        precompute_store(root / split, num_items=n, load_images=lambda a, b: images[a:b],
                         encode=projector.encode, projector=projector.info(), source={"dataset": "synthetic-pixels"},
                         split=split, shard_size=shard_size, batch_size=512, progress=False)
    return root


def pixel_config(store: Path, **overrides):
    return tiny_config(**{"data.dataset": "bundled", "data.projector": "identity", "data.latents": str(store),
                          "data.resolution": 16, "model.in_chans": 3, "model.latent_size": 16, "model.patch_size": 4,
                          "data.loader": "ray", "data.stream_lanes": 4, "data.stream_window": 8,
                          "data.num_probe": 0, **overrides})


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=4) as ray:
        yield ray


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory) -> Path:
    return make_pixel_store(tmp_path_factory.mktemp("pixels"), count=200, shard_size=24)


# ---------------------------------------------------------------------------------------------- the stream
def test_stream_serves_the_plan_across_epochs_from_one_pipeline(ray_session, pixel_store, monkeypatch):
    from lmd.data.stream import RayLatentStream

    train = pixel_store / "train"
    stream = RayLatentStream(train, 16, seed=3, lanes=4, window_items=12, total_steps=30)
    assert stream.steps_per_epoch == 12  # 200 items -> 4 lanes of 50 -> 12 batches of 4 per lane
    opens = []
    open_ = stream._open
    monkeypatch.setattr(stream, "_open", lambda step: (opens.append(step), open_(step)))
    straight = [stream.batch_with_index(t) for t in range(30)]
    assert opens == [0]  # two and a half epochs, one pipeline: no restart at an epoch boundary
    store = read_store(train)
    for t, (latents, index) in enumerate(straight):
        assert latents.shape == (16, 3, 16, 16) and latents.dtype == torch.float16  # cast on the device
        assert np.array_equal(index.numpy(), stream.plan.batch_ids(t))
        assert torch.equal(latents.float(), store[index])
    assert torch.equal(stream.batch(4), straight[4][0]) and opens[-1] == 4  # a jump back rebuilds from there

    # A fresh stream resumed mid-window, and rank 1 of 2 (its slice only), read the same rows.
    resumed = RayLatentStream(train, 16, seed=3, lanes=4, window_items=12, total_steps=30)
    half = RayLatentStream(train, 16, seed=3, lanes=4, window_items=12, rank=1, world_size=2, total_steps=30)
    for t in (13, 14, 29):
        assert torch.equal(resumed.batch_with_index(t)[1], straight[t][1])
        latents, index = half.batch_with_index(t)
        assert torch.equal(index, straight[t][1][8:]) and torch.equal(latents, straight[t][0][8:])
    assert pickle.loads(pickle.dumps(resumed))._iter is None  # ships without its live iterator
    for s in (stream, resumed, half):
        s.close()


def test_a_shard_replaced_mid_stream_stops_it_with_one_line_naming_the_file(ray_session, pixel_store, tmp_path):
    import os
    import shutil

    from lmd.data.stream import RayLatentStream

    train = tmp_path / "train"
    shutil.copytree(pixel_store / "train", train)
    stream = RayLatentStream(train, 16, seed=3, lanes=4, window_items=12, total_steps=24)
    stream.batch(0)
    # Same size, another position in the store, and the old modification time kept (as `cp -p` would): only the
    # per-task index check can see it.
    shard, stat = train / "shard-00003.parquet", (train / "shard-00003.parquet").stat()
    shard.write_bytes((train / "shard-00004.parquet").read_bytes())
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = {p.name: p.read_bytes() for p in train.iterdir()}
    with pytest.raises(StoreError) as caught:
        for t in range(1, 24):
            stream.batch(t)
    assert str(caught.value).startswith(f"{train / 'shard-00003.parquet'}: index:") and "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in train.iterdir()} == before  # nothing written
    stream.close()


def test_a_shard_reencoded_in_place_mid_stream_stops_it(ray_session, pixel_store, tmp_path):
    """Same size and same position (a re-encoded shard of a fixed-width store): only its modification time differs
    from the file the stream opened."""
    import os
    import shutil

    from lmd.data.stream import RayLatentStream

    train = tmp_path / "train"
    shutil.copytree(pixel_store / "train", train)
    stream = RayLatentStream(train, 16, seed=3, lanes=4, window_items=12, total_steps=24)
    stream.batch(0)
    shard = train / "shard-00003.parquet"
    (train / "new.tmp").write_bytes(shard.read_bytes())  # written anew, then renamed over it: as a writer does
    os.utime(train / "new.tmp", ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    os.replace(train / "new.tmp", shard)
    with pytest.raises(StoreError) as caught:
        for t in range(1, 24):
            stream.batch(t)
    assert str(caught.value).startswith(f"{shard}: modified at ") and "(replaced mid-run)" in str(caught.value)
    stream.close()


# ---------------------------------------------------------------------------------------------- training
def test_a_streamed_run_resumes_at_the_same_data_position(ray_session, pixel_store, tmp_path):
    cfg = pixel_config(pixel_store, **{"run.steps": 30, "run.ckpt_every": 10})
    straight = local_engine(cfg, tmp_path / "straight")
    straight.fit()
    first = local_engine(cfg, tmp_path / "resumed")
    first.fit(stop_at=17)  # mid-epoch (12 steps each) and mid-window (3 steps each)
    resumed = local_engine(cfg, tmp_path / "resumed")
    resumed.fit(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values(), strict=True))


def _newest_change(folder: Path) -> float:
    """The newest modification time under `folder` (0 when empty); files renamed away meanwhile are skipped."""
    newest = 0.0
    for path in folder.rglob("*") if folder.exists() else []:
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest


def finished_within(watch: Path, fit, stall: float = 600.0):
    """fit() in a thread, failing the test (instead of hanging the suite) when the run stops making progress: no
    file under `watch` (its storage: checkpoints, results) changed for `stall` seconds, as when its reads wait
    forever for a CPU. A busy machine only slows the writes down, so it does not trip this; a hang does."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(fit()), daemon=True)
    thread.start()
    last_change = time.monotonic()
    newest = 0.0
    while thread.is_alive():
        thread.join(timeout=2.0)
        latest = _newest_change(watch)
        if latest > newest:
            newest, last_change = latest, time.monotonic()
        assert time.monotonic() - last_change < stall, (
            f"no file under {watch} changed for {stall:g} s: the run stopped making progress (its reads found no CPU?)")
    return outcome[0]


def test_two_workers_streaming_their_lanes_compute_the_single_process_update(ray_session, pixel_store, tmp_path):
    # The two workers hold all 4 CPUs of this Ray: Ray Data's read tasks do not run in the workers' placement
    # group, and had they asked for a CPU they would wait forever for one outside it (`reader_options`).
    cfg = pixel_config(pixel_store, **{"run.steps": 16})
    cluster = ClusterConfig(workers=2, cpus_per_worker=2, storage=str(tmp_path / "ray"), name="stream2")
    result = finished_within(tmp_path / "ray", lambda: fit_distributed(cfg, cluster))
    assert result.error is None, result.error
    engine = local_engine(cfg, tmp_path / "local")
    engine.fit()
    # The same global batches and masks, each worker reading only its two lanes (see test_distributed
    # for why the weights agree to rounding, not bit for bit).
    assert result.metrics["loss_last"] == pytest.approx(engine.history[-1]["loss_last"], rel=1e-5)
    state, _ = load_checkpoint(Path(result.checkpoint.path))
    reference = engine.model.state_dict()
    assert all(torch.allclose(state["model"][k], reference[k], rtol=0, atol=2e-3) for k in reference)


def test_streaming_refuses_lanes_the_workers_cannot_share(ray_session, pixel_store, tmp_path):
    cfg = pixel_config(pixel_store, **{"data.stream_lanes": 2, "data.batch_size": 12})
    with pytest.raises(ConfigError, match="stream_lanes=2: must divide data.batch_size=12 and be divisible by "
                                          "--workers=4"):
        fit_distributed(cfg, ClusterConfig(workers=4, storage=str(tmp_path / "ray"), name="x"))


def _private_rss_mb(pid: int) -> float | None:
    """A process's private resident memory (RssAnon): what a worker holding the store in memory would grow."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _peak_worker_memory(cfg, storage: Path, name: str) -> list[float]:
    """Train with 2 workers and return each worker's peak private memory (MiB), sampled from outside."""
    peaks: dict[int, float] = {}
    done = threading.Event()
    earlier = set(ray_train_workers(os.getpid()))  # a previous run's workers may still be exiting

    def sample() -> None:
        while not done.is_set():
            for pid in set(ray_train_workers(os.getpid())) - earlier:  # this run's, not another test's beside it
                rss = _private_rss_mb(pid)
                if rss is not None:
                    peaks[pid] = max(rss, peaks.get(pid, 0.0))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fit_distributed(cfg, ClusterConfig(workers=2, storage=str(storage), name=name))
    finally:
        done.set()
        sampler.join()
    assert result.error is None, result.error
    assert result.metrics["step"] == cfg.run.steps
    # The two training workers; a process Ray was still starting or stopping under that name (seen once in CI,
    # at half a worker's memory) is not one of them.
    assert len(peaks) >= 2, peaks
    return sorted(peaks.values())[-2:]


def test_workers_memory_does_not_grow_with_the_store(ray_session, tmp_path):
    # The same 8 steps of 1024 items streamed by 2 workers from a 4,096-item store and from a 16x larger one
    # (65,536 items: 96 MiB of float16 on disk, 192 MiB decoded, which the in-memory loader would hold in every
    # worker). Streaming, a worker holds a few shuffle windows whatever the store's size.
    budget_mb = 48
    peaks = {}
    for count in (4096, 65_536):
        store = make_pixel_store(tmp_path / f"s{count}", count=count, shard_size=2048)
        cfg = pixel_config(store, **{"run.steps": 8, "data.batch_size": 1024, "data.num_train": count,
                                     "data.stream_lanes": 8, "data.stream_window": 2048, "run.ckpt_every": 8,
                                     "run.eval_every": 8, "run.log_every": 4})
        peaks[count] = _peak_worker_memory(cfg, tmp_path / "ray", f"n{count}")
    decoded_growth_mb = (65_536 - 4096) * 3 * 16 * 16 * 4 / 2**20
    for small, large in zip(peaks[4096], peaks[65_536], strict=True):
        assert large - small < budget_mb < decoded_growth_mb / 3, (peaks, decoded_growth_mb)


def test_a_tune_trial_reserving_every_cpu_streams_its_store_as_a_plain_run_does(ray_session, pixel_store, tmp_path):
    # Trials keep data.loader (before, they always loaded the store into memory, in another order): the
    # trial streams the same batches a plain `lmd train --loader ray` run reads, with its reads riding on
    # the trial's own CPUs.
    from ray import tune

    from lmd.experiments.trial import Placement, TrialSpec, run_trial, trial_resources

    cfg = pixel_config(pixel_store, **{"run.steps": 6, "run.log_every": 2, "run.eval_every": 6, "run.ckpt_every": 6})
    spec = TrialSpec("lmd_cosine", cfg, Placement(cpus=4))
    tuner = tune.Tuner(tune.with_resources(run_trial, trial_resources), param_space={"trial": spec.to_dict()},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="streamed"))
    (result,) = finished_within(tmp_path / "tune", tuner.fit)
    assert result.error is None, result.error
    engine = local_engine(cfg, tmp_path / "plain")
    engine.fit()
    rows = result.metrics_dataframe
    assert rows["step"].tolist() == [2, 4, 6]
    assert rows["loss"].tolist() == pytest.approx([r["loss"] for r in engine.history], rel=1e-5)


def test_the_search_takes_a_precomputed_store_and_both_scripts_a_loader():
    from .test_experiments import tune_script

    search = tune_script("search")
    _, base, _ = search.experiment(search.parse_args(["--latents", "s3://bucket/stores/imagenet", "--loader", "ray"]))
    overrides = base.overrides("cuda")
    assert (overrides["data.latents"], overrides["data.loader"]) == ("s3://bucket/stores/imagenet", "ray")
    ablation = tune_script("ablation")
    _, spec = ablation.experiment(ablation.parse_args(["--loader", "memory"]))
    overrides = spec.base.overrides("cpu")
    assert overrides["data.loader"] == "memory" and "data.latents" not in overrides  # each space builds its store
    assert search.parse_args([]).loader == "auto"


def test_a_search_on_a_store_made_for_another_model_stops_before_any_trial(pixel_store, tmp_path):
    # The store holds 3-channel 16 px pixels (identity projector); the search's trials expect the fmnist
    # projector's latents: one line naming the manifest's mismatch, exit code 2, no Ray trial started.
    proc = subprocess.run([sys.executable, "tune/search.py", "--latents", str(pixel_store), "--samples", "1",
                           "--budget", "2", "--storage", str(tmp_path), "--preset", "tiny", "--resolution", "128"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("search: error: ") and str(pixel_store) in line and "projector" in line, line


def test_an_experiment_refuses_a_store_its_trials_would_stream_but_cannot_split(pixel_store):
    # `auto` streams a store larger than data.memory_limit_mb; the experiment's driver resolves that once and
    # refuses a split the trials could not take, before any trial starts (not in every trial, after it has).
    from lmd.experiments.driver import build_stores

    cfg = pixel_config(pixel_store, **{"data.loader": "auto", "data.memory_limit_mb": 0, "data.batch_size": 12})
    build_stores([cfg], "val_psnr", "--metric", workers=1)  # 12 items = 4 lanes x 3: fine for one worker
    with pytest.raises(ConfigError, match=r"stream_lanes=4: .* divisible by --workers-per-trial=3"):
        build_stores([cfg], "val_psnr", "--metric", workers=3)


def test_read_tasks_ask_for_a_cpu_outside_a_placement_group_and_ride_on_their_node_inside_one(ray_session):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from lmd.data.stream import reader_options

    @ray.remote(num_cpus=1)
    def options_here() -> tuple[dict, str]:
        return reader_options(), ray.get_runtime_context().get_node_id()

    outside, _ = ray.get(options_here.remote())
    assert outside == {"num_cpus": 1}
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready())
    try:
        inside, node = ray.get(options_here.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=True)).remote())
    finally:
        remove_placement_group(group)
    assert inside == {"num_cpus": 0, "label_selector": {"ray.io/node-id": node}}
