"""Training from Parquet latent stores: precompute, validate before training, Ray Data == memory, pixel space."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmd.cli import main

from .test_images import _write_images


def _env() -> dict[str, str]:
    # Read at call time: the session fixture points LMD_CACHE at a private folder.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _lmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmd.cli", *args], capture_output=True, text=True, timeout=600,
                          env=_env())


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_masked_mse_fixed")) for r in rows]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("images")
    _write_images(images / "train", 40, size=(80, 72))
    _write_images(images / "val", 8, size=(64, 64))
    out = tmp_path_factory.mktemp("store") / "latents"
    assert main(["precompute", "--dataset", str(images), "--resolution", "64", "--out", str(out),
                 "--shard-size", "16"]) == 0
    return out


TRAIN = ["train", "--preset", "tiny", "--resolution", "64", "--steps", "10", "--batch-size", "8",
         "--log-every", "2", "--eval-every", "5", "--ckpt-every", "5"]


def test_precompute_writes_train_and_val_stores(store):
    for split, count in (("train", 40), ("val", 8)):
        manifest = json.loads((store / split / "manifest.json").read_text())
        assert manifest["count"] == count and manifest["latent_shape"] == [4, 8, 8]
        assert manifest["projector"]["name"] == "lmd-f8c4" and manifest["split"] == split
    assert len(json.loads((store / "train" / "manifest.json").read_text())["shards"]) == 3


def test_lmd_train_streams_a_store_through_ray_data(store, tmp_path):
    # The streamed order itself (lanes, windows, resume, workers) is tested in test_stream.py; this is the command.
    streamed = _lmd(*TRAIN, "--latents", str(store), "--loader", "ray", "--stream-lanes", "4", "--stream-window", "8",
                    "--run-dir", str(tmp_path / "ray"))
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert "via ray" in streamed.stderr
    losses = _losses(tmp_path / "ray")
    assert [r[0] for r in losses] == [2, 4, 5, 6, 8, 10] and all(math.isfinite(r[1]) for r in losses)
    config = json.loads((tmp_path / "ray" / "config.json").read_text())["data"]
    assert (config["loader"], config["stream_lanes"], config["stream_window"]) == ("ray", 4, 8)


@pytest.mark.parametrize(("flags", "message"), [
    (["--projector", "identity"], "projector.name: store has 'lmd-f8c4', run expects 'identity'"),
    (["--resolution", "128"], "latent_shape"),
])
def test_a_store_that_does_not_match_the_run_is_refused_untouched(store, tmp_path, capsys, flags, message):
    before = _snapshot(store)
    argv = [*TRAIN, "--latents", str(store), "--run-dir", str(tmp_path / "run"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and str(store) in err and len(err.splitlines()) == 1
    assert _snapshot(store) == before


def test_default_store_is_built_once_then_reused(tmp_path):
    args = ["train", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--num-train", "48", "--num-val", "8"]
    first = _lmd(*args, "--run-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "building the latent store" in first.stderr
    stores = list((Path(os.environ["LMD_CACHE"]) / "stores").glob("bundled-r128-n48-v8-lmd-f8c4-*"))
    assert len(stores) == 1
    before = _snapshot(stores[0])
    second = _lmd(*args, "--run-dir", str(tmp_path / "b"))
    assert second.returncode == 0 and "building the latent store" not in second.stderr
    assert _snapshot(stores[0]) == before
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_pixel_space_trains_through_the_same_path_with_matching_token_count(tmp_path):
    proc = _lmd("train", "--preset", "tiny", "--projector", "identity", "--steps", "4", "--batch-size", "8",
                "--num-train", "32", "--num-val", "8", "--run-dir", str(tmp_path / "px"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = json.loads((tmp_path / "px" / "config.json").read_text())["model"]
    assert (model["latent_size"], model["patch_size"], model["in_chans"]) == (128, 32, 3)
    assert (model["latent_size"] // model["patch_size"]) ** 2 == 16  # same 16 tokens as the latent tiny preset
    stores = list((Path(os.environ["LMD_CACHE"]) / "stores").glob("bundled-r128-n32-v8-identity-*"))
    assert json.loads((stores[0] / "train" / "manifest.json").read_text())["latent_shape"] == [3, 128, 128]


def test_a_trial_skips_hashing_the_store_its_driver_hashed(store, tmp_path):
    # A Tune trial's engine is built with verify_checksums=False (its experiment's driver hashed the store), so a
    # trial does not download a remote store once more just to hash it. Proof it skips only the hash: a shard with
    # one flipped byte (same size, footer intact) is refused by a plain run and accepted there.
    import shutil

    from lmd.config_build import build_config
    from lmd.data.store import StoreError
    from lmd.runtime import local_engine

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    shard = copy / "train" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = build_config(overrides={"model.preset": "tiny", "data.resolution": 64, "data.latents": str(copy),
                                  "data.batch_size": 8, "run.steps": 2, "run.device": "cpu"})
    with pytest.raises(StoreError, match="shard-00000.parquet: sha256: corrupt"):
        local_engine(cfg, tmp_path / "plain")
    engine = local_engine(cfg, tmp_path / "trial", verify_checksums=False)
    assert engine.data.latents.shape[0] == 40
