"""One real Airflow on PostgreSQL with two triggerers, and one fake LLM server, for the fault tests.

Both are package-scoped: every module under tests/e2e/faults shares them (one start-up; the DB is a
copy of the run's migrated template, tests/e2e/conftest.py). They run in one process (xdist group
``faults``), beside the shared deployment of the other e2e modules, which they never touch.
The stack uses AirflowStack's defaults plus ``TRIGGERER_CONFIG`` (see ``_support.py``): a killed
triggerer's triggers move to the other one about 30 s after its last heartbeat. The tests start once
each triggerer has built its in-process Execution API as it started (``wait_for_built_apis``), so
none stalls on that build with calls in flight.

Figures the tests measure (calls replayed, takeover time, ...) are collected with the ``figures``
fixture and printed at the end of the run, under "fault survival figures".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from airflow_llm_async.testing.airflow_stack import AirflowStack
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.conftest import FIGURES_FILE
from tests.e2e.conftest import postgres_database, run_root
from tests.e2e.faults._support import API_KEY, TRIGGERER_CONFIG, connections_env, wait_for_built_apis

DAGS = Path(__file__).resolve().parent / "dags"


@pytest.fixture(scope="package")
def fault_llm(tmp_path_factory):
    log = tmp_path_factory.mktemp("fault-llm") / "fake-llm.log"
    with FakeServerProcess(api_key=API_KEY, log_path=log) as server:
        server.log = log
        yield server


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory, fault_llm, postgres_template):
    dags = tmp_path_factory.mktemp("fault-dags")
    for source in sorted(DAGS.glob("*.py")):
        shutil.copy(source, dags / source.name)
    with postgres_database(postgres_template, "airflow_llm_faults") as db_url:
        stack = AirflowStack(
            tmp_path_factory.mktemp("fault-airflow"),
            dags,
            db_url=db_url,
            triggerers=2,
            parallelism=8,
            env=connections_env(fault_llm.base_url),
            config=TRIGGERER_CONFIG,
            migrate=False,
        )
        with stack:
            wait_for_built_apis(stack)
            yield stack


@pytest.fixture
def figures(tmp_path_factory):
    """Append a line to the figures printed at the end of the run (tests/conftest.py prints them)."""
    path = run_root(tmp_path_factory) / FIGURES_FILE

    def add(line: str) -> None:
        with open(path, "a") as fh:
            fh.write(line + "\n")

    return add


def pytest_collection_modifyitems(items):
    for item in items:
        if "/faults/" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("faults"))
