"""The circuit breaker against the fake server: a dead primary (503) and a working fallback.

The issue's scenario without Airflow: many calls whose primary model answers 503. With the breaker
the dead primary sees its threshold of requests (plus one probe per cool-down), and the calls go to
the fallback at once; without it (extra ``circuit_breaker: false``) every call pays all its retries.
The Redis tests need the Redis at 127.0.0.1:6379 (they fail, never skip, without it).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from airflow_llm_async import breakers, driver, limits, limits_redis
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.testing.fake_server import FakeLLMServer
from tests.integration.conftest import API_KEY, point_connection, wait_until
from tests.integration.test_metrics import statsd  # noqa: F401 (a fixture)

PRIMARY, FALLBACK = "gpt-4", "gpt-3.5-turbo"
REQUEST = {"messages": [{"role": "user", "content": "Summarise the report"}], "max_tokens": 50}
REDIS_URL = "redis://127.0.0.1:6379/0"
THRESHOLD = 5  # the default


@pytest.fixture(autouse=True)
async def _fresh_breakers():
    breakers.reset()
    yield
    await limits_redis.wait_for_adjustments()
    await limits.close_loop_limiters()
    breakers.reset()


@pytest.fixture
async def dead_primary():
    async with FakeLLMServer(api_key=API_KEY, faults={PRIMARY: "503"}) as server:
        yield server


def connect(monkeypatch, server, conn_id="llm_breaker", **extra) -> str:
    point_connection(monkeypatch, conn_id, server.base_url, timeout=2, **extra)
    return conn_id


def spec(conn_id: str, models=(PRIMARY, FALLBACK), **options) -> CallSpec:
    return CallSpec.of(REQUEST, [conn_id], list(models), max_retries=2, **options)


def primary_requests(server) -> int:
    return server.stats()["by_model"].get(PRIMARY, 0)


def kinds(outcome) -> list[str | None]:
    return [attempt.reason and attempt.reason["kind"] for attempt in outcome.attempts]


async def test_sixty_calls_send_the_dead_primary_only_its_threshold_then_go_straight_to_the_fallback(
    dead_primary, monkeypatch
):
    conn_id = connect(monkeypatch, dead_primary)
    outcomes = [await driver.complete(spec(conn_id)) for _ in range(60)]
    assert all(o.ok and o.model == FALLBACK for o in outcomes)
    # Call 1: three 503s (its retries). Call 2: two more open the circuit; its back-off is not waited.
    assert primary_requests(dead_primary) == THRESHOLD
    assert kinds(outcomes[0]) == ["server", "server", "server", None]
    assert kinds(outcomes[1]) == ["server", "server", "circuit_open", None]
    assert all(kinds(o) == ["circuit_open", None] for o in outcomes[2:])
    assert "5 consecutive failures (last: HTTP 503)" in outcomes[2].attempts[0].reason["message"]
    assert dead_primary.stats()["by_model"][FALLBACK] == 60


async def test_with_the_breaker_off_every_call_pays_all_its_retries_on_the_dead_primary(
    dead_primary, monkeypatch
):
    conn_id = connect(monkeypatch, dead_primary, circuit_breaker=False)
    outcomes = [await driver.complete(spec(conn_id)) for _ in range(4)]
    assert all(o.ok and o.model == FALLBACK for o in outcomes)
    assert primary_requests(dead_primary) == 4 * 3


async def test_a_fan_out_whose_primary_is_dead_reaches_its_fallback_without_retrying_item_by_item(
    dead_primary, monkeypatch
):
    conn_id = connect(monkeypatch, dead_primary)
    endpoints = await driver.resolve(spec(conn_id))
    records = await driver.fan_out([spec(conn_id)] * 100, endpoints)
    assert all(r["meta"]["status"] == "success" and r["meta"]["model"] == FALLBACK for r in records)
    # Requests sent before the circuit opened cannot be called back (a fan-out starts its items
    # together, before the first 503 is back), but no item retried on the dead primary: at most one
    # request each, where 3 each (300) go out without the breaker.
    assert primary_requests(dead_primary) <= 100
    assert all(r["meta"]["attempts"] in (2, 3) for r in records)  # (503 or skip), then the fallback
    skipped_at_once = sum(1 for r in records if r["meta"]["attempts"] == 2)
    assert skipped_at_once + primary_requests(dead_primary) >= 100


async def test_after_the_cool_down_one_probe_closes_the_circuit_once_the_primary_is_back(
    dead_primary, monkeypatch
):
    conn_id = connect(monkeypatch, dead_primary, circuit_breaker={"cooldown_s": 0.3})
    for _ in range(2):
        await driver.complete(spec(conn_id))
    assert primary_requests(dead_primary) == THRESHOLD
    dead_primary.set_fault(PRIMARY, None)
    answered_by = []
    while FALLBACK in answered_by[-1:] or not answered_by:  # skipped until the probe closes it
        answered_by.append((await driver.complete(spec(conn_id))).model)
        assert len(answered_by) < 10_000, "the circuit never closed"
        await asyncio.sleep(0.01)  # calls spread over time, as tasks are
    assert primary_requests(dead_primary) == THRESHOLD + 1  # one probe, which succeeded
    assert (await driver.complete(spec(conn_id))).model == PRIMARY
    assert breakers.snapshots()[0]["status"] == "closed"


async def test_a_failed_probe_opens_it_again_so_the_dead_primary_sees_one_request_per_cool_down(
    dead_primary, monkeypatch
):
    cooldown = 0.2
    conn_id = connect(monkeypatch, dead_primary, circuit_breaker={"cooldown_s": cooldown})
    for _ in range(2):  # open it
        await driver.complete(spec(conn_id))
    assert primary_requests(dead_primary) == THRESHOLD
    loop = asyncio.get_running_loop()
    started = loop.time()
    calls = 0
    while loop.time() - started < 1.0:
        assert (await driver.complete(spec(conn_id))).ok
        calls += 1
        await asyncio.sleep(0.01)
    elapsed = loop.time() - started
    probes = primary_requests(dead_primary) - THRESHOLD
    assert 1 <= probes <= elapsed / cooldown + 1 and calls > probes * 3


async def test_with_no_fallback_an_open_circuit_fails_fast_or_waits_for_the_probe_when_asked(
    dead_primary, monkeypatch
):
    conn_id = connect(monkeypatch, dead_primary, circuit_breaker={"cooldown_s": 0.5})
    await driver.complete(spec(conn_id, models=(PRIMARY,)))
    await driver.complete(spec(conn_id, models=(PRIMARY,)))
    failed = await driver.complete(spec(conn_id, models=(PRIMARY,)))
    assert failed.error.kind == "circuit_open" and f"gpt-4 on {conn_id!r}" in failed.error.message
    assert primary_requests(dead_primary) == THRESHOLD
    dead_primary.set_fault(PRIMARY, None)
    waited = await driver.complete(spec(conn_id, models=(PRIMARY,), circuit_open="wait"))
    assert waited.ok and kinds(waited) == ["circuit_open", None]
    assert primary_requests(dead_primary) == THRESHOLD + 1


# ---- shared through Redis ---------------------------------------------------------------------------


@pytest.fixture
async def redis_conn_id():
    """A connection id of this test's own (the breaker keys carry it); its keys are deleted afterwards."""
    conn_id = f"llm_breaker_{uuid.uuid4().hex[:12]}"
    yield conn_id
    client = Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{limits_redis.BREAKER_PREFIX}{conn_id}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_a_circuit_opened_by_one_host_is_skipped_by_another_from_its_first_call(
    dead_primary, monkeypatch, redis_conn_id
):
    conn_id = connect(monkeypatch, dead_primary, redis_conn_id, rate_limit_backend=REDIS_URL)
    for _ in range(2):
        await driver.complete(spec(conn_id))
    await limits_redis.wait_for_adjustments()  # the failures are written in the background
    assert primary_requests(dead_primary) == THRESHOLD
    rows = [row for row in limits_redis.read_breakers(REDIS_URL) if row["conn_id"] == conn_id]
    assert [(r["model"], r["status"], r["failures"]) for r in rows] == [(PRIMARY, "open", THRESHOLD)]
    breakers.reset()  # another host: no copy of the state yet
    outcome = await driver.complete(spec(conn_id))
    assert outcome.ok and kinds(outcome) == ["circuit_open", None]
    assert primary_requests(dead_primary) == THRESHOLD


async def test_only_one_host_takes_the_probe(dead_primary, monkeypatch, redis_conn_id):
    conn_id = connect(monkeypatch, dead_primary, redis_conn_id, rate_limit_backend=REDIS_URL)
    config = (await driver.resolve(spec(conn_id)))[conn_id].circuit_breaker
    clock = [1000.0]
    hosts = [
        limits_redis.SharedBreaker(REDIS_URL, conn_id, PRIMARY, config, clock=lambda: clock[0])
        for _ in range(3)
    ]
    for _ in range(THRESHOLD):
        hosts[0].record(True, "HTTP 503")
        await limits_redis.wait_for_adjustments()
    clock[0] += config.cooldown_s
    decisions = await asyncio.gather(*(host.admit(10.0) for host in hosts for _ in range(4)))
    assert decisions.count("probe") == 1 and decisions.count("send") == 0
    winner = hosts[decisions.index("probe") // 4]
    winner.record(False, probe=True)
    await limits_redis.wait_for_adjustments()
    hosts[2]._synced_at = float("-inf")  # its next call reads the state again
    assert await hosts[2].admit(10.0) == "send"


async def test_opening_closing_and_skips_are_counted_in_the_metrics(dead_primary, monkeypatch, statsd):  # noqa: F811
    conn_id = connect(monkeypatch, dead_primary, circuit_breaker={"cooldown_s": 0.3})
    for _ in range(3):  # open it, then one call skips the primary
        await driver.complete(spec(conn_id))
    dead_primary.set_fault(PRIMARY, None)
    for _ in range(200):  # the cool-down passes, the probe closes it
        if (await driver.complete(spec(conn_id))).model == PRIMARY:
            break
        await asyncio.sleep(0.05)
    primary = {"conn_id": conn_id, "model": PRIMARY}
    await wait_until(lambda: statsd.named("llm.circuit.closed", **primary), timeout=10)
    assert statsd.total("llm.circuit.opened", **primary) == 1
    assert statsd.total("llm.circuit.closed", **primary) == 1
    assert statsd.total("llm.errors.circuit_open", **primary) >= 2  # call 2's retry, call 3
    assert statsd.total("llm.errors.server", **primary) == THRESHOLD


async def test_with_redis_unreachable_each_process_decides_on_its_own_copy(dead_primary, monkeypatch, caplog):
    down = "redis://127.0.0.1:1/0"  # nothing listens there
    conn_id = connect(monkeypatch, dead_primary, rate_limit_backend=down)
    outcomes = [await driver.complete(spec(conn_id)) for _ in range(3)]
    assert all(o.ok for o in outcomes) and kinds(outcomes[2]) == ["circuit_open", None]
    assert primary_requests(dead_primary) == THRESHOLD
    assert "circuit breaker backend redis://127.0.0.1:1/0 failed" in caplog.text


async def test_a_probe_cancelled_in_flight_lets_the_next_call_probe_at_once():
    config = breakers.BreakerConfig(failures=1, window_s=10.0, cooldown_s=5.0)
    clock = [100.0]
    gate = breakers.LocalBreaker("c", "m", config, clock=lambda: clock[0])
    gate.record(True, "HTTP 503")
    clock[0] += 5.0
    never = asyncio.get_running_loop().create_future()
    probe = asyncio.ensure_future(breakers.through(gate, 60.0, lambda: never))
    await wait_until(lambda: gate.state.probe_until is not None)  # it holds the probe
    assert isinstance(await gate.admit(60.0), breakers.Skip)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert await gate.admit(60.0) == "probe"


# ---- in doubt: between the first failure and the circuit opening ------------------------------------


@pytest.fixture
async def fallback_server():
    """The fallback on a server of its own, so that holding the primary's server does not hold it."""
    async with FakeLLMServer(api_key=API_KEY) as server:
        yield server


def chain_spec(primary: str, fallback: str | None = None, **options) -> CallSpec:
    chain = [(primary, PRIMARY)] + ([(fallback, FALLBACK)] if fallback else [])
    return CallSpec(request=REQUEST, chain=chain, **{"max_retries": 2, **options})


async def test_after_a_failure_only_the_requests_that_decide_go_out_and_the_other_calls_take_the_fallback(
    dead_primary, fallback_server, monkeypatch
):
    primary = connect(monkeypatch, dead_primary, "llm_dead")
    fallback = connect(monkeypatch, fallback_server, "llm_ok")
    first = await driver.complete(chain_spec(primary, fallback, max_retries=0))
    assert first.ok and primary_requests(dead_primary) == 1  # one failure: the model is in doubt
    dead_primary.hold()  # the next 503s wait at the server: their requests are in flight
    calls = [asyncio.ensure_future(driver.complete(chain_spec(primary, fallback))) for _ in range(50)]
    async with asyncio.timeout(10):
        await dead_primary.wait_for(lambda s: s["held"] == THRESHOLD - 1)
        await fallback_server.wait_for(lambda s: s["by_model"].get(FALLBACK, 0) == 1 + 50 - (THRESHOLD - 1))
    assert primary_requests(dead_primary) == THRESHOLD  # not 51: the others went to the fallback at once
    dead_primary.release()  # the trials fail: the circuit opens, their retries skip
    outcomes = await asyncio.gather(*calls)
    assert all(o.ok and o.model == FALLBACK for o in outcomes)
    assert primary_requests(dead_primary) == THRESHOLD
    skipped = next(o for o in outcomes if kinds(o) == ["circuit_open", None])
    assert (
        "is in doubt after 1 consecutive failures (last: HTTP 503)" in skipped.attempts[0].reason["message"]
    )
    assert breakers.snapshots()[0]["status"] == "open"


async def test_in_doubt_a_call_with_no_fallback_waits_for_the_trials_instead_of_sending(
    dead_primary, monkeypatch
):
    primary = connect(monkeypatch, dead_primary, "llm_dead")
    await driver.complete(chain_spec(primary, max_retries=0))
    dead_primary.hold()
    trials = [asyncio.ensure_future(driver.complete(chain_spec(primary, max_retries=0))) for _ in range(4)]
    async with asyncio.timeout(10):
        await dead_primary.wait_for(lambda s: s["held"] == THRESHOLD - 1)
    waiting = asyncio.ensure_future(driver.complete(chain_spec(primary)))
    await wait_until(lambda: breakers.snapshots()[0]["failures"] == 1 and not waiting.done())
    assert primary_requests(dead_primary) == THRESHOLD  # the fifth call has not gone out
    dead_primary.release()
    failed = await waiting
    assert failed.error.kind == "circuit_open" and kinds(failed) == ["circuit_open"]
    assert primary_requests(dead_primary) == THRESHOLD
    await asyncio.gather(*trials)


async def test_a_model_that_has_not_failed_gets_every_request_at_once(fallback_server, monkeypatch):
    conn_id = connect(monkeypatch, fallback_server, "llm_ok")
    fallback_server.hold()
    calls = [asyncio.ensure_future(driver.complete(chain_spec(conn_id, conn_id))) for _ in range(50)]
    async with asyncio.timeout(10):
        await fallback_server.wait_for(lambda s: s["held"] == 50)  # no cap: all 50 in flight together
    fallback_server.release()
    assert all(o.model == PRIMARY for o in await asyncio.gather(*calls))


# ---- a stall: no failure comes back before the first timeout -------------------------------------


async def test_a_stalled_primary_is_in_doubt_before_its_first_timeout_and_the_next_calls_take_the_fallback(
    fallback_server, monkeypatch
):
    async with FakeLLMServer(api_key=API_KEY, faults={PRIMARY: "stall"}) as stalled:
        primary = connect(monkeypatch, stalled, "llm_stalled")  # timeout 2 s: in doubt after 1 s
        fallback = connect(monkeypatch, fallback_server, "llm_ok")
        first = [
            asyncio.ensure_future(driver.complete(chain_spec(primary, fallback))) for _ in range(THRESHOLD)
        ]
        async with asyncio.timeout(10):
            await stalled.wait_for(lambda s: s["in_flight"] == THRESHOLD)
        gate = breakers.breaker_for(await _endpoint(primary), PRIMARY)
        await wait_until(lambda: gate.silent_s(2.0) > 0)  # a second with nothing answered
        later = await asyncio.gather(*(driver.complete(chain_spec(primary, fallback)) for _ in range(20)))
        assert all(o.ok and o.model == FALLBACK and kinds(o) == ["circuit_open", None] for o in later)
        assert "have had no answer for 1." in later[0].attempts[0].reason["message"]
        assert primary_requests(stalled) == THRESHOLD  # not 25: the later calls were not sent
        assert fallback_server.stats()["by_model"][FALLBACK] == 20
        # The first five time out: five failures open the circuit, their retries take the fallback.
        outcomes = await asyncio.gather(*first)
        assert all(o.ok and o.model == FALLBACK for o in outcomes)
        assert primary_requests(stalled) == THRESHOLD
        assert breakers.snapshots()[0]["status"] == "open"


async def test_a_silent_model_is_not_capped_for_a_call_without_fallback_and_its_answer_ends_the_doubt(
    fallback_server, monkeypatch
):
    conn_id = "llm_slow"
    point_connection(monkeypatch, conn_id, fallback_server.base_url, timeout=3)  # in doubt after 1.5 s
    fallback_server.hold()  # answers wait at the server: a slow model, not a dead one
    held = [asyncio.ensure_future(driver.complete(chain_spec(conn_id, conn_id))) for _ in range(THRESHOLD)]
    async with asyncio.timeout(10):
        await fallback_server.wait_for(lambda s: s["held"] == THRESHOLD)
    gate = breakers.breaker_for(await _endpoint(conn_id), PRIMARY)
    await wait_until(lambda: gate.silent_s(3.0) > 0)
    alone = asyncio.ensure_future(driver.complete(chain_spec(conn_id)))  # no fallback: sent at once,
    async with asyncio.timeout(1):  # not held until the others time out (at 3 s)
        await fallback_server.wait_for(lambda s: s["held"] == THRESHOLD + 1)
    fallback_server.release()
    assert all(o.ok and o.model == PRIMARY for o in await asyncio.gather(*held, alone))
    after = await driver.complete(chain_spec(conn_id, conn_id))  # answered: no doubt, no cap
    assert after.model == PRIMARY and kinds(after) == [None]
    assert breakers.snapshots() == []  # never a failure


async def _endpoint(conn_id: str):
    return (await driver.resolve(chain_spec(conn_id)))[conn_id]
