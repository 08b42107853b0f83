"""Helpers shared by the fault-survival e2e tests and the deferral-race study (``race_study.py``)."""

from __future__ import annotations

import json
import re
import signal
import statistics
import time
from datetime import datetime
from typing import Any

import psutil

from airflow_llm_async.testing.airflow_stack import AirflowStack, create_postgres_database
from airflow_llm_async.testing.fake_server import LATENCY_HEADER, compose_answer
from tests.e2e.polling import wait_for

API_KEY = "sk-faults-7c41e0aa"
# The worker's report of a task's defer-exit comes late by up to this many seconds (see race_study.py).
AIRFLOW_DEFAULT_MIN_HEARTBEAT_INTERVAL = "5"

# A killed triggerer's triggers go to a live one once its heartbeat is older than
# [triggerer] triggerer_health_check_threshold (airflow/models/trigger.py, Trigger.assign_unassigned,
# read with conf.getint in airflow/jobs/triggerer_job_runner.py: an integer). The job heartbeats every
# [triggerer] job_heartbeat_sec (airflow/jobs/job.py, Job._heartrate); defaults 5 s and 30 s.
# A live triggerer whose supervisor stalls longer than the threshold looks dead too, and its triggers
# then run on both triggerers at once: every such call is paid twice. Each triggerer process stalls
# once, at its first request through its in-process Execution API (20-26 s on this loaded machine;
# docs/fault-survival.md, "Calls run twice without a fault"), unless the provider built it as the
# triggerer started (0.6.0): the fault stack waits for that build before the tests and after each
# restart (wait_for_built_apis). Later stalls still reached 15-20 s under load, so the threshold stays
# at Airflow's default 30 s (15 s saw false takeovers); beats every second.
TRIGGERER_CONFIG = {"triggerer": {"job_heartbeat_sec": "1", "triggerer_health_check_threshold": "30"}}

# Models of the fake server, one per scenario, so that a fault rule only hits its own scenario.
KILL_MODEL = "gpt-4"
RECOVER_MODEL = "gpt-4o"
STALL_MODEL = "gpt-4o-mini"
RACE_MODEL = "fake-model"
STORM_MODEL = "gpt-3.5-turbo"
# The storm's connection allows 1,200 requests/min per triggerer process: the rate its limiter cuts.
STORM_REQUESTS_PER_MINUTE = 1200


def llm_connection(base_url: str, *, latency: float | None = None, **extra: Any) -> str:
    """An ``llm`` connection as AIRFLOW_CONN_* JSON; ``latency`` becomes the fake server's header."""
    if latency is not None:
        extra["headers"] = {LATENCY_HEADER: str(latency)}
    return json.dumps({"conn_type": "llm", "host": base_url, "password": API_KEY, "extra": extra})


def connections_env(base_url: str, race_latency: float = 1.0) -> dict[str, str]:
    """The connections the DAGs under tests/e2e/faults/dags use."""
    return {
        # 8 s calls: long enough to kill a triggerer while all of them are in flight.
        "AIRFLOW_CONN_LLM_SLOW": llm_connection(base_url, latency=8, default_model=KILL_MODEL, timeout=60),
        "AIRFLOW_CONN_LLM_FLAKY": llm_connection(
            base_url, latency=0.2, default_model=RECOVER_MODEL, timeout=30
        ),
        # A short per-attempt timeout: a stalled server is given up on after 3 s. No circuit breaker: the
        # three stalling tasks share (connection, model), and their 6 timeouts would open it after 5, so
        # whichever attempt came last would fail "circuit_open" instead of with the timeout under test.
        "AIRFLOW_CONN_LLM_STALL": llm_connection(
            base_url, default_model=STALL_MODEL, timeout=3, circuit_breaker=False
        ),
        "AIRFLOW_CONN_LLM_QUICK": llm_connection(
            base_url, latency=race_latency, default_model=RACE_MODEL, timeout=30
        ),
        "AIRFLOW_CONN_LLM_STORM": llm_connection(
            base_url,
            latency=0.5,
            default_model=STORM_MODEL,
            timeout=30,
            requests_per_minute=STORM_REQUESTS_PER_MINUTE,
        ),
        # 0.2 s answers: the fastest calls, the ones most exposed to the deferral race.
        "AIRFLOW_CONN_LLM_FAST": llm_connection(base_url, latency=0.2, default_model=RACE_MODEL, timeout=30),
    }


WARM_UP_DAG = "faults_warm_up"  # tests/e2e/faults/dags/faults_warm_up.py


def warm_triggerers(stack: AirflowStack, names: list[str] | None = None) -> dict[int, float]:
    """Have each triggerer, in turn, end one worker-free task; ``{triggerer job id: seconds the run took}``.

    A triggerer's supervisor builds its in-process Execution API at its first request (here the task's
    XCom push) and neither heartbeats nor answers its triggers meanwhile (airflow/jobs/
    triggerer_job_runner.py, ``TriggerRunnerSupervisor.run_once``, ``in_process_api_server``): paid with
    nothing else in flight, that stall cannot make another triggerer run the tests' calls again. The
    other triggerers are stopped (SIGSTOP) meanwhile, so the warm-up task can only go to this one.
    ``names``: the triggerers to warm (default: all).
    """
    stack.wait_for_dag(WARM_UP_DAG, timeout=240)
    stack.unpause(WARM_UP_DAG)
    every = [name for name in stack.process_names if name.startswith("triggerer-")]
    names = every if names is None else names
    took: dict[int, float] = {}
    for name in names:
        others = [other for other in every if other != name]
        for other in others:
            stack.kill_process(other, signal.SIGSTOP)
        try:
            started = time.monotonic()
            run_id = stack.trigger(WARM_UP_DAG)
            state = stack.wait_for_run(WARM_UP_DAG, run_id, timeout=300)
        finally:
            for other in others:
                stack.kill_process(other, signal.SIGCONT)
        assert state == "success", stack.describe_run(WARM_UP_DAG, run_id)
        (job,) = trigger_starts(stack, WARM_UP_DAG, run_id)["ask"]
        took[job] = round(time.monotonic() - started, 1)
    if len(took) != len(names):
        raise AssertionError(
            f"the warm-up tasks ran on triggerer jobs {sorted(took)}, not one on each of {names}"
        )
    return took


# The provider's listener plugin logs it once per triggerer start (compat.prebuild_execution_api).
API_BUILT = "Built the triggerer's in-process Execution API at its start"


def wait_for_built_apis(stack: AirflowStack, starts: dict[str, int] | None = None) -> None:
    """Until each triggerer has built its Execution API as it started, off its supervisor's thread.

    ``starts``: per triggerer, how many builds its log already held before a restart (the log is
    appended to); default: every triggerer, a first start. Afterwards no triggerer stalls on that build
    while the tests' calls are in flight (see TRIGGER_CONFIG above).
    """
    starts = starts or {name: 0 for name in stack.process_names if name.startswith("triggerer-")}
    for name, before in starts.items():
        wait_for(
            lambda name=name, before=before: _builds(stack, name) > before,
            240,
            f"{name} to build its Execution API",
            stack.process_logs,
        )


def _builds(stack: AirflowStack, name: str) -> int:
    return stack.log_path(name).read_text(errors="replace").count(API_BUILT)


def restart_triggerers(stack: AirflowStack) -> None:
    """Start again the triggerers an earlier test killed, and wait for their Execution API."""
    stopped = [n for n in stack.process_names if n.startswith("triggerer-") and not stack.is_running(n)]
    before = {name: _builds(stack, name) for name in stopped}
    for name in stopped:
        stack.restart_process(name, timeout=240)
    wait_for_built_apis(stack, before)


def require_postgres() -> str:
    db_url = create_postgres_database("airflow_llm_faults")
    if db_url is None:
        raise RuntimeError(
            "These tests need PostgreSQL on 127.0.0.1:5432 (user postgres or root, trust auth): no server "
            "answered. Start it (e.g. `service postgresql start`) and run them again."
        )
    return db_url


def expected_answer(prompt: str) -> str:
    """What the fake server answers to a lone user message (its answers are deterministic)."""
    return compose_answer("", prompt)


def chat_requests(stats: dict) -> int:
    """Chat requests the fake server has seen since its last reset (every model)."""
    return sum(stats["by_model"].values())


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` held by process ``pid`` and its children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    count = 0
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        count += sum(
            1 for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        )
    return count


def state_mismatches(stack: AirflowStack, dag_id: str, run_id: str) -> list[dict]:
    """The audit-log entries the scheduler writes when it fails a task for a "state mismatch"."""
    entries, offset = [], 0
    while True:
        page = stack.api(
            "GET",
            "eventLogs",
            params={
                "dag_id": dag_id,
                "run_id": run_id,
                "event": "state mismatch",
                "limit": 100,
                "offset": offset,
            },
        )
        entries += page["event_logs"]
        offset += len(page["event_logs"])
        if not page["event_logs"] or offset >= page["total_entries"]:
            return entries


def trigger_starts(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, list[int]]:
    """``{task: [triggerer job id of each start of its trigger, oldest first]}``, from the task logs.

    A triggerer writes a task's trigger log to ``attempt=N.log.trigger.<its job id>.log``; every
    start of the trigger (a takeover included) logs "trigger <name> (ID n) starting" there.
    """
    run_dir = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    starts: dict[str, list[tuple[str, int]]] = {}
    for path in run_dir.glob("task_id=*/**/attempt=*.log.trigger.*.log"):
        parts = dict(p.split("=", 1) for p in path.relative_to(run_dir).parts[:-1])
        task = parts["task_id"] if "map_index" not in parts else f"{parts['task_id']}[{parts['map_index']}]"
        job = int(path.name.rsplit(".", 2)[-2])
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            event = record.get("event", "")
            if event.startswith("trigger ") and event.endswith(" starting"):
                starts.setdefault(task, []).append((record.get("timestamp", ""), job))
    return {task: [job for _, job in sorted(found)] for task, found in starts.items()}


_PAUSED = re.compile(r"^(\S+ \S+) \[info\s*\] Pausing task as DEFERRED\..*ti_id=(\S+)")
_DEFER_EXIT = re.compile(r"^(\S+) \[info\s*\] Workload finished .*final_state=deferred .*workload_id=(\S+)")


def defer_exit_delays(stack: AirflowStack, dag_id: str | None = None) -> list[float]:
    """Per deferral: seconds from the task's "Pausing task as DEFERRED" to its worker's "Workload
    finished ... final_state=deferred", i.e. how late the executor learns that the try exited.

    The LocalExecutor's workers log to the scheduler's log, the task process's lines included.
    """
    paused: dict[str, datetime] = {}
    delays = []
    for line in stack.log_path("scheduler").read_text(errors="replace").splitlines():
        if (match := _PAUSED.match(line)) and (dag_id is None or f"dag_id={dag_id} " in line):
            paused[match[2]] = datetime.fromisoformat(match[1])
        elif (match := _DEFER_EXIT.match(line)) and match[2] in paused:
            exited = datetime.fromisoformat(match[1].replace("Z", "+00:00"))
            delays.append((exited - paused.pop(match[2])).total_seconds())
    return delays


def delay_figures(delays: list[float]) -> dict[str, Any]:
    if not delays:
        return {"count": 0}
    ordered = sorted(delays)
    return {
        "count": len(ordered),
        "median_s": round(statistics.median(ordered), 2),
        "p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max_s": round(ordered[-1], 2),
        "over_1s": sum(d > 1 for d in ordered),
    }


def ti_label(ti: dict) -> str:
    return ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"
