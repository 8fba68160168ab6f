"""A plain redis-py client for the broker URL (used for adapt replies: one Redis list per request)."""
from __future__ import annotations

from urllib.parse import urlparse

import redis


def redis_client(url: str) -> redis.Redis:
    if url.startswith("redis+socket://"):
        u = urlparse(url)
        return redis.Redis(unix_socket_path=u.path)
    return redis.Redis.from_url(url)


def reply_key(request_id: str) -> str:
    return f"metashrink:adapt-reply:{request_id}"
