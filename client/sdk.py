from __future__ import annotations

import os
import time
from pathlib import Path

import httpx


class ApiError(Exception):
    def __init__(self, status: int, body):
        self.status, self.body = status, body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 300.0):
        self.url = (url or os.environ.get("METASHRINK_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.key = key or os.environ.get("METASHRINK_API_KEY")
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.key}"} if self.key else {})

    def _call(self, method, path, **kw):
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise ApiError(r.status_code, body)
        return r.json() if r.content else None  # 204: nothing

    def submit(self, config: dict, idempotency_key: str | None = None) -> dict:
        h = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=config, headers=h)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def modules(self, job_id: str, step: int | None = None) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}/modules", params={"step": step} if step is not None else {})

    def metrics(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics")

    def model(self, model_id: str) -> dict:
        return self._call("GET", f"/v1/models/{model_id}")

    def adapt(self, model_id: str, support: dict, query: dict, steps: int = 100, modules="selected") -> dict:
        return self._call("POST", f"/v1/models/{model_id}/adapt",
                          json={"support": support, "query": query, "steps": steps, "modules": modules})

    # uploaded meta-datasets: accepted after a header check (202, status "processing"), then decoded by a worker
    def upload_dataset(self, file, kind: str, name: str | None = None, filename: str | None = None,
                       min_per_class: int | None = None, min_points: int | None = None, wait: bool = False,
                       timeout: float | None = None) -> dict:
        """Upload ``file`` (a path, or bytes with ``filename``) as an ``image_classes`` zip or a ``regression``
        CSV/NPZ. Returns the dataset (status ``processing``); with ``wait``, the dataset once it is ``ready`` or
        ``failed`` (see ``wait_dataset``)."""
        if isinstance(file, (bytes, bytearray)):
            data, fname = bytes(file), filename or "upload"
        else:
            data, fname = Path(file).read_bytes(), filename or Path(file).name
        fields = {"kind": kind, "name": name, "min_per_class": min_per_class, "min_points": min_points}
        d = self._call("POST", "/v1/datasets", files={"file": (fname, data)},
                       data={k: str(v) for k, v in fields.items() if v is not None})
        return self.wait_dataset(d["id"], timeout=timeout) if wait else d

    def dataset(self, dataset_id: str) -> dict:
        return self._call("GET", f"/v1/datasets/{dataset_id}")

    def datasets(self, limit: int = 20, cursor: str | None = None) -> dict:
        """A page of the tenant's datasets and ``usage``: ``{"bytes", "quota"}`` (quota None: unlimited)."""
        params = {k: v for k, v in {"limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/datasets", params=params)

    def wait_dataset(self, dataset_id: str, poll: float = 0.5, timeout: float | None = None,
                     raise_on_failure: bool = False) -> dict:
        """Poll until the dataset is ``ready`` or ``failed`` (``error.message`` says why); returns it. With
        ``raise_on_failure``, a failed dataset raises ValueError with that message."""
        t0 = time.monotonic()
        while True:
            d = self.dataset(dataset_id)
            if d["status"] != "processing":
                if raise_on_failure and d["status"] == "failed":
                    raise ValueError(f"dataset {dataset_id} failed: {(d.get('error') or {}).get('message')}")
                return d
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"dataset {dataset_id} still processing after {timeout} s")
            time.sleep(poll)

    # deletes: None on success; ApiError 404 (unknown, or another tenant's) or 409 (something depends on it)
    DELETABLE = {"job": "jobs", "model": "models", "checkpoint": "checkpoints", "dataset": "datasets",
                 "adapter": "adapters", "evaluation": "evaluations"}

    def delete(self, kind: str, id_: str) -> None:
        """Delete a job, model, checkpoint, dataset, adapter or evaluation (``kind``); the rules are in the
        API's DELETE routes (a queued or running job is canceled first)."""
        if kind not in self.DELETABLE:
            raise ValueError(f"kind must be one of {sorted(self.DELETABLE)}")
        self._call("DELETE", f"/v1/{self.DELETABLE[kind]}/{id_}")

    def delete_job(self, job_id: str) -> None:
        self.delete("job", job_id)

    def delete_model(self, model_id: str) -> None:
        self.delete("model", model_id)

    def delete_checkpoint(self, ckpt_id: str) -> None:
        self.delete("checkpoint", ckpt_id)

    def delete_dataset(self, dataset_id: str) -> None:
        self.delete("dataset", dataset_id)

    def delete_adapter(self, adapter_id: str) -> None:
        self.delete("adapter", adapter_id)

    def delete_evaluation(self, eval_id: str) -> None:
        self.delete("evaluation", eval_id)

    # API keys (an admin key only)
    def keys(self, tenant: str | None = None, limit: int = 100, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"tenant": tenant, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/admin/keys", params=params)

    def create_key(self, tenant: str, admin: bool = False) -> dict:
        """The new key's record with ``key``, the key itself (shown this once)."""
        return self._call("POST", "/v1/admin/keys", json={"tenant": tenant, "admin": admin})

    def revoke_key(self, key_id: str) -> None:
        self._call("DELETE", f"/v1/admin/keys/{key_id}")

    def wait(self, job_id: str, poll: float = 1.0, on_progress=None, timeout: float | None = None) -> dict:
        t0 = time.monotonic()
        while True:
            j = self.job(job_id)
            if on_progress:
                on_progress(j)
            if j["status"] in ("succeeded", "failed", "canceled"):
                return j
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"job {job_id} still {j['status']} after {timeout} s")
            time.sleep(poll)
