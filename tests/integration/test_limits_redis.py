"""The Redis backend of the rate limiter, against the real Redis at 127.0.0.1:6379.

These tests need that Redis: if it cannot be reached they fail (they never skip). Each test
uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from airflow_llm_async import limits, limits_redis
from airflow_llm_async.core.buckets import Limits, LocalBuckets
from airflow_llm_async.core.protocol import Endpoint
from airflow_llm_async.limits import ConnectionLimiter, limiter_for
from airflow_llm_async.limits_redis import KEY_PREFIX, RedisBuckets, wait_for_adjustments

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.parked = asyncio.Event()
        self.park = False

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.park:
            self.parked.set()
            await asyncio.Event().wait()
        self.now += seconds


@pytest.fixture
async def redis_client():
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
        problem = None
    except (RedisError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        await client.aclose()
    if problem:  # outside the except block: one clear line, no chained traceback
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({problem}). These tests need a running Redis 7 "
            f"there, e.g. `redis-server --port 6379 --save ''`.",
            pytrace=False,
        )
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:ratelimit:{uuid.uuid4().hex}:"
    yield prefix
    await wait_for_adjustments()
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture(autouse=True)
async def _close_limiters():
    yield
    await limits.close_loop_limiters()


def shared_buckets(prefix, clock, rpm=None, tpm=None, conn_id="conn") -> RedisBuckets:
    limits = Limits(None, rpm, tpm, REDIS_URL)
    fallback = LocalBuckets(rpm, tpm, clock)
    return RedisBuckets.for_url(REDIS_URL, conn_id, limits, fallback=fallback, key_prefix=prefix, clock=clock)


async def levels(client: Redis, key: str) -> tuple[float, float]:
    requests, tokens = await client.hmget(key, "requests", "tokens")
    return float(requests), float(tokens)


# --- the script -------------------------------------------------------------------------------


async def test_script_paces_like_the_local_bucket(prefix):
    clock = FakeClock()
    buckets = shared_buckets(prefix, clock, rpm=60)
    assert [await buckets.reserve(0) for _ in range(12)] == [0.0] * 10 + [1.0, 2.0]
    clock.now += 2.5
    assert await buckets.reserve(0) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
async def test_script_agrees_with_local_buckets_step_by_step(prefix, seed):
    """Differential: the same random operations on the Lua buckets and on LocalBuckets."""
    rng = random.Random(seed)
    clock = FakeClock()
    rpm, tpm = rng.choice([None, 30, 600]), rng.choice([None, 1000, 90_000])
    if rpm is None and tpm is None:
        rpm = 120
    remote = shared_buckets(prefix, clock, rpm, tpm, conn_id=f"c{seed}")
    local = LocalBuckets(rpm, tpm, clock)
    for step in range(150):
        operation = rng.choice(["reserve", "reserve", "reserve", "settle", "refund", "throttle", "drain"])
        if operation in ("throttle", "drain"):
            # Takes effect at the next script call: compare at the same instant.
            if operation == "throttle":
                fraction = rng.choice([1.0, 0.5, 0.25])
                remote.set_throttle(fraction)
                local.set_throttle(fraction)
            else:
                remote.drain()
                local.drain()
            assert await remote.reserve(5) == pytest.approx(local.reserve_now(5), abs=1e-9), step
        else:
            clock.now += rng.choice([0.0, 0.05, 0.5, 3.0, 30.0])
            tokens = rng.randint(1, 3000)
            if operation == "reserve":
                assert await remote.reserve(tokens) == pytest.approx(local.reserve_now(tokens), abs=1e-9), (
                    step
                )
            else:
                requests = -1 if operation == "refund" else 0
                sign = -1 if operation == "refund" else rng.choice([-1, 1])
                remote.adjust(requests, sign * tokens)
                local.adjust(requests, sign * tokens)
                await wait_for_adjustments()
        for name, value in local.snapshot().items():
            expected = None if value is None else pytest.approx(value, rel=1e-9, abs=1e-6)
            assert remote.snapshot()[name] == expected, (step, name)


async def test_two_hosts_share_one_bucket(prefix):
    clock = FakeClock()
    host_a = shared_buckets(prefix, clock, rpm=60, tpm=6000)
    host_b = shared_buckets(prefix, clock, rpm=60, tpm=6000)
    assert [await host_a.reserve(100) for _ in range(10)] == [0.0] * 10  # the whole burst
    assert await host_b.reserve(100) == 1.0
    assert await host_a.reserve(100) == 2.0


async def test_settle_and_refund_reach_redis(redis_client, prefix):
    clock = FakeClock()
    buckets = shared_buckets(prefix, clock, rpm=60, tpm=6000)
    await buckets.reserve(800)
    assert await levels(redis_client, buckets.key) == (9.0, 200.0)
    buckets.adjust(0, 300 - 800)  # used 300 of 800
    await wait_for_adjustments()
    assert await levels(redis_client, buckets.key) == (9.0, 700.0)
    buckets.adjust(-1, -300)  # a cancelled call gives everything back
    await wait_for_adjustments()
    assert await levels(redis_client, buckets.key) == (10.0, 1000.0)


async def test_throttle_and_drain_apply_to_the_shared_bucket(prefix):
    clock = FakeClock()
    buckets = shared_buckets(prefix, clock, rpm=600)
    buckets.set_throttle(0.5)
    buckets.drain()
    assert await buckets.reserve(0) == pytest.approx(0.2)  # empty, refilling at 5/s
    assert await buckets.reserve(0) == pytest.approx(0.4)


async def test_the_key_expires_once_the_buckets_would_be_full(redis_client, prefix):
    clock = FakeClock()
    buckets = shared_buckets(prefix, clock, rpm=60, tpm=600)
    await buckets.reserve(100)  # the token bucket is empty: 10 s to refill at 10/s
    ttl_ms = await redis_client.pttl(buckets.key)
    assert 10_000 < ttl_ms <= 11_000


async def test_by_default_the_script_reads_the_redis_clock(prefix):
    limits = Limits(None, 6, None, REDIS_URL)
    fallback = LocalBuckets(6, None)
    buckets = RedisBuckets.for_url(REDIS_URL, "clockless", limits, fallback=fallback, key_prefix=prefix)
    assert await buckets.reserve(0) == 0.0  # burst of one
    assert 0.0 < await buckets.reserve(0) <= 10.0  # then one per 10 s


# --- the limiter with Redis buckets -----------------------------------------------------------


async def test_concurrency_stays_local_while_the_buckets_are_shared(prefix):
    clock = FakeClock()
    limits = Limits(1, 60, None, REDIS_URL)
    host_a, host_b = (
        ConnectionLimiter(
            "conn", limits, clock=clock, sleep=clock.sleep, buckets=shared_buckets(prefix, clock, 60)
        )
        for _ in range(2)
    )
    async with host_a.slot(), host_b.slot():  # a cap of 1 per host: both are in flight at once
        assert host_a.stats()["in_flight"] == host_b.stats()["in_flight"] == 1
    for _ in range(4):
        async with host_a.slot():
            pass
    for _ in range(4):
        async with host_b.slot():
            pass
    assert clock.now == 1000.0  # 10 between them, all within the shared burst
    async with host_b.slot() as permit:
        assert permit.granted_at == 1001.0
    assert host_b.stats()["backend"] == "redis"
    assert host_b.stats()["requests_available"] == -1.0
    assert host_a.stats()["requests_available"] == 4.0  # each host sees the level of its own last call


async def test_cancelling_a_waiter_gives_its_reservation_back_in_redis(redis_client, prefix):
    clock = FakeClock()
    buckets = shared_buckets(prefix, clock, rpm=60, tpm=6000)
    limiter = ConnectionLimiter(
        "conn", Limits(None, 60, 6000, REDIS_URL), clock=clock, sleep=clock.sleep, buckets=buckets
    )
    async with limiter.slot(1000) as permit:
        permit.settle(1000)
    clock.park = True
    waiter = asyncio.create_task(limiter.slot(500).__aenter__())
    await clock.parked.wait()
    assert await levels(redis_client, buckets.key) == (8.0, -500.0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await wait_for_adjustments()
    assert await levels(redis_client, buckets.key) == (9.0, 0.0)
    assert limiter.stats()["in_flight"] == limiter.stats()["waiting"] == 0


async def test_a_caller_cancelled_during_the_script_call_leaves_nothing_reserved(redis_client, prefix):
    clock = FakeClock()
    buckets = shared_buckets(prefix, clock, rpm=60, tpm=6000)
    reserving = asyncio.create_task(buckets.reserve(700))
    await asyncio.sleep(0)  # the script call is on its way
    reserving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reserving
    await wait_for_adjustments()  # the call finished, then gave its reservation back
    assert await levels(redis_client, buckets.key) == (10.0, 1000.0)


async def test_limiter_for_uses_redis_when_the_connection_names_it(redis_client):
    conn_id = f"test-{uuid.uuid4().hex}"
    try:
        limiter = limiter_for(Endpoint(conn_id, requests_per_minute=60, rate_limit_backend=REDIS_URL))
        async with limiter.slot(10):
            pass
        assert limiter.stats()["backend"] == "redis"
        assert await redis_client.hget(f"{KEY_PREFIX}{conn_id}", "requests") == b"9"
    finally:
        await redis_client.delete(f"{KEY_PREFIX}{conn_id}")


async def test_unreachable_redis_falls_back_to_local_buckets_and_says_so(caplog):
    url = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
    clock = FakeClock()
    limits = Limits(None, 60, None, url)
    buckets = RedisBuckets.for_url(url, "conn", limits, fallback=LocalBuckets(60, None, clock), clock=clock)
    limiter = ConnectionLimiter("conn", limits, clock=clock, sleep=clock.sleep, buckets=buckets)
    with caplog.at_level(logging.WARNING, logger=limits_redis.__name__):
        for _ in range(11):
            async with limiter.slot():
                pass
    assert clock.now == 1001.0  # paced by the local buckets: a burst of 10, then one per second
    assert buckets.down and limiter.stats()["requests_available"] == 0.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # once, not per call
    assert "redis://127.0.0.1:1/0" in warnings[0] and "in this process only" in warnings[0]
    assert "hunter2" not in caplog.text
