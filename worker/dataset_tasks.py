"""Celery task ``process_dataset`` (queue ``datasets``): decode and validate an upload the API accepted.

The API checked the upload's headers (store/uploads.py: image count, pixels per image and in all, numbers) and
the tenant's quota, stored the raw bytes and recorded the dataset ``processing``. Here the bytes are decoded by
``datasets.upload.validate_upload`` (which runs the same header pass first), and the dataset becomes ``ready``
(its collection stored as safetensors, the summary, sha256 and bytes recorded) or ``failed`` with the message
``validate_upload`` gives. The raw upload is deleted either way.

Why its own queue (see also worker/celery_app.py): the embedded default's train worker runs one task at a time
and may train for hours, and the adapt queue carries requests with deadlines of seconds; decoding an upload
takes seconds to a minute and up to ~5x ``dataset_max_pixels`` bytes of memory (the decoded images, their
stacked copy, the file written), so it runs where it delays neither. ``metashrink serve`` starts one
``datasets`` worker (one process); deployments run ``-Q datasets`` somewhere.

Delivery as for jobs: the database row is the truth. A claim counts the attempt and renews ``enqueued_at``;
the reconciler re-sends a dataset still processing whose message is older than ``requeue_queued_after``
(lost with the broker, or held by a worker that died); a dataset whose worker was lost ``max_attempts``
times (e.g. killed for memory; ``reject_on_worker_lost`` re-delivers the message each time) ends failed.
"""
from __future__ import annotations

import logging
import uuid

from store.artifacts import ArtifactError
from store.datasets import (claim_processing, finish_processing, lock_quota, quota_problem, release_processing,
                            tenant_usage)
from store.models import Dataset
from store.uploads import UploadError, UploadLimits

from .celery_app import PROCESS_DATASET, app
from .runtime import public_error, runtime

log = logging.getLogger("metashrink.worker")

# a decode that runs this long is stopped (SoftTimeLimitExceeded: failed with that message); the hard limit
# kills the child, which counts as a lost attempt
SOFT_TIME_LIMIT = 900
TIME_LIMIT = 960


@app.task(name=PROCESS_DATASET, acks_late=True, reject_on_worker_lost=True, soft_time_limit=SOFT_TIME_LIMIT,
          time_limit=TIME_LIMIT)
def process_dataset(dataset_id: str):
    rt = runtime()
    s = rt.settings
    with rt.db.session() as ses:
        state = claim_processing(ses, dataset_id, s.max_attempts)
        row = ses.get(Dataset, dataset_id)
        if row is not None:
            tenant, kind, raw_uri, upload = row.tenant, row.kind, row.uri, dict((row.summary or {}).get("upload") or {})
            raw_sha = row.sha256  # the raw upload's while processing (the API recorded it)
    if state != "claimed":
        log.info("dataset %s: %s", dataset_id, "attempts spent: failed" if state == "exhausted" else
                 "not processing (duplicate delivery, finished, or deleted)")
        if state == "exhausted":
            rt.store.delete(raw_uri)
        return state
    try:
        return _process(rt, dataset_id, tenant, kind, raw_uri, upload, raw_sha)
    except SystemExit:  # billiard's SIGTERM handler in pool children: a shutdown; the next sweep re-sends it
        log.warning("dataset %s: terminated; released to the queue", dataset_id)
        with rt.db.session() as ses:
            release_processing(ses, dataset_id)
        raise


def _fail(rt, dataset_id: str, raw_uri: str, message: str) -> str:
    with rt.db.session() as ses:
        finish_processing(ses, dataset_id, "failed", error=message)
    rt.store.delete(raw_uri)
    return "failed"


def _process(rt, dataset_id: str, tenant: str, kind: str, raw_uri: str, upload: dict,
             raw_sha: str | None = None) -> str:
    from datasets.stored import put_collection  # datasets/ imports core (torch): only in the worker's child
    from datasets.upload import validate_upload

    s = rt.settings
    opts = {k: int(upload[k]) for k in ("min_per_class", "min_points") if upload.get(k) is not None}
    try:
        data = rt.store.get_bytes(raw_uri, sha256=raw_sha)  # through the store: a local file or an S3 object
    except (OSError, ArtifactError) as e:  # gone (MissingArtifact), unreadable, or not the bytes uploaded
        log.error("dataset %s: the raw upload %s is unreadable: %s", dataset_id, raw_uri, e)
        return _fail(rt, dataset_id, raw_uri, "the uploaded file was lost before it could be processed; upload "
                                              "it again")
    try:
        coll = validate_upload(data, upload.get("file") or "upload", kind, limits=UploadLimits.from_settings(s),
                               **opts)
    except UploadError as e:
        return _fail(rt, dataset_id, raw_uri, str(e))
    except Exception as e:  # a decoder's own failure, or the soft time limit
        log.exception("dataset %s: processing failed", dataset_id)
        return _fail(rt, dataset_id, raw_uri, public_error(rt, e))
    del data
    art = put_collection(rt.store, f"datasets/{tenant}/{dataset_id}-{uuid.uuid4().hex[:6]}.safetensors", coll)
    summary = coll.summary()
    del coll
    with rt.db.session() as ses:
        lock_quota(ses, tenant)
        row = ses.get(Dataset, dataset_id)
        reserved = row.bytes if row is not None and row.status == "processing" else 0
        used = tenant_usage(ses, tenant) - reserved + art.bytes
        problem = quota_problem(used, art.bytes, s.tenant_quota_bytes)
        if problem:
            ok = finish_processing(ses, dataset_id, "failed", error=problem)
        else:
            ok = finish_processing(ses, dataset_id, "ready", summary=summary, uri=art.uri, sha256=art.sha256,
                                   bytes=art.bytes)
    if problem or not ok:  # over the quota, or a duplicate delivery finished first, or the dataset is gone
        rt.store.delete(art.uri)
    rt.store.delete(raw_uri)
    if not ok:
        return "skip"
    log.info("dataset %s: %s", dataset_id, "failed (quota)" if problem else f"ready ({art.bytes} bytes)")
    return "failed" if problem else "ready"
