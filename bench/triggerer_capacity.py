"""How many ChatCompletionTriggers one event loop can hold, against a bare aiohttp baseline.

For each N and client, two worker processes each run N concurrent calls on one asyncio loop
against the fake server (latency 5 s, its own process):

* a timing run: the calls start one by one, as the triggerer starts triggers, and answer after
  the latency. Gives completions/s, event-loop lag p50/p99/max and CPU ms per call.
* a memory run: the server holds every call until all N are in flight; the worker's RSS then,
  minus its RSS before the run, divided by N, is the memory per in-flight call.

The clients: ours (``trigger``) and the baseline (``aiohttp``), a bare shared aiohttp session
making the same POSTs, measured the same way in the same invocation.

    python bench/triggerer_capacity.py                         # quick: N = 1,000
    python bench/triggerer_capacity.py --sizes 1000 2000 5000  # full

Targets at N = 5,000 (issue 15, item 5), each against the baseline of the same invocation: CPU per
call <= 1.3x the baseline's (in the timing run, and in the memory run, where all N are answered at
once); lag p99 < 50 ms in the timing run; lag p99 in the memory run <= 1.2x the baseline's there;
< 25 KB per in-flight call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _harness import FakeServer, bench_environment, describe_machine, fmt, print_table, run_worker

BASELINE, OURS = "aiohttp", "trigger"
TARGET_LAG_P99_MS = 50.0  # timing run: calls start one by one
TARGET_HELD_LAG_RATIO = 1.2  # memory run (all N answered together): ours' lag p99 / the baseline's
TARGET_KB_PER_CALL = 25.0
TARGET_CPU_RATIO = 1.3


def derive(timing: dict[str, Any], memory: dict[str, Any]) -> dict[str, float]:
    """The reported figures of one timing run and one memory run."""
    return {
        "peak_in_flight": timing.get("peak_in_flight", 0),
        "completions_s": timing["ok"] / timing["wall_s"],
        "wall_s": timing["wall_s"],
        "launch_s": timing["launch_s"],
        "lag_p50": timing["lag_ms"]["p50"],
        "lag_p99": timing["lag_ms"]["p99"],
        "lag_max": timing["lag_ms"]["max"],
        # The memory run has all N in flight at once, then all N answered together: the worst case.
        "held_lag_p99": memory["lag_ms"]["p99"],
        "held_lag_max": memory["lag_ms"]["max"],
        "gc_max_ms": max(run["gc"][f"gen{gen}"]["max_ms"] for run in (timing, memory) for gen in (0, 1, 2)),
        "gen2_count": timing["gc"]["gen2"]["count"],
        "cpu_ms": timing["cpu_s"] / timing["calls"] * 1000,
        # The memory run's CPU: every call started, held, then all N answered at once.
        "held_cpu_ms": memory["cpu_s"] / memory["calls"] * 1000,
        "held_gen2_count": memory["gc"]["gen2"]["count"],
        "sys_pct": 100 * timing["sys_s"] / timing["cpu_s"] if timing["cpu_s"] else 0.0,
        "held": memory["peak_in_flight"],
        "kb_per_call": (memory["rss_peak_kb"] - memory["rss_before_kb"]) / memory["calls"],
        "objects_per_call": (memory["at_peak"].get("gc_objects", 0) - memory["gc_objects_before"])
        / memory["calls"],
        "heap_objects": memory["gc_objects_before"],
        "errors": timing["calls"] - timing["ok"] + memory["calls"] - memory["ok"],
        "server_cpu_s": timing["server_cpu_s"],
        "types_per_call": memory["at_peak"].get("types_per_call", {}),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over the rounds (a shared machine makes single runs noisy)."""
    return {
        key: statistics.median(run[key] for run in runs)
        for key in runs[0]
        if isinstance(runs[0][key], int | float)
    } | {"types_per_call": runs[-1]["types_per_call"]}


def run_pair(
    args: argparse.Namespace, server: FakeServer, workdir: Path, mode: str, size: int, raw: list[dict]
) -> dict[str, float]:
    """A timing run and a memory run of ``size`` calls with one client."""
    common = {"calls": size, "concurrency": size, "timeout": args.latency * 4 + size / 100}
    timing = run_worker(mode, server, workdir, watch=True, **common)
    memory = run_worker(mode, server, workdir, hold=True, **common)
    raw += [{"run": "timing", **timing}, {"run": "memory", **memory}]
    for result in (timing, memory):
        if result["first_failure"]:
            print(f"  {mode} N={size}: first failure {result['first_failure']}", file=sys.stderr)
    row = derive(timing, memory)
    print(
        f"  N={size} {mode}: {fmt(row['cpu_ms'], 3)} CPU ms/call, {fmt(row['kb_per_call'], 1)} KB/call, "
        f"lag p99 {fmt(row['lag_p99'], 1)} ms, longest GC {fmt(row['gc_max_ms'], 1)} ms",
        file=sys.stderr,
    )
    return row


def measure(args: argparse.Namespace, raw: list[dict]) -> dict[int, dict[str, dict[str, float]]]:
    figures: dict[int, dict[str, list[dict[str, float]]]] = {}
    with bench_environment(args.latency, keep_logs=args.keep_logs) as (server, workdir):
        for size in args.sizes:
            figures[size] = {BASELINE: [], OURS: []}
            for _ in range(args.rounds):
                # Baseline and ours back to back, so both see the same machine load.
                for mode in (BASELINE, OURS):
                    figures[size][mode].append(run_pair(args, server, workdir, mode, size, raw))
        if args.profile:
            # One more run: sampling slows the worker, so it never feeds the figures.
            size = max(args.sizes)
            common = {"calls": size, "concurrency": size, "timeout": args.latency * 4 + size / 100}
            run_worker(OURS, server, workdir, profile=Path(args.profile), **common)
            print(f"  profile of {OURS} at N={size} written to {args.profile}", file=sys.stderr)
        if args.cprofile:
            # One more timing run per client under cProfile, with the collector off: where each client's
            # own CPU goes. Diagnostic only (cProfile slows every call): never part of the figures.
            size = max(args.sizes)
            common = {"calls": size, "concurrency": size, "timeout": args.latency * 4 + size / 100}
            Path(args.cprofile).mkdir(parents=True, exist_ok=True)
            for mode in (BASELINE, OURS):
                out = Path(args.cprofile) / f"{mode}-{size}.prof"
                run_worker(mode, server, workdir, worker_args=("--cprofile", str(out), "--no-gc"), **common)
                print_profile(out, size)
    return {size: {mode: median_of(runs) for mode, runs in modes.items()} for size, modes in figures.items()}


def print_profile(path: Path, calls: int, top: int = 30) -> None:
    """The functions with the most own time, in µs per call, from a cProfile dump."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    total = sum(tt for _, _, tt, _, _ in stats.values())
    print(f"\ncProfile of {path.name} (collector off): {total / calls * 1e6:,.0f} µs per call in all")
    groups: dict[str, float] = {}
    for (file, _, _), (_, _, tt, _, _) in stats.items():
        groups[_package(file)] = groups.get(_package(file), 0.0) + tt
    print(
        "  own time by package: "
        + ", ".join(
            f"{name} {tt / calls * 1e6:,.0f}" for name, tt in sorted(groups.items(), key=lambda g: -g[1])
        )
    )
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    for (file, line, name), (_, ncalls, tt, ct, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(
            f"  {tt / calls * 1e6:7.1f} µs own {ct / calls * 1e6:8.1f} µs cum {ncalls / calls:6.2f}x  {where}"
        )


def _package(file: str) -> str:
    """Which part of the process a profiled function belongs to, from its file."""
    if file == "~":
        return "builtins"
    parts = Path(file).parts
    for name in (
        "airflow_llm_async",
        "aiohttp",
        "asyncio",
        "structlog",
        "json",
        "logging",
        "airflow",
        "bench",
    ):
        if name in parts:
            return name
    return Path(file).name if "site-packages" not in parts else parts[parts.index("site-packages") + 1]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def ratio(ours: float, base: float) -> float:
    return ours / base if base else float("nan")


def report(figures: dict[int, dict[str, dict[str, float]]]) -> None:
    print("\nTiming runs (calls start one by one, answers after the latency):")
    headers = ["N", "client", "completions/s", "wall s", "launch s", "peak in flight", "lag p50 ms"]
    headers += ["lag p99 ms", "lag max ms", "CPU ms/call", "sys %", "full GCs", "errors"]
    rows = []
    for size, modes in figures.items():
        for mode, f in modes.items():
            rows.append(
                [f"{size:,}", mode, fmt(f["completions_s"], 0), fmt(f["wall_s"]), fmt(f["launch_s"])]
                + [f"{f['peak_in_flight']:,.0f}", fmt(f["lag_p50"]), fmt(f["lag_p99"]), fmt(f["lag_max"])]
                + [fmt(f["cpu_ms"], 3), fmt(f["sys_pct"], 0), f"{f['gen2_count']:.0f}", f"{f['errors']:.0f}"]
            )
    print_table(headers, rows)
    print("\nMemory runs (the server holds all N in flight, then answers them all):")
    headers = ["N", "client", "held", "KB/call", "GC objects/call", "heap objects", "lag p99 ms"]
    headers += ["lag max ms", "longest GC ms", "CPU ms/call", "full GCs"]
    rows = []
    for size, modes in figures.items():
        for mode, f in modes.items():
            rows.append(
                [
                    f"{size:,}",
                    mode,
                    f"{f['held']:,.0f}",
                    fmt(f["kb_per_call"], 1),
                    fmt(f["objects_per_call"], 0),
                ]
                + [f"{f['heap_objects']:,.0f}", fmt(f["held_lag_p99"]), fmt(f["held_lag_max"])]
                + [fmt(f["gc_max_ms"]), fmt(f["held_cpu_ms"], 3), f"{f['held_gen2_count']:.0f}"]
            )
    print_table(headers, rows)
    print("\nGC-tracked objects per in-flight call, by type (memory run; the types that grew most):")
    for size, modes in figures.items():
        for mode, f in modes.items():
            top = ", ".join(f"{name} {count:g}" for name, count in list(f["types_per_call"].items())[:12])
            print(f"- N={size:,} {mode}: {fmt(f['objects_per_call'], 0)} in all: {top}")
    print("\nRatios and targets (ours / the baseline of this run):")
    headers = ["N", "CPU ratio (timing)", "CPU ratio (all answered at once)", "KB ratio"]
    headers += [f"CPU <= {TARGET_CPU_RATIO}x", f"lag p99 < {TARGET_LAG_P99_MS:g} ms (timing)"]
    headers += [f"lag p99 <= {TARGET_HELD_LAG_RATIO}x baseline (all at once)"]
    headers += [f"< {TARGET_KB_PER_CALL:g} KB/call"]
    rows = []
    for size, modes in figures.items():
        ours, base = modes[OURS], modes[BASELINE]
        cpu = ratio(ours["cpu_ms"], base["cpu_ms"])
        held_cpu = ratio(ours["held_cpu_ms"], base["held_cpu_ms"])
        held_lag = ratio(ours["held_lag_p99"], base["held_lag_p99"])
        rows.append(
            [f"{size:,}", fmt(cpu), fmt(held_cpu), fmt(ratio(ours["kb_per_call"], base["kb_per_call"]))]
            + [f"{verdict(max(cpu, held_cpu) <= TARGET_CPU_RATIO)} ({fmt(cpu)}x / {fmt(held_cpu)}x)"]
            + [f"{verdict(ours['lag_p99'] < TARGET_LAG_P99_MS)} ({fmt(ours['lag_p99'], 1)} ms)"]
            + [
                f"{verdict(held_lag <= TARGET_HELD_LAG_RATIO)} ({fmt(ours['held_lag_p99'], 1)} / "
                f"{fmt(base['held_lag_p99'], 1)} ms = {fmt(held_lag)}x)"
            ]
            + [f"{verdict(ours['kb_per_call'] < TARGET_KB_PER_CALL)} ({fmt(ours['kb_per_call'], 1)})"]
        )
    print_table(headers, rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000], help="concurrent calls per run")
    parser.add_argument("--latency", type=float, default=5.0, help="fake server seconds per call")
    parser.add_argument("--rounds", type=int, default=1, help="runs per size and client; medians shown")
    parser.add_argument("--json", help="also write the figures and every run's raw results to this file")
    parser.add_argument("--profile", help="then one more timing run of ours at the largest N under py-spy")
    parser.add_argument(
        "--cprofile", help="then one timing run per client at the largest N under cProfile (gc off) into DIR"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker and server logs")
    args = parser.parse_args()
    if any(size < 1 or size > 10_000 for size in args.sizes) or not 0 < args.latency <= 30:
        parser.error("sizes must be 1..10000 and latency 0..30 s (bounded runs only)")
    return args


def main() -> None:
    args = parse_args()
    print(
        f"# triggerer_capacity: sizes {args.sizes}, latency {args.latency} s, rounds {args.rounds}\n"
        f"# {describe_machine()}"
    )
    raw: list[dict] = []
    figures = measure(args, raw)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "runs": raw}, indent=2))


if __name__ == "__main__":
    main()
