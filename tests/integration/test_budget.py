"""A connection's budget_usd: calls against the fake server, in one process and through Redis.

The Redis tests need the real Redis at 127.0.0.1:6379 and fail (never skip) without it. Each test
uses its own connection id, so its keys are its own, and deletes them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import pytest
from redis.asyncio import Redis

from airflow_llm_async import budget_store, driver, limits_redis
from airflow_llm_async.core.budget import BudgetConfig, Reservation
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.core.protocol import Endpoint
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens
from airflow_llm_async.monitor import budgets as monitor_budgets
from tests.integration.conftest import point_connection

REDIS_URL = "redis://127.0.0.1:6379/0"
REQUEST = {"messages": [{"role": "user", "content": "Summarize the day's articles."}], "max_tokens": 200}
WORST = DEFAULT_PRICES["gpt-4"].cost(estimate_prompt_tokens(REQUEST), completion_budget(REQUEST))


@pytest.fixture(autouse=True)
def empty_ledger():
    budget_store.forget()
    yield
    budget_store.forget()


@pytest.fixture
async def redis_keys():
    """A connection id of the test's own; its budget keys are deleted afterwards."""
    conn_id = f"llm_budget_{uuid.uuid4().hex[:8]}"
    yield conn_id
    client = Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{budget_store.KEY_PREFIX}{conn_id}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def call(conn_ids: list[str], model: str = "gpt-4") -> dict:
    outcome = await driver.complete(CallSpec.of(REQUEST, conn_ids, [model]))
    return {"status": outcome.status, "meta": outcome.meta(), "error": outcome.error}


async def test_calls_stop_at_the_budget_and_the_refused_one_never_reaches_the_server(fake_llm, monkeypatch):
    # Room for two worst cases (and a bit), not three: each answer really costs far less than its
    # worst case, so what is held shrinks after each call; the limit is reached on spending.
    point_connection(
        monkeypatch, "llm_budget", fake_llm.base_url, default_model="gpt-4", budget_usd={"usd": WORST * 2.5}
    )
    results = []
    while len(results) < 100:
        results.append(await call(["llm_budget"]))
        if results[-1]["status"] != "success":
            break
    answered = results[:-1]
    refused = results[-1]
    spent = sum(result["meta"]["cost_usd"] for result in answered)
    assert refused["status"] == "error" and refused["error"].kind == "budget"
    assert "budget_usd of $" in refused["error"].message and "would be exceeded" in refused["error"].message
    # Refused once the spending plus the next worst case would pass the limit, and not before.
    assert spent + WORST > WORST * 2.5 >= spent
    assert fake_llm.stats()["requests"] == len(answered)  # the refused call sent nothing
    assert refused["meta"]["attempts"][-1]["reason"]["kind"] == "budget"


async def test_a_refused_connection_falls_back_to_another(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_poor", fake_llm.base_url, default_model="gpt-4", budget_usd=WORST / 2)
    point_connection(monkeypatch, "llm_rich", fake_llm.base_url, default_model="gpt-4")
    result = await call(["llm_poor", "llm_rich"])
    assert result["status"] == "success" and result["meta"]["conn_id"] == "llm_rich"
    assert [a["conn_id"] for a in result["meta"]["attempts"]] == ["llm_poor", "llm_rich"]
    assert fake_llm.stats()["requests"] == 1


async def test_an_unpriced_model_cannot_be_bounded_so_it_is_refused(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_budget", fake_llm.base_url, budget_usd={"usd": 100, "per": "month"})
    result = await call(["llm_budget"], model="fake-model")
    assert result["error"].kind == "budget"
    assert "budget_usd of $100 per month (UTC)" in result["error"].message
    assert "no price is known for model 'fake-model'" in result["error"].message
    assert fake_llm.stats()["requests"] == 0


async def test_a_failed_attempt_gives_its_reservation_back(fake_llm, monkeypatch):
    point_connection(
        monkeypatch,
        "llm_budget",
        fake_llm.base_url,
        default_model="gpt-4",
        budget_usd=WORST * 1.5,
        max_retries=0,
    )
    fake_llm.set_fault("gpt-4", "500*3")
    for _ in range(3):  # each held the worst case, which alone leaves no room for a second
        assert (await call(["llm_budget"]))["meta"]["error"]["kind"] == "server"
    assert (await call(["llm_budget"]))["status"] == "success"
    assert fake_llm.stats()["requests"] == 4


def redis_endpoint(conn_id: str, usd: float) -> Endpoint:
    return Endpoint(conn_id, rate_limit_backend=REDIS_URL, budget_usd=BudgetConfig(usd))


async def test_redis_holds_the_budget_across_processes(redis_keys):
    """Two event loops in two threads, each with its own Redis client, as two triggerers would be:
    60 reservations of $0.10 against $1.00 admit exactly ten in all."""
    endpoint = redis_endpoint(redis_keys, 1.0)

    def host() -> list:
        async def reserve_many() -> list:
            try:
                return await asyncio.gather(*(budget_store.reserve(endpoint, 0.1) for _ in range(30)))
            finally:
                await limits_redis.close_clients()

        return asyncio.run(reserve_many())

    results: list = []
    threads = [threading.Thread(target=lambda: results.extend(host())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 60
    assert sum(isinstance(result, Reservation) for result in results) == 10
    # The process's own ledger was not used: Redis held it all.
    assert budget_store._ledger.held_usd(redis_keys, endpoint.budget_usd, time.time()) == 0.0


async def test_redis_settles_to_the_real_cost(redis_keys):
    endpoint = redis_endpoint(redis_keys, 1.0)
    held = await budget_store.reserve(endpoint, 0.9)
    assert isinstance(await budget_store.reserve(endpoint, 0.2), str)
    await budget_store.settle(endpoint, held, 0.05)
    assert isinstance(await budget_store.reserve(endpoint, 0.9), Reservation)
    client = Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{budget_store.KEY_PREFIX}{redis_keys}:*")]
    assert len(keys) == 1 and int(await client.get(keys[0])) == 950_000_000
    assert 86400 < await client.ttl(keys[0]) <= 2 * 86400  # the day's end plus a day's grace
    await client.aclose()
    await limits_redis.close_clients()


async def test_an_unreachable_redis_falls_back_to_the_process_ledger(caplog):
    endpoint = Endpoint(
        "llm_budget_down", rate_limit_backend="redis://127.0.0.1:1/0", budget_usd=BudgetConfig(1.0)
    )
    with caplog.at_level(logging.WARNING, logger="airflow_llm_async.budget_store"):
        held = await budget_store.reserve(endpoint, 0.6)
    assert isinstance(held, Reservation)
    assert "budget backend redis://127.0.0.1:1/0 failed" in caplog.text
    assert "in this process only" in caplog.text
    assert isinstance(await budget_store.reserve(endpoint, 0.6), str)  # the process ledger holds it
    budget_store._down_until.clear()
    await limits_redis.close_clients()


async def test_the_monitor_reads_what_the_shared_ledger_holds(redis_keys):
    endpoint = redis_endpoint(redis_keys, 1.0)
    now = time.time()
    assert monitor_budgets.spent_in_redis(REDIS_URL, redis_keys, endpoint.budget_usd, now) == 0.0
    await budget_store.settle(endpoint, await budget_store.reserve(endpoint, 0.5), 0.125)
    await budget_store.reserve(endpoint, 0.25)  # in flight: held
    spent = monitor_budgets.spent_in_redis(REDIS_URL, redis_keys, endpoint.budget_usd, now)
    assert spent == pytest.approx(0.375)
    assert (
        monitor_budgets.spent_in_redis("redis://127.0.0.1:1/0", redis_keys, endpoint.budget_usd, now) is None
    )
    await limits_redis.close_clients()
