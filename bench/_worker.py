"""The measured process: one asyncio event loop making ``--calls`` completions with one client.

Protocol with the orchestrator (JSON lines on stdout, commands on stdin):

1. warm up (sessions, imports, connection lookup), collect garbage, print ``{"rss_kb": ...}``;
2. wait for ``go`` on stdin (the orchestrator resets the server's counters meanwhile);
3. make the calls while a sampler task measures event-loop lag; print the figures and exit.

Everything else the process writes to stdout (Airflow's log handler writes there) goes to the
log file on stderr, so log lines cost what they cost in a real process without mixing in.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import sys
import time
from collections import Counter
from typing import IO, Any

from _harness import percentile, raise_nofile_limit, rss_kb

WARMUP_CALLS = 20
LAG_INTERVAL = 0.010  # the sampler sleeps 10 ms; anything beyond that is time the loop was busy


async def sample_lag(samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """Record (when, how late) each 10 ms sleep wakes up: the wait every other coroutine sees too."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(LAG_INTERVAL)
        samples.append((started, time.perf_counter() - started - LAG_INTERVAL))


class GCPauses:
    """Every garbage collection's duration by generation: a full pass can stall the loop on its own."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (started, generation, seconds)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((self._started, info["generation"], time.perf_counter() - self._started))

    def summary(self, since: float) -> dict[str, Any]:
        by_gen = {}
        for gen in (0, 1, 2):
            times = [p for _, g, p in self.pauses if g == gen]
            by_gen[f"gen{gen}"] = {"count": len(times), "total_ms": sum(times) * 1000}
            by_gen[f"gen{gen}"]["max_ms"] = max(times, default=0) * 1000
        by_gen["full"] = [(round(t - since, 3), round(p * 1000, 1)) for t, g, p in self.pauses if g == 2]
        by_gen["longest"] = [
            {"at_s": round(t - since, 3), "gen": g, "ms": round(p * 1000, 1)}
            for t, g, p in sorted(self.pauses, key=lambda x: -x[2])[:5]
        ]
        return by_gen


async def burst(call, calls: int) -> tuple[list[bool], float]:
    """One task per call, created one by one as the triggerer creates trigger tasks.

    The triggerer yields to the loop (``await asyncio.sleep(0)``) between creations; so do we.
    Returns the results and the seconds spent launching.
    """
    started = time.perf_counter()
    tasks = []
    for _ in range(calls):
        tasks.append(asyncio.create_task(call()))
        await asyncio.sleep(0)
    launched = time.perf_counter() - started
    return await asyncio.gather(*tasks, return_exceptions=True), launched


async def pool(call, calls: int, concurrency: int) -> tuple[list[bool], float]:
    """``concurrency`` coroutines sharing ``calls`` calls: a steady load of that many in flight."""
    remaining = calls
    results: list[Any] = []

    async def drain() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                results.append(await call())
            except Exception as exc:  # counted as a failed call, never hidden
                results.append(exc)

    await asyncio.gather(*(drain() for _ in range(concurrency)))
    return results, 0.0


async def measure(client, calls: int, concurrency: int, timeout: float) -> dict[str, Any]:
    """Run the calls with the lag sampler; CPU is this process's user + system time in the window."""
    lag_at: list[tuple[float, float]] = []
    stop = asyncio.Event()
    gc_pauses = GCPauses()
    gc.callbacks.append(gc_pauses)
    sampler = asyncio.create_task(sample_lag(lag_at, stop))
    usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    async with asyncio.timeout(timeout):
        if concurrency >= calls:
            results, launch_s = await burst(client.call, calls)
        else:
            results, launch_s = await pool(client.call, calls, concurrency)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    await sampler
    gc.callbacks.remove(gc_pauses)
    lag = [late for _, late in lag_at]
    worst = sorted(lag_at, key=lambda sample: -sample[1])[:5]
    failures = [r for r in results if r is not True]
    return {
        "calls": calls,
        "ok": calls - len(failures),
        "first_failure": repr(failures[0])[:300] if failures else None,
        "wall_s": wall,
        "launch_s": launch_s,
        "cpu_s": cpu,
        "user_s": usage.ru_utime - usage0.ru_utime,
        "sys_s": usage.ru_stime - usage0.ru_stime,
        "lag_ms": {
            "p50": percentile(lag, 0.50) * 1000,
            "p99": percentile(lag, 0.99) * 1000,
            "max": max(lag, default=0.0) * 1000,
            "samples": len(lag),
            "worst": [{"at_s": round(at - wall0, 3), "ms": round(late * 1000, 1)} for at, late in worst],
            # Every sample over 20 ms, in order: which phase of the run (launch, wait, answers) stalls.
            "slow": [(round(at - wall0, 3), round(late * 1000, 1)) for at, late in lag_at if late > 0.020],
        },
        "gc": gc_pauses.summary(wall0),
        "rss_end_kb": rss_kb(),
    }


def object_types() -> Counter[str]:
    """GC-tracked objects by type: what each in-flight call keeps alive shows up in the difference."""
    return Counter(type(obj).__qualname__ for obj in gc.get_objects())


def snapshot(types_before: Counter[str], calls: int) -> dict[str, Any]:
    """Objects alive with every call in flight: the total, and the types that grew most, per call."""
    grown = object_types()
    grown.subtract(types_before)
    top = {name: round(count / calls, 2) for name, count in grown.most_common(15)}
    return {"gc_objects": len(gc.get_objects()), "types_per_call": top}


async def run(args: argparse.Namespace, out: IO[str]) -> None:
    from _clients import make_client  # imports Airflow: only after the environment is in place

    client = make_client(args.mode, args.base_url)
    await client.setup()
    for _ in range(WARMUP_CALLS):
        if not await client.warmup():
            raise RuntimeError(f"warm-up call failed for {args.mode}")
    gc.collect()
    ready = {"rss_kb": rss_kb(), "gc_objects": len(gc.get_objects())}
    types_before = object_types()  # before "ready", so a profiler attached after it never sees this
    print(json.dumps(ready), file=out, flush=True)
    if sys.stdin.readline().strip() != "go":  # blocking on purpose: nothing else is running yet
        return
    # The orchestrator sends SIGUSR1 when the server holds every call: count the objects then.
    at_peak: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: at_peak.update(snapshot(types_before, args.calls)))
    profiler = None
    if args.cprofile:  # a diagnostic run: cProfile slows every Python call, so its figures are not reported
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU time: the loop's idle waits do not count
    if args.no_gc:  # a diagnostic run: our own CPU without the collector's share
        gc.disable()
    if profiler is not None:
        profiler.enable()
    result = await measure(client, args.calls, args.concurrency, args.timeout)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    result["at_peak"] = at_peak
    await client.close()
    print(json.dumps(result), file=out, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="one measured benchmark worker (started by bench/*.py)")
    parser.add_argument("--mode", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--cprofile", help="profile the measured window with cProfile into this file")
    parser.add_argument("--no-gc", action="store_true", help="gc.disable() for the measured window")
    args = parser.parse_args()
    # Keep the real stdout for the protocol; send fd 1 (log handlers, prints) to the log on stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    raise_nofile_limit()
    asyncio.run(run(args, out))


if __name__ == "__main__":
    main()
