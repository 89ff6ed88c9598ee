"""Stores in an object store: `lmd precompute --out s3://...`, checked, streamed and trained from there.

A real S3 endpoint on loopback (moto's server, spoken to over HTTP by pyarrow's own S3 client, the
client a cluster uses against AWS), so every byte goes through the S3 protocol: multipart uploads,
ranged GETs for Parquet footers, prefix listings.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmd.config_build import build_config
from lmd.data import precompute as precompute_pipeline
from lmd.data.latents import build_store, prepare_data
from lmd.data.location import Location
from lmd.data.store import (
    MANIFEST_FILE,
    PLAN_FILE,
    StoreError,
    read_manifest,
    read_store,
    shard_name,
    validate_store,
)
from lmd.data.store_writer import write_shard
from lmd.projector import load_projector

from .conftest import local_ray

BUCKET = "lmd-test"
PROJECTOR, RESOLUTION, ITEMS = "lmd-f8c4", 32, (64, 16)  # bundled crops -> 4x4x4 latents
SHARDS = ["--shard-size", "24", "--batch-size", "10"]


# Credentials come from the environment, as on a cluster (a URI with credentials is refused): set before this
# module starts Ray or a subprocess, so every process that opens the store has them.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on loopback with one bucket; yields `uri(key)` -> the s3:// URI of `key` in it."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield lambda key: f"s3://{BUCKET}/{key}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def ray_session(s3):  # after s3: Ray's workers inherit the credentials from this process's environment
    with local_ray(num_cpus=2) as ray:
        yield ray


def precompute(*args: str) -> subprocess.CompletedProcess:
    flags = ["--dataset", "bundled", "--projector", PROJECTOR, "--resolution", str(RESOLUTION), "--limit",
             str(ITEMS[0]), "--num-val", str(ITEMS[1]), *SHARDS]
    return subprocess.run([sys.executable, "-m", "lmd.cli", "precompute", *flags, *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory) -> dict[str, str]:
    """The same store made twice: locally by the one-process path, in S3 by the Ray Data pipeline."""
    local = tmp_path_factory.mktemp("local") / "store"
    build_store(local, "bundled", load_projector(PROJECTOR), RESOLUTION, *ITEMS, shard_size=24, batch_size=10,
                progress=False)
    proc = precompute("--out", s3("store"), "--encoders", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])["store"]
    assert printed == f"s3://{BUCKET}/store"  # no query string in what is shown
    return {"local": str(local), "s3": s3("store")}


def test_precompute_into_s3_writes_the_bytes_the_local_path_writes(stores):
    local, remote = Path(stores["local"]), Location.of(stores["s3"])
    for split in ("train", "val"):
        manifest = validate_store(remote / split, projector=load_projector(PROJECTOR).info())  # checksums too
        assert [s["sha256"] for s in manifest["shards"]] == [
            s["sha256"] for s in json.loads((local / split / MANIFEST_FILE).read_text())["shards"]]
        for shard in manifest["shards"]:
            assert (remote / split / shard["file"]).read_bytes() == (local / split / shard["file"]).read_bytes()
        assert PLAN_FILE not in (remote / split).names()  # finished: the plan is gone, as locally
    assert np.array_equal(read_store(remote / "train").numpy(), read_store(local / "train").numpy())


def test_a_run_trains_from_the_s3_store_streamed_by_ray_data_as_from_the_local_one(stores, ray_session, tmp_path):
    from lmd.runtime import local_engine

    losses = {}
    for where in ("local", "s3"):
        cfg = build_config(overrides={
            "model.preset": "tiny", "model.patch_size": 1, "data.dataset": "bundled", "data.projector": PROJECTOR,
            "data.resolution": RESOLUTION, "data.num_train": ITEMS[0], "data.num_val": ITEMS[1],
            "data.latents": stores[where], "data.loader": "ray", "data.batch_size": 16, "data.stream_lanes": 4,
            "data.stream_window": 32, "run.steps": 6, "run.log_every": 2, "run.eval_every": 6, "run.device": "cpu",
            "mask.scheduler": "cosine", "data.num_probe": 0})
        data = prepare_data(cfg, progress=False)
        assert str(data.store) == (stores[where] if where == "local" else f"s3://{BUCKET}/store")
        assert type(data.train).__name__ == "RayLatentStream"
        batches = [data.train.batch_with_index(step)[1].tolist() for step in range(6)]
        losses[where] = (batches, _fit_losses(local_engine(cfg, tmp_path / where)))
    assert losses["s3"][0] == losses["local"][0]  # the same items at every step
    assert losses["s3"][1] == losses["local"][1]  # and so the same training, bit for bit on CPU


def _fit_losses(engine) -> list[float]:
    engine.fit()
    return [json.loads(line)["loss"] for line in engine.metrics_path.read_text().splitlines()]


def test_a_corrupt_object_is_named_by_its_s3_key(stores, s3):
    # A copy of the store under another prefix, with one shard's bytes changed (same size).
    source, copy = Location.of(stores["s3"]) / "train", Location.of(s3("corrupt")) / "train"
    for name in source.names():
        (copy / name).write_bytes((source / name).read_bytes())
    data = bytearray((copy / shard_name(1)).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / shard_name(1)).write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        validate_store(copy)
    message = str(err.value)
    assert message.startswith(f"s3://{BUCKET}/corrupt/train/{shard_name(1)}: sha256: corrupt")
    assert "endpoint_override" not in message


def test_an_s3_store_is_hashed_once_per_machine_until_an_object_changes(stores, s3, monkeypatch, tmp_path):
    import time

    from lmd.data import verified

    monkeypatch.setenv("LMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "SETTLE_SECONDS", 4.0)  # S3 times are whole seconds; production waits 60 s
    source, copy = Location.of(stores["s3"]) / "train", Location.of(s3("verified")) / "train"
    for name in source.names():
        (copy / name).write_bytes((source / name).read_bytes())
    shards = len(read_manifest(copy)["shards"])
    hashed: list[str] = []
    real_sha256 = Location.sha256
    monkeypatch.setattr(Location, "sha256", lambda self: hashed.append(self.name) or real_sha256(self))

    validate_store(copy)  # written a moment ago: hashed, not yet recorded (a same-second rewrite would hide)
    assert len(hashed) == shards and not list((tmp_path / "cache").rglob("*.json"))
    time.sleep(4.1)
    validate_store(copy)
    validate_store(copy)
    assert len(hashed) == 2 * shards  # the settled store was hashed once more, then recorded and trusted

    data = bytearray((copy / shard_name(1)).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, new object: its time moves on
    (copy / shard_name(1)).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{shard_name(1)}: sha256: corrupt"):
        validate_store(copy)

    local = Path(stores["local"]) / "train"
    hashed.clear()
    validate_store(local)
    validate_store(local)
    assert len(hashed) == 2 * len(read_manifest(local)["shards"])  # a local store is hashed every time


def test_an_interrupted_s3_build_resumes_encoding_only_the_missing_shard(stores, s3, ray_session):
    source, broken = Location.of(stores["s3"]), Location.of(s3("broken"))
    for split in ("train", "val"):
        for name in (source / split).names():
            (broken / split / name).write_bytes((source / split / name).read_bytes())
    # As a killed build leaves it: the plan, shards 0 and 2 of train, no manifest; val finished.
    plan = json.loads((source / "val" / MANIFEST_FILE).read_text())  # identity fields, rebuilt below
    (broken / "train" / MANIFEST_FILE).unlink()
    (broken / "train" / shard_name(1)).unlink()
    train = json.loads((source / "train" / MANIFEST_FILE).read_text())
    identity = {"projector": train["projector"], "source": train["source"], "split": "train",
                "num_items": train["count"], "shard_size": train["shard_size"], "dtype": train["dtype"],
                "classes": train.get("classes", [])}
    (broken / "train" / PLAN_FILE).write_json({"format": plan["format"], "identity": identity})
    # Shard 0 is finished but holds zeros: a valid shard the build must keep, not re-encode.
    write_shard(broken / "train", identity, 0, np.zeros((24, *train["latent_shape"]), np.float32), None,
                train["latent_shape"])
    # In this process's Ray (the command's path is the fixture's build): plan, then the pipeline.
    build = precompute_pipeline.plan_build(broken, "bundled", load_projector(PROJECTOR), RESOLUTION, *ITEMS,
                                           shard_size=24, batch_size=10)
    assert {(c["split"], c["shard"]) for c in build.chunks()} == {("train", 1)}  # val and shards 0, 2: skipped
    precompute_pipeline.run_build(build, precompute_pipeline.encoder_pool(1, "auto", ray_session.cluster_resources()),
                                  progress=False)
    assert (broken / "train" / shard_name(1)).read_bytes() == (source / "train" / shard_name(1)).read_bytes()
    manifest = validate_store(broken / "train")
    assert manifest["shards"][1:] == train["shards"][1:]
    assert not read_store(broken / "train", limit=24).any()  # shard 0 kept as it was


def test_storage_that_refuses_ends_in_one_line_naming_the_store(s3):
    missing = s3("x").replace(BUCKET, "no-such-bucket")
    proc = precompute("--out", missing)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("lmd: error: s3://no-such-bucket/x: cannot use the store")
    assert "NO_SUCH_BUCKET" in lines[0]
    train = subprocess.run([sys.executable, "-m", "lmd.cli", "train", "--latents", missing, "--steps", "1"],
                           capture_output=True, text=True, timeout=120)
    lines = train.stderr.strip().splitlines()
    assert train.returncode != 0 and len(lines) == 1, train.stderr[-2000:]
    assert lines[0].startswith("lmd: error: s3://no-such-bucket/x/train: missing")  # S3 reports no such key


@pytest.mark.parametrize(("uri", "expect"), [
    ("s3://AKIA:hunter2@bucket/store?region=us-east-1", "s3://bucket/store: credentials in the URI are refused"),
    ("s3://bucket/st ore?endpoint_override=10.0.0.1:9000&secret=hunter2", "s3://bucket/st ore: not a storage URI"),
])
def test_a_uri_that_cannot_be_used_is_refused_without_showing_secrets(uri, expect):
    with pytest.raises(ValueError) as err:
        Location.of(uri)
    assert str(err.value).startswith(expect) and "hunter2" not in str(err.value)
    assert "10.0.0.1" not in str(err.value) and len(str(err.value).splitlines()) == 1
    if "AKIA" in uri:  # refused at the config boundary too: a run would save the URI in its config.json
        with pytest.raises(ValueError, match="data.latents") as err:
            build_config(overrides={"data.latents": uri})
        assert "hunter2" not in str(err.value)


def test_validating_an_s3_store_lists_its_shards_instead_of_asking_for_each(stores, caplog):
    # What every Ray Train worker and Tune trial does before it streams (no hashing): sizes come from one
    # listing of the split instead of two metadata requests per object (was: a HEAD for "is it there", one
    # for its size, one more to open its footer). Requests are counted in the S3 server's own request log.
    store = Location.of(stores["s3"]) / "train"
    shards = [s["file"] for s in read_manifest(store)["shards"]]
    caplog.set_level(logging.INFO, logger="werkzeug")
    validate_store(store, verify_checksums=False)
    requests = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
    lists = [r for r in requests if "list-type=2" in r]
    heads = {name: sum(f'"HEAD /{BUCKET}/store/train/{name} ' in r for r in requests) for name in shards}
    assert len(shards) >= 3 and len(lists) == 1, requests
    assert heads == dict.fromkeys(shards, 1), requests  # the one left: pyarrow opening the footer
