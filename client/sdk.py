from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import httpx

# what the server decodes (datasets/upload.py); a file with another extension in an image folder is skipped
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm")


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
            self._raise(r)
        return r.json() if r.content else None  # 204: nothing

    @staticmethod
    def _raise(r: httpx.Response):
        try:
            body = r.json()
        except ValueError:
            body = r.text
        raise ApiError(r.status_code, body)

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

    def retry(self, job_id: str) -> dict:
        """Re-queue a failed or canceled job (it resumes from its latest checkpoint); ApiError 409 otherwise."""
        return self._call("POST", f"/v1/jobs/{job_id}/retry")

    def checkpoints(self, job_id: str) -> dict:
        """``{"items": [{"id", "step", "sha256", "bytes", "val_score", "best"}], "best_checkpoint_id"}``."""
        return self._call("GET", f"/v1/jobs/{job_id}/checkpoints")

    def download_checkpoint(self, ckpt_id: str, dest) -> Path:
        """The checkpoint's safetensors file to ``dest`` (a file, or a directory for ``<id>.safetensors``);
        its sha256 is checked against the server's."""
        return self._download(f"/v1/checkpoints/{ckpt_id}/file", dest, f"{ckpt_id}.safetensors")

    def events(self, job_id: str, interval: float | None = None):
        """The job's Server-Sent Events as ``{"event", "id", "data"}`` dicts (``data`` decoded): ``progress``,
        ``metrics``, ``status``, one per change; the iteration ends after the terminal ``status``."""
        params = {"interval": interval} if interval is not None else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params=params) as r:
            if r.status_code >= 400:
                r.read()
                self._raise(r)
            event: dict = {}
            for line in r.iter_lines():
                if not line:  # a blank line ends an event
                    if "data" in event:
                        yield {**event, "data": json.loads(event["data"])}
                    event = {}
                elif not line.startswith(":"):  # ": keep-alive" comments
                    field, _, value = line.partition(":")
                    event[field] = value[1:] if value.startswith(" ") else value

    def models(self, limit: int = 20, cursor: str | None = None) -> dict:
        """A page of the tenant's published meta-models, newest first, with ``next_cursor``."""
        params = {k: v for k, v in {"limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/models", params=params)

    def download_model(self, model_id: str, dest) -> Path:
        """The meta-model's safetensors file to ``dest`` (a file, or a directory for ``<id>.safetensors``)."""
        return self._download(f"/v1/models/{model_id}/file", dest, f"{model_id}.safetensors")

    def evaluate(self, model_id: str, **request) -> dict:
        """Queue a meta-test evaluation (``n_tasks``, ``steps``, ``modules``, ``split``, ``seed``; all optional):
        ``{"id", "status": "queued"}``."""
        return self._call("POST", f"/v1/models/{model_id}/evaluations", json=request)

    def evaluation(self, eval_id: str) -> dict:
        return self._call("GET", f"/v1/evaluations/{eval_id}")

    def evaluations(self, model_id: str) -> dict:
        """The model's evaluations, newest first: ``{"items": [...]}``."""
        return self._call("GET", f"/v1/models/{model_id}/evaluations")

    def wait_evaluation(self, eval_id: str, poll: float = 1.0, timeout: float | None = None) -> dict:
        t0 = time.monotonic()
        while (e := self.evaluation(eval_id))["status"] not in ("succeeded", "failed"):
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"evaluation {eval_id} still {e['status']} after {timeout} s")
            time.sleep(poll)
        return e

    def adapter(self, adapter_id: str) -> dict:
        """A stored adapter (``adapt(..., save_adapter=True)``): ``{"id", "model_id", "modules", "steps", ...}``."""
        return self._call("GET", f"/v1/adapters/{adapter_id}")

    def _download(self, path: str, dest, default_name: str) -> Path:
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / default_name
        digest = hashlib.sha256()
        with self.http.stream("GET", path) as r:
            if r.status_code >= 400:
                r.read()
                self._raise(r)
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes():
                    digest.update(chunk)
                    f.write(chunk)
            want = r.headers.get("X-Checksum-Sha256")
        if want and digest.hexdigest() != want:
            dest.unlink()
            raise ValueError(f"{path}: sha256 {digest.hexdigest()} of the download is not the server's {want}")
        return dest

    def model(self, model_id: str) -> dict:
        return self._call("GET", f"/v1/models/{model_id}")

    def adapt(self, model_id: str, support: dict, query: dict, steps: int = 100, modules="selected",
              save_adapter: bool = False) -> dict:
        """``save_adapter``: also store the adapted modules; the answer has ``adapter_id`` (``predict``)."""
        return self._call("POST", f"/v1/models/{model_id}/adapt",
                          json={"support": support, "query": query, "steps": steps, "modules": modules,
                                "save_adapter": save_adapter})

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

    def usage(self) -> dict:
        """What the tenant stores (bytes by kind) and runs, beside the deployment's limits (``GET /v1/usage``)."""
        return self._call("GET", "/v1/usage")

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

    def adapt_images(self, model_id: str, support, labels, query, steps: int | None = None, modules=None,
                     save_adapter: bool = False) -> dict:
        """Adapt an image model to image files as they are (multipart): ``support`` paths with one class label
        each (``labels``, same order), ``query`` paths. The server preprocesses them exactly as the model's
        training data (GET /v1/models/{id}: ``preprocessing``). Same answer as ``adapt``."""
        data = {"labels": json.dumps([int(v) for v in labels]), "save_adapter": "true" if save_adapter else "false"}
        if steps is not None:
            data["steps"] = str(int(steps))
        if modules is not None:
            data["modules"] = modules if isinstance(modules, str) else json.dumps(list(modules))
        return self._call("POST", f"/v1/models/{model_id}/adapt", data=data,
                          files=_parts("support", support) + _parts("query", query))

    def predict(self, adapter_id: str, x) -> dict:
        return self._call("POST", f"/v1/adapters/{adapter_id}/predict", json={"x": x})

    def predict_many(self, items) -> list:
        """Predictions of many stored adapters in one request (``POST /v1/adapters/predict``): ``items`` are
        ``(adapter_id, x)`` pairs or ``{"adapter_id", "x"}`` dicts; returns the predictions, one list per item, in
        their order. ``x`` may be a numpy array or nested lists."""
        body = []
        for it in items:
            aid, x = (it["adapter_id"], it["x"]) if isinstance(it, dict) else it
            body.append({"adapter_id": aid, "x": x.tolist() if hasattr(x, "tolist") else x})
        return [r["predictions"] for r in self._call("POST", "/v1/adapters/predict", json={"items": body})["items"]]

    def predict_images(self, adapter_id: str, paths) -> dict:
        """Predict with a stored adapter from image files as they are (multipart ``x``)."""
        return self._call("POST", f"/v1/adapters/{adapter_id}/predict", files=_parts("x", paths))

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


def _parts(field: str, paths) -> list:
    """Multipart file parts; each is named by its folder and file name (``class/0001.png``), so that a 422 names
    it recognisably without sending local paths."""
    out = []
    for p in map(Path, paths):
        out.append((field, (f"{p.parent.name}/{p.name}" if p.parent.name else p.name, p.read_bytes(),
                            "application/octet-stream")))
    return out


def image_files(directory) -> list[Path]:
    """The image files directly in ``directory``, sorted by name (hidden files skipped)."""
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(directory) -> tuple[list[str], list[Path], list[int]]:
    """``DIR/CLASS/image`` -> (class names sorted, image paths class after class, labels 0..N-1 by that order)."""
    classes = sorted(p.name for p in Path(directory).iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = image_files(Path(directory) / name)
        paths += files
        labels += [label] * len(files)
    return classes, paths, labels
