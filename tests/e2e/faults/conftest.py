"""One real Airflow on PostgreSQL with two triggerers, and one fake LLM server, for the fault tests.

Both are package-scoped: every module under tests/e2e/faults shares them (one start-up, ~1 min).
The stack uses AirflowStack's defaults plus ``FAST_TAKEOVER`` (see ``_support.py``), so a killed
triggerer's triggers move to the other one about 6 s after its last heartbeat instead of 30 s.

Figures the tests measure (calls replayed, takeover time, ...) are collected with the ``figures``
fixture and printed at the end of the run, under "fault survival figures".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from airflow_llm_async.testing.airflow_stack import AirflowStack, drop_postgres_database
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.e2e.faults._support import API_KEY, FAST_TAKEOVER, connections_env, require_postgres

DAGS = Path(__file__).resolve().parent / "dags"
_FIGURES: list[str] = []


@pytest.fixture(scope="package")
def fault_llm(tmp_path_factory):
    log = tmp_path_factory.mktemp("fault-llm") / "fake-llm.log"
    with FakeServerProcess(api_key=API_KEY, log_path=log) as server:
        server.log = log
        yield server


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory, fault_llm):
    dags = tmp_path_factory.mktemp("fault-dags")
    for source in sorted(DAGS.glob("*.py")):
        shutil.copy(source, dags / source.name)
    try:
        db_url = require_postgres()
    except RuntimeError as exc:
        pytest.fail(str(exc))  # never skipped: the fault tests need PostgreSQL
    stack = AirflowStack(
        tmp_path_factory.mktemp("fault-airflow"),
        dags,
        db_url=db_url,
        triggerers=2,
        parallelism=8,
        env=connections_env(fault_llm.base_url),
        config=FAST_TAKEOVER,
    )
    try:
        with stack:
            yield stack
    finally:
        drop_postgres_database(db_url)


@pytest.fixture
def figures():
    """Append a line to the figures printed at the end of the run."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("fault survival figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
