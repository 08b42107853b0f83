"""A budget_usd shared through Redis by three processes, as three triggerers share it (issue 14).

Three OS processes (spawned: each its own interpreter and event loop, as triggerers are) make 100
concurrent calls each through ``driver.complete`` on one connection whose ``budget_usd`` admits 40
worst cases, against one fake server process that holds every request it gets until all 300 calls
are either held there or refused: nothing is settled before the last reservation, the hardest
case. The server counts what reached it. Needs the Redis at 127.0.0.1:6379 (fails, never skips,
without it).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import time
import uuid

import httpx
import pytest
from redis import Redis

from airflow_llm_async import budget_store
from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.integration.conftest import API_KEY

REDIS_URL = "redis://127.0.0.1:6379/0"
PROCESSES, CALLS = 3, 100
# max_tokens just above what the fake server answers (56 tokens): an answer costs about its worst
# case, so a ledger per process (3 x 40 answers) would spend far past the budget.
REQUEST = {"messages": [{"role": "user", "content": "Summarize the day's articles."}], "max_tokens": 60}
WORST = DEFAULT_PRICES["gpt-4"].cost(estimate_prompt_tokens(REQUEST), completion_budget(REQUEST))
ADMITS = 40
BUDGET = WORST * (ADMITS + 0.5)


def _triggerer(conn_id: str, start, events) -> None:
    """One 'triggerer': 100 concurrent calls on its own loop; reports each refusal as it happens."""
    from airflow_llm_async import driver
    from airflow_llm_async.core.outcome import CallSpec

    async def calls() -> list[dict]:
        async def one() -> dict:
            outcome = await driver.complete(CallSpec.of(REQUEST, [conn_id], ["gpt-4"], max_retries=0))
            result = {
                "ok": outcome.ok,
                "kind": outcome.error.kind if outcome.error else None,
                "cost_usd": outcome.cost_usd,
                "sent": sum(
                    1 for a in outcome.attempts if not (a.reason and a.reason.get("kind") == "budget")
                ),
            }
            if not outcome.ok:
                events.put(("refused", result))
            return result

        return await asyncio.gather(*(one() for _ in range(CALLS)))

    start.wait()  # every process ready (imported, loop about to start): the calls begin together
    events.put(("done", asyncio.run(calls())))


@pytest.fixture
def conn_id():
    conn_id = f"llm_budget3_{uuid.uuid4().hex[:8]}"
    yield conn_id
    client = Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{budget_store.KEY_PREFIX}{conn_id}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.slow  # three spawned processes import the provider and Airflow
def test_three_processes_and_300_concurrent_calls_never_spend_past_the_budget(conn_id, monkeypatch):
    with FakeServerProcess(api_key=API_KEY) as server:
        extra = {"default_model": "gpt-4", "rate_limit_backend": REDIS_URL, "budget_usd": {"usd": BUDGET}}
        conn = {"conn_type": "llm", "host": server.base_url, "password": API_KEY, "extra": extra}
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))  # the children inherit it
        server.hold()  # every admitted request waits at the server: nothing settles before the last reserve
        context = multiprocessing.get_context("spawn")
        start, events = context.Barrier(PROCESSES), context.Queue()
        workers = [
            context.Process(target=_triggerer, args=(conn_id, start, events)) for _ in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        try:
            reports: list[list[dict]] = []
            refused = _wait_until_held_or_refused(server, events, reports)
            server.release()
            results = _drain(events, reports)
        finally:
            server.release()
            for worker in workers:
                worker.join(timeout=60)
                if worker.is_alive():
                    worker.kill()
        stats = _stats(server)
    answered = [r for r in results if r["ok"]]
    spent = sum(r["cost_usd"] for r in answered)
    print(
        f"budget ${BUDGET:.6f} ({ADMITS} worst cases of ${WORST:.6f}); {len(answered)} answered, spent "
        f"${spent:.6f}, {len(results) - len(answered)} refused; server saw {stats['requests']} requests"
    )
    assert len(results) == PROCESSES * CALLS and refused == len(results) - len(answered)
    assert spent <= BUDGET + WORST
    assert len(answered) == ADMITS  # all reservations at their worst case, none settled yet
    assert all(r["kind"] == "budget" and r["sent"] == 0 for r in results if not r["ok"])
    assert stats["requests"] == len(answered)  # a refused call never reached the server
    assert all(worker.exitcode == 0 for worker in workers)


def _stats(server: FakeServerProcess) -> dict:
    # A connection of its own each time: the server resets requests on connections idle past 5 s
    # (its keep-alive, as uvicorn's), and the processes may take longer than that to finish.
    return httpx.get(server.base_url.removesuffix("/v1") + "/_fake/stats", timeout=10).json()


def _wait_until_held_or_refused(
    server: FakeServerProcess, events, reports: list, timeout: float = 120.0
) -> int:
    """Every call is either held at the server or refused: the refusals seen so far. A process whose
    calls were all refused reports its results meanwhile (into ``reports``)."""
    refused, deadline = 0, time.monotonic() + timeout
    while _stats(server)["held"] + refused < PROCESSES * CALLS:
        if time.monotonic() > deadline:
            raise AssertionError(f"{_stats(server)['held']} held and {refused} refused after {timeout} s")
        try:
            kind, payload = events.get(timeout=0.05)
        except queue.Empty:
            continue
        if kind == "done":
            assert not any(r["ok"] for r in payload), (
                "a call was answered while the server held every request"
            )
            reports.append(payload)
        else:
            refused += 1
    return refused


def _drain(events, reports: list) -> list[dict]:
    """Every process's results, once all have reported."""
    while len(reports) < PROCESSES:
        kind, payload = events.get(timeout=120)
        if kind == "done":
            reports.append(payload)
    return [result for batch in reports for result in batch]
