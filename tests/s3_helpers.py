"""A local S3-protocol server for the tests: moto's server mode (``moto[server]``, a dev extra) in a subprocess on
a free port, as s3fs's own test suite runs it. The store, the Celery workers and the API processes reach it over
HTTP exactly as they would reach MinIO or AWS S3."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    access_key, secret_key, region = "metashrink-test", "metashrink-test-secret", "us-east-1"

    def __init__(self, log_path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                    raise RuntimeError(f"moto_server did not start; see {log_path}")
                time.sleep(0.1)

    def client(self):
        import boto3
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=self.region,
                                              aws_access_key_id=self.access_key,
                                              aws_secret_access_key=self.secret_key)

    def new_bucket(self, stem="ms") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, url: str, **over) -> dict:
        """METASHRINK_* variables that point a service's processes at ``url`` (s3://bucket/prefix) here."""
        e = {"METASHRINK_ARTIFACTS_URL": url, "METASHRINK_S3_ENDPOINT_URL": self.endpoint,
             "METASHRINK_S3_REGION": self.region, "METASHRINK_S3_ACCESS_KEY_ID": self.access_key,
             "METASHRINK_S3_SECRET_ACCESS_KEY": self.secret_key}
        e.update({f"METASHRINK_{k.upper()}": str(v) for k, v in over.items()})
        return e

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:  # pragma: no cover
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()
