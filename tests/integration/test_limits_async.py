"""The async layer of the rate limiter: caps, FIFO, pacing on virtual time, cancellation, AIMD."""

from __future__ import annotations

import asyncio
import json

import pytest
from airflow.triggers.base import TriggerEvent

from airflow_llm_async import limits, transport
from airflow_llm_async.core.buckets import Limits
from airflow_llm_async.hooks.llm import shared_endpoint
from airflow_llm_async.limits import ConnectionLimiter
from airflow_llm_async.testing.fake_server import FakeLLMServer
from tests.integration.conftest import point_connection, wait_until
from tests.integration.test_fanout_trigger import events_of, fan_out


class VirtualTime:
    """A clock that only moves when the limiter sleeps; only the head of a line ever sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.blocked = asyncio.Event()  # set while a sleep is parked by `park_sleeps`
        self.park = False

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.park:  # stand still until cancelled
            self.blocked.set()
            await asyncio.Event().wait()
        self.now += seconds
        await asyncio.sleep(0)


async def until(condition, rounds: int = 1000) -> None:
    """Let the other tasks run until ``condition()`` holds; fail if it never does."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def hold_slots(limiter: ConnectionLimiter, count: int, release: asyncio.Event, log: list | None = None):
    """Start ``count`` tasks that take a slot each and keep it until ``release`` is set."""

    async def holder(index: int):
        async with limiter.slot(1) as permit:
            if log is not None:
                log.append(index)
            await release.wait()
            return permit

    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(holder(index)))
        await asyncio.sleep(0)  # start them in order
    return tasks


# --- concurrency ------------------------------------------------------------------------------


async def test_concurrency_cap_holds_against_the_fake_server():
    limiter = ConnectionLimiter("fake", Limits(max_concurrency=5))
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with FakeLLMServer() as server:
        url, headers = f"{server.base_url}/chat/completions", {"Authorization": "Bearer sk-x"}

        async def call() -> int:
            async with limiter.slot(10):
                status = (await transport.post_json(url, headers, body, 10, 1_000_000)).status
                return status

        server.hold()
        tasks = [asyncio.create_task(call()) for _ in range(40)]
        async with asyncio.timeout(10):
            await server.wait_for(lambda stats: stats["held"] == 5)
            assert limiter.stats()["in_flight"] == 5
            assert limiter.stats()["waiting"] == 35
            server.release()
            statuses = await asyncio.gather(*tasks)
        assert statuses == [200] * 40
        assert server.stats()["max_in_flight"] == 5
    assert limiter.stats()["in_flight"] == limiter.stats()["waiting"] == 0


async def test_concurrency_cap_holds_for_many_tasks():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=7))
    inside = peak = 0

    async def work():
        nonlocal inside, peak
        async with limiter.slot():
            inside += 1
            peak = max(peak, inside)
            for _ in range(3):
                await asyncio.sleep(0)
            inside -= 1

    await asyncio.gather(*(work() for _ in range(500)))
    assert peak == 7
    assert limiter.stats()["in_flight"] == 0


async def test_waiters_are_served_first_come_first_served():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=1))
    release, order = asyncio.Event(), []
    tasks = await hold_slots(limiter, 30, release, order)
    assert limiter.stats()["waiting"] == 29
    release.set()
    await asyncio.gather(*tasks)
    assert order == list(range(30))


async def test_no_limits_only_counts():
    limiter = ConnectionLimiter("free")
    async with limiter.slot(500) as first, limiter.slot(500):
        assert limiter.stats()["in_flight"] == 2
        first.settle(10)
    assert limiter.stats() == {**limiter.stats(), "in_flight": 0, "waiting": 0, "backend": None}
    limiter.on_success()  # nothing to recover: no effect
    assert limiter.stats()["max_concurrency"] is None


# --- pacing on virtual time -------------------------------------------------------------------


async def test_requests_per_minute_paces_after_the_burst():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(requests_per_minute=60), clock=clock, sleep=clock.sleep)
    granted = []

    async def call():
        async with limiter.slot() as permit:
            granted.append(permit.granted_at)

    await asyncio.gather(*(call() for _ in range(25)))
    # A burst of 10 s worth (10 requests), then one per second.
    assert granted == [0.0] * 10 + [float(s) for s in range(1, 16)]


async def test_rpm_and_concurrency_together():
    clock = VirtualTime()
    limiter = ConnectionLimiter(
        "c", Limits(max_concurrency=2, requests_per_minute=60), clock=clock, sleep=clock.sleep
    )
    inside = peak = 0

    async def call():
        nonlocal inside, peak
        async with limiter.slot():
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0)
            inside -= 1

    await asyncio.gather(*(call() for _ in range(30)))
    assert peak == 2
    assert clock.now == 20.0  # 10 in the burst, 20 more at one per second


@pytest.mark.parametrize(("actual", "used"), [(60, 60), (30, 30), (None, 60), (90, 90)])
async def test_tokens_per_minute_paces_by_settled_usage(actual, used):
    clock = VirtualTime()
    # 10 tokens/s, a burst of 100. Each call reserves 60 and really uses `actual` (None: unknown).
    limiter = ConnectionLimiter("c", Limits(tokens_per_minute=600), clock=clock, sleep=clock.sleep)
    calls = 40
    for _ in range(calls):
        async with limiter.slot(60) as permit:
            permit.settle(actual)
    # The burst, then the real usage at 10 tokens/s; within one call's estimate of it.
    assert clock.now == pytest.approx((calls * used - 100) / 10, abs=60 / 10)


async def test_over_estimate_settles_back_at_once():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(tokens_per_minute=600), clock=clock, sleep=clock.sleep)
    async with limiter.slot(100) as permit:
        assert limiter.stats()["tokens_available"] == 0
        permit.settle(25)
    assert limiter.stats()["tokens_available"] == 75
    async with limiter.slot(100) as permit:
        assert clock.now == 2.5  # 25 more tokens at 10/s
        permit.settle(250)  # more than estimated: the next callers pay
    assert limiter.stats()["tokens_available"] == -150


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelling_a_waiter_for_a_slot_leaks_nothing():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=1))
    release = asyncio.Event()
    holder, waiter = await hold_slots(limiter, 2, release)
    assert limiter.stats()["waiting"] == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.stats()["waiting"] == 0 and limiter.stats()["in_flight"] == 1
    release.set()
    await holder
    assert limiter.stats()["in_flight"] == 0
    async with asyncio.timeout(5), limiter.slot():  # the slot is free again
        assert limiter.stats()["in_flight"] == 1


async def test_cancelling_the_woken_head_before_it_runs_passes_the_slot_on():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=1))
    release = asyncio.Event()
    holder, head, behind = await hold_slots(limiter, 3, release)
    release.set()
    await until(holder.done)  # the holder left: the head was woken but has not run yet
    head.cancel()
    async with asyncio.timeout(5):
        await behind
    assert head.cancelled()
    assert limiter.stats()["in_flight"] == limiter.stats()["waiting"] == 0


async def test_cancelling_a_waiter_for_tokens_gives_them_back():
    clock = VirtualTime()
    limiter = ConnectionLimiter(
        "c", Limits(requests_per_minute=60, tokens_per_minute=600), clock=clock, sleep=clock.sleep
    )
    async with limiter.slot(100):
        pass
    before = limiter.stats()
    assert (before["requests_available"], before["tokens_available"]) == (9, 0)
    clock.park = True
    waiter = asyncio.create_task(limiter.slot(50).__aenter__())
    await clock.blocked.wait()
    assert clock.sleeps == [5.0]
    stats = limiter.stats()
    assert (stats["tokens_available"], stats["in_flight"], stats["waiting"]) == (-50, 0, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    after = limiter.stats()
    assert (after["requests_available"], after["tokens_available"]) == (9, 0)
    assert after["in_flight"] == after["waiting"] == 0


async def test_timeout_while_waiting_raises_and_holds_nothing():
    clock = VirtualTime()
    limiter = ConnectionLimiter(
        "c", Limits(max_concurrency=1, tokens_per_minute=600), clock=clock, sleep=clock.sleep
    )
    async with limiter.slot(100):
        with pytest.raises(TimeoutError):  # waiting for the slot
            await limiter.slot(10, timeout=0.01).__aenter__()
    clock.park = True
    with pytest.raises(TimeoutError):  # waiting for tokens
        await limiter.slot(10, timeout=0.01).__aenter__()
    stats = limiter.stats()
    assert (stats["in_flight"], stats["waiting"], stats["tokens_available"]) == (0, 0, 0)


async def test_mass_cancellation_leaks_nothing():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=10, requests_per_minute=10**6))
    release = asyncio.Event()
    inside = peak = done = 0

    async def call():
        nonlocal inside, peak, done
        async with limiter.slot(1):
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1
        done += 1

    tasks = [asyncio.create_task(call()) for _ in range(1000)]
    await until(lambda: limiter.stats()["waiting"] == 990)
    for task in tasks[::3]:  # some hold a slot, most are in line
        task.cancel()
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled == len(tasks[::3])
    assert done == 1000 - cancelled
    assert peak == 10
    assert limiter.stats()["in_flight"] == limiter.stats()["waiting"] == 0


# --- adaptive back-off ------------------------------------------------------------------------


async def test_429_halves_the_rate_drains_and_successes_restore_it():
    clock = VirtualTime()
    limiter = ConnectionLimiter(
        "c", Limits(requests_per_minute=600, tokens_per_minute=60_000), clock=clock, sleep=clock.sleep
    )
    async with limiter.slot(10, model="m") as permit:
        clock.now = 5.0
        limiter.on_rate_limited(permit)
    stats, line = limiter.stats(), limiter._backing_off["m"].stats()
    assert (stats["models"]["m"]["requests_per_minute"], stats["models"]["m"]["tokens_per_minute"]) == (
        300,
        30_000,
    )
    assert (
        line["requests_available"] <= 0 and stats["rate_limited"] == stats["models"]["m"]["rate_limited"] == 1
    )
    # Paced at the cut rate now: 5 per second, not a burst.
    granted = []
    for _ in range(3):
        async with limiter.slot(10, model="m") as next_permit:
            granted.append(next_permit.granted_at)
    assert granted == pytest.approx([5.2, 5.4, 5.6])
    for _ in range(49):
        limiter.on_success(permit)
    assert limiter.stats()["models"]["m"]["rate_fraction"] == pytest.approx(0.99)
    limiter.on_success(permit)
    assert limiter.stats()["models"] == {}  # recovered: the model's line is gone
    limiter.on_success(permit)
    assert limiter.stats()["requests_per_minute"] == 600


async def test_a_429_for_a_call_sent_before_the_cut_is_not_a_second_cut():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(requests_per_minute=600), clock=clock, sleep=clock.sleep)
    async with limiter.slot(model="m") as old, limiter.slot(model="m") as other:
        clock.now = 10.0
        limiter.on_rate_limited(other)
        limiter.on_rate_limited(old)  # sent at 0, before the cut at 10
    assert limiter.stats()["models"]["m"]["rate_fraction"] == 0.5
    assert limiter.stats()["rate_limited"] == 2
    async with limiter.slot(model="m") as fresh:
        pass
    limiter.on_rate_limited(fresh)
    assert limiter.stats()["models"]["m"]["rate_fraction"] == 0.25


async def test_429_without_rates_caps_concurrency_then_lifts_the_cap():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", clock=clock, sleep=clock.sleep)
    releases = [asyncio.Event() for _ in range(8)]

    async def hold(event):
        async with limiter.slot(model="m") as permit:
            await event.wait()
            return permit

    holders = [asyncio.create_task(hold(event)) for event in releases]
    await until(lambda: limiter.stats()["in_flight"] == 8)
    limiter.on_rate_limited(limiter.slot(model="m"))  # a permit names the model
    assert limiter.stats()["models"]["m"]["max_concurrency"] == 4
    assert limiter.stats()["max_concurrency"] is None  # the connection's own cap: as configured
    late = asyncio.create_task(hold(asyncio.Event()))
    await until(lambda: limiter.stats()["waiting"] == 1)
    for event, holder in zip(releases[:4], holders, strict=False):
        event.set()
        await holder
    assert limiter.stats()["waiting"] == 1  # 4 in flight, still at the cap
    releases[4].set()
    await holders[4]
    await until(lambda: limiter.stats()["waiting"] == 0)
    assert limiter.stats()["in_flight"] == 4
    caps = []
    for _ in range(4):
        limiter.on_success(holders[0].result())
        caps.append(limiter.stats()["models"].get("m", {}).get("max_concurrency"))
    assert caps == [5, 6, 7, None]  # back where it was (8 in flight at the 429), then no back-off
    for event in releases:
        event.set()
    late.cancel()
    await asyncio.gather(*holders[5:], late, return_exceptions=True)
    assert limiter.stats()["in_flight"] == 0


async def test_429_with_a_configured_cap_cuts_from_what_was_in_flight():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=100))
    release = asyncio.Event()
    tasks = await hold_slots(limiter, 10, release)
    limiter.on_rate_limited()  # no permit: the calls of no model in particular, as hold_slots makes
    assert limiter.stats()["models"][None]["max_concurrency"] == 5
    for _ in range(95):
        limiter.on_success()
    assert limiter.stats()["models"] == {} and limiter.stats()["max_concurrency"] == 100
    release.set()
    await asyncio.gather(*tasks)


# --- back-off per model -----------------------------------------------------------------------
# Gateways and providers limit per model: a 429 on one model cuts that model's calls, never the
# calls to another model on the same connection (issue 12, item 2).


async def test_429s_on_one_model_leave_another_models_calls_uncapped():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=100))
    release, granted = asyncio.Event(), []

    async def call(model: str):
        async with limiter.slot(1, model=model) as permit:
            granted.append(permit)
            await release.wait()
            return permit

    primary = [asyncio.create_task(call("gpt-4")) for _ in range(10)]
    await until(lambda: limiter.stats()["in_flight"] == 10)
    # Each answers 429 (the first cuts; the others were sent before the cut: echoes).
    for permit in granted:
        limiter.on_rate_limited(permit)
    assert limiter.stats()["models"]["gpt-4"]["max_concurrency"] == 5
    assert limiter.stats()["max_concurrency"] == 100  # the connection's own cap is untouched
    # Another model's calls all go at once, past the primary's cut cap.
    fallback = [asyncio.create_task(call("gpt-3.5-turbo")) for _ in range(40)]
    await until(lambda: limiter.stats()["in_flight"] == 50)
    assert limiter.stats()["waiting"] == 0
    # The primary's next calls wait in its own line (10 in flight > its cap of 5), and hold no
    # other model back: a fallback call behind them in time still goes at once.
    late_primary = asyncio.create_task(call("gpt-4"))
    await until(lambda: limiter.stats()["waiting"] == 1)
    late_fallback = asyncio.create_task(call("gpt-3.5-turbo"))
    await until(lambda: limiter.stats()["in_flight"] == 51)
    assert "gpt-3.5-turbo" not in limiter.stats()["models"]
    release.set()
    await asyncio.gather(*primary, *fallback, late_primary, late_fallback)
    assert limiter.stats()["in_flight"] == limiter.stats()["waiting"] == 0


async def test_a_models_own_line_caps_it_at_the_cut_and_recovers_to_no_back_off():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=100))
    release, granted = asyncio.Event(), []
    inside = peak = 0

    async def call():
        nonlocal inside, peak
        async with limiter.slot(1, model="gpt-4") as permit:
            granted.append(permit)
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1
            return permit

    holders = [asyncio.create_task(call()) for _ in range(8)]
    await until(lambda: inside == 8)
    limiter.on_rate_limited(granted[0])  # 8 in flight on the connection: cut to 4
    release.set()
    await asyncio.gather(*holders)
    release.clear()
    inside = peak = 0
    tasks = [asyncio.create_task(call()) for _ in range(20)]
    await until(lambda: limiter.stats()["waiting"] == 16)
    assert peak == 4
    release.set()
    permits = await asyncio.gather(*tasks)
    assert peak == 4
    for permit in permits:  # each success lifts the model's cap by one, up to the connection's
        limiter.on_success(permit)
    assert limiter.stats()["models"]["gpt-4"]["max_concurrency"] == 24
    for _ in range(100):
        limiter.on_success(permits[0])
    assert "gpt-4" not in limiter.stats()["models"]  # recovered: back on the fast path


async def test_a_429_on_one_model_halves_that_models_rate_only():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(requests_per_minute=600), clock=clock, sleep=clock.sleep)
    async with limiter.slot(model="gpt-4") as permit:
        clock.now = 5.0
        limiter.on_rate_limited(permit)
    assert limiter.stats()["models"]["gpt-4"]["rate_fraction"] == 0.5
    assert limiter.stats()["rate_fraction"] == 1.0 and limiter.stats()["requests_per_minute"] == 600
    granted = {"gpt-4": [], "gpt-3.5-turbo": []}
    for model in ("gpt-4", "gpt-4", "gpt-3.5-turbo", "gpt-3.5-turbo", "gpt-3.5-turbo"):
        async with limiter.slot(model=model) as next_permit:
            granted[model].append(next_permit.granted_at)
    # gpt-4 is paced at the cut rate (5 per second, its bucket drained); the other model goes at
    # once from the connection's configured bucket, which gpt-4's calls also draw from.
    assert granted["gpt-4"] == pytest.approx([5.2, 5.4])
    assert granted["gpt-3.5-turbo"] == pytest.approx([5.4, 5.4, 5.4])


async def test_a_fan_out_whose_primary_is_rate_limited_sends_its_fallbacks_all_at_once(fake_llm, monkeypatch):
    """The issue's fan-out: every gpt-4 call answers 429, each item falls back to gpt-3.5-turbo."""
    point_connection(monkeypatch, "llm_rl", fake_llm.base_url, default_model="gpt-4", timeout=30)
    fake_llm.set_fault("gpt-4", "429")
    prompts = [f"item {i}" for i in range(40)]
    fake_llm.hold()
    made = fan_out(prompts, ti=None, llm_conn_id="llm_rl", fallback_models=["gpt-3.5-turbo"], max_retries=0)
    running = asyncio.create_task(events_of(made))
    await wait_until(lambda: fake_llm.stats()["held"] == 40, timeout=30)  # the 40 primary calls
    fake_llm.release()
    fake_llm.hold()  # the 40 held go on (and answer 429); what comes next is held: the fallbacks
    limiter = limits.limiter_for(await shared_endpoint("llm_rl"))
    await wait_until(lambda: fake_llm.stats()["by_model"].get("gpt-3.5-turbo", 0) >= 20, timeout=30)
    await asyncio.sleep(0.3)  # time for any further fallback to reach the server
    stats = fake_llm.stats()
    assert (stats["held"], stats["by_model"]["gpt-3.5-turbo"], limiter.stats()["waiting"]) == (40, 40, 0)
    assert limiter.stats()["models"]["gpt-4"]["max_concurrency"] == 20  # the primary alone is cut
    fake_llm.release()
    (event,) = await running
    assert type(event) is TriggerEvent and None not in event.payload["results"]
    assert event.payload["meta"]["totals"]["fallback_used"] == 40


async def test_calls_waiting_in_a_models_line_when_it_recovers_are_not_stranded():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=4))
    release, granted = asyncio.Event(), []

    async def call():
        async with limiter.slot(1, model="m") as permit:
            granted.append(permit)
            await release.wait()

    holders = [asyncio.create_task(call()) for _ in range(4)]
    await until(lambda: len(granted) == 4)
    limiter.on_rate_limited(granted[0])  # 4 in flight: the model's cap is cut to 2
    late = [asyncio.create_task(call()) for _ in range(3)]
    await until(lambda: limiter.stats()["waiting"] == 3)
    limiter.on_success(granted[0])
    limiter.on_success(granted[0])  # back at the connection's cap of 4: the model's line is gone
    assert limiter.stats()["models"] == {}
    release.set()  # the holders leave; those that waited in the model's line still get through
    async with asyncio.timeout(5):
        await asyncio.gather(*holders, *late)
    assert len(granted) == 7 and limiter.stats()["in_flight"] == limiter.stats()["waiting"] == 0


# --- the server's word: x-ratelimit-* headers on answers -----------------------------------------


def budget_headers(remaining_requests: int, reset: str) -> dict[str, str]:
    return {"x-ratelimit-remaining-requests": str(remaining_requests), "x-ratelimit-reset-requests": reset}


async def test_nothing_left_holds_the_models_calls_until_the_reset_and_no_other_models():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(max_concurrency=10), clock=clock, sleep=clock.sleep)
    async with limiter.slot(model="gpt-4") as permit:
        pass
    limiter.on_success(permit, budget_headers(0, "1.5s"))
    assert limiter.stats()["models"]["gpt-4"]["paced"] is True
    async with limiter.slot(model="gpt-3.5-turbo") as other:
        pass
    assert other.granted_at == 0.0 and not other.waited  # another model is not held
    async with limiter.slot(model="gpt-4") as held:
        pass
    assert held.granted_at == 1.5 and held.waited  # the reset
    limiter.on_success(held, budget_headers(5000, "1s"))  # the new window: plenty left
    assert limiter.stats()["models"] == {}  # back on the fast path


async def test_what_is_left_is_spread_over_the_time_to_the_reset():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", clock=clock, sleep=clock.sleep)
    async with limiter.slot(model="m") as permit:
        pass
    limiter.on_success(permit, budget_headers(4, "2s"))
    granted = []
    for _ in range(6):
        async with limiter.slot(model="m") as permit:
            granted.append(permit.granted_at)
    assert granted == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])  # the 5th waits for the reset


async def test_plenty_left_keeps_the_model_on_the_fast_path():
    limiter = ConnectionLimiter("c")
    async with limiter.slot(model="m") as permit:
        pass
    limiter.on_success(permit, budget_headers(9999, "6ms"))
    limiter.on_success(permit, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "?"})
    assert limiter.stats()["models"] == {}


async def test_a_429_on_a_paced_model_cuts_it_as_before_and_the_pace_goes_when_it_recovers():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(max_concurrency=8), clock=clock, sleep=clock.sleep)
    async with limiter.slot(model="m") as permit:
        pass
    limiter.on_success(permit, budget_headers(1, "10s"))
    limiter.on_rate_limited(permit)  # 0 in flight: its cap is cut to 1
    assert limiter.stats()["models"]["m"]["max_concurrency"] == 1
    assert limiter.stats()["models"]["m"]["paced"] is True
    for _ in range(10):
        limiter.on_success(permit, budget_headers(5000, "1s"))
    assert limiter.stats()["models"] == {}


async def test_calls_already_waiting_for_a_slot_when_the_pace_begins_pass_through_it():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(max_concurrency=1), clock=clock, sleep=clock.sleep)
    release, granted = asyncio.Event(), []

    async def call():
        async with limiter.slot(model="m") as permit:
            granted.append(permit)
            await release.wait()

    holder = asyncio.create_task(call())
    await until(lambda: len(granted) == 1)
    queued = [asyncio.create_task(call()) for _ in range(2)]
    await until(lambda: limiter.stats()["waiting"] == 2)  # in the connection's line: no pace yet
    limiter.on_success(granted[0], budget_headers(1, "2s"))  # the answer: one request left for 2 s
    release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(holder, *queued)
    assert [permit.granted_at for permit in granted] == [0.0, 0.0, 2.0]  # the third: after the reset
