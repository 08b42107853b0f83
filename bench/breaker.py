"""The circuit breaker on issue 14's scenario, without Airflow: a dead primary (503), a working fallback.

Each scenario runs twice in the same run, the breaker off (connection extra ``circuit_breaker:
false``, the baseline: what every release before it did) and on (the defaults), against the
in-process fake server, and prints the requests the dead primary received, the wall time and the
ratios. Then the hot-path cost: calls to a healthy model with the breaker off and on (closed), in
this process and shared through Redis (127.0.0.1:6379).

    .venv/bin/python bench/breaker.py [--calls 60] [--items 100] [--hot-calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_llm_async import breakers, driver, limits, limits_redis, transport  # noqa: E402
from airflow_llm_async.core.outcome import CallSpec  # noqa: E402
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--hot-calls", type=int, default=20000)
    args = parser.parse_args()
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
    await transport.close_shared_session()


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    asyncio.run(main())
