"""The response cache against the fake server on loopback, in this process's store and in the real Redis.

The Redis tests need Redis at 127.0.0.1:6379 (as tests/integration/test_limits_redis.py): they fail,
never skip, without it. Every test asks its own prompt (a uuid in it), so no entry of another test or
run is found, and each uses a fresh per-process store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

import pytest
from redis.asyncio import Redis

from airflow_llm_async import cache_store, driver, limits
from airflow_llm_async.core import cache
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.quality import QualitySpec
from tests.integration.conftest import point_connection, wait_until
from tests.integration.test_metrics import statsd  # noqa: F401 (a fixture: Airflow's StatsD to a socket)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def clock():
    """A fresh per-process store on a clock the test moves."""
    now = [1_700_000_000.0]
    cache_store.reset_local(clock=lambda: now[0])
    yield now
    cache_store.reset_local()


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    await limits.close_loop_limiters()


def ask(prompt: str | None = None, *, models=("gpt-4",), conn_id="llm_fake", **options) -> CallSpec:
    prompt = prompt or f"Summarize the triggerer in one line ({uuid.uuid4().hex})"
    request = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 200}
    return CallSpec.of(request, [conn_id], list(models), **{"cache_ttl": 600.0, "max_retries": 0, **options})


async def test_a_second_identical_call_sends_nothing_and_says_so(fake_llm):
    spec = ask()
    first = await driver.complete(spec)
    second = await driver.complete(spec)
    assert fake_llm.stats()["requests"] == 1
    assert first.ok and not first.cache_hit and first.cost_usd > 0
    assert second.cache_hit and (second.text, second.model, second.usage) == (
        first.text,
        first.model,
        first.usage,
    )
    meta = second.meta()
    assert (meta["cache_hit"], meta["cost_usd"], meta["attempts"]) == (True, 0.0, [])
    # Another request (here: another temperature) is another key.
    await driver.complete(
        CallSpec.from_json({**spec.to_json(), "request": {**spec.request, "temperature": 1}})
    )
    assert fake_llm.stats()["requests"] == 2


async def test_without_cache_ttl_every_call_goes_to_the_server(fake_llm):
    spec = ask(cache_ttl=None)
    await driver.complete(spec)
    await driver.complete(spec)
    assert fake_llm.stats()["requests"] == 2


async def test_an_answer_that_failed_the_quality_gate_is_not_kept(fake_llm):
    fake_llm.set_fault("gpt-4", "short")  # "OK.": fails min_chars, returned anyway
    spec = ask(quality=QualitySpec(min_chars=20), on_quality_failure="return")
    first = await driver.complete(spec)
    assert first.ok and first.quality_failures
    fake_llm.set_fault("gpt-4", None)
    second = await driver.complete(spec)
    assert fake_llm.stats()["requests"] == 2 and not second.cache_hit and not second.quality_failures
    third = await driver.complete(spec)  # the good answer was kept
    assert third.cache_hit and third.text == second.text and fake_llm.stats()["requests"] == 2


async def test_an_entry_expires_after_the_ttl_on_the_stores_clock(fake_llm, clock):
    spec = ask(cache_ttl=60.0)
    await driver.complete(spec)
    clock[0] += 60
    assert (await driver.complete(spec)).cache_hit
    clock[0] += 0.5  # 60.5 s after it was stored
    assert not (await driver.complete(spec)).cache_hit
    assert fake_llm.stats()["requests"] == 2


async def test_an_answer_from_the_fallback_is_found_without_asking_the_primary_again(fake_llm):
    fake_llm.set_fault("gpt-4", "503")
    spec = ask(models=("gpt-4", "gpt-3.5-turbo"))
    first = await driver.complete(spec)
    assert first.fallback_used and first.requested_model == "gpt-3.5-turbo"
    assert fake_llm.stats()["by_model"] == {"gpt-4": 1, "gpt-3.5-turbo": 1}
    fake_llm.set_fault("gpt-4", None)
    second = await driver.complete(spec)
    assert second.cache_hit and second.fallback_used and second.text == first.text
    assert fake_llm.stats()["requests"] == 2  # the primary was not asked again


async def test_a_fan_out_sends_only_the_items_not_in_the_cache(fake_llm):
    base = ask()
    endpoints = await driver.resolve(base)
    tag = uuid.uuid4().hex
    items = [CallSpec.from_json({**base.to_json(), "request": {**base.request, "messages": [
        {"role": "user", "content": f"item {i} {tag}"}]}}) for i in range(6)]  # fmt: skip
    await driver.fan_out(items[:4], endpoints)
    assert fake_llm.stats()["requests"] == 4
    records = await driver.fan_out(items, endpoints)
    assert fake_llm.stats()["requests"] == 6  # only items 4 and 5
    assert [record["meta"].get("cache_hit", False) for record in records] == [True] * 4 + [False] * 2
    assert all(record["meta"]["cost_usd"] == 0.0 for record in records[:4])
    again = await driver.fan_out(items, endpoints)
    assert fake_llm.stats()["requests"] == 6
    assert [r["text"] for r in again] == [r["text"] for r in records]


async def test_a_hit_counts_in_the_metrics_and_spends_no_tokens(statsd, fake_llm):  # noqa: F811
    spec = ask()
    first = await driver.complete(spec)
    for _ in range(2):
        await driver.complete(spec)
    tags = {"conn_id": "llm_fake", "model": "gpt-4"}
    await wait_until(lambda: statsd.total("llm.calls", **tags) == 3)
    assert statsd.total("llm.cache_hits", **tags) == 2
    assert statsd.total("llm.attempts", **tags) == 1
    assert statsd.total("llm.prompt_tokens", **tags) == first.usage["prompt_tokens"]  # once, not thrice
    assert statsd.total("llm.cost_micro_usd", **tags) == pytest.approx(first.cost_usd * 1e6, abs=1)


# ---- Redis: one store for every process ---------------------------------------------------------------


@pytest.fixture
async def redis_client():
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
    except OSError as exc:
        await client.aclose()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); start one: redis-server --save ''")
    yield client
    await client.aclose()


def in_another_loop(spec: CallSpec):
    """What an independent process would see: a new event loop in its own thread, its own clients."""
    result = []
    thread = threading.Thread(target=lambda: result.append(driver.complete_sync(spec)))
    thread.start()
    thread.join(timeout=30)
    return result[0]


async def test_the_redis_backend_is_shared_by_independent_event_loops(fake_llm, monkeypatch, redis_client):
    point_connection(
        monkeypatch, "llm_shared", fake_llm.base_url, default_model="gpt-4", cache_backend=REDIS_URL
    )
    spec = ask(conn_id="llm_shared", cache_ttl=30.0)
    first = await asyncio.to_thread(in_another_loop, spec)
    cache_store.reset_local()  # nothing in this process's own store: a hit can only come from Redis
    key = cache.links(spec, await driver.resolve(spec))[0].key
    assert await redis_client.exists(key) == 1
    assert 29_000 <= await redis_client.pttl(key) <= 30_000  # Redis drops it after the storing call's TTL
    second = await asyncio.to_thread(in_another_loop, spec)
    third = await driver.complete(spec)  # and this loop
    assert fake_llm.stats()["requests"] == 1
    assert (second.cache_hit, third.cache_hit) == (True, True)
    assert second.text == third.text == first.text
    await redis_client.delete(key)


async def test_a_fan_out_reads_redis_in_one_round_trip(fake_llm, monkeypatch, redis_client):
    point_connection(
        monkeypatch, "llm_shared", fake_llm.base_url, default_model="gpt-4", cache_backend=REDIS_URL
    )
    base = ask(conn_id="llm_shared")
    endpoints = await driver.resolve(base)
    tag = uuid.uuid4().hex
    items = [CallSpec.from_json({**base.to_json(), "request": {**base.request, "messages": [
        {"role": "user", "content": f"item {i} {tag}"}]}}) for i in range(50)]  # fmt: skip
    await driver.fan_out(items, endpoints)
    store = cache_store.store_for(endpoints["llm_shared"])
    trips = []
    round_trip = store._round_trip

    async def counted(keys, puts):
        trips.append((len(keys), len(puts)))
        return await round_trip(keys, puts)

    monkeypatch.setattr(store, "_round_trip", counted)
    records = await driver.fan_out(items, endpoints)
    assert trips == [(50, 0)]  # one pipeline: every item's key, nothing to write
    assert all(record["meta"]["cache_hit"] for record in records) and fake_llm.stats()["requests"] == 50
    await redis_client.delete(*[cache.links(item, endpoints)[0].key for item in items])


async def test_an_unreachable_redis_costs_the_cache_not_the_call(fake_llm, monkeypatch, caplog):
    point_connection(
        monkeypatch, "llm_noredis", fake_llm.base_url, default_model="gpt-4",
        cache_backend="redis://:pw-redis-77@127.0.0.1:9/0",
    )  # fmt: skip
    spec = ask(conn_id="llm_noredis")
    with caplog.at_level(logging.WARNING, logger="airflow_llm_async.cache_store"):
        outcomes = [await driver.complete(spec) for _ in range(3)]
    assert all(outcome.ok and not outcome.cache_hit for outcome in outcomes)
    assert fake_llm.stats()["requests"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "airflow_llm_async.cache_store"]
    assert (
        len(warnings) == 1 and "skip the cache for 10 s" in warnings[0]
    )  # then it waits before trying again
    assert "pw-redis-77" not in warnings[0]
