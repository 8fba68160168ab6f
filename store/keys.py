"""API keys: only a SHA-256 hash of the key is stored. A key is revoked (``revoked``, ``revoked_at``), never
deleted, so the record of who held which key stays; the API checks the key on every request (api.deps), so a
revocation holds from the next request on, in every API process."""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update

from .models import ApiKey, new_id, utcnow


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session, tenant: str, admin: bool = False) -> str:
    """A new key for ``tenant`` (``admin``: it may also manage keys, /v1/admin/keys). Returns the key itself,
    which is never stored: show it once."""
    return create_key_row(session, tenant, admin)[1]


def create_key_row(session, tenant: str, admin: bool = False) -> tuple[ApiKey, str]:
    key = "msk_" + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant=tenant, key_hash=hash_key(key), prefix=key[:10], admin=bool(admin),
                 revoked=False, created_at=utcnow())
    session.add(row)
    session.flush()
    return row, key


def key_for(conn, key: str):
    """``(tenant, admin)`` of an unrevoked key, or None: one query on the unique key_hash index (``conn``: a
    session or a connection)."""
    return conn.execute(select(ApiKey.tenant, ApiKey.admin)
                           .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False))).first()


def tenant_for_key(session, key: str) -> str | None:
    row = key_for(session, key)
    return row.tenant if row else None


def list_keys(session, tenant: str | None = None, include_revoked: bool = True) -> list[ApiKey]:
    stmt = select(ApiKey)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked.is_(False))
    return list(session.scalars(stmt.order_by(ApiKey.created_at.desc(), ApiKey.id.desc())))


def revoke_key(session, key_id: str) -> ApiKey | None:
    """Revoke by id (idempotent: an already revoked key keeps its first ``revoked_at``). None: no such key."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked.is_(False))
                    .values(revoked=True, revoked_at=utcnow()).execution_options(synchronize_session=False))
    row = session.get(ApiKey, key_id)
    if row is not None:
        session.refresh(row)
    return row


def key_view(k: ApiKey) -> dict:
    """What the API and the CLI show of a key: never its hash."""
    return {"id": k.id, "tenant": k.tenant, "prefix": k.prefix, "admin": bool(k.admin),
            "created_at": k.created_at, "revoked_at": k.revoked_at, "revoked": bool(k.revoked)}
