"""Worker slots: N LLM calls on a real Airflow with 2 worker slots, sync vs deferrable vs worker-free.

One run starts one Airflow stack (scheduler, dag-processor, triggerer, api-server; LocalExecutor,
``[core] parallelism`` = 2; PostgreSQL if a server answers on 127.0.0.1:5432, else SQLite) and the
fake OpenAI server (2 s per answer), then runs a DAG of N independent LLM tasks in each mode of one
suite. The ``operators`` suite (the default), N ``LLMOperator`` tasks:

* ``sync`` (``deferrable=False``): the call waits on a worker slot;
* ``deferrable`` (default): the call waits in the triggerer; the task starts and resumes on a worker;
* ``worker_free`` (``start_from_trigger=True``): the task starts and ends in the triggerer.

The ``taskflow`` suite, one decorated function mapped over N articles (``summarize.expand(...)``):

* ``taskflow_common_ai``: common.ai's ``@task.llm``; the call runs on the worker (pydantic-ai);
* ``taskflow_deferred``: our ``@task.llm_deferred``; the function runs on the worker, the call
  waits in the triggerer.

Per mode: the DAG run's wall time (its start_date to end_date in the REST API), the most LLM task
instances ``running`` at once (= worker slots held; sampled every 0.25 s), worker-slot-seconds (slots
busy, min(slots, queued + running), x time, summed over the samples; and ``running`` alone), how many
were ever queued for a worker (``queued_when`` set), and the most calls waiting at the fake server at
once. All modes of the suite run in the same invocation, after an unreported warm-up run of each, so
the ratios to the suite's first mode hold on a shared machine even when absolute times do not.

    .venv/bin/python -m bench.worker_slots                              # N = 50, ~4 min
    .venv/bin/python -m bench.worker_slots --plot --sizes 10,25,50      # + docs/worker_slots.png, ~7 min
    .venv/bin/python -m bench.worker_slots --suite taskflow --sizes 20,50   # ~7 min

Targets, operators: worker-free >= 10x faster than sync at the same worker slots, faster than
deferrable, and no worker slot used by its LLM tasks. TaskFlow: ``@task.llm_deferred`` faster than
``@task.llm`` and fewer worker-slot-seconds. The exit status is 1 if a task failed or a target is
missed at the largest N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from airflow_llm_async.testing.airflow_stack import (
    AirflowStack,
    create_postgres_database,
    drop_postgres_database,
)
from airflow_llm_async.testing.fake_server_process import FakeServerProcess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The first mode of each suite is its baseline.
SUITES = {
    "operators": ("sync", "deferrable", "worker_free"),
    "taskflow": ("taskflow_common_ai", "taskflow_deferred"),
}
LATENCY_S = 2.0
PARALLELISM = 2
SAMPLE_INTERVAL_S = 0.25
TARGET_SPEEDUP = 10.0
# Each mode first runs a DAG this small, unreported: the first use of a code path in a long-lived
# component costs seconds once (e.g. the triggerer builds its in-process execution API on its first
# XCom push, ~5 s here), which a real deployment pays once at start-up, not per DAG run.
WARMUP_N = 2
API_KEY = "bench-worker-slots-key"
# Logged by the scheduler when Airflow 3.3.2's resume race hits a deferred task.
RACE_MESSAGE = "but the task instance's state attribute is"


@dataclass
class Result:
    mode: str
    n: int
    state: str
    wall_s: float
    max_running: int  # most LLM task instances in `running` at one sample: worker slots held
    # Worker-slot-seconds, each a sum over the samples of a count x the seconds to the next sample:
    slot_s: float  # slots busy with LLM tasks: min(slots, queued + running)
    running_s: float  # LLM task instances in `running`: their task processes alone
    ever_queued: int  # LLM task instances with queued_when set: handed to the executor at least once
    succeeded: int
    requests: int  # calls the fake server answered
    max_in_flight: int  # most calls waiting at the fake server at once
    race_hits: int  # scheduler log lines of the 3.3.2 resume race during this run


def dag_id(mode: str, n: int) -> str:
    return f"worker_slots_{mode}_{n}"


# ---- setup ---------------------------------------------------------------------------------------------


def write_dags(folder: Path, modes: tuple[str, ...], sizes: list[int]) -> list[str]:
    """One copy of dag.py per (mode, N); the copy's name tells it which DAG to build."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [dag_id(mode, n) for n in sizes for mode in modes]
    for name in ids:
        shutil.copy(HERE / "dag.py", folder / f"{name}.py")
    return ids


def connections(base_url: str) -> dict[str, str]:
    """Ours (type ``llm``) and common.ai's (type ``pydanticai``), both to the fake server, model gpt-4."""
    llm_extra = {"default_model": "gpt-4", "timeout": 60}
    pydanticai_extra = {"model": "openai-chat:gpt-4"}  # openai-chat: Chat Completions, as ours
    return {
        f"AIRFLOW_CONN_{name.upper()}": json.dumps(
            {"conn_type": conn_type, "host": base_url, "password": API_KEY, "extra": extra}
        )
        for name, conn_type, extra in [
            ("llm_default", "llm", llm_extra),
            ("pydanticai_default", "pydanticai", pydanticai_extra),
        ]
    }


@contextmanager
def airflow_with_fake_llm(
    workdir: Path, modes: tuple[str, ...], sizes: list[int], latency_s: float
) -> Iterator[tuple[AirflowStack, FakeServerProcess]]:
    """The fake server and one Airflow stack for the whole run; the database is dropped afterwards."""
    dags = write_dags(workdir / "dags", modes, sorted(set(sizes)))
    db_url = create_postgres_database("airflow_llm_bench")
    try:
        with FakeServerProcess(latency=latency_s, api_key=API_KEY, log_path=workdir / "fake-llm.log") as fake:
            env = connections(fake.base_url)
            stack = AirflowStack(
                workdir / "home", workdir / "dags", db_url=db_url, parallelism=PARALLELISM, env=env
            )
            with stack:
                for name in dags:
                    stack.wait_for_dag(name, timeout=300)
                    stack.unpause(name)
                yield stack, fake
    finally:
        if db_url:
            drop_postgres_database(db_url)


# ---- one measurement -----------------------------------------------------------------------------------


def race_lines(stack: AirflowStack) -> int:
    try:
        return stack.log_path("scheduler").read_text(errors="replace").count(RACE_MESSAGE)
    except FileNotFoundError:
        return 0


def wall_seconds(run: dict) -> float:
    start, end = (datetime.fromisoformat(run[key]) for key in ("start_date", "end_date"))
    return (end - start).total_seconds()


def measure(stack: AirflowStack, fake: FakeServerProcess, mode: str, n: int, latency_s: float) -> Result:
    """Trigger the (mode, N) DAG, sample its task states until it ends, and sum up."""
    name = dag_id(mode, n)
    fake.reset()
    races_before = race_lines(stack)
    max_running = 0
    slot_s = running_s = 0.0
    last = (time.monotonic(), 0, 0)  # the previous sample: when, slots busy, instances running

    def sample(_run: dict) -> None:
        nonlocal max_running, slot_s, running_s, last
        states = [ti["state"] for ti in stack.task_instances(name, run_id)]
        running = states.count("running")
        # Airflow 3.3 queues every ready instance at once; the executor hands them to its slots. A slot
        # is busy while an instance runs and while a queued one's process starts (before `running`).
        busy = min(PARALLELISM, running + states.count("queued"))
        now = time.monotonic()
        slot_s += last[1] * (now - last[0])  # the previous counts held until this sample
        running_s += last[2] * (now - last[0])
        last = (now, busy, running)
        max_running = max(max_running, running)

    run_id = stack.trigger(name)
    # Generous bound: sync on a loaded 2-core machine can take ~(latency + 3) s per task and slot.
    state = stack.wait_for_run(
        name, run_id, timeout=120 + (latency_s + 4) * n, on_poll=sample, poll_interval=SAMPLE_INTERVAL_S
    )
    tis = stack.task_instances(name, run_id)
    server = fake.stats()
    return Result(
        mode=mode,
        n=n,
        state=state,
        wall_s=wall_seconds(stack.dag_run(name, run_id)),
        max_running=max_running,
        slot_s=slot_s,
        running_s=running_s,
        ever_queued=sum(ti["queued_when"] is not None for ti in tis),
        succeeded=sum(ti["state"] == "success" for ti in tis),
        requests=server["requests"],
        max_in_flight=server["max_in_flight"],
        race_hits=race_lines(stack) - races_before,
    )


# ---- report --------------------------------------------------------------------------------------------


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, so it can be pasted into the docs as it is."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def check_targets(results: dict[str, Result]) -> list[tuple[str, bool]]:
    """The targets of one N, as (what was measured, met)."""
    if "taskflow_deferred" in results:
        return taskflow_targets(results["taskflow_common_ai"], results["taskflow_deferred"])
    sync, deferrable, free = (results[mode] for mode in SUITES["operators"])
    speedup = sync.wall_s / free.wall_s
    slots = f"max {free.max_running} running, {free.ever_queued} ever queued"
    return [
        (f"worker-free >= {TARGET_SPEEDUP:.0f}x faster than sync: {speedup:.2f}x", speedup >= TARGET_SPEEDUP),
        (
            f"worker-free faster than deferrable: {deferrable.wall_s / free.wall_s:.2f}x",
            free.wall_s < deferrable.wall_s,
        ),
        (f"worker-free holds no worker slot: {slots}", free.max_running == 0 and free.ever_queued == 0),
    ]


def taskflow_targets(before: Result, after: Result) -> list[tuple[str, bool]]:
    """What moving from common.ai's ``@task.llm`` to ``@task.llm_deferred`` gains, after/before."""
    wall, slots = after.wall_s / before.wall_s, after.slot_s / max(before.slot_s, 1e-9)
    return [
        (
            f"@task.llm_deferred faster than @task.llm: wall {after.wall_s:.1f} / {before.wall_s:.1f} s "
            f"= {wall:.2f} after/before ({1 / wall:.2f}x faster)",
            wall < 1,
        ),
        (
            f"@task.llm_deferred holds worker slots less: {after.slot_s:.1f} / {before.slot_s:.1f} "
            f"slot-seconds = {slots:.2f} after/before ({after.running_s:.1f} / {before.running_s:.1f} "
            f"running = {after.running_s / max(before.running_s, 1e-9):.2f})",
            slots < 1,
        ),
    ]


def report(results: dict[str, Result]) -> list[tuple[str, bool]]:
    """Print the table of one N and its targets; return the targets."""
    baseline = next(iter(results.values()))
    headers = [
        "mode",
        "N",
        "wall s",
        "max slots in use",
        "slot-s busy",
        "slot-s running",
        "ever queued on a worker",
    ]
    headers += [f"speed-up vs {baseline.mode}", "calls in flight", "succeeded", "resume races"]
    rows = [
        [
            r.mode,
            str(r.n),
            f"{r.wall_s:.1f}",
            str(r.max_running),
            f"{r.slot_s:.1f}",
            f"{r.running_s:.1f}",
            str(r.ever_queued),
            f"{baseline.wall_s / r.wall_s:.1f}x",
            f"max {r.max_in_flight}",
            f"{r.succeeded}/{r.n}",
            str(r.race_hits),
        ]
        for r in results.values()
    ]
    print_table(headers, rows)
    targets = check_targets(results)
    for text, ok in targets:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}")
    return targets


def describe_setup(stack: AirflowStack, latency_s: float) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    db = "SQLite" if stack.is_sqlite else "PostgreSQL"
    return (
        f"Airflow {version('apache-airflow')}, LocalExecutor, parallelism={PARALLELISM}, {db}, "
        f"fake LLM latency {latency_s:g} s; {os.cpu_count()} CPUs, load average {load}; "
        f"Python {platform.python_version()}"
    )


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_slots", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50", help="comma-separated numbers of LLM tasks (default 50)")
    parser.add_argument(
        "--suite",
        choices=SUITES,
        default="operators",
        help="operators: sync vs deferrable vs worker-free LLMOperator (default); "
        "taskflow: common.ai's @task.llm vs @task.llm_deferred, mapped",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=LATENCY_S,
        help=f"seconds per answer at the fake server (default {LATENCY_S:g})",
    )
    parser.add_argument("--plot", action="store_true", help="also plot wall time vs N (operators suite)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "worker_slots.png", help="the plot file")
    parser.add_argument("--keep", action="store_true", help="keep the Airflow home (logs) afterwards")
    args = parser.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.plot and args.suite != "operators":
        parser.error("--plot draws the operators suite only")
    return args


def run_all(
    stack: AirflowStack, fake: FakeServerProcess, modes: tuple[str, ...], sizes: list[int], latency_s: float
) -> tuple[list[Result], dict[int, dict[str, Result]]]:
    """Warm up every mode, then measure every (N, mode), printing each N's table as it completes."""
    warm = [measure(stack, fake, mode, WARMUP_N, latency_s) for mode in modes]
    summary = ", ".join(f"{r.mode} {r.wall_s:.1f} s ({r.succeeded}/{r.n} ok)" for r in warm)
    print(f"warm-up, N={WARMUP_N}, not reported below: {summary}", flush=True)
    results: dict[int, dict[str, Result]] = {}
    for n in sizes:
        results[n] = {}
        for mode in modes:
            results[n][mode] = measure(stack, fake, mode, n, latency_s)
            print(f"  measured {mode} N={n}: {results[n][mode].wall_s:.1f} s", flush=True)
        print(f"\nN = {n}:")
        report(results[n])
        print(flush=True)
    return warm, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-worker-slots-"))
    started = time.monotonic()
    try:
        modes = SUITES[args.suite]
        with airflow_with_fake_llm(workdir, modes, [WARMUP_N, *args.sizes], args.latency) as (stack, fake):
            setup = describe_setup(stack, args.latency)
            print(setup, flush=True)
            warm, results = run_all(stack, fake, modes, args.sizes, args.latency)
    finally:
        if args.keep:
            print(f"Airflow home and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.plot:
        from bench.worker_slots.plot import plot

        plot(results, args.out, slots=PARALLELISM, latency_s=args.latency, setup=setup)
        print(f"plot: {args.out}")
    print(f"total {time.monotonic() - started:.0f} s")
    measured = [*warm, *(r for per_n in results.values() for r in per_n.values())]
    failed = [r for r in measured if r.succeeded != r.n or r.requests != r.n]
    for r in failed:
        print(
            f"FAILED: {r.mode} N={r.n}: run {r.state}, {r.succeeded}/{r.n} tasks succeeded, "
            f"{r.requests} calls, {r.race_hits} resume races"
        )
    # The exit status follows the targets at the largest N.
    missed = [text for text, ok in check_targets(results[args.sizes[-1]]) if not ok]
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
