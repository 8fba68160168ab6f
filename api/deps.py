"""Request dependencies shared by the routers: the database session, the caller's tenant (bearer API key),
ownership checks (404 for another tenant's resource) and cursor pagination."""

import base64
import time
from datetime import datetime
from typing import Annotated, Optional

from fastapi import Depends, Header, Query, Request
from sqlalchemy import and_, or_, select

from store.keys import hash_key
from store.models import Adapter, ApiKey, Dataset, Job, MetaModelRow

from .errors import ApiError, unprocessable

PAGE_LIMIT_MAX = 100
KEY_CACHE_S = 30.0


def db_session(request: Request):
    with request.app.state.db.session() as s:
        yield s


def tenant(request: Request, authorization: Annotated[Optional[str], Header()] = None) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "missing bearer API key (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})
    h = hash_key(authorization[7:].strip())
    cache = request.app.state.key_cache
    hit = cache.get(h)
    if hit and hit[1] > time.monotonic():
        return hit[0]
    with request.app.state.db.session() as s:
        t = s.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == h, ApiKey.revoked.is_(False)))
    if t is None:
        raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    cache[h] = (t, time.monotonic() + KEY_CACHE_S)
    return t


Session = Annotated[object, Depends(db_session)]
Tenant = Annotated[str, Depends(tenant)]
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


# --------------------------------------------------------------------------- cursor pagination
def encode_cursor(created_at: datetime, id_: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{id_}".encode()).decode()


def decode_cursor(cursor: str):
    try:
        ts, id_ = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(ts), id_
    except Exception:
        raise unprocessable(["query", "cursor"], "not a cursor returned by this API")


def page(s, stmt, model, limit: int, cursor: Optional[str], view) -> dict:
    """One page of ``stmt`` (newest first) as ``{"items": [view(row)], "next_cursor"}``."""
    if cursor:
        ts, id_ = decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < id_)))
    rows = s.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).all()
    nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return {"items": [view(r) for r in rows[:limit]], "next_cursor": nxt}
