"""A 429 storm met with the default settings: 20 calls, 80 % of requests refused for 5 s.

The connection sets nothing about limits or retries (no ``requests_per_minute``, ``max_retries`` 2,
``rate_limit_patience_s`` 120 s); the fake server answers 429 with ``retry-after-ms: 300``. Every
call must outlast the storm, every refusal must have gone through the connection's limiter (a
retry is a new request through it), and the server must see only the refusals and one answer per
call. The same storm with ``rate_limit_patience_s: 0`` (429s counted as ``max_retries``, the old
behaviour) loses about half the calls: what the patience is for.
"""

from __future__ import annotations

import asyncio

import pytest

from airflow_llm_async import limits
from airflow_llm_async.hooks.llm import shared_endpoint
from airflow_llm_async.testing.fake_server import FakeLLMServer
from tests.integration.conftest import API_KEY, chat_trigger, point_connection

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a 5 s storm, twice

CALLS = 20
STORM_S = 5.0
REQUEST = {"messages": [{"role": "user", "content": "Summarise the storm"}], "max_tokens": 50}


async def storm(monkeypatch, **extra) -> tuple[list[dict], dict, dict]:
    """Run CALLS triggers through a STORM_S-second storm; their payloads, the server's and limiter's stats."""
    async with FakeLLMServer(api_key=API_KEY, retry_after_ms=300) as server:
        point_connection(monkeypatch, "llm_storm", server.base_url, default_model="gpt-4", **extra)
        server.set_fault("gpt-4", "429%80")
        asyncio.get_running_loop().call_later(STORM_S, server.set_fault, "gpt-4", None)
        payloads = await asyncio.gather(*(one_call(i) for i in range(CALLS)))
        limiter = limits.limiter_for(await shared_endpoint("llm_storm"))
        return payloads, server.stats(), limiter.stats()


async def one_call(i: int) -> dict:
    request = {**REQUEST, "messages": [{"role": "user", "content": f"Storm call {i}"}]}
    events = [event async for event in chat_trigger(request, conn_id="llm_storm").run()]
    assert len(events) == 1
    return events[0].payload


async def test_every_call_outlasts_a_5_s_storm_of_429s_with_the_default_settings(monkeypatch):
    payloads, server, limiter = await storm(monkeypatch)
    failed = [p["error"]["message"] for p in payloads if p["status"] != "success"]
    assert not failed, failed
    refused, answered = server["by_status"].get("429", 0), server["by_status"].get("200", 0)
    # One answer per call, every other request a refusal: no call was sent twice.
    assert (answered, server["requests"]) == (CALLS, refused + answered)
    # Every refusal came back through the connection's limiter, which cut the model's pace.
    assert limiter["rate_limited"] == refused
    # Bounded: the retries thin out as the storm goes on (each waits at least the server's 300 ms and
    # a back-off that doubles per refusal), so no call makes more than 10 requests in 5 s (a retry
    # every 300 ms would be 17), and the storm costs a few refusals per call, as 80 % refusals do.
    per_call = [sum(a["status"] == 429 for a in p["meta"]["attempts"]) for p in payloads]
    assert sum(per_call) == refused and max(per_call) < 10, per_call
    assert refused <= 8 * CALLS, per_call
    print(
        f"\n429 storm ({STORM_S:g} s, 80 %, retry-after-ms 300), {CALLS} calls, default settings: "
        f"{CALLS - len(failed)} of {CALLS} succeeded; {server['requests']} requests = {refused} refusals "
        f"+ {answered} answers; refusals per call max {max(per_call)}, mean {refused / CALLS:.1f}; "
        f"longest call {max(p['meta']['latency_s'] for p in payloads):.1f} s"
    )


async def test_counting_429s_as_retries_loses_calls_to_the_same_storm(monkeypatch):
    payloads, server, _ = await storm(monkeypatch, rate_limit_patience_s=0)
    failed = [p for p in payloads if p["status"] != "success"]
    assert failed and all(p["error"]["kind"] == "rate_limit" for p in failed)
    print(
        f"\nthe same storm with rate_limit_patience_s 0 (429s counted, max_retries 2): "
        f"{CALLS - len(failed)} of {CALLS} succeeded; {server['by_status'].get('429', 0)} refusals"
    )
