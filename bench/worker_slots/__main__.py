"""Worker slots: N LLM calls on a real Airflow with 2 worker slots, sync vs deferrable vs worker-free.

One run starts one Airflow stack (scheduler, dag-processor, triggerer, api-server; LocalExecutor,
``[core] parallelism`` = 2; PostgreSQL if a server answers on 127.0.0.1:5432, else SQLite) and the
fake OpenAI server (2 s per answer; ``--latency 2,20`` measures 2 s and 20 s calls in one run, real
LLM calls taking 10-60 s), then runs a DAG of N independent LLM tasks in each mode of one suite, per
latency. The ``operators`` suite (the default), N ``LLMOperator`` tasks:

* ``sync`` (``deferrable=False``): the call waits on a worker slot;
* ``deferrable`` (default): the task starts on a worker, the call waits in the triggerer, and a
  successful task ends there (a failed one resumes on a worker);
* ``worker_free`` (``start_from_trigger=True``): the task starts and ends in the triggerer.

The ``taskflow`` suite, one decorated function mapped over N articles (``summarize.expand(...)``):

* ``taskflow_common_ai``: common.ai's ``@task.llm``; the call runs on the worker (pydantic-ai);
* ``taskflow_deferred``: our ``@task.llm_deferred``; the function runs on the worker, the call
  waits in the triggerer.

Per mode: the DAG run's wall time (its start_date to end_date in the REST API), the most LLM task
instances ``running`` at once (= worker slots held; sampled every 0.25 s), worker-slot-seconds (slots
busy, min(slots, queued + running), x time, summed over the samples; and ``running`` alone), how many
were ever queued for a worker (``queued_when`` set), and the most calls waiting at the fake server at
once. A second table, the timeline, places each run's stages after the run's start: the first and
last call sent and the last answer (each task's ``llm_meta``), the last task's end, the run's end;
per task, its ``start_date`` to its call (a worker's start-up, or the scheduler and triggerer for a
worker-free task) and the hand-back (answer to ``end_date``), median and max. All modes of the suite
run in the same invocation, after an unreported warm-up run of each, so the ratios to the suite's
first mode hold on a shared machine even when absolute times do not.

    .venv/bin/python -m bench.worker_slots                              # N = 50, ~4 min
    .venv/bin/python -m bench.worker_slots --latency 2,20               # + 20 s calls, ~20 min
    .venv/bin/python -m bench.worker_slots --plot --sizes 10,25,50      # + docs/worker_slots.png, ~7 min
    .venv/bin/python -m bench.worker_slots --suite taskflow --sizes 20,50   # ~7 min

Targets, operators (issue 15): worker-free >= 10x faster than sync at the same worker slots with
2 s calls, >= 20x with calls of 20 s or more, and deferrable >= 5x with those; worker-free faster
than deferrable, and no worker slot used by its LLM tasks. TaskFlow: ``@task.llm_deferred`` faster than
``@task.llm`` and fewer worker-slot-seconds. The exit status is 1 if a task failed or a target is
missed at the largest N (of any latency).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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
LATENCIES_S = "2"
PARALLELISM = 2
SAMPLE_INTERVAL_S = 0.25
# Issue 15's targets, speed-up over sync at the same N and worker slots, by call latency: from
# SLOW_CALL_S up the slow-call targets apply, below it the others. None: no target.
SLOW_CALL_S = 20.0
TARGET_SPEEDUP = {"worker_free": (10.0, 20.0), "deferrable": (None, 5.0)}
LATENCY_HEADER = "x-fake-latency"  # airflow_llm_async/testing/fake_server.py: this request's latency
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
    latency_s: float
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
    # The timeline, seconds after the run's start_date (None when no task pushed its llm_meta):
    first_call_s: float | None  # the first call sent (llm_meta.started_at)
    last_call_s: float | None  # the last call sent: until then a mode is still starting calls
    last_answer_s: float | None  # the last answer (llm_meta.finished_at)
    last_end_s: float | None  # the last task's end_date; the run ends at wall_s
    to_call_s: list[float]  # per task: start_date -> its call sent
    hand_back_s: list[float]  # per task: its answer -> end_date


def latency_tag(latency_s: float) -> str:
    """``2`` -> ``2s``, ``0.5`` -> ``0p5s``: a DAG id and connection id part."""
    return f"{latency_s:g}s".replace(".", "p")


def dag_id(mode: str, n: int, latency_s: float) -> str:
    return f"worker_slots_{mode}_{n}_{latency_tag(latency_s)}"


# ---- setup ---------------------------------------------------------------------------------------------


def write_dags(folder: Path, modes: tuple[str, ...], runs: list[tuple[int, float]]) -> list[str]:
    """One copy of dag.py per mode and (N, latency) of ``runs``; its name tells it which DAG to build."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [dag_id(mode, n, latency) for n, latency in runs for mode in modes]
    for name in ids:
        shutil.copy(HERE / "dag.py", folder / f"{name}.py")
    return ids


def connections(base_url: str, latencies: list[float]) -> dict[str, str]:
    """Ours (type ``llm``) and common.ai's (type ``pydanticai``), both to the fake server, model gpt-4.

    ``llm_default`` and ``pydanticai_default`` get the fake server's own latency; ``llm_<latency>s``
    (the operator modes' connection) asks for its latency in a header on every request.
    """
    timeout = max(60.0, 3 * max(latencies))  # seconds per attempt: never the bound
    llm_extra = {"default_model": "gpt-4", "timeout": timeout}
    pydanticai_extra = {"model": "openai-chat:gpt-4"}  # openai-chat: Chat Completions, as ours
    conns = [("llm_default", "llm", llm_extra), ("pydanticai_default", "pydanticai", pydanticai_extra)]
    for latency in latencies:
        headers = {LATENCY_HEADER: f"{latency:g}"}
        conns.append((f"llm_{latency_tag(latency)}", "llm", {**llm_extra, "headers": headers}))
    return {
        f"AIRFLOW_CONN_{name.upper()}": json.dumps(
            {"conn_type": conn_type, "host": base_url, "password": API_KEY, "extra": extra}
        )
        for name, conn_type, extra in conns
    }


@contextmanager
def airflow_with_fake_llm(
    workdir: Path, modes: tuple[str, ...], runs: list[tuple[int, float]]
) -> Iterator[tuple[AirflowStack, FakeServerProcess]]:
    """The fake server and one Airflow stack for the (N, latency) ``runs`` of every mode; the database
    is dropped afterwards. The fake server's own latency is the first run's (the TaskFlow suite runs one).
    """
    dags = write_dags(workdir / "dags", modes, runs)
    latencies = list(dict.fromkeys(latency for _n, latency in runs))
    db_url = create_postgres_database("airflow_llm_bench")
    try:
        log_path = workdir / "fake-llm.log"
        with FakeServerProcess(latency=runs[0][1], api_key=API_KEY, log_path=log_path) as fake:
            env = connections(fake.base_url, latencies)
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


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def wall_seconds(run: dict) -> float:
    return epoch(run["end_date"]) - epoch(run["start_date"])


def timeline(stack: AirflowStack, name: str, run: dict, tis: list[dict]) -> dict:
    """The Result's timeline fields, from the tasks' REST dates and their ``llm_meta`` XComs."""
    start = epoch(run["start_date"])
    sent, answered, ended, to_call, hand_back = [], [], [], [], []
    for ti in tis:
        if ti["state"] != "success" or not ti["end_date"]:
            continue
        meta = stack.xcom(name, run["dag_run_id"], ti["task_id"], "llm_meta", map_index=ti["map_index"])
        metas = meta if isinstance(meta, list) else [meta]  # one per call; a task here makes one
        if not all(isinstance(m, dict) and m.get("started_at") and m.get("finished_at") for m in metas):
            continue
        end = epoch(ti["end_date"])
        sent.append(min(m["started_at"] for m in metas))
        answered.append(max(m["finished_at"] for m in metas))
        ended.append(end)
        to_call.append(sent[-1] - epoch(ti["start_date"]))
        hand_back.append(end - answered[-1])
    return {
        "first_call_s": min(sent) - start if sent else None,
        "last_call_s": max(sent) - start if sent else None,
        "last_answer_s": max(answered) - start if answered else None,
        "last_end_s": max(ended) - start if ended else None,
        "to_call_s": to_call,
        "hand_back_s": hand_back,
    }


def measure(stack: AirflowStack, fake: FakeServerProcess, mode: str, n: int, latency_s: float) -> Result:
    """Trigger the (mode, N, latency) DAG, sample its task states until it ends, and sum up."""
    name = dag_id(mode, n, latency_s)
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
    run = stack.dag_run(name, run_id)
    return Result(
        mode=mode,
        n=n,
        latency_s=latency_s,
        state=state,
        wall_s=wall_seconds(run),
        max_running=max_running,
        slot_s=slot_s,
        running_s=running_s,
        ever_queued=sum(ti["queued_when"] is not None for ti in tis),
        succeeded=sum(ti["state"] == "success" for ti in tis),
        requests=server["requests"],
        max_in_flight=server["max_in_flight"],
        race_hits=race_lines(stack) - races_before,
        **timeline(stack, name, run, tis),
    )


# ---- report --------------------------------------------------------------------------------------------


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, so it can be pasted into the docs as it is."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def speedup_targets(results: dict[str, Result]) -> list[tuple[str, bool]]:
    """Issue 15's speed-ups over sync for the latency of ``results``, as (what was measured, met)."""
    sync = results["sync"]
    slow = sync.latency_s >= SLOW_CALL_S
    targets = []
    for mode, (fast_target, slow_target) in TARGET_SPEEDUP.items():
        target = slow_target if slow else fast_target
        if target is not None:
            speedup = sync.wall_s / results[mode].wall_s
            label = mode.replace("_", "-")
            text = (
                f"{label} >= {target:.0f}x faster than sync ({sync.latency_s:g} s calls): "
                f"{sync.wall_s:.1f} / {results[mode].wall_s:.1f} s = {speedup:.2f}x"
            )
            targets.append((text, speedup >= target))
    return targets


def check_targets(results: dict[str, Result]) -> list[tuple[str, bool]]:
    """The targets of one N and latency, as (what was measured, met)."""
    if "taskflow_deferred" in results:
        return taskflow_targets(results["taskflow_common_ai"], results["taskflow_deferred"])
    deferrable, free = results["deferrable"], results["worker_free"]
    slots = f"max {free.max_running} running, {free.ever_queued} ever queued"
    return [
        *speedup_targets(results),
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
    """Print the tables of one N and latency and its targets; return the targets."""
    baseline = next(iter(results.values()))
    headers = [
        "mode",
        "N",
        "call s",
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
            f"{r.latency_s:g}",
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
    print()
    print_timeline(results)
    targets = check_targets(results)
    for text, ok in targets:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}")
    return targets


def print_timeline(results: dict[str, Result]) -> None:
    """Where each run's time went: its stages in seconds after the run's start, and two per-task spans."""

    def at(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def med_max(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} / {max(values):.2f}" if values else "-"

    headers = [
        "mode",
        "first call sent",
        "last call sent",
        "last answer",
        "last task end",
        "run end",
        "start -> call, med / max",
        "hand-back, med / max",
    ]
    rows = [
        [
            r.mode,
            at(r.first_call_s),
            at(r.last_call_s),
            at(r.last_answer_s),
            at(r.last_end_s),
            f"{r.wall_s:.1f}",
            med_max(r.to_call_s),
            med_max(r.hand_back_s),
        ]
        for r in results.values()
    ]
    print("timeline, s after the run's start (per task: start_date -> call sent; answer -> end_date):")
    print_table(headers, rows)


def describe_setup(stack: AirflowStack, latencies: list[float]) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    db = "SQLite" if stack.is_sqlite else "PostgreSQL"
    calls = ", ".join(f"{latency:g}" for latency in latencies)
    return (
        f"Airflow {version('apache-airflow')}, LocalExecutor, parallelism={PARALLELISM}, {db}, "
        f"fake LLM latency {calls} s; {os.cpu_count()} CPUs, load average {load}; "
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
        default=LATENCIES_S,
        help=f"comma-separated seconds per answer at the fake server, each measured at every N in the "
        f"same run, e.g. 2,20 (default {LATENCIES_S}; the taskflow suite and --plot take one)",
    )
    parser.add_argument("--plot", action="store_true", help="also plot wall time vs N (operators suite)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "worker_slots.png", help="the plot file")
    parser.add_argument("--keep", action="store_true", help="keep the Airflow home (logs) afterwards")
    args = parser.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    try:
        args.latency = list(dict.fromkeys(float(s) for s in args.latency.split(",")))
    except ValueError:
        parser.error(f"--latency: comma-separated seconds expected, got {args.latency!r}")
    if not all(0 <= latency <= 300 for latency in args.latency):
        parser.error("--latency: each between 0 and 300 s")
    if args.plot and args.suite != "operators":
        parser.error("--plot draws the operators suite only")
    if len(args.latency) > 1 and (args.plot or args.suite != "operators"):
        parser.error("--plot and the taskflow suite take one --latency")
    return args


def run_all(
    stack: AirflowStack,
    fake: FakeServerProcess,
    modes: tuple[str, ...],
    sizes: list[int],
    latencies: list[float],
) -> tuple[list[Result], dict[float, dict[int, dict[str, Result]]]]:
    """Warm up every mode (at the first latency), then measure every (latency, N, mode), printing each
    table as it completes."""
    warm = [measure(stack, fake, mode, WARMUP_N, latencies[0]) for mode in modes]
    summary = ", ".join(f"{r.mode} {r.wall_s:.1f} s ({r.succeeded}/{r.n} ok)" for r in warm)
    print(f"warm-up, N={WARMUP_N}, {latencies[0]:g} s calls, not reported below: {summary}", flush=True)
    results: dict[float, dict[int, dict[str, Result]]] = {}
    for latency in latencies:
        results[latency] = {}
        for n in sizes:
            per_n = results[latency][n] = {}
            for mode in modes:
                per_n[mode] = measure(stack, fake, mode, n, latency)
                print(f"  measured {mode} N={n}, {latency:g} s calls: {per_n[mode].wall_s:.1f} s", flush=True)
            print(f"\nN = {n}, {latency:g} s calls:")
            report(per_n)
            print(flush=True)
    return warm, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-worker-slots-"))
    started = time.monotonic()
    try:
        modes = SUITES[args.suite]
        runs = [(WARMUP_N, args.latency[0]), *((n, latency) for latency in args.latency for n in args.sizes)]
        with airflow_with_fake_llm(workdir, modes, list(dict.fromkeys(runs))) as (stack, fake):
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

        plot(results[args.latency[0]], args.out, slots=PARALLELISM, latency_s=args.latency[0], setup=setup)
        print(f"plot: {args.out}")
    print(f"total {time.monotonic() - started:.0f} s")
    per_latency = results.values()
    measured = [*warm, *(r for per_n in per_latency for rs in per_n.values() for r in rs.values())]
    failed = [r for r in measured if r.succeeded != r.n or r.requests != r.n]
    for r in failed:
        print(
            f"FAILED: {r.mode} N={r.n}: run {r.state}, {r.succeeded}/{r.n} tasks succeeded, "
            f"{r.requests} calls, {r.race_hits} resume races"
        )
    # The exit status follows the targets at the largest N, of every latency; repeated here together.
    largest = [(latency, per_n[args.sizes[-1]]) for latency, per_n in results.items()]
    print(f"\nTargets at N = {args.sizes[-1]}:")
    missed = []
    for _latency, per_mode in largest:
        for text, ok in check_targets(per_mode):
            print(f"  [{'met' if ok else 'NOT MET'}] {text}")
            missed += [] if ok else [text]
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
