"""The async layer of the rate limiter: caps, FIFO, pacing on virtual time, cancellation, AIMD."""

from __future__ import annotations

import asyncio
import json

import pytest

from airflow_llm_async import transport
from airflow_llm_async.core.buckets import Limits
from airflow_llm_async.limits import ConnectionLimiter
from airflow_llm_async.testing.fake_server import FakeLLMServer


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
    async with limiter.slot(10) as permit:
        clock.now = 5.0
        limiter.on_rate_limited(permit)
    stats = limiter.stats()
    assert (stats["requests_per_minute"], stats["tokens_per_minute"]) == (300, 30_000)
    assert stats["requests_available"] <= 0 and stats["rate_limited"] == 1
    # Paced at the cut rate now: 5 per second, not a burst.
    granted = []
    for _ in range(3):
        async with limiter.slot(10) as next_permit:
            granted.append(next_permit.granted_at)
    assert granted == pytest.approx([5.2, 5.4, 5.6])
    for _ in range(49):
        limiter.on_success()
    assert limiter.stats()["rate_fraction"] == pytest.approx(0.99)
    limiter.on_success()
    limiter.on_success()
    assert limiter.stats()["requests_per_minute"] == 600


async def test_a_429_for_a_call_sent_before_the_cut_is_not_a_second_cut():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", Limits(requests_per_minute=600), clock=clock, sleep=clock.sleep)
    async with limiter.slot() as old, limiter.slot() as other:
        clock.now = 10.0
        limiter.on_rate_limited(other)
        limiter.on_rate_limited(old)  # sent at 0, before the cut at 10
    assert limiter.stats()["rate_fraction"] == 0.5
    assert limiter.stats()["rate_limited"] == 2
    async with limiter.slot() as fresh:
        pass
    limiter.on_rate_limited(fresh)
    assert limiter.stats()["rate_fraction"] == 0.25


async def test_429_without_rates_caps_concurrency_then_lifts_the_cap():
    clock = VirtualTime()
    limiter = ConnectionLimiter("c", clock=clock, sleep=clock.sleep)
    releases = [asyncio.Event() for _ in range(8)]

    async def hold(event):
        async with limiter.slot() as permit:
            await event.wait()
            return permit

    holders = [asyncio.create_task(hold(event)) for event in releases]
    await until(lambda: limiter.stats()["in_flight"] == 8)
    limiter.on_rate_limited()
    assert limiter.stats()["max_concurrency"] == 4
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
        limiter.on_success()
        caps.append(limiter.stats()["max_concurrency"])
    assert caps == [5, 6, 7, None]  # back where it was (8 in flight at the 429), then no cap
    for event in releases:
        event.set()
    late.cancel()
    await asyncio.gather(*holders[5:], late, return_exceptions=True)
    assert limiter.stats()["in_flight"] == 0


async def test_429_with_a_configured_cap_cuts_from_what_was_in_flight():
    limiter = ConnectionLimiter("c", Limits(max_concurrency=100))
    release = asyncio.Event()
    tasks = await hold_slots(limiter, 10, release)
    limiter.on_rate_limited()
    assert limiter.stats()["max_concurrency"] == 5
    for _ in range(200):
        limiter.on_success()
    assert limiter.stats()["max_concurrency"] == 100
    release.set()
    await asyncio.gather(*tasks)
