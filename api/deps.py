"""Request dependencies shared by the routers: the database session, the caller's tenant (bearer API key),
admin keys (403 for others), ownership checks (404 for another tenant's resource) and cursor pagination."""

from datetime import datetime, timedelta
from typing import Annotated, Optional

from fastapi import Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from sqlalchemy import and_, or_

from store.artifacts import ArtifactError, MissingArtifact
from store.keys import key_for
from store.models import Adapter, Dataset, Job, MetaModelRow

from .errors import ApiError

PAGE_LIMIT_MAX = 100


def db_session(request: Request):
    with request.app.state.db.session() as s:
        yield s


def _caller(request: Request, authorization: Optional[str]):
    """``(tenant, admin)`` of the bearer key. Checked against the database on every request (one query on the
    unique ``key_hash`` index, no cache), so a revoked key is refused from the next request on, in every API
    process (issue 12; measured in benchmarks/key_check.py)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "missing bearer API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    with request.app.state.db.engine.connect() as c:  # a bare connection: ~0.1 ms less than an ORM session
        row = key_for(c, authorization[7:].strip())
    if row is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return row


def tenant(request: Request, authorization: Annotated[Optional[str], Header()] = None) -> str:
    return _caller(request, authorization).tenant


def admin_tenant(request: Request, authorization: Annotated[Optional[str], Header()] = None) -> str:
    row = _caller(request, authorization)
    if not row.admin:
        raise ApiError(403, "this route needs an admin API key (metashrink keys create --admin)")
    return row.tenant


Session = Annotated[object, Depends(db_session)]
Tenant = Annotated[str, Depends(tenant)]
Admin = Annotated[str, Depends(admin_tenant)]
Limit = Annotated[int, Query(ge=1, le=PAGE_LIMIT_MAX)]


def _own(s, t: str, model, id_: str, what: str):
    row = s.get(model, id_)
    if row is None or row.tenant != t:
        raise ApiError(404, f"{what} {id_} not found")
    return row


def own_job(s, t: str, job_id: str) -> Job:
    return _own(s, t, Job, job_id, "job")


def own_model(s, t: str, model_id: str) -> MetaModelRow:
    return _own(s, t, MetaModelRow, model_id, "model")


def own_dataset(s, t: str, dataset_id: str) -> Dataset:
    return _own(s, t, Dataset, dataset_id, "dataset")


def own_adapter(s, t: str, adapter_id: str) -> Adapter:
    return _own(s, t, Adapter, adapter_id, "adapter")


def artifact_file(request: Request, uri: str, what: str, filename: str, sha256: str) -> StreamingResponse:
    """The artifact as a download streamed from the store (a local file, or an S3 object fetched by this API
    process, whatever its data directory), verified against the recorded sha256 before the first byte is sent;
    410 when the row's file is gone from the store, 500 when it no longer matches (the messages name the
    resource, never a server path)."""
    try:
        f = request.app.state.store.open(uri, sha256=sha256)
    except MissingArtifact:
        raise ApiError(410, f"{what}: its file is missing from the artifact store") from None
    except ArtifactError:
        raise ApiError(500, f"{what}: its file in the artifact store does not match its recorded sha256") from None
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)

    def chunks():
        try:
            while chunk := f.read(1 << 20):
                yield chunk
        finally:
            f.close()

    return StreamingResponse(chunks(), media_type="application/octet-stream", background=BackgroundTask(f.close),
                             headers={"Content-Length": str(size), "X-Checksum-Sha256": sha256,
                                      "Content-Disposition": f'attachment; filename="{filename}"'})


# --------------------------------------------------------------------------- cursor pagination
# A cursor is the position of the last item of a page in the (created_at, id) order: microseconds since the epoch
# (UTC), a dot, the id. Any string of that form is a position, so every cursor the pattern admits is a valid one.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[A-Za-z0-9_-]{1,64}$"
EPOCH = datetime(1970, 1, 1)
Cursor = Annotated[Optional[str], Query(pattern=CURSOR_PATTERN, description="the `next_cursor` of the previous page")]


def encode_cursor(created_at: datetime, id_: str) -> str:
    return f"{(created_at.replace(tzinfo=None) - EPOCH) // timedelta(microseconds=1)}.{id_}"


def decode_cursor(cursor: str):
    micros, id_ = cursor.split(".", 1)
    return EPOCH + timedelta(microseconds=int(micros)), id_


def page(s, stmt, model, limit: int, cursor: Optional[str], view) -> dict:
    """One page of ``stmt`` (newest first) as ``{"items": [view(row)], "next_cursor"}``."""
    if cursor:
        ts, id_ = decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < id_)))
    rows = s.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).all()
    nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return {"items": [view(r) for r in rows[:limit]], "next_cursor": nxt}
