"""A plain redis-py client for the broker URL (used for adapt replies: one Redis list per request)."""
from __future__ import annotations

from urllib.parse import urlparse

import redis


# explicit, above BLPOP_SLICE: redis-py 8 defaults to a 5 s socket timeout, which a blocking pop of 5 s races
SOCKET_TIMEOUT = 10.0
BLPOP_SLICE = 2.0  # seconds one blocking pop waits; callers loop until their own deadline


def redis_client(url: str, retry: bool = True) -> redis.Redis:
    """``retry=False`` (the API): a lost connection is an error at once, never a silent reconnect to a broker
    that restarted without the request's message; the caller answers 503."""
    kw = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": 5.0}
    if not retry:
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        kw["retry"] = Retry(NoBackoff(), 0)
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=urlparse(url).path, **kw)
    return redis.Redis.from_url(url, **kw)


def reply_key(request_id: str) -> str:
    return f"metashrink:adapt-reply:{request_id}"


# DELETE of a model or adapter publishes "model:ID" / "adapter:ID" here; adapt processes drop what they hold of it
# (worker/resident.py)
EVICT_CHANNEL = "metashrink:adapt-evict"
