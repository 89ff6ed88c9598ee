"""The Ray Data precompute pipeline (`lmd.data.precompute`) builds the same store as the one-process path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmd.data import precompute
from lmd.data.latents import build_store as build_store_single
from lmd.data.store import MANIFEST_FILE, PLAN_FILE, StoreError, shard_name, validate_store
from lmd.projector import IdentityProjector, load_projector

from .conftest import local_ray

SHARDS = {"shard_size": 24, "batch_size": 10}  # 10-item chunks from each shard's start: 10, 10, 4


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=2) as ray:
        yield ray


def pool(ray) -> precompute.EncoderPool:
    return precompute.encoder_pool(None, "auto", ray.cluster_resources())


# When, and from which commit: a commit landing between two builds changes code_version, not the content.
UNSTABLE = ("created_unix", "code_version")


def assert_same_store(a: Path, b: Path) -> None:
    """Equal shard bytes and manifests (but when and by which commit) in both splits."""
    for split in ("train", "val"):
        ma, mb = (json.loads((root / split / MANIFEST_FILE).read_text()) for root in (a, b))
        assert {k: v for k, v in ma.items() if k not in UNSTABLE} == {k: v for k, v in mb.items()
                                                                      if k not in UNSTABLE}
        assert all(key in ma and key in mb for key in UNSTABLE)
        for shard in ma["shards"]:
            assert (a / split / shard["file"]).read_bytes() == (b / split / shard["file"]).read_bytes()
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(p.name for p in (b / split).iterdir())


CASES = {"bundled": ("lmd-f8c4", 32), "fashion-mnist": ("lmd-f8c4-fmnist", 32)}  # dataset: projector, px
ITEMS = (64, 8)  # train, val: shards of 24, 24, 16 | 8 items


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory) -> dict[str, Path]:
    """Per dataset, a store made by each path from the same inputs: root/single, root/pipe."""
    roots = {}
    for dataset, (projector, resolution) in CASES.items():
        root, proj = tmp_path_factory.mktemp(dataset), load_projector(projector)
        build_store_single(root / "single", dataset, proj, resolution, *ITEMS, progress=False, **SHARDS)
        precompute.build_store(root / "pipe", dataset, proj, resolution, *ITEMS, pool=pool(ray_session),
                               progress=False, **SHARDS)
        roots[dataset] = root
    return roots


@pytest.mark.parametrize("dataset", CASES)
def test_pipeline_store_equals_the_single_process_store(built, dataset):
    assert_same_store(built[dataset] / "single", built[dataset] / "pipe")
    manifest = validate_store(built[dataset] / "pipe" / "train", projector=load_projector(CASES[dataset][0]).info())
    assert bool(manifest.get("classes")) == (dataset == "fashion-mnist")  # labels travel with the latents


def test_a_failing_encode_ends_in_the_task_s_own_error_and_no_manifest(ray_session, tmp_path):
    class Infinite(IdentityProjector):
        def encode_raw(self, images):
            return images * float("inf")

    with pytest.raises(precompute.PipelineError, match=r"^items \[\d+, \d+\): latents are not finite in float16"):
        precompute.build_store(tmp_path, "bundled", Infinite(), 32, 16, 8, progress=False, **SHARDS,
                               pool=precompute.encoder_pool(1, "auto", ray_session.cluster_resources()))
    assert not (tmp_path / "train" / MANIFEST_FILE).exists() and (tmp_path / "train" / PLAN_FILE).exists()


def test_encoder_pool_is_one_per_gpu_else_one_per_cpu_and_refuses_what_cannot_run():
    assert precompute.encoder_pool(None, "auto", {"CPU": 2}) == precompute.EncoderPool(2, 0.5, 0.0, 1.0)
    assert precompute.encoder_pool(None, "auto", {"CPU": 16, "GPU": 2}) == precompute.EncoderPool(2, 1.0, 1.0)
    assert precompute.encoder_pool(None, "cpu", {"CPU": 16, "GPU": 2}).size == 16
    assert precompute.encoder_pool(None, "auto", {"CPU": 1}) == precompute.EncoderPool(1, 0.5, 0.0, 0.5)
    for encoders, device, resources, match in [(3, "auto", {"CPU": 2}, "--encoders=3: .* at most 2"),
                                               (0, "auto", {"CPU": 2}, "--encoders=0"),
                                               (3, "auto", {"CPU": 8, "GPU": 2}, "one GPU per encoder"),
                                               (None, "cuda", {"CPU": 2}, "no GPUs"),
                                               (None, "tpu", {"CPU": 2}, "--device='tpu'")]:
        with pytest.raises(ValueError, match=match):
            precompute.encoder_pool(encoders, device, resources)


def test_plan_build_refuses_a_store_made_for_another_run_before_any_ray(tmp_path):
    precompute.plan_build(tmp_path, "bundled", IdentityProjector(), 32, 16, 8, **SHARDS)
    with pytest.raises(StoreError, match="num_items: store has 16, run expects 24"):
        precompute.plan_build(tmp_path, "bundled", IdentityProjector(), 32, 24, 8, **SHARDS)


def lmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmd.cli", "precompute", *args], capture_output=True, text=True,
                          timeout=300)


SMALL = ["--projector", "identity", "--resolution", "32", "--limit", "16", "--num-val", "8"]


def test_a_refused_store_ends_in_one_line_through_the_command(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("mine")
    proc = lmd(*SMALL, "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmd: error: ") and "not empty and holds no store" in lines[0]
    assert [str(p.relative_to(out)) for p in out.rglob("*")] == ["train", "train/notes.txt"]


@pytest.mark.parametrize("flags, code, expect", [
    (["--projector", "nope"], 1, "projector 'nope'"),
    (["--dataset", "{tmp}/missing"], 1, "not a directory of images"),
    (["--out", "ftp://host/store"], 2, "ftp://host/store: not a storage URI pyarrow can open"),
    (["--encoders", "0"], 2, "--encoders=0: must be > 0"),
])
def test_bad_precompute_flags_end_in_one_line_before_any_ray(tmp_path, capsys, flags, code, expect):
    from lmd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["precompute", *SMALL, "--out", str(tmp_path / "out"), *(f.format(tmp=tmp_path) for f in flags)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == code and lines[-1].startswith("lmd: error: ") and expect in lines[-1], lines
    assert not (tmp_path / "out").exists()


def test_an_interrupted_build_resumes_through_lmd_precompute_encoding_only_the_missing_shard(built, tmp_path):
    projector, resolution = CASES["bundled"]
    proj, args = load_projector(projector), ("bundled", resolution, *ITEMS)
    # As a kill leaves it: the plan, some shards of train, no manifest; val finished.
    broken = tmp_path / "broken"
    shutil.copytree(built["bundled"] / "pipe", broken)
    (broken / "train" / MANIFEST_FILE).unlink()
    (broken / "train" / shard_name(1)).unlink()
    fresh = precompute.plan_build(tmp_path / "fresh", args[0], proj, *args[1:], **SHARDS)
    shutil.copy(tmp_path / "fresh" / "train" / PLAN_FILE, broken / "train" / PLAN_FILE)
    kept = {p.name: p.stat().st_mtime_ns for p in (broken / "train").iterdir() if p.name != PLAN_FILE}
    build = precompute.plan_build(broken, args[0], proj, *args[1:], **SHARDS)
    assert {(c["split"], c["shard"]) for c in build.chunks()} == {("train", 1)}  # val, shards 0 and 2: skipped
    assert len(fresh.chunks()) > len(build.chunks())

    flags = ["--dataset", "bundled", "--projector", projector, "--resolution", str(resolution), "--limit",
             str(ITEMS[0]), "--num-val", str(ITEMS[1]), "--shard-size", str(SHARDS["shard_size"]), "--batch-size",
             str(SHARDS["batch_size"]), "--out", str(broken)]
    proc = lmd(*flags, "--encoders", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["store"] == str(broken)
    assert_same_store(built["bundled"] / "single", broken)
    assert not (broken / "train" / PLAN_FILE).exists()
    assert all((broken / "train" / name).stat().st_mtime_ns == t for name, t in kept.items())
    rerun = lmd(*flags)
    assert rerun.returncode == 0 and "Ray" not in rerun.stderr  # a complete store needs no cluster
