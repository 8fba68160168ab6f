"""API keys: only a SHA-256 hash of the key is stored."""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from .models import ApiKey, new_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session, tenant: str) -> str:
    key = "msk_" + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), tenant=tenant, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


def tenant_for_key(session, key: str) -> str | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False)))
    return row.tenant if row else None
