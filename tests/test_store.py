"""The latent store: exact round trip, validation that names file and field and never writes,
crash-safe resumable precompute, and a Ray stream whose batches are a pure function of (seed, step)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from lmd import code_version
from lmd.data.store import StoreError, read_store, validate_store
from lmd.data.store_writer import precompute_store

N, SHARD, BATCH = 40, 16, 8  # shards of 16, 16 and 8 items
IMAGES = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0))
MIX = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
PROJECTOR = {"name": "toy-f8c4", "checksum": "ab12" * 16, "scale": 0.5, "shift": 0.1, "latent_channels": 4,
             "downsample": 8}
SOURCE = {"dataset": "synthetic", "resolution": 32, "seed": 0, "num_items": N}


def toy_encode(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, 32, 32] -> [n, 4, 4, 4]: 8x8 average pooling, then a fixed channel mix (per item: batch-size free)."""
    pooled = F.avg_pool2d(images, 8)
    return 3 * (MIX[None, :, :, None, None] * pooled[:, None]).sum(2)


def load_images(start: int, stop: int) -> torch.Tensor:
    return IMAGES[start:stop]


def make_store(path: Path, **overrides) -> dict:
    kwargs = {"num_items": N, "load_images": load_images, "encode": toy_encode, "projector": PROJECTOR,
              "source": SOURCE, "split": "train", "shard_size": SHARD, "batch_size": BATCH, "progress": False}
    return precompute_store(path, **{**kwargs, **overrides})


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root (hidden ones too): relative path -> (sha256, mtime_ns)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


class Interrupted(Exception):
    pass


class CountingEncode:
    """toy_encode that counts the items it sees and can fail on its (fail_at+1)-th call, like a killed run."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.calls, self.items = fail_at, 0, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.calls == self.fail_at:
            raise Interrupted
        self.calls += 1
        self.items += images.shape[0]
        return toy_encode(images)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "train"
    make_store(path)
    return path


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "train"
    shutil.copytree(pristine, copy)
    return copy


# ---------------------------------------------------------------- round trip and layout


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_read_store_gives_the_dtype_rounded_latents_of_a_direct_encode_in_item_order(tmp_path, dtype):
    manifest = make_store(tmp_path / "s", dtype=dtype)
    expected = toy_encode(IMAGES).to(getattr(torch, dtype)).float()
    latents = read_store(tmp_path / "s")
    assert latents.dtype == torch.float32 and torch.equal(latents, expected)
    if dtype == "float16":
        assert not torch.equal(latents, toy_encode(IMAGES))  # the rounding is real, so the check above has teeth

    assert manifest == json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("format", "projector", "source", "split", "latent_shape", "dtype", "count",
                                     "shard_size", "code_version")} == {
        "format": 1, "projector": PROJECTOR, "source": SOURCE, "split": "train", "latent_shape": [4, 4, 4],
        "dtype": dtype, "count": N, "shard_size": SHARD, "code_version": code_version()}
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 8]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]  # no plan, no temps
    for k, shard in enumerate(manifest["shards"]):
        path = tmp_path / "s" / shard["file"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        table = pq.ParquetFile(path).read()
        width = 4 * 4 * 4 * (2 if dtype == "float16" else 4)
        assert table.schema.field("index").type == pa.int64()
        assert table.schema.field("latent").type == pa.binary(width)
        assert json.loads(table.schema.metadata[b"lmd"]) == {"format": 1, "latent_shape": [4, 4, 4], "dtype": dtype}
        assert table["index"].to_pylist() == list(range(k * SHARD, k * SHARD + shard["rows"]))


# ---------------------------------------------------------------- validation: names file and field, never writes


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _replace_shard(root: Path, k: int, table: pa.Table | None = None, raw: bytes | None = None) -> None:
    """Swap shard k for other content and make the manifest's size and checksum agree, so a deeper check must fire."""
    path = root / f"shard-{k:05d}.parquet"
    if raw is None:
        pq.write_table(table, path)
    else:
        path.write_bytes(raw)

    def fix(manifest):
        manifest["shards"][k].update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    _edit_manifest(root, fix)


def _last_shard(root: Path, rows: int = 8, width: int = 128, with_index: bool = True) -> pa.Table:
    meta = pq.read_schema(root / "shard-00002.parquet").metadata
    columns = {"latent": pa.array([b"\0" * width] * rows, pa.binary(width))}
    if with_index:
        columns = {"index": pa.array(range(32, 32 + rows), pa.int64()), **columns}
    return pa.table(columns).replace_schema_metadata(meta)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CASES = {  # name: (damage, expectations passed to validate_store, fragments the message must hold besides the file)
    "missing manifest": (lambda d: (d / "manifest.json").unlink(), {}, "manifest.json", ["missing"]),
    "malformed manifest": (lambda d: (d / "manifest.json").write_text('{"format": 1,'), {}, "manifest.json",
                           ["not valid JSON"]),
    "manifest lacks a field": (lambda d: _edit_manifest(d, lambda m: m.pop("latent_shape")), {}, "manifest.json",
                               ["'latent_shape'"]),
    "wrong format": (lambda d: _edit_manifest(d, lambda m: m.update(format=2)), {}, "manifest.json", ["format", "2"]),
    "rows do not sum to count": (lambda d: _edit_manifest(d, lambda m: m.update(count=41)), {}, "manifest.json",
                                 ["count", "41", "40"]),
    "missing shard": (lambda d: (d / "shard-00001.parquet").unlink(), {}, "shard-00001.parquet", ["missing"]),
    "truncated shard": (lambda d: _truncate(d / "shard-00001.parquet", 500), {}, "shard-00001.parquet",
                        ["bytes", "truncated"]),
    "flipped byte": (lambda d: _flip_byte(d / "shard-00001.parquet"), {}, "shard-00001.parquet", ["sha256", "corrupt"]),
    "unreadable parquet": (lambda d: _replace_shard(d, 2, raw=b"not parquet" * 100), {}, "shard-00002.parquet",
                           ["Parquet unreadable"]),
    "wrong byte width": (lambda d: _replace_shard(d, 2, _last_shard(d, width=64)), {}, "shard-00002.parquet",
                         ["schema", "'latent'", "fixed_size_binary[64]", "fixed_size_binary[128]"]),
    "missing column": (lambda d: _replace_shard(d, 2, _last_shard(d, with_index=False)), {}, "shard-00002.parquet",
                       ["schema", "'index'", "missing"]),
    "rows differ from manifest": (lambda d: _replace_shard(d, 2, _last_shard(d, rows=7)), {}, "shard-00002.parquet",
                                  ["rows", "7", "8"]),
    "latent_shape expectation": (lambda d: None, {"latent_shape": (4, 8, 8)}, "manifest.json",
                                 ["latent_shape", "[4, 4, 4]", "[4, 8, 8]"]),
    "dtype expectation": (lambda d: None, {"dtype": "float32"}, "manifest.json", ["dtype", "float16", "float32"]),
    "projector checksum": (lambda d: None, {"projector": {**PROJECTOR, "checksum": "cd34" * 16}}, "manifest.json",
                           ["projector.checksum", repr(PROJECTOR["checksum"]), repr("cd34" * 16)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_store_raises_store_error_naming_file_and_field_and_is_left_untouched(store, case):
    damage, expect, file, fragments = CASES[case]
    damage(store)
    before = snapshot(store)
    for read in (validate_store, read_store):
        with pytest.raises(StoreError) as err:
            read(store, **expect)
        message = str(err.value)
        assert message.startswith(f"{store / file}:"), message
        for fragment in fragments:
            assert fragment in message, message
    assert snapshot(store) == before


def test_matching_expectations_pass(pristine):
    manifest = validate_store(pristine, projector={"name": "toy-f8c4", "checksum": PROJECTOR["checksum"]},
                              latent_shape=[4, 4, 4], dtype="float16")
    assert manifest["count"] == N


# ---------------------------------------------------------------- precompute: resume, idempotence, refusal


def _shards(manifest: dict) -> list[dict]:
    return manifest["shards"]


def test_interrupted_precompute_resumes_to_the_same_store_as_a_straight_run(pristine, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):  # shard 0 (2 batches) is written, shard 1 dies on its second batch
        make_store(run, encode=CountingEncode(fail_at=3))
    assert sorted(p.name for p in run.iterdir()) == [".plan.json", "shard-00000.parquet"]
    with pytest.raises(StoreError, match="interrupted"):
        validate_store(run)
    (run / ".tmp-shard-00001.parquet.0123abcd").write_bytes(b"half a shard")  # as a killed writer leaves it

    encode = CountingEncode()
    manifest = make_store(run, encode=encode)
    assert encode.items == N - SHARD  # the finished shard was kept
    assert _shards(manifest) == _shards(json.loads((pristine / "manifest.json").read_text()))  # same bytes
    assert torch.equal(read_store(run), read_store(pristine))
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in pristine.iterdir())  # plan and temp gone


def test_resume_re_encodes_a_damaged_shard(pristine, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        make_store(run, encode=CountingEncode(fail_at=3))
    _truncate(run / "shard-00000.parquet", 300)  # e.g. a disk that lost the tail of a file
    encode = CountingEncode()
    manifest = make_store(run, encode=encode)
    assert encode.items == N
    assert _shards(manifest) == _shards(json.loads((pristine / "manifest.json").read_text()))


def test_rerunning_a_complete_store_returns_it_and_touches_nothing(store):
    before = snapshot(store)
    manifest = make_store(store, encode=CountingEncode(fail_at=0))  # would raise if it encoded anything
    assert manifest == json.loads((store / "manifest.json").read_text())
    assert snapshot(store) == before


@pytest.mark.parametrize("state", ["complete", "interrupted"])
@pytest.mark.parametrize("change, field", [
    ({"projector": {**PROJECTOR, "checksum": "cd34" * 16}}, "projector.checksum"),
    ({"shard_size": 8}, "shard_size"),
    ({"split": "val"}, "split"),
    ({"source": {**SOURCE, "resolution": 64}}, "source.resolution"),
])
def test_precompute_refuses_a_store_made_for_another_run_and_changes_nothing(tmp_path, state, change, field):
    root = tmp_path / "s"
    if state == "complete":
        make_store(root)
    else:
        with pytest.raises(Interrupted):
            make_store(root, encode=CountingEncode(fail_at=3))
    before = snapshot(root)
    with pytest.raises(StoreError, match=field.replace(".", r"\.")) as err:
        make_store(root, **change)
    assert str(err.value).startswith(str(root / ("manifest.json" if state == "complete" else ".plan.json")))
    assert snapshot(root) == before


def test_precompute_refuses_a_non_empty_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        make_store(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- Ray Data


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    yield ray
    ctx.enable_progress_bars = saved
    if started:
        ray.shutdown()


def test_ray_dataset_reads_exactly_the_manifest_shards_in_item_order(ray_session, store):
    from lmd.data.stream import ray_dataset

    pq.write_table(pa.table({"x": [1]}), store / "stray.parquet")  # not in the manifest: must not be read
    (store / "extra").mkdir()
    pq.write_table(pa.table({"x": [1]}), store / "extra" / "more.parquet")
    rows = ray_dataset(store).take_all()
    assert [r["index"] for r in rows] == list(range(N))
    assert rows[0]["latent"].dtype == "float32" and rows[0]["latent"].shape == (4, 4, 4)
    assert torch.equal(torch.tensor(np.stack([r["latent"] for r in rows])), read_store(store))


def test_ray_stream_and_dataset_require_ray_to_be_initialised(ray_session, pristine, monkeypatch):
    from lmd.data.stream import RayLatentStream, ray_dataset

    monkeypatch.setattr(ray_session, "is_initialized", lambda: False)
    for make in (lambda: RayLatentStream(pristine, 8, seed=5), lambda: ray_dataset(pristine)):
        with pytest.raises(RuntimeError, match=r"ray\.init"):
            make()
