"""API keys, for admin keys only (403 for any other key): list, create (the key is answered once), revoke.

A revoked key is refused (401) from the very next request on, in every API process: ``api.deps`` checks the key
against the database on every request. ``metashrink keys create|list|revoke`` does the same on the database
directly (the first admin key comes from ``metashrink keys create --admin``).
"""

from typing import Annotated, Optional

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from schemas.api import KeyCreate, KeyCreated, KeyPage
from store.keys import create_key_row, key_view, revoke_key
from store.models import ApiKey

from ..bodies import read_json
from ..deps import Admin, Cursor, Limit, Session, page
from ..errors import ApiError, json_body

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"])


@router.get("", response_model=KeyPage)
def list_keys(s: Session, _: Admin, tenant: Annotated[Optional[str], Query(max_length=128)] = None,
              limit: Limit = 100, cursor: Cursor = None):
    """Every tenant's keys, newest first (revoked ones included, with ``revoked_at``); never their hashes."""
    stmt = select(ApiKey)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return page(s, stmt, ApiKey, limit, cursor, key_view)


@router.post("", status_code=201, response_model=KeyCreated, openapi_extra=json_body(KeyCreate))
async def create_key(request: Request, _: Admin):
    """A new key for a tenant (``admin``: it may manage keys too). The answer holds the key itself, once."""
    req = await read_json(request, 4096, KeyCreate, object_msg="body must be a JSON object")

    def create():
        with request.app.state.db.session() as s:
            row, key = create_key_row(s, req.tenant, req.admin)
            return JSONResponse(KeyCreated(**key_view(row), key=key).model_dump(mode="json"), status_code=201)
    return await run_in_threadpool(create)


@router.delete("/{key_id}", status_code=204, response_class=Response)
def revoke(key_id: str, s: Session, _: Admin):
    """Revoke a key: refused from the next request on, in every API process. Idempotent (a revoked key keeps its
    first ``revoked_at``); the row stays, as a record."""
    if revoke_key(s, key_id) is None:
        raise ApiError(404, f"key {key_id} not found")
    return Response(status_code=204)
