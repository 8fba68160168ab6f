"""The S3 artifact store (store/artifacts.py) against a local S3-protocol server (moto's server mode, the
``s3_server`` fixture): tensors and bytes round-trip, every read verifies the sha256, a missing object is
MissingArtifact, files above the multipart threshold go up in parts, deletes by uri and by prefix; and the
local store's same interface (``open`` / ``get_bytes``) with the same semantics."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from store.artifacts import (ArtifactError, LocalArtifactStore, MissingArtifact, S3ArtifactStore, make_store)
from store.settings import Settings

MiB = 1024 ** 2


@pytest.fixture
def s3(s3_server):
    bucket = s3_server.new_bucket()
    store = S3ArtifactStore(f"s3://{bucket}/tenant-a/artifacts", endpoint_url=s3_server.endpoint,
                            region=s3_server.region, access_key_id=s3_server.access_key,
                            secret_access_key=s3_server.secret_key, multipart_threshold=5 * MiB,
                            multipart_chunksize=5 * MiB)
    store.raw = s3_server.client()
    return store


def _objects(store) -> dict:
    r = store.raw.list_objects_v2(Bucket=store.bucket)
    return {o["Key"]: o for o in r.get("Contents", [])}


def test_tensors_round_trip(s3):
    t = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5, dtype=torch.int64)}
    art = s3.put_tensors("jobs/j1/ckpt-000000010.safetensors", t, metadata={"step": 10, "note": "x"})
    assert art.uri == "s3:jobs/j1/ckpt-000000010.safetensors" and len(art.sha256) == 64
    # under the url's prefix, with the sha256 as the object's metadata
    objs = _objects(s3)
    assert list(objs) == ["tenant-a/artifacts/jobs/j1/ckpt-000000010.safetensors"]
    assert objs["tenant-a/artifacts/jobs/j1/ckpt-000000010.safetensors"]["Size"] == art.bytes
    head = s3.raw.head_object(Bucket=s3.bucket, Key="tenant-a/artifacts/jobs/j1/ckpt-000000010.safetensors")
    assert head["Metadata"]["sha256"] == art.sha256
    got, meta = s3.get_tensors(art.uri, sha256=art.sha256)
    assert meta == {"step": 10, "note": "x"}
    assert set(got) == {"w", "b"} and torch.equal(got["w"], t["w"]) and torch.equal(got["b"], t["b"])
    got["w"].add_(1)  # owned, writable copies
    data = s3.get_bytes(art.uri, sha256=art.sha256)
    assert hashlib.sha256(data).hexdigest() == art.sha256 and len(data) == art.bytes
    with s3.open(art.uri, sha256=art.sha256) as f:
        assert f.read() == data
    arrays, meta = s3.load_safetensors(art.uri, art.sha256, "np")
    assert isinstance(arrays["w"], np.ndarray) and np.array_equal(arrays["w"], t["w"].numpy())


def test_dataset_collection_round_trip(s3):
    from datasets.upload import RegressionCollection
    from datasets.stored import get_collection, put_collection

    rng = np.random.default_rng(0)
    coll = RegressionCollection([(f"t{i}", rng.normal(size=(6, 2)), rng.normal(size=(6, 1))) for i in range(3)],
                                "test")
    art = put_collection(s3, "datasets/alice/ds1.safetensors", coll)
    back = get_collection(s3, art.uri, sha256=art.sha256)
    assert [t for t, _, _ in back.tasks] == ["t0", "t1", "t2"]
    for (_, x0, y0), (_, x1, y1) in zip(coll.tasks, back.tasks):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)


def test_sha256_mismatch_is_detected(s3):
    art = s3.put_bytes("models/m1.safetensors", b"the bytes that were stored")
    okey = "tenant-a/artifacts/models/m1.safetensors"
    # the object replaced behind the store's back, its metadata kept: the recorded sha256 no longer matches
    s3.raw.put_object(Bucket=s3.bucket, Key=okey, Body=b"other bytes", Metadata={"sha256": art.sha256})
    for read in (lambda: s3.get_bytes(art.uri, sha256=art.sha256), lambda: s3.open(art.uri, sha256=art.sha256),
                 lambda: s3.get_tensors(art.uri, sha256=art.sha256),
                 lambda: s3.get_bytes(art.uri)):  # without the caller's sha256: the object's own is checked
        with pytest.raises(ArtifactError, match="does not match its recorded sha256") as e:
            read()
        assert not isinstance(e.value, MissingArtifact)
    # the caller's sha256 (the database's) wins over the object's metadata
    assert s3.get_bytes(art.uri, sha256=hashlib.sha256(b"other bytes").hexdigest()) == b"other bytes"


def test_missing_object_is_missing_artifact(s3, s3_server):
    for read in (s3.get_bytes, s3.open, s3.get_tensors, s3.load_safetensors):
        with pytest.raises(MissingArtifact) as e:
            read("s3:models/gone.safetensors")
        msg = str(e.value)
        assert msg == "artifact models/gone.safetensors is missing from the artifact store"
        assert s3_server.endpoint not in msg and s3.bucket not in msg
    with pytest.raises(ArtifactError, match="not an artifact uri of this S3 store"):
        s3.get_bytes("file:models/x.safetensors")
    with pytest.raises(ArtifactError, match="escapes the store"):
        s3.put_bytes("../outside", b"x")


def test_multipart_upload_above_the_threshold(s3):
    big = os.urandom(11 * MiB + 123)  # threshold and parts of 5 MiB: three parts
    art = s3.put_bytes("models/big.safetensors", big)
    head = s3.raw.head_object(Bucket=s3.bucket, Key="tenant-a/artifacts/models/big.safetensors")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart object's ETag counts its parts
    assert head["ContentLength"] == len(big) and head["Metadata"]["sha256"] == art.sha256
    assert art.sha256 == hashlib.sha256(big).hexdigest()
    assert s3.get_bytes(art.uri, sha256=art.sha256) == big  # ranged parts, reassembled in order and verified
    with s3.open(art.uri, sha256=art.sha256) as f:
        assert f.read() == big
    small = s3.put_bytes("models/small.safetensors", b"x" * 1000)
    head = s3.raw.head_object(Bucket=s3.bucket, Key="tenant-a/artifacts/models/small.safetensors")
    assert "-" not in head["ETag"] and s3.get_bytes(small.uri, sha256=small.sha256) == b"x" * 1000


def test_delete_and_delete_prefix(s3):
    arts = [s3.put_bytes(f"jobs/j1/ckpt-{i}.safetensors", b"%d" % i) for i in range(3)]
    keep = s3.put_bytes("jobs/j10/ckpt-0.safetensors", b"sibling")  # shares "jobs/j1" as a string prefix
    model = s3.put_bytes("models/m.safetensors", b"model")
    assert sorted(s3.list_keys("jobs/j1")) == [f"jobs/j1/ckpt-{i}.safetensors" for i in range(3)]
    s3.delete_prefix("jobs/j1")
    assert sorted(_objects(s3)) == ["tenant-a/artifacts/jobs/j10/ckpt-0.safetensors",
                                    "tenant-a/artifacts/models/m.safetensors"]
    with pytest.raises(MissingArtifact):
        s3.get_bytes(arts[0].uri)
    assert s3.get_bytes(keep.uri, sha256=keep.sha256) == b"sibling"
    s3.delete(model.uri)
    s3.delete(model.uri)  # idempotent, as the local store's
    s3.delete_prefix("jobs/nothing-here")
    assert list(_objects(s3)) == ["tenant-a/artifacts/jobs/j10/ckpt-0.safetensors"]


def test_make_store_from_settings(s3_server, tmp_path):
    s = Settings(data_dir=tmp_path, **{k[len("METASHRINK_"):].lower(): v for k, v in
                                       s3_server.env("s3://bkt/some/prefix", s3_multipart_threshold=6 * MiB).items()})
    store = make_store(s)
    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix, store.root) == ("bkt", "some/prefix", "s3://bkt/some/prefix")
    assert store.endpoint_url == s3_server.endpoint and store.addressing_style == "path"
    assert store.multipart_threshold == 6 * MiB and store.multipart_chunksize == 8 * MiB
    assert s3_server.secret_key not in repr(s)  # a SecretStr
    assert not (tmp_path / "artifacts").exists()  # nothing local
    # the embedded default, a path, a file:// url
    assert make_store(Settings(data_dir=tmp_path)).root == (tmp_path / "artifacts").resolve()
    assert make_store(Settings(data_dir=tmp_path, artifacts_url=str(tmp_path / "a"))).root == tmp_path / "a"
    assert make_store(Settings(data_dir=tmp_path, artifacts_url=f"file://{tmp_path}/b")).root == tmp_path / "b"
    for bad in ("gs://bucket/x", "s3://", "s3:///prefix"):
        with pytest.raises(ValueError, match="artifacts_url"):
            Settings(data_dir=tmp_path, artifacts_url=bad)


def test_local_store_same_interface(tmp_path):
    store = LocalArtifactStore(tmp_path / "art")
    art = store.put_bytes("models/m.safetensors", b"local bytes")
    assert store.get_bytes(art.uri, sha256=art.sha256) == b"local bytes"
    with store.open(art.uri, sha256=art.sha256) as f:
        assert f.read() == b"local bytes"
    store.path(art.uri).write_bytes(b"tampered")
    for read in (lambda: store.get_bytes(art.uri, sha256=art.sha256), lambda: store.open(art.uri, art.sha256)):
        with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
            read()
    for read in (store.get_bytes, store.open, store.get_tensors):
        with pytest.raises(MissingArtifact, match="^artifact models/gone.safetensors is missing"):
            read("file:models/gone.safetensors")


def test_datasets_worker_reads_the_raw_upload_through_the_store(s3, tmp_path):
    """worker/dataset_tasks.py on the S3 store: the raw upload is read from the bucket (no local path) and checked
    against the sha256 the API recorded; a replaced one fails the dataset as lost; the raw object is deleted."""
    from types import SimpleNamespace

    from store.db import Database
    from store.migrate import upgrade
    from store.models import Dataset, utcnow
    from worker.dataset_tasks import _process

    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    rt = SimpleNamespace(settings=Settings(data_dir=tmp_path), db=Database(url), store=s3)
    csv = b"task,x,y\n" + b"".join(b"t%d,%d.5,%d.25\n" % (t, i, i) for t in range(4) for i in range(12))
    try:
        for did, body in (("ds_ok", csv), ("ds_bad", csv)):
            raw = s3.put_bytes(f"uploads/alice/{did}.raw", body)
            with rt.db.session() as ses:
                ses.add(Dataset(id=did, tenant="alice", kind="regression", name=did, summary={}, uri=raw.uri,
                                sha256=raw.sha256, bytes=len(body), status="processing", attempts=1,
                                enqueued_at=utcnow(), created_at=utcnow()))
        s3.raw.put_object(Bucket=s3.bucket, Key="tenant-a/artifacts/uploads/alice/ds_bad.raw", Body=csv + b"t9,1,1\n")
        assert _process(rt, "ds_ok", "alice", "regression", "s3:uploads/alice/ds_ok.raw", {"file": "a.csv"},
                        hashlib.sha256(csv).hexdigest()) == "ready"
        assert _process(rt, "ds_bad", "alice", "regression", "s3:uploads/alice/ds_bad.raw", {"file": "a.csv"},
                        hashlib.sha256(csv).hexdigest()) == "failed"
        with rt.db.session() as ses:
            ok, bad = ses.get(Dataset, "ds_ok"), ses.get(Dataset, "ds_bad")
            assert ok.status == "ready" and ok.uri.startswith("s3:datasets/alice/ds_ok-")
            assert bad.status == "failed" and "lost before it could be processed" in bad.error
            assert s3.get_bytes(ok.uri, sha256=ok.sha256)
        assert not s3.list_keys("uploads")
    finally:
        rt.db.dispose()
