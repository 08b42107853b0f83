"""CPU per chat completion: our trigger vs a bare aiohttp session vs the official AsyncOpenAI client.

Each client makes the same calls (default 2,000 at a concurrency of 200) against the same fake
server (latency 0.2 s, its own process), in its own worker process, in the same invocation; the
rounds interleave the clients so all see the same machine load, and the table shows medians.

    python bench/overhead.py                  # 2,000 calls x 3 rounds x 4 clients, ~2 minutes
    python bench/overhead.py --rounds 1       # quicker

Clients: ``trigger`` (ours), ``aiohttp`` (the floor), ``openai`` (one shared ``AsyncOpenAI``,
default httpx client), ``openai-aiohttp`` (the same with ``http_client=DefaultAioHttpClient()``).
Target: our trigger cheaper per call than AsyncOpenAI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _harness import bench_environment, describe_machine, fmt, print_table, run_worker

OURS = "trigger"
CLIENTS = ("aiohttp", "trigger", "openai", "openai-aiohttp")
# Ours with the response cache (docs/cache.md): not run unless named in --clients.
CACHE_CLIENTS = (
    "trigger-cache-miss",
    "trigger-cache-hit",
    "trigger-cache-redis-miss",
    "trigger-cache-redis-hit",
)


def derive(result: dict[str, Any]) -> dict[str, float]:
    gc_stats = result["gc"]
    return {
        "cpu_ms": result["cpu_s"] / result["calls"] * 1000,
        "user_ms": result["user_s"] / result["calls"] * 1000,
        "sys_ms": result["sys_s"] / result["calls"] * 1000,
        "calls_s": result["ok"] / result["wall_s"],
        "lag_p99": result["lag_ms"]["p99"],
        "gc_max_ms": max(gc_stats[f"gen{gen}"]["max_ms"] for gen in (0, 1, 2)),
        "errors": result["calls"] - result["ok"],
    }


def measure(args: argparse.Namespace, raw: list[dict]) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {client: [] for client in args.clients}
    timeout = 60 + args.calls * args.latency / args.concurrency * 4
    with bench_environment(args.latency, keep_logs=args.keep_logs) as (server, workdir):
        for round_ in range(args.rounds):
            for client in args.clients:
                result = run_worker(
                    client, server, workdir, calls=args.calls, concurrency=args.concurrency, timeout=timeout
                )
                raw.append(result)
                if result["first_failure"]:
                    print(f"  {client}: first failure {result['first_failure']}", file=sys.stderr)
                runs[client].append(derive(result))
                print(
                    f"  round {round_ + 1} {client}: {fmt(runs[client][-1]['cpu_ms'], 3)} CPU ms/call",
                    file=sys.stderr,
                )
        if args.profile:
            # One more run under py-spy; sampling slows the worker, so it never feeds the figures.
            run_worker(
                OURS,
                server,
                workdir,
                calls=args.calls,
                concurrency=args.concurrency,
                timeout=timeout,
                profile=Path(args.profile),
            )
            print(f"  profile of {OURS} written to {args.profile}", file=sys.stderr)
    return runs


def report(runs: dict[str, list[dict[str, float]]]) -> None:
    medians = {client: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for client, rs in runs.items()}
    headers = ["client", "CPU ms/call", "(min-max)", "user ms", "sys ms", "calls/s", "lag p99 ms"]
    headers += ["longest GC ms", "errors"]
    rows = []
    for client, f in medians.items():
        cpu = [r["cpu_ms"] for r in runs[client]]
        spread = f"{fmt(min(cpu), 3)}-{fmt(max(cpu), 3)}"
        rows.append(
            [client, fmt(f["cpu_ms"], 3), spread, fmt(f["user_ms"], 3), fmt(f["sys_ms"], 3)]
            + [fmt(f["calls_s"], 0), fmt(f["lag_p99"], 1), fmt(f["gc_max_ms"], 1), f"{f['errors']:.0f}"]
        )
    print_table(headers, rows)
    if OURS not in medians or len(medians) < 2:
        return
    print()
    ours = medians[OURS]["cpu_ms"]
    rows = []
    for client, f in medians.items():
        if client == OURS:
            continue
        if client in CACHE_CLIENTS:  # what the cache adds to (a miss) or saves of (a hit) our call
            rows.append([f"{client} / {OURS}", fmt(f["cpu_ms"] / ours), ""])
            continue
        ratio = ours / f["cpu_ms"]
        verdict = ""
        if client == "openai":
            verdict = f"{'met' if ratio < 1 else 'NOT met'} (ours {fmt(ours, 3)} vs {fmt(f['cpu_ms'], 3)} ms)"
        rows.append([f"{OURS} / {client}", fmt(ratio), verdict])
    print_table(["CPU per call", "ratio", "target: ours cheaper than AsyncOpenAI"], rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per client per round")
    parser.add_argument("--concurrency", type=int, default=200, help="calls in flight at once")
    parser.add_argument("--latency", type=float, default=0.2, help="fake server seconds per call")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS + CACHE_CLIENTS, default=list(CLIENTS))
    parser.add_argument("--json", help="also write every run's raw results to this file")
    parser.add_argument("--profile", help="then one more run of our trigger under py-spy, to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker and server logs")
    args = parser.parse_args()
    if not (1 <= args.calls <= 20_000 and 1 <= args.concurrency <= 1000 and 0 <= args.latency <= 5):
        parser.error("calls 1..20000, concurrency 1..1000, latency 0..5 s (bounded runs only)")
    return args


def main() -> None:
    args = parse_args()
    print(
        f"# overhead: {args.calls} calls at concurrency {args.concurrency}, latency {args.latency} s, "
        f"{args.rounds} rounds\n# {describe_machine()}"
    )
    raw: list[dict] = []
    runs = measure(args, raw)
    report(runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": raw}, indent=2))


if __name__ == "__main__":
    main()
