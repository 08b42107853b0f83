"""The circuit breaker on issue 14's scenario, without Airflow: a dead primary (503), a working fallback.

Each scenario runs twice in the same run, the breaker off (connection extra ``circuit_breaker:
false``, the baseline: what every release before it did) and on (the defaults), against the
in-process fake server, and prints the requests the dead primary received, the wall time and the
ratios. Then the hot-path cost: calls to a healthy model with the breaker off and on (closed), in
this process and shared through Redis (127.0.0.1:6379).

Then the issue's target, for each way a primary is down (``503``; ``stall``: no answer, each
request times out; ``refused``: nothing listens on the primary connection's port): ``--tasks`` calls
arriving ``--rate`` a second (as mapped tasks reach a triggerer), then ``--items`` all at once,
the breaker off and on. It prints the requests the primary received (attempts sent to it, from
``llm_meta``), the latency the calls that started after the circuit opened had beyond a healthy
call's, and, with the fault cleared, how long until calls return to the primary (within one
cool-down, ``--cooldown``).

Then a slow but healthy primary (every answer takes ``--slow`` seconds, some under and some over
half the timeout, when a silent model is first in doubt): the same calls, the breaker off and on,
and how many the primary answered; the breaker must not send a model that answers to its fallback,
except before its first answer when that takes over half the timeout.

    .venv/bin/python bench/breaker.py [--calls 60] [--items 100] [--hot-calls 20000]
                                      [--tasks 200] [--rate 100] [--cooldown 3] [--slow 0.4 0.7]
                                      [--only outage|hot|slow]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_llm_async import breakers, driver, limits, limits_redis, transport  # noqa: E402
from airflow_llm_async.core.outcome import CallSpec, Outcome  # noqa: E402
from airflow_llm_async.testing.fake_server import FakeLLMServer  # noqa: E402

PRIMARY, FALLBACK = "gpt-4", "gpt-3.5-turbo"
REQUEST = {"messages": [{"role": "user", "content": "Summarise the report"}], "max_tokens": 50}
KEY = "bench-key"
REDIS_URL = "redis://127.0.0.1:6379/0"


def connect(conn_id: str, base_url: str, **extra) -> None:
    conn = {"conn_type": "llm", "host": base_url, "password": KEY, "extra": {"timeout": 5, **extra}}
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)


def spec(conn_id: str, models=(PRIMARY, FALLBACK)) -> CallSpec:
    return CallSpec.of(REQUEST, [conn_id], list(models), max_retries=2)


async def calls(server: FakeLLMServer, conn_id: str, n: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> bool:
        async with gate:
            return (await driver.complete(spec(conn_id))).ok

    started = time.perf_counter()
    ok = await asyncio.gather(*(one() for _ in range(n)))
    return _figures(server, started, sum(ok))


async def fan_out(server: FakeLLMServer, conn_id: str, n: int) -> dict:
    started = time.perf_counter()
    endpoints = await driver.resolve(spec(conn_id))
    records = await driver.fan_out([spec(conn_id)] * n, endpoints)
    return _figures(server, started, sum(r["meta"]["status"] == "success" for r in records))


def _figures(server: FakeLLMServer, started: float, ok: int) -> dict:
    by_model = server.stats()["by_model"]
    return {
        "ok": ok,
        "primary": by_model.get(PRIMARY, 0),
        "fallback": by_model.get(FALLBACK, 0),
        "wall_s": time.perf_counter() - started,
    }


async def scenario(name: str, run) -> None:
    results = {}
    for label, extra in (("off", {"circuit_breaker": False}), ("on", {})):
        breakers.reset()
        async with FakeLLMServer(api_key=KEY, faults={PRIMARY: "503"}) as server:
            conn_id = f"bench_breaker_{label}_{uuid.uuid4().hex[:6]}"
            connect(conn_id, server.base_url, **extra)
            results[label] = await run(server, conn_id)
        await limits.close_loop_limiters()
    off, on = results["off"], results["on"]
    print(f"{name}")
    for label, r in results.items():
        print(
            f"  breaker {label:>3}: {r['ok']} ok, dead primary got {r['primary']:>4} requests, "
            f"fallback {r['fallback']:>4}, wall {r['wall_s']:.2f} s"
        )
    print(
        f"  ratio on/off: primary requests {on['primary'] / off['primary']:.3f}, "
        f"wall time {on['wall_s'] / off['wall_s']:.3f}"
    )


async def hot_path(n: int) -> None:
    """What a closed breaker adds to a call: the driver's checks, and the Redis round trips."""
    from airflow_llm_async.core.engine import Answer
    from airflow_llm_async.core.protocol import Endpoint

    reply = Answer(200)

    async def send() -> Answer:
        return reply

    endpoints = {"off": Endpoint("bench_off", circuit_breaker=None), "on": Endpoint("bench_on")}
    micros = {}
    for label, endpoint in endpoints.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):  # what the driver does for each request
                breakers.skip_for(endpoint, PRIMARY)
                await breakers.through(breakers.breaker_for(endpoint, PRIMARY), 5.0, send)
            best = min(best, (time.perf_counter() - started) / n * 1e6)
        micros[label] = best
    print(f"hot path, closed circuit: the driver's breaker checks per request (best of 5 x {n})")
    print(
        f"  breaker off: {micros['off']:.2f} µs, on: {micros['on']:.2f} µs, "
        f"on - off: {micros['on'] - micros['off']:.2f} µs"
    )

    # Shared through Redis: count the round trips while a healthy model answers n calls.
    trips = {"get": 0, "transaction": 0}
    sync, transact = limits_redis.SharedBreaker._sync, limits_redis.SharedBreaker._transact

    async def counted_sync(self):
        trips["get"] += 1
        return await sync(self)

    async def counted_transact(self, step):
        trips["transaction"] += 1
        return await transact(self, step)

    limits_redis.SharedBreaker._sync, limits_redis.SharedBreaker._transact = counted_sync, counted_transact
    try:
        async with FakeLLMServer(api_key=KEY) as server:
            conn_id = f"bench_hot_redis_{uuid.uuid4().hex[:6]}"
            connect(conn_id, server.base_url, rate_limit_backend=REDIS_URL)
            started = time.perf_counter()
            await calls(server, conn_id, n, 200)
            seconds = time.perf_counter() - started
            await limits_redis.wait_for_adjustments()
            await limits.close_loop_limiters()
    finally:
        limits_redis.SharedBreaker._sync, limits_redis.SharedBreaker._transact = sync, transact
    print(
        f"  shared through Redis: {n} healthy calls in {seconds:.2f} s made {trips['get']} state reads and "
        f"{trips['transaction']} transactions "
        f"({(trips['get'] + trips['transaction']) / n:.4f} round trips per call)"
    )


# --- the issue's target: a primary down three ways, calls arriving as tasks do ------------------------

FAULTS = ("503", "stall", "refused")
TIMEOUT_S = 1.0  # the connections' timeout: what a stalled request costs


def closed_port() -> int:
    """A loopback port nothing listens on (a refused connection), free to bind again for the recovery."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sent_to(outcomes: list[Outcome], conn_id: str) -> int:
    """Requests that went out to ``conn_id``: its attempts, less the ones the breaker skipped."""
    return sum(
        1
        for o in outcomes
        for a in o.attempts
        if a.conn_id == conn_id and not (a.reason and a.reason.get("kind") == "circuit_open")
    )


async def outage(fault: str, breaker_extra, tasks: int, rate: float, items: int, cooldown: float) -> dict:
    """``tasks`` calls at ``rate`` a second, then a fan-out of ``items``, then the recovery."""
    breakers.reset()
    port = closed_port()
    tag = uuid.uuid4().hex[:6]
    primary, fallback = f"bench_primary_{tag}", f"bench_fallback_{tag}"
    async with FakeLLMServer(api_key=KEY, faults={} if fault == "refused" else {PRIMARY: fault}) as server:
        primary_url = f"http://127.0.0.1:{port}/v1" if fault == "refused" else server.base_url
        extra = {"timeout": TIMEOUT_S, "circuit_breaker": breaker_extra}
        connect(primary, primary_url, **extra)
        connect(fallback, server.base_url, **extra)
        chain = CallSpec(request=REQUEST, chain=[(primary, PRIMARY), (fallback, FALLBACK)], max_retries=2)
        healthy = CallSpec(request=REQUEST, chain=[(fallback, FALLBACK)], max_retries=2)
        base = statistics.median([await _timed(healthy) for _ in range(20)])

        started_at: list[float] = []
        outcomes: list[Outcome] = []

        async def task(index: int) -> None:
            await asyncio.sleep(index / rate)
            started_at.append(time.time())
            outcomes.append(await driver.complete(chain))

        wall = time.perf_counter()
        await asyncio.gather(*(task(i) for i in range(tasks)))
        wall = time.perf_counter() - wall
        gate = breakers._local.get((primary, PRIMARY))
        opened_at = (
            None if gate is None or gate.state.open_until is None else gate.state.open_until - cooldown
        )
        after = [
            o.finished_at - o.started_at
            for o in outcomes
            if opened_at is not None and o.started_at >= opened_at
        ]
        task_requests = sent_to(outcomes, primary)

        # Then a burst: every call starts at once (a fan-out's items, or a backlog of deferred tasks).
        burst = await asyncio.gather(*(driver.complete(chain) for _ in range(items)))
        fan_requests = sent_to(burst, primary)
        ok = sum(o.ok for o in outcomes) + sum(o.ok for o in burst)

        recovery = None
        if breaker_extra is not False:
            recovery = await _recover(server, fault, port, chain)
    await limits.close_loop_limiters()
    return {
        "ok": ok,
        "calls": tasks + items,
        "task_requests": task_requests,
        "fan_requests": fan_requests,
        "server_primary": server.stats()["by_model"].get(PRIMARY, 0) if fault != "refused" else None,
        "wall_s": wall,
        "base_s": base,
        "after": after,
        "recovery_s": recovery,
    }


async def _timed(spec: CallSpec) -> float:
    started = time.perf_counter()
    assert (await driver.complete(spec)).ok
    return time.perf_counter() - started


async def _recover(server: FakeLLMServer, fault: str, port: int, chain: CallSpec) -> float:
    """Clear the fault, call every 20 ms: seconds until a call is answered by the primary again."""
    revived = None
    if fault == "refused":
        revived = FakeLLMServer(api_key=KEY, port=port)
        await revived.start()
    else:
        server.set_fault(PRIMARY, None)
    cleared = time.perf_counter()
    try:
        while (await driver.complete(chain)).model != PRIMARY:  # noqa: ASYNC110 (calls spread over time)
            await asyncio.sleep(0.02)
        return time.perf_counter() - cleared
    finally:
        if revived is not None:
            await revived.stop()


async def outages(tasks: int, rate: float, items: int, cooldown: float) -> None:
    for fault in FAULTS:
        results = {}
        for label, extra in (("off", False), ("on", {"cooldown_s": cooldown})):
            results[label] = await outage(fault, extra, tasks, rate, items, cooldown)
        print(
            f"primary down ({fault}), fallback up: {tasks} calls at {rate:.0f}/s, then {items} at once "
            f"(max_retries=2, timeout {TIMEOUT_S:.0f} s, cooldown {cooldown:.0f} s)"
        )
        for label, r in results.items():
            after = r["after"]
            extra = ""
            if after:
                median, worst = ((x - r["base_s"]) * 1000 for x in (statistics.median(after), max(after)))
                extra = (
                    f", {len(after)} started after it opened: extra latency median {median:.0f} ms, "
                    f"max {worst:.0f} ms"
                )
            print(
                f"  breaker {label:>3}: {r['ok']}/{r['calls']} ok; primary requests: "
                f"calls {r['task_requests']}, burst {r['fan_requests']}"
                + (f" (server counted {r['server_primary']})" if r["server_primary"] is not None else "")
                + f"; calls' wall {r['wall_s']:.2f} s{extra}"
                + (
                    f"; back on the primary {r['recovery_s']:.2f} s after the fault cleared"
                    if r["recovery_s"] is not None
                    else ""
                )
            )
        total = {k: r["task_requests"] + r["fan_requests"] for k, r in results.items()}
        print(f"  ratio on/off: primary requests {total['on'] / total['off']:.3f}")


async def slow_primary(latency: float, breaker_extra, tasks: int, rate: float) -> dict:
    """``tasks`` calls at ``rate`` a second to a healthy primary whose answers take ``latency``."""
    breakers.reset()
    tag = uuid.uuid4().hex[:6]
    primary, fallback = f"bench_slow_{tag}", f"bench_fallback_{tag}"
    async with FakeLLMServer(api_key=KEY, latency=latency) as slow, FakeLLMServer(api_key=KEY) as server:
        extra = {"timeout": TIMEOUT_S, "circuit_breaker": breaker_extra}
        connect(primary, slow.base_url, **extra)
        connect(fallback, server.base_url, **extra)
        chain = CallSpec(request=REQUEST, chain=[(primary, PRIMARY), (fallback, FALLBACK)], max_retries=2)

        async def task(index: int) -> Outcome:
            await asyncio.sleep(index / rate)
            return await driver.complete(chain)

        outcomes = await asyncio.gather(*(task(i) for i in range(tasks)))
        latencies = [o.finished_at - o.started_at for o in outcomes if o.model == PRIMARY]
    await limits.close_loop_limiters()
    return {
        "primary": sum(o.model == PRIMARY for o in outcomes),
        "fallback": sum(o.model == FALLBACK for o in outcomes),
        "median_s": statistics.median(latencies) if latencies else float("nan"),
    }


async def slow_primaries(latencies: list[float], tasks: int, rate: float) -> None:
    for latency in latencies:
        results = {}
        for label, extra in (("off", False), ("on", {})):
            results[label] = await slow_primary(latency, extra, tasks, rate)
        print(
            f"healthy primary answering in {latency:.2f} s: {tasks} calls at {rate:.0f}/s "
            f"(timeout {TIMEOUT_S:.0f} s: a silent model is in doubt after {TIMEOUT_S / 2:.1f} s before "
            "its first answer)"
        )
        for label, r in results.items():
            print(
                f"  breaker {label:>3}: primary answered {r['primary']}, fallback {r['fallback']}, "
                f"median latency of the primary's {r['median_s'] * 1000:.0f} ms"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--hot-calls", type=int, default=20000)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--cooldown", type=float, default=3.0)
    parser.add_argument("--slow", type=float, nargs="+", default=[0.4, 0.7])
    parser.add_argument(
        "--only",
        choices=["outage", "hot", "slow"],
        help="only the issue's target scenarios, the hot path, or the slow healthy primary",
    )
    args = parser.parse_args()
    if args.only:
        if args.only == "outage":
            await outages(args.tasks, args.rate, args.items, args.cooldown)
        elif args.only == "hot":
            await hot_path(args.hot_calls)
        else:
            await slow_primaries(args.slow, args.tasks, args.rate)
        await transport.close_shared_session()
        return
    await scenario(
        f"{args.calls} calls one after another (max_retries=2)",
        lambda s, c: calls(s, c, args.calls, 1),
    )
    await scenario(
        f"{args.calls} calls, 10 at a time (max_retries=2)",
        lambda s, c: calls(s, c, args.calls, 10),
    )
    await scenario(f"a fan-out of {args.items} items (max_retries=2)", lambda s, c: fan_out(s, c, args.items))
    await hot_path(args.hot_calls)
    await outages(args.tasks, args.rate, args.items, args.cooldown)
    await slow_primaries(args.slow, args.tasks, args.rate)
    await transport.close_shared_session()


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    asyncio.run(main())
