"""Artifacts on object storage (issue 13): the service (Celery workers and the API) configured with the S3 store
(``METASHRINK_ARTIFACTS_URL=s3://bucket/prefix``) against a local S3-protocol server (moto's server mode, the
``s3_server`` fixture), on both database backends. A dataset is uploaded and decoded, a job trains on it, and
its checkpoints and model are objects in the bucket; a SECOND API process on another, empty data directory
(same database, broker and S3 settings) serves them byte for byte with their sha256, adapts, and deletes them.
Nothing is written under either data directory's artifacts."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serve_harness import free_port

from .conftest import running_service, small_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "metashrink/artifacts"


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def s3_service(request, tmp_path_factory, s3_server):
    """The service with the S3 artifact store: its own workers, database and bucket (only these tests pay for
    it). Parts above 5 MiB, S3's smallest, so that a model of the test's size still fits in one part."""
    bucket = s3_server.new_bucket("svc")
    env = s3_server.env(f"s3://{bucket}/{PREFIX}", s3_multipart_threshold=5 * 1024 ** 2,
                        s3_multipart_chunksize=5 * 1024 ** 2)
    with running_service(request.param, tmp_path_factory.mktemp(f"svc-s3-{request.param}"), env) as svc:
        svc.bucket = bucket
        yield svc


class SecondApi:
    """``uvicorn api.main:app`` in its own process, on ``data_dir``, with the service's other settings."""

    def __init__(self, svc, data_dir: Path, log: Path):
        self.port = free_port()
        env = {**svc.env, "METASHRINK_DATA_DIR": str(data_dir), "METASHRINK_RECONCILER": "false"}
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        t0 = time.monotonic()
        while True:
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() - t0 < 120, f"second API never ready; see {log}"
            time.sleep(0.3)

    def close(self):
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def _csv(n_tasks=30, points=20) -> bytes:
    rng = np.random.default_rng(1)
    lines = ["task,x,y"]
    for t in range(n_tasks):
        amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
        lines += [f"t{t},{x!r},{float(amp * np.sin(x - phase))!r}" for x in map(float, rng.uniform(-5, 5, points))]
    return ("\n".join(lines) + "\n").encode()


def _files(root: Path) -> list:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".raw")]


def test_job_artifacts_in_s3_served_by_another_api_process(s3_service, s3_server, tmp_path):
    svc, c, h = s3_service, s3_service.client, s3_service.h()
    s3 = s3_server.client()

    def objects(under=""):
        r = s3.list_objects_v2(Bucket=svc.bucket, Prefix=f"{PREFIX}/{under}")
        return {o["Key"][len(PREFIX) + 1:]: o for o in r.get("Contents", [])}

    # an upload: the API puts the raw bytes in the bucket, the datasets worker reads them back from it and stores
    # the decoded collection there, the raw object is deleted
    d = svc.upload_ready(_csv(), "regression", "sines.csv")
    ds_keys = list(objects("datasets/"))
    assert len(ds_keys) == 1 and ds_keys[0].startswith(f"datasets/alice/{d['id']}-"), ds_keys
    assert objects(ds_keys[0])[ds_keys[0]]["Size"] == d["bytes"]
    assert not objects("uploads/")

    # a job trains on it (the train worker loads the collection from S3) and writes checkpoints and its model
    cfg = small_config(steps=20)
    cfg["tasks"] = {"dataset_id": d["id"], "shots": 5, "query": 5}
    jid = svc.submit(cfg)
    j = svc.wait(jid)
    assert j["status"] == "succeeded", j
    mid = j["model_id"]
    ckpts = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    assert [k["step"] for k in ckpts] == [10, 20]
    in_bucket = objects()
    ck_keys = sorted(k for k in in_bucket if k.startswith(f"jobs/{jid}/"))
    assert len(ck_keys) == 2 and all(k.endswith(".safetensors") for k in ck_keys), sorted(in_bucket)
    assert f"models/{mid}.safetensors" in in_bucket
    model = c.get(f"/v1/models/{mid}", headers=h).json()
    assert in_bucket[f"models/{mid}.safetensors"]["Size"] == model["bytes"]
    # nothing on the service's disk
    assert not _files(svc.logdir), _files(svc.logdir)

    # a second API process: another, empty data directory; the same database, broker and S3 settings
    other = tmp_path / "other-data"
    other.mkdir()
    api2 = SecondApi(svc, other, svc.logdir / "api2.log")
    try:
        c2 = api2.client
        r = c2.get(f"/v1/models/{mid}/file", headers=h)
        assert r.status_code == 200, r.text
        assert r.headers["x-checksum-sha256"] == model["sha256"] == hashlib.sha256(r.content).hexdigest()
        assert int(r.headers["content-length"]) == len(r.content) == model["bytes"]
        assert f'filename="{mid}.safetensors"' in r.headers["content-disposition"]
        body = s3.get_object(Bucket=svc.bucket, Key=f"{PREFIX}/models/{mid}.safetensors")["Body"].read()
        assert r.content == body
        assert c.get(f"/v1/models/{mid}/file", headers=h).content == body  # the first API streams it too
        for ck in ckpts:
            r = c2.get(f"/v1/checkpoints/{ck['id']}/file", headers=h)
            assert r.status_code == 200, r.text
            assert r.headers["x-checksum-sha256"] == ck["sha256"] == hashlib.sha256(r.content).hexdigest()
            assert len(r.content) == ck["bytes"]
        key = next(k for k in ck_keys if hashlib.sha256(
            s3.get_object(Bucket=svc.bucket, Key=f"{PREFIX}/{k}")["Body"].read()).hexdigest() == ckpts[0]["sha256"])
        assert c2.get(f"/v1/checkpoints/{ckpts[0]['id']}/file", headers=h).content == \
            s3.get_object(Bucket=svc.bucket, Key=f"{PREFIX}/{key}")["Body"].read()

        # adapt through the second API (the adapt worker loads the model and the dataset from S3), saving the
        # adapter in the bucket; its predict loads it back
        xs = [[float(v)] for v in np.linspace(-4, 4, 6)]
        a = c2.post(f"/v1/models/{mid}/adapt", headers=h, json={
            "support": {"x": xs, "y": [[float(np.sin(v[0]))] for v in xs]}, "query": {"x": [[0.5], [1.0]]},
            "steps": 5, "save_adapter": True})
        assert a.status_code == 200, a.text
        assert len(a.json()["predictions"]) == 2
        aid = a.json()["adapter_id"]
        assert f"adapters/{aid}.safetensors" in objects("adapters/")
        p = c2.post(f"/v1/adapters/{aid}/predict", headers=h, json={"x": [[0.5]]})
        assert p.status_code == 200, p.text

        # integrity and loss, as for local files: a replaced object is refused (500), a gone one is 410
        s3.put_object(Bucket=svc.bucket, Key=f"{PREFIX}/{key}", Body=b"not the checkpoint")
        r = c2.get(f"/v1/checkpoints/{ckpts[0]['id']}/file", headers=h)
        assert r.status_code == 500 and "does not match its recorded sha256" in r.json()["detail"], r.text
        s3.delete_object(Bucket=svc.bucket, Key=f"{PREFIX}/{key}")
        r = c2.get(f"/v1/checkpoints/{ckpts[0]['id']}/file", headers=h)
        assert r.status_code == 410, r.text
        assert svc.bucket not in r.text and s3_server.endpoint not in r.text

        # deletes through the second API remove the objects (by key, and a job's checkpoints by prefix)
        assert c2.delete(f"/v1/models/{mid}", headers=h).status_code == 204
        assert c2.delete(f"/v1/jobs/{jid}", headers=h).status_code == 204
        left = objects()
        assert not [k for k in left if k.startswith((f"jobs/{jid}/", f"models/{mid}", f"adapters/{aid}"))], left
        assert not _files(other) and not (other / "artifacts").exists(), _files(other)
        assert not _files(svc.logdir)
    finally:
        api2.close()


def test_compose_stores_artifacts_in_minio():
    """docker-compose.yml (as ``docker-compose config`` resolves it): a MinIO service, a one-shot bucket creation
    after it is healthy, migrate (which every app service waits for) after that, and every app service pointed at
    the bucket through the environment."""
    import shutil

    import yaml

    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose binary not installed (.ci/run installs Debian's package)")
    r = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                       cwd=ROOT, env={k: v for k, v in os.environ.items()
                                      if not k.startswith(("METASHRINK_", "MINIO_"))})
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    assert services["minio"]["image"].startswith("minio/minio") and "healthcheck" in services["minio"]
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy" and init["restart"] == "no"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing local/metashrink" in script and "mc admin user add" in script
    assert services["migrate"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    apps = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("metashrink")}
    assert {"api", "migrate", "worker-datasets"} <= set(apps)
    for name, s in apps.items():
        env = s["environment"]
        assert env["METASHRINK_ARTIFACTS_URL"] == "s3://metashrink/artifacts", name
        assert env["METASHRINK_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["METASHRINK_S3_ACCESS_KEY_ID"] == init["environment"]["APP_KEY"], name
        assert env["METASHRINK_S3_SECRET_ACCESS_KEY"] == init["environment"]["APP_SECRET"], name
        if name != "migrate":
            assert "migrate" in s["depends_on"], name
