"""The test Redis (127.0.0.1:6379) that the e2e connections share state through: checked, and cleared
of a test's keys that an earlier session (or run) left, so a test starts from nothing."""

from __future__ import annotations

import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"


def fresh_redis(needed_by: str, *patterns: str) -> redis.Redis:
    """The test Redis, without keys matching ``patterns``; if it is down, the test fails naming who needs it.

    ``needed_by``: what keeps its state there, e.g. "connection llm_cache".
    """
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
        for pattern in patterns:
            stale = list(client.scan_iter(pattern))
            if stale:
                client.delete(*stale)
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"{needed_by} keeps its state in Redis at 127.0.0.1:6379, which is down: {exc}")
    return client
