"""What a server says of its rate limits, heeded end to end: driver, limiter and fake server on loopback.

OpenAI's ``x-ratelimit-*`` headers on answers pace a model before its budget runs out; a gateway's
per-model 429 with only ``llm_provider-retry-after`` is waited out for that model alone.
"""

from __future__ import annotations

import asyncio
import time

from airflow_llm_async import driver
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.testing.fake_server import FakeLLMServer, RateLimit
from tests.integration.conftest import API_KEY, point_connection

REQUEST = {"messages": [{"role": "user", "content": "Summarize: the triggerer waits on the network."}]}
# The scenario: the server admits BUDGET requests of gpt-4 per WINDOW_S; 3 x BUDGET calls, 3 at a time.
BUDGET, WINDOW_S, CALLS, CAP = 5, 1.0, 15, 3


async def ask(conn_id: str, model: str = "gpt-4", **options) -> Outcome:
    return await driver.complete(CallSpec.of(REQUEST, [conn_id], [model], **options))


async def refused_calls(monkeypatch, conn_id: str, *, headers: bool) -> tuple[int, list[Outcome]]:
    """The 429s the server answered while CALLS calls ran, with its x-ratelimit-* headers or without."""
    limits = {"gpt-4": RateLimit(requests=BUDGET, window=WINDOW_S)}
    async with FakeLLMServer(
        api_key=API_KEY, latency=0.05, rate_limits=limits, rate_limit_headers=headers
    ) as srv:
        point_connection(monkeypatch, conn_id, srv.base_url, timeout=10, max_concurrency=CAP)
        async with asyncio.timeout(60):
            outcomes = await asyncio.gather(*(ask(conn_id, max_retries=20) for _ in range(CALLS)))
        return srv.stats()["by_status"].get("429", 0), outcomes


async def test_the_servers_remaining_budget_paces_the_model_before_the_429(monkeypatch):
    unpaced, blind = await refused_calls(monkeypatch, "llm_no_headers", headers=False)
    paced, heeded = await refused_calls(monkeypatch, "llm_headers", headers=True)
    said = f"{CALLS} calls, {BUDGET} admitted per {WINDOW_S:g} s"
    print(f"\n429s for {said}: {unpaced} without the headers, {paced} with")
    assert all(o.ok for o in blind) and all(o.ok for o in heeded)
    assert unpaced >= BUDGET  # without the headers the limit is found by running into it
    assert paced <= 1 < unpaced  # with them, at most a call in flight across a window's edge


async def test_a_gateways_per_model_429_is_waited_out_for_that_model_only(monkeypatch):
    # LiteLLM's proxy: the deployment's rpm is spent; 429 with llm_provider-retry-after: 1 and no retry-after.
    async with FakeLLMServer(api_key=API_KEY, latency=0.05, faults={"gpt-4": "429gateway*4"}) as srv:
        point_connection(monkeypatch, "llm_gateway", srv.base_url, timeout=10)
        started = time.monotonic()
        limited = [asyncio.create_task(ask("llm_gateway", max_retries=2)) for _ in range(4)]
        async with asyncio.timeout(10):
            await srv.wait_for(lambda s: s["faults_applied"].get("429gateway") == 4 and s["in_flight"] == 0)
            others = await asyncio.gather(*(ask("llm_gateway", "gpt-4o") for _ in range(8)))
            others_s = time.monotonic() - started
            outcomes = await asyncio.gather(*limited)
        limited_s = time.monotonic() - started
    for outcome in outcomes:
        assert [(a.model, a.status, a.result) for a in outcome.attempts] == [
            ("gpt-4", 429, "error"),
            ("gpt-4", 200, "ok"),
        ]
    assert limited_s >= 1.0  # the forwarded retry-after: 1 s, waited before the retry
    # The other model's 8 calls went while gpt-4 waited: one round trip, no back-off of theirs.
    assert all(o.ok and len(o.attempts) == 1 for o in others)
    assert others_s < 0.9, f"gpt-4o's calls took {others_s:.2f} s"
