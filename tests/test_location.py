"""`lmd.data.location.Location`: how a store's path or URI is parsed, named and compared (no storage touched)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lmd.data.location import Location, is_uri

S3 = "s3://bucket/stores/a?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


@pytest.mark.parametrize("where, path", [
    ("runs/store", Path("runs/store")),
    ("/data/store", Path("/data/store")),
    ("file:///data/store", Path("/data/store")),
    ("file://localhost/data/store", Path("/data/store")),
    (Path("rel/x"), Path("rel/x")),
])
def test_local_paths_and_file_uris_are_local(where, path):
    location = Location.of(where)
    assert location.is_local and location.local_path == path and not is_uri(str(location))
    assert (location / "train").local_path == path / "train" and (location / "train").parent == location


def test_an_object_store_uri_is_named_without_its_query_and_travels_pickled():
    location = Location.of(S3.format(port=9000))
    assert not location.is_local and str(location) == "s3://bucket/stores/a"
    child = location / "train" / "manifest.json"
    assert str(child) == "s3://bucket/stores/a/train/manifest.json" and child.name == "manifest.json"
    assert child.parent.parent == location and child.fs_path == "bucket/stores/a/train/manifest.json"
    assert pickle.loads(pickle.dumps(child)) == child  # a Ray task gets the same location, filesystem included
    with pytest.raises(ValueError, match="not a local path"):
        _ = location.local_path


def test_the_same_key_on_another_endpoint_is_another_location():
    a, b = Location.of(S3.format(port=9000)), Location.of(S3.format(port=9001))
    assert str(a) == str(b) and a != b and a == Location.of(S3.format(port=9000))
    assert Location.of("/x") != Location.of("s3://x?region=us-east-1")


def test_a_verified_store_record_belongs_to_one_endpoint():
    # lmd.data.verified keys what a machine hashed by store, endpoint and manifest: the same key on another
    # service is another store, hashed on its own.
    from lmd.data import verified

    manifest = {"shards": [{"file": "shard-00000.parquet", "sha256": "ab"}]}
    a, b = Location.of(S3.format(port=9000)), Location.of(S3.format(port=9001))
    assert verified._record_path(a, manifest) != verified._record_path(b, manifest)
    assert verified._record_path(a, manifest) == verified._record_path(Location.of(S3.format(port=9000)), manifest)
    assert verified._record_path(a, manifest) != verified._record_path(a, {**manifest, "count": 2})
