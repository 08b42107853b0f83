"""Self-test of the AirflowStack harness: real Airflow 3 processes on SQLite and on PostgreSQL.

SQLite: a stack of its own (one triggerer), its DB a copy of the run's migrated template file.
PostgreSQL: the shared e2e deployment (tests/e2e/conftest.py: two triggerers), after the other modules
that use it, since these tests kill and restart triggerer-0. The tests of one backend run in file order:
health, crash/restart of the triggerer, then the smoke DAG on the restarted stack.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from airflow_llm_async.testing.airflow_stack import AirflowStack, copy_sqlite_database

pytestmark = pytest.mark.e2e

DAGS_FOLDER = Path(__file__).parent / "dags_stack"
DAG_ID = "stack_smoke"
DEFERRABLE_TASKS = ("wait", "defer_resume")


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path):
    home = tmp_path_factory.mktemp("airflow-sqlite")
    db_url = copy_sqlite_database(sqlite_template, home)
    airflow = AirflowStack(home, DAGS_FOLDER, db_url=db_url, migrate=False)
    try:
        airflow.start(timeout=240)
        yield airflow
    finally:
        airflow.stop()
    leftovers = airflow.live_processes()
    assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", marks=pytest.mark.xdist_group("sqlite-stack")),
        pytest.param("postgres", marks=pytest.mark.xdist_group("airflow")),
    ],
)
def stack(request: pytest.FixtureRequest) -> AirflowStack:
    return request.getfixturevalue("sqlite_stack" if request.param == "sqlite" else "airflow")


def test_components_are_healthy_and_logging(stack: AirflowStack) -> None:
    health = stack.api("GET", "monitor/health")
    for component in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        assert health[component]["status"] == "healthy", health
    assert stack.triggerers == (1 if stack.is_sqlite else 2)
    triggerers = [f"triggerer-{i}" for i in range(stack.triggerers)]
    assert sorted(stack.process_names) == ["api-server", "dag-processor", "scheduler", *triggerers]
    assert all(stack.is_running(name) for name in stack.process_names)
    assert "Starting the triggerer" in stack.log_path("triggerer-0").read_text()
    assert "===== scheduler.log =====" in stack.process_logs()


def test_cli_uses_the_stack_database(stack: AirflowStack) -> None:
    stack.airflow("connections", "add", "stack_smoke_conn", "--conn-uri", "http://127.0.0.1:1/")
    assert stack.api("GET", "connections/stack_smoke_conn")["host"] == "127.0.0.1"


def test_kill_and_restart_triggerer(stack: AirflowStack) -> None:
    old_pid = stack.pid("triggerer-0")
    stack.kill_process("triggerer-0", signal.SIGKILL)
    assert not stack.is_running("triggerer-0")
    assert old_pid not in {p.pid for p in stack.live_processes()}

    stack.restart_process("triggerer-0")  # already dead: just starts it and waits for its new job
    assert stack.is_running("triggerer-0")
    assert stack.pid("triggerer-0") != old_pid


def test_smoke_dag_defers_and_passes_xcoms(stack: AirflowStack) -> None:
    stack.wait_for_dag(DAG_ID)
    stack.unpause(DAG_ID)
    run_id = stack.trigger(DAG_ID, conf={"origin": "test_stack"})

    seen: dict[str, set[str | None]] = {}

    def record_task_states(run: dict) -> None:
        for task, state in stack.task_states(DAG_ID, run_id).items():
            seen.setdefault(task, set()).add(state)

    state = stack.wait_for_run(DAG_ID, run_id, timeout=180, on_poll=record_task_states, poll_interval=0.25)
    report = stack.describe_run(DAG_ID, run_id)
    assert state == "success", f"{report}\n{stack.process_logs()}"
    assert stack.task_states(DAG_ID, run_id) == dict.fromkeys(
        ["produce", "wait", "defer_resume", "consume"], "success"
    ), report
    for task in DEFERRABLE_TASKS:
        assert "deferred" in seen[task], f"{task} never observed deferred: {seen}"

    assert stack.dag_run(DAG_ID, run_id)["conf"] == {"origin": "test_stack"}
    assert stack.xcom(DAG_ID, run_id, "produce") == {"label": "smoke", "numbers": [1, 2, 3]}
    assert stack.xcom(DAG_ID, run_id, "defer_resume") == {"resumed": True}
    assert stack.xcom(DAG_ID, run_id, "consume") == {"label": "SMOKE", "total": 6, "resumed": True}
    assert "Pushing xcom" in stack.task_log(DAG_ID, run_id, "consume", contains=("Pushing xcom",))
