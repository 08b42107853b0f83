"""Fan-out: N prompts in one LLMFanOutOperator task vs N worker-free tasks vs N mapped deferrable tasks.

One run, one fake OpenAI server (``--latency`` seconds per answer, backlog 4,096), two parts:

1. **In process** (``bench/fanout/inprocess.py``, one event loop as in the triggerer): one
   ``FanOutTrigger`` with N items vs N ``ChatCompletionTrigger``s, ``--rounds`` times each
   (alternating, a fresh process per run; single runs vary a lot on a shared machine). Wall and CPU
   time of the calls and the event-loop lag (p50/p99/max of a 10 ms sleep's lateness); the targets
   use the fan-out's medians.
2. **Real Airflow** (``AirflowStack``: scheduler, dag-processor, triggerer, api-server; PostgreSQL;
   LocalExecutor with ``[core] parallelism`` = 2 worker slots): the DAGs of ``bench/fanout/dag.py``,
   one variant after the other, each after an unreported N = 2 warm-up run. Per variant: the DAG
   run's wall time, the fan-out task's own wall time, the triggerer's CPU time (its processes'
   user + system), the triggerer's own "async thread was blocked" warnings (its watchdog sleeps
   100 ms; a warning means the loop was late by more than 100 ms), calls answered. A variant still
   running after ``--cap`` seconds is stopped (its run marked failed) and reported as done/total.

    .venv/bin/python -m bench.fanout                         # N = 1,000, 5 s latency (~12 min)
    .venv/bin/python -m bench.fanout --prompts 200 --cap 120 # quicker
    .venv/bin/python -m bench.fanout --skip-airflow          # only the in-process part (~2 min)

Targets (N = 1,000, 5 s latency): the fan-out task takes under 2x the latency; the fan-out DAG run
is at least 10x faster than the worker-free tasks' run; in-process event-loop lag p99 under 100 ms.
The exit status is 1 if the fan-out failed or a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import psutil

from airflow_llm_async.testing.airflow_stack import (
    AirflowStack,
    create_postgres_database,
    drop_postgres_database,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: the shared harness (fake server, tables)

from _harness import API_KEY, bench_environment, print_table, worker_env  # noqa: E402

VARIANTS = ("fanout", "worker_free", "mapped_deferrable")
PARALLELISM = 2
WARMUP_N = 2
LAG_TARGET_MS = 100.0
SPEEDUP_TARGET = 10.0
_BLOCKED = re.compile(r"async thread was blocked for (?P<s>[\d.]+) seconds")


@dataclass
class AirflowResult:
    variant: str
    n: int
    state: str  # success, failed, or capped (still running at the cap)
    done: int  # task instances in success
    tasks: int
    run_s: float  # the DAG run's start to end (to the cap if capped)
    task_s: float | None  # the fan-out task's own start to end
    triggerer_cpu_s: float
    stalls: int  # triggerer watchdog warnings: loop late by > 100 ms
    worst_stall_s: float
    answered: int  # chat completions the fake server received
    max_in_flight: int


# ---- part 1: in process --------------------------------------------------------------------------------


def in_process(server, workdir: Path, n: int, rounds: int) -> dict[str, list[dict]]:
    """Each variant ``rounds`` times, alternating, each run in a fresh process."""
    import subprocess

    results: dict[str, list[dict]] = {"fanout": [], "triggers": []}
    for _ in range(rounds):
        for variant in results:
            argv = [sys.executable, "-m", "bench.fanout.inprocess", variant, "--prompts", str(n)]
            out = subprocess.run(
                argv, env=worker_env(server.base_url, workdir), capture_output=True, text=True, timeout=900
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
                raise RuntimeError(f"in-process {variant} failed:\n{tail}")
            results[variant].append(json.loads(line.removeprefix("RESULT ")))
    return results


def report_in_process(results: dict[str, list[dict]], latency: float) -> list[tuple[str, bool]]:
    headers = ["round", "in one event loop", "items", "answered", "wall s", "CPU s", "lag p50 ms"]
    headers += ["lag p99 ms", "lag max ms", "full GCs (longest ms)"]
    rows = []
    for i, (fan, many) in enumerate(zip(results["fanout"], results["triggers"], strict=True), 1):
        for label, r in (("1 FanOutTrigger", fan), (f"{many['items']} ChatCompletionTriggers", many)):
            gen2 = r["gc"]["gen2"]
            rows.append(
                [str(i), label, str(r["items"]), str(r["answered"])]
                + [f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['lag_p50_ms']:.1f}"]
                + [f"{r['lag_p99_ms']:.1f}", f"{r['lag_max_ms']:.0f}"]
                + [f"{gen2['count']} ({gen2['max_ms']:.0f})"]
            )
    print_table(headers, rows)
    cpu = [m["cpu_s"] / f["cpu_s"] for f, m in zip(results["fanout"], results["triggers"], strict=True)]
    wall = [m["wall_s"] / f["wall_s"] for f, m in zip(results["fanout"], results["triggers"], strict=True)]
    print(
        f"  separate triggers / fan-out, per round: CPU {', '.join(f'{x:.2f}x' for x in cpu)} "
        f"(median {statistics.median(cpu):.2f}x); wall {', '.join(f'{x:.2f}x' for x in wall)}"
    )
    fans = results["fanout"]
    lag_p99 = statistics.median(r["lag_p99_ms"] for r in fans)
    fan_wall = statistics.median(r["wall_s"] for r in fans)
    all_answered = all(r["answered"] == r["items"] for r in fans)
    return [
        (
            f"in-process fan-out lag p99 < {LAG_TARGET_MS:.0f} ms: median {lag_p99:.1f} ms",
            lag_p99 < LAG_TARGET_MS,
        ),
        (
            f"in-process fan-out wall < 2x latency ({2 * latency:.0f} s): median {fan_wall:.2f} s",
            fan_wall < 2 * latency and all_answered,
        ),
    ]


# ---- part 2: real Airflow ------------------------------------------------------------------------------


def dag_id(variant: str, n: int) -> str:
    return f"fanout_bench_{variant}_{n}"


def triggerer_cpu(stack: AirflowStack) -> float:
    try:
        root = psutil.Process(stack.pid("triggerer-0"))
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def measure(stack: AirflowStack, server, variant: str, n: int, cap: float) -> AirflowResult:
    name = dag_id(variant, n)
    server.reset()
    log = stack.log_path("triggerer-0")
    log_offset = log.stat().st_size
    cpu0 = triggerer_cpu(stack)
    started = time.monotonic()
    run_id = stack.trigger(name)
    state = "running"
    while time.monotonic() - started < cap:
        state = stack.dag_run(name, run_id)["state"]
        if state in ("success", "failed"):
            break
        time.sleep(1.0)
    else:
        state = "capped"
    capped_at = time.monotonic() - started
    cpu = triggerer_cpu(stack) - cpu0
    stats = server.stats()
    tis = stack.task_instances(name, run_id)
    run = stack.dag_run(name, run_id)
    with open(log, errors="replace") as handle:
        handle.seek(log_offset)
        stalls = [float(m["s"]) for m in _BLOCKED.finditer(handle.read())]
    if state == "capped":
        # Stop it, and restart the triggerer: its queue of triggers still to create would otherwise
        # slow the next variant down for minutes (each takes ~1 s there, see docs/performance.md).
        stack.api("PATCH", f"dags/{name}/dagRuns/{run_id}", json={"state": "failed"})
        stack.restart_process("triggerer-0", sig=signal.SIGKILL, timeout=300)
    run_s = capped_at if state == "capped" else seconds_between(run["start_date"], run["end_date"])
    return AirflowResult(
        variant=variant,
        n=n,
        state=state,
        done=sum(ti["state"] == "success" for ti in tis),
        tasks=len(tis),
        run_s=run_s or capped_at,
        task_s=seconds_between(tis[0]["start_date"], tis[0]["end_date"]) if variant == "fanout" else None,
        triggerer_cpu_s=cpu,
        stalls=len(stalls),
        worst_stall_s=max(stalls, default=0.0),
        answered=stats["requests"],
        max_in_flight=stats["max_in_flight"],
    )


def airflow_part(server, workdir: Path, n: int, cap: float) -> dict[str, AirflowResult]:
    dags = workdir / "dags"
    dags.mkdir()
    for variant in VARIANTS:
        for size in (WARMUP_N, n):
            shutil.copy(HERE / "dag.py", dags / f"{dag_id(variant, size)}.py")
    db_url = create_postgres_database("airflow_llm_bench_fanout")
    if db_url is None:
        raise SystemExit("bench.fanout needs PostgreSQL on 127.0.0.1:5432; no server answered.")
    conn = {"conn_type": "llm", "host": server.base_url, "password": API_KEY}
    conn["extra"] = {"default_model": "gpt-4", "timeout": 120}
    config = {
        # Room for N triggers in one triggerer, and N mapped tasks.
        "triggerer": {"capacity": str(max(1000, n + 100)), "blocked_main_thread_warning_threshold": "0.2"},
        "core": {"max_map_length": str(max(1024, n))},
    }
    stack = AirflowStack(
        workdir / "home",
        dags,
        db_url=db_url,
        parallelism=PARALLELISM,
        env={"AIRFLOW_CONN_LLM_DEFAULT": json.dumps(conn)},
        config=config,
    )
    results: dict[str, AirflowResult] = {}
    try:
        with stack:
            for variant in VARIANTS:
                for size in (WARMUP_N, n):
                    stack.wait_for_dag(dag_id(variant, size), timeout=600)
                    stack.unpause(dag_id(variant, size))
            print(describe_setup(stack, server.latency), flush=True)
            for variant in VARIANTS:
                warm = measure(stack, server, variant, WARMUP_N, cap)
                print(f"  warm-up {variant} N={WARMUP_N}: {warm.state} in {warm.run_s:.1f} s", flush=True)
                results[variant] = measure(stack, server, variant, n, cap)
                r = results[variant]
                print(f"  measured {variant} N={n}: {r.state}, {r.done}/{r.tasks}, {r.run_s:.1f} s")
    finally:
        drop_postgres_database(db_url)
    return results


def report_airflow(results: dict[str, AirflowResult], latency: float) -> list[tuple[str, bool]]:
    fan = results["fanout"]
    headers = ["variant", "N prompts", "tasks done", "DAG run s", "task s", "vs fan-out run"]
    headers += ["triggerer CPU s", "loop stalls > 100 ms (worst s)", "calls sent", "max in flight"]
    rows = []
    for r in results.values():
        speed = f"{r.run_s / fan.run_s:.1f}x" + (" (at cap)" if r.state == "capped" else "")
        rows.append(
            [r.variant, str(r.n), f"{r.done}/{r.tasks}" + (" at cap" if r.state == "capped" else "")]
            + [f"{r.run_s:.1f}", "-" if r.task_s is None else f"{r.task_s:.1f}", speed]
            + [f"{r.triggerer_cpu_s:.1f}", f"{r.stalls} ({r.worst_stall_s:.2f})", str(r.answered)]
            + [str(r.max_in_flight)]
        )
    print_table(headers, rows)
    free = results["worker_free"]
    speedup = free.run_s / fan.run_s
    note = " (worker-free capped: at least this)" if free.state == "capped" else ""
    return [
        (
            f"fan-out succeeded: {fan.state}, {fan.answered} calls",
            fan.state == "success" and fan.answered >= fan.n,
        ),
        (
            f"fan-out task < 2x latency ({2 * latency:.0f} s): {fan.task_s or 0:.1f} s",
            fan.task_s is not None and fan.task_s < 2 * latency,
        ),
        (
            f"fan-out run >= {SPEEDUP_TARGET:.0f}x faster than worker-free tasks: {speedup:.2f}x{note}",
            speedup >= SPEEDUP_TARGET,
        ),
    ]


def describe_setup(stack: AirflowStack, latency: float) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    db = "SQLite" if stack.is_sqlite else "PostgreSQL"
    return (
        f"Airflow {version('apache-airflow')}, LocalExecutor, parallelism={PARALLELISM}, {db}, 1 triggerer, "
        f"fake LLM latency {latency:g} s; {os.cpu_count()} CPUs, load average {load}; "
        f"Python {platform.python_version()}"
    )


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=1000, help="prompts per variant (default 1,000)")
    parser.add_argument("--latency", type=float, default=5.0, help="fake server seconds per answer")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds a variant may run (default 300)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="in-process runs of each variant, alternating (default 3)"
    )
    parser.add_argument("--skip-airflow", action="store_true", help="only the in-process part")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the Airflow home and logs")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= 10_000:
        parser.error("--prompts must be from 1 to 10,000")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be from 1 to 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    targets: list[tuple[str, bool]] = []
    raw: dict = {}
    with bench_environment(args.latency, keep_logs=args.keep_logs) as (server, workdir):
        print(f"N = {args.prompts} prompts, fake server latency {args.latency:g} s\n", flush=True)
        raw["in_process"] = in_process(server, workdir, args.prompts, args.rounds)
        targets += report_in_process(raw["in_process"], args.latency)
        print(flush=True)
        if not args.skip_airflow:
            results = airflow_part(server, workdir, args.prompts, args.cap)
            raw["airflow"] = {k: asdict(v) for k, v in results.items()}
            print()
            targets += report_airflow(results, args.latency)
    print()
    for text, ok in targets:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}")
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
