"""What LLM calls in a triggerer cost the OTHER triggers that share its event loop.

A triggerer runs every trigger as a coroutine on one asyncio loop. A well-behaved non-LLM trigger
(a sensor polling a job's status, a time trigger) sleeps between polls; when the loop is busy it
wakes up late, and that lateness is what "starving the other triggers" means. This benchmark runs
``--neighbours`` such pollers (each wakes every ``--poll`` seconds on a fixed schedule, random
phase, and records how late it woke) plus a copy of Airflow's own triggerer watchdog (a 0.1 s sleep;
3.3.2 logs "Triggerer's async thread was blocked" when it takes more than
``[triggerer] blocked_main_thread_warning_threshold``, 0.2 s) on one loop, over a fixed window, in
one fresh process per variant, with its baseline in the same run:

* ``alone``: the neighbours only (every variant imports and warms up the same modules and clients,
  so all carry the same heap);
* ``aiohttp``: the neighbours + N calls by one bare shared aiohttp session (the floor of any HTTP
  client on that loop);
* ``trigger``: the neighbours + N of our ``ChatCompletionTrigger`` s, built and re-created as the
  triggerer does (bench/_clients.py);
* ``trigger+gc``: the same, with ``gc.freeze()`` after warm-up and ``gc.set_threshold(--gc-gen0)``.

The N calls start one by one 1 s into the window (``await asyncio.sleep(0)`` between them, as the
triggerer's ``create_triggers`` does), against the fake server (latency ``--latency``, own process).

    python bench/shared_triggerer.py                        # N = 1,000 and 5,000 (~4-6 min)
    python bench/shared_triggerer.py --sizes 1000 --rounds 1

Prints, per N and variant, the neighbours' wake-up lateness (p50 / p99 / p99.9 / max), how many
wake-ups were over 100 ms and 1 s late, the watchdog warnings 3.3.2 would log, full GCs, and the
ratios to ``alone`` and to ``aiohttp`` (medians over ``--rounds``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import IO

from _harness import (
    FakeServer,
    bench_environment,
    describe_machine,
    fmt,
    percentile,
    print_table,
    raise_nofile_limit,
    read_json_line,
    start_worker,
)

VARIANTS = ("alone", "aiohttp", "trigger", "trigger+gc")
WATCHDOG_SLEEP_S = 0.1  # airflow/jobs/triggerer_job_runner.py, TriggerRunner.block_watchdog
WATCHDOG_THRESHOLD_S = 0.2  # [triggerer] blocked_main_thread_warning_threshold, default
WARMUP_CALLS = 20
CALLS_START_AT_S = 1.0


# --- the measured process ------------------------------------------------------------------------


async def neighbour(
    start: float, phase: float, poll: float, stop: asyncio.Event, late: list[tuple[float, float]]
) -> None:
    """A polling trigger's wait: wake at start + phase + k * poll, record how late each wake-up was."""
    k = 0
    while not stop.is_set():
        due = start + phase + k * poll
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if stop.is_set():
            return
        late.append((due - start, time.perf_counter() - due))
        k += 1


async def watchdog(stop: asyncio.Event, elapsed: list[float]) -> None:
    """Airflow's block watchdog: sleep 0.1 s and see how long it took."""
    while not stop.is_set():
        last = time.perf_counter()
        await asyncio.sleep(WATCHDOG_SLEEP_S)
        elapsed.append(time.perf_counter() - last)


class FullGCs:
    """Full (generation 2) collections: when, and how long each held the loop."""

    def __init__(self, start: float) -> None:
        self.pauses: list[tuple[float, float]] = []  # (at, seconds)
        self._start = start
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((self._started - self._start, time.perf_counter() - self._started))


async def worker(args: argparse.Namespace, out: IO[str]) -> None:
    from _clients import make_client  # imports Airflow: only after the environment is in place

    client_mode = "aiohttp" if args.variant == "aiohttp" else "trigger"
    client = make_client(client_mode, args.base_url)
    await client.setup()
    for _ in range(WARMUP_CALLS):
        if not await client.warmup():
            raise RuntimeError(f"warm-up call failed for {args.variant}")
    gc.collect()
    if args.variant == "trigger+gc":
        gc.set_threshold(args.gc_gen0, *gc.get_threshold()[1:])
        gc.freeze()
    print(json.dumps({"ready": True, "gc_threshold": gc.get_threshold()}), file=out, flush=True)
    if sys.stdin.readline().strip() != "go":
        return

    start = time.perf_counter()
    full_gcs = FullGCs(start)
    gc.callbacks.append(full_gcs)
    stop = asyncio.Event()
    late: list[tuple[float, float]] = []  # (due, seconds late)
    watchdog_elapsed: list[float] = []
    rng = random.Random(7)
    tasks = [
        asyncio.create_task(neighbour(start, rng.uniform(0, args.poll), args.poll, stop, late))
        for _ in range(args.neighbours)
    ]
    tasks.append(asyncio.create_task(watchdog(stop, watchdog_elapsed)))
    ok = calls_wall = launch = 0.0
    await asyncio.sleep(CALLS_START_AT_S)
    if args.variant != "alone":
        calls_started = time.perf_counter()
        calls = []
        for _ in range(args.calls):
            calls.append(asyncio.create_task(client.call()))
            await asyncio.sleep(0)
        launch = time.perf_counter() - calls_started
        async with asyncio.timeout(args.latency * 4 + args.calls / 100):
            results = await asyncio.gather(*calls, return_exceptions=True)
        calls_wall = time.perf_counter() - calls_started
        ok = sum(r is True for r in results)
    # The window: --window seconds, or until the calls are done, whichever is later.
    await asyncio.sleep(max(0.0, start + args.window - time.perf_counter()))
    window = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*tasks)
    gc.callbacks.remove(full_gcs)
    await client.close()
    print(
        json.dumps(
            {
                "window_s": window,
                "late": late,
                "watchdog": watchdog_elapsed,
                "full_gcs": full_gcs.pauses,
                "ok": ok,
                "calls_wall_s": calls_wall,
                "launch_s": launch,
            }
        ),
        file=out,
        flush=True,
    )


def worker_main(args: argparse.Namespace) -> None:
    out = os.fdopen(os.dup(1), "w")  # the protocol; Airflow's log lines go to stderr (the log file)
    os.dup2(2, 1)
    raise_nofile_limit()
    asyncio.run(worker(args, out))


# --- the orchestrator ----------------------------------------------------------------------------


def run_variant(args: argparse.Namespace, server: FakeServer, workdir: Path, variant: str, size: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant]
    argv += ["--base-url", server.base_url, "--calls", str(size), "--latency", str(args.latency)]
    argv += ["--neighbours", str(args.neighbours), "--poll", str(args.poll), "--window", str(args.window)]
    argv += ["--gc-gen0", str(args.gc_gen0)]
    log_path = workdir / f"shared-{variant}-{size}.log"
    proc = start_worker(argv, log_path, server, workdir)
    try:
        read_json_line(proc.stdout, 120, "ready message")
        server.reset()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = read_json_line(proc.stdout, args.window + args.latency * 4 + size / 100 + 60, "result")
        result["server_max_in_flight"] = server.stats()["max_in_flight"] if variant != "alone" else 0
        proc.wait(timeout=30)
    except Exception:
        print(f"worker {variant} failed; see {log_path}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    late = [seconds for _, seconds in result["late"]]
    gcs = [seconds for _, seconds in result["full_gcs"]]
    worst = sorted(result["late"], key=lambda sample: -sample[1])[:3]
    row = {
        "samples": len(late),
        "p50": percentile(late, 0.50) * 1000,
        "p99": percentile(late, 0.99) * 1000,
        "p999": percentile(late, 0.999) * 1000,
        "max": max(late, default=0.0) * 1000,
        "over_100ms_pct": 100 * sum(x > 0.1 for x in late) / max(1, len(late)),
        "over_1s": sum(x > 1.0 for x in late),
        "warnings": sum(x > WATCHDOG_THRESHOLD_S for x in result["watchdog"]),
        "full_gcs": len(gcs),
        "longest_gc_ms": max(gcs, default=0.0) * 1000,
        "ok": result["ok"],
        "calls_wall_s": result["calls_wall_s"],
        "launch_s": result["launch_s"],
        "peak_in_flight": result["server_max_in_flight"],
        "window_s": result["window_s"],
    }
    print(
        f"  N={size} {variant}: neighbour lateness p99 {fmt(row['p99'], 1)} ms, max {fmt(row['max'], 1)} ms, "
        f"{row['warnings']} watchdog warnings, {row['full_gcs']} full GCs, {row['ok']:.0f}/{size} calls ok; "
        f"worst wake-ups (due at s: ms late) {[(round(at, 2), round(s * 1000)) for at, s in worst]}, calls "
        f"started at {CALLS_START_AT_S} s for {fmt(row['launch_s'])} s; full GCs (at s: ms) "
        f"{[(round(at, 2), round(s * 1000)) for at, s in result['full_gcs']]}",
        file=sys.stderr,
    )
    return row


def report(figures: dict[int, dict[str, dict[str, float]]], variants: list[str]) -> None:
    print("\nNeighbour triggers' wake-up lateness (medians over the rounds):")
    headers = ["N", "variant", "wake-ups", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "> 100 ms %"]
    headers += ["> 1 s", "watchdog warnings", "full GCs", "longest full GC ms", "calls ok", "peak in flight"]
    headers += ["calls wall s"]
    rows = []
    for size, by_variant in figures.items():
        for variant in variants:
            f = by_variant[variant]
            rows.append(
                [f"{size:,}", variant, f"{f['samples']:,.0f}", fmt(f["p50"]), fmt(f["p99"]), fmt(f["p999"])]
                + [fmt(f["max"]), fmt(f["over_100ms_pct"]), f"{f['over_1s']:.0f}", f"{f['warnings']:.0f}"]
                + [f"{f['full_gcs']:.0f}", fmt(f["longest_gc_ms"], 1), f"{f['ok']:,.0f}"]
                + [f"{f['peak_in_flight']:,.0f}", fmt(f["calls_wall_s"])]
            )
    print_table(headers, rows)
    print("\nRatios of the neighbours' p99 / max lateness:")
    pairs = [(a, b) for a, b in (("trigger", "alone"), ("trigger", "aiohttp"), ("trigger+gc", "trigger"))]
    pairs = [(a, b) for a, b in pairs if a in variants and b in variants]
    headers = ["N", *(f"{a} / {b} (p99; max)" for a, b in pairs)]
    rows = []
    for size, by_variant in figures.items():
        cells = []
        for a, b in pairs:
            fa, fb = by_variant[a], by_variant[b]
            p99 = fa["p99"] / fb["p99"] if fb["p99"] else float("inf")
            mx = fa["max"] / fb["max"] if fb["max"] else float("inf")
            cells.append(f"{fmt(p99)}x; {fmt(mx)}x")
        rows.append([f"{size:,}", *cells])
    print_table(headers, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="LLM calls per run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--latency", type=float, default=5.0, help="fake server seconds per call")
    parser.add_argument("--neighbours", type=int, default=500, help="other (polling) triggers on the loop")
    parser.add_argument("--poll", type=float, default=1.0, help="the neighbours' poll interval, seconds")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured (longer if calls last)")
    parser.add_argument("--gc-gen0", type=int, default=50_000, help="gen-0 threshold, trigger+gc variant")
    parser.add_argument("--rounds", type=int, default=1, help="runs per size and variant, alternated")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker and server logs")
    # The measured process (started by the orchestrator).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(size < 1 or size > 10_000 for size in args.sizes) or not 0 < args.latency <= 30:
        parser.error("sizes must be 1..10000 and latency 0..30 s (bounded runs only)")
    if not 1 <= args.neighbours <= 5_000 or not 0.05 <= args.poll <= 10 or not 1 <= args.window <= 120:
        parser.error("neighbours 1..5000, poll 0.05..10 s, window 1..120 s (bounded runs only)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    print(
        f"# shared_triggerer: sizes {args.sizes}, variants {args.variants}, {args.neighbours} neighbours "
        f"polling every {args.poll} s, window {args.window} s, latency {args.latency} s, rounds "
        f"{args.rounds}, trigger+gc: gc.freeze() + gen-0 threshold {args.gc_gen0}\n# {describe_machine()}"
    )
    figures: dict[int, dict[str, dict[str, float]]] = {}
    with bench_environment(args.latency, keep_logs=args.keep_logs) as (server, workdir):
        for size in args.sizes:
            runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
            for _ in range(args.rounds):
                for variant in args.variants:  # back to back, so all see the same machine load
                    runs[variant].append(run_variant(args, server, workdir, variant, size))
            figures[size] = {
                v: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for v, rs in runs.items()
            }
    report(figures, args.variants)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
