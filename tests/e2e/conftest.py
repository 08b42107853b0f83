"""The e2e tiers' shared set-up: migrated template DBs, and one Airflow deployment for most modules.

Starting Airflow is the expensive part of these tests, so each expensive thing starts once per run:

* ``postgres_template`` / ``sqlite_template``: ``airflow db migrate`` once per run, behind a lock file
  that every pytest-xdist worker of the run shares (upstream Airflow's devel-common pytest plugin does
  the same); each deployment then copies the template (``CREATE DATABASE ... TEMPLATE``, or the file).
* ``airflow``: one real deployment (PostgreSQL, scheduler, dag-processor, two triggerers, api-server
  with the dashboard plugin, StatsD metrics to ``statsd``) and one fake LLM server (``fake_llm``),
  shared by every e2e module but the fault tests (they kill triggerers: tests/e2e/faults has its own)
  and the doc tests (the docs' commands make their own ``~/airflow``). Its DAG folder holds the example
  DAGs and the DAGs of tests/e2e/dags*; each DAG id is defined once.

The tests on the shared deployment run in one process (xdist group ``airflow``), in the order that
``pytest_collection_modifyitems`` below sets, because some read what the deployment did as a whole.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from airflow_llm_async.testing.airflow_stack import (
    AirflowStack,
    create_postgres_database,
    drop_postgres_database,
    migrate_database,
)
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.e2e.dags.e2e_budget import BUDGET_USD
from tests.e2e.statsd_receiver import StatsdReceiver

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-e2e-secret-9d2b7c"
# The other secrets of connection llm_echo, whose server echoes them back (tests/e2e/dags/e2e_echo.py).
ECHOED_SECRETS = ("gateway-secret-e2e-41f0", "org-secret-e2e-77a1")
SHARED_DAG_FOLDERS = [
    ROOT / "example_dags",
    ROOT / "tests/e2e/dags",
    ROOT / "tests/e2e/dags_metrics",
    ROOT / "tests/e2e/dags_stack",
]
NO_POSTGRES = (
    "The e2e tests need PostgreSQL on 127.0.0.1:5432 (user postgres or root, trust auth): no server "
    "answered. Start it (e.g. `service postgresql start`) and run them again."
)
# The order of the modules on the shared deployment (see the module docstring); others run after them.
SHARED_ORDER = [
    # The monitor's and the dashboard's figures cover every LLM call in the DB, and every triggerer
    # job: they run first, when the deployment has seen only their DAG runs and no triggerer was killed.
    "test_monitor_dashboard.py",
    "test_example_dags.py",
    "test_fanout.py",
    "test_metrics_stack.py",
    # Kills and restarts triggerer-0.
    "test_stack.py",
]
# Reads every log and the whole metadata DB for the API key: after every DAG run on the deployment.
LAST = "test_example_dags.py::test_no_secret_appears_in_any_log_or_table_even_when_the_server_echoes_them"


def llm_connection(base_url: str, **extra) -> str:
    return json.dumps({"conn_type": "llm", "host": base_url, "password": API_KEY, "extra": extra})


# ---- once per test run, whichever xdist worker asks first ------------------------------------------------


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's own temporary directory, the same for the controller and every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``make(work_dir)`` once per run, behind a lock file; every caller gets its (JSON) result."""
    root = run_root(tmp_path_factory)
    record = root / f"{name}.json"
    with _locked(root / f"{name}.lock"):
        if record.exists():
            result = json.loads(record.read_text())
            if "error" in result:
                pytest.fail(f"{name} could not be made (by another worker): {result['error']}")
            return result
        work = root / name
        work.mkdir(exist_ok=True)
        try:
            result = make(work)
        except BaseException as exc:
            record.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            raise
        record.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def postgres_template(tmp_path_factory) -> str:
    """The URL of a migrated PostgreSQL database to copy; dropped when the run ends (tests/conftest.py)."""

    def make(work: Path) -> dict[str, Any]:
        url = create_postgres_database("airflow_llm_template")
        if url is None:
            raise RuntimeError(NO_POSTGRES)
        # Recorded before migrating, so that the end of the run drops it even if migrating fails.
        (run_root(tmp_path_factory) / "postgres-template.url").write_text(url)
        return {"url": url, "migrate_s": round(migrate_database(url, work), 1)}

    return once_per_run(tmp_path_factory, "postgres-template", make)["url"]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite metadata DB file (WAL mode) to copy."""

    def make(work: Path) -> dict[str, Any]:
        path = work / "airflow.db"
        seconds = migrate_database(f"sqlite:///{path}", work)
        return {"path": str(path), "migrate_s": round(seconds, 1)}

    return Path(once_per_run(tmp_path_factory, "sqlite-template", make)["path"])


@contextmanager
def postgres_database(template: str, name_prefix: str) -> Iterator[str]:
    """A copy of the migrated template, dropped afterwards."""
    url = create_postgres_database(name_prefix, template=template)
    if url is None:
        pytest.fail(NO_POSTGRES)
    try:
        yield url
    finally:
        drop_postgres_database(url)


# ---- the shared deployment ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_llm(tmp_path_factory):
    log = tmp_path_factory.mktemp("fake-llm") / "fake-llm.log"
    with FakeServerProcess(latency=1.0, api_key=API_KEY, log_path=log) as server:
        server.log = log
        yield server


@pytest.fixture(scope="session")
def statsd():
    receiver = StatsdReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def airflow(tmp_path_factory, postgres_template, fake_llm, statsd):
    """The shared deployment (see the module docstring); no process of it may outlive it."""
    dags = tmp_path_factory.mktemp("dags")
    for folder in SHARED_DAG_FOLDERS:
        for source in sorted(folder.glob("*.py")):
            if (dags / source.name).exists():
                raise RuntimeError(f"two DAG files named {source.name}: rename one")
            shutil.copy(source, dags / source.name)
    env = {
        "AIRFLOW_CONN_LLM_DEFAULT": llm_connection(fake_llm.base_url, default_model="gpt-4", timeout=30),
        "AIRFLOW_CONN_LLM_DOWN": llm_connection("http://127.0.0.1:9/v1", timeout=2),
        # Answers kept in the test Redis, shared by both triggerers and the workers (tests/e2e/test_cache.py).
        "AIRFLOW_CONN_LLM_CACHE": llm_connection(
            fake_llm.base_url, default_model="gpt-4", timeout=30, cache_backend="redis://127.0.0.1:6379/0"
        ),
        # Room for two calls a day, kept in the test Redis (tests/e2e/test_budget.py).
        "AIRFLOW_CONN_LLM_BUDGET": llm_connection(
            fake_llm.base_url,
            timeout=30,
            rate_limit_backend="redis://127.0.0.1:6379/0",
            budget_usd={"usd": BUDGET_USD, "per": "day"},
        ),
        "AIRFLOW_CONN_LLM_ECHO": llm_connection(
            fake_llm.base_url,
            timeout=30,
            organization=ECHOED_SECRETS[1],
            headers={"api-key": ECHOED_SECRETS[0], "x-fake-fault": "echo"},
        ),
        # Hostile servers (tests/e2e/dags/e2e_hostile.py).
        **{
            f"AIRFLOW_CONN_LLM_{name.upper()}": llm_connection(
                fake_llm.base_url,
                default_model="gpt-4",
                timeout=30,
                max_response_bytes=1048576,
                headers={"x-fake-fault": fault},
            )  # fmt: skip
            for name, fault in (("redirected", "redirect"), ("endless", "endless"), ("garbled", "garbled*1"))
        },
    }
    metrics = {
        "statsd_on": "True",
        "statsd_host": "127.0.0.1",
        "statsd_port": str(statsd.port),
        "statsd_prefix": "airflow",
        "statsd_influxdb_enabled": "True",
    }
    with postgres_database(postgres_template, "airflow_llm_e2e") as db_url:
        stack = AirflowStack(
            tmp_path_factory.mktemp("airflow"),
            dags,
            db_url=db_url,
            triggerers=2,
            env=env,
            config={"metrics": metrics},
            migrate=False,
        )
        with stack:
            yield stack
    leftovers = stack.live_processes()
    assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"


def _group(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker and marker.args else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _group(item) is None and "airflow" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("airflow"))
    positions = [i for i, item in enumerate(items) if _group(item) == "airflow"]

    def rank(item: pytest.Item) -> int:
        if item.nodeid.split("@")[0].endswith(LAST):
            return len(SHARED_ORDER) + 1
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return SHARED_ORDER.index(module) if module in SHARED_ORDER else len(SHARED_ORDER)

    ordered = sorted((items[i] for i in positions), key=rank)  # stable: file order within a module
    for position, item in zip(positions, ordered, strict=True):
        items[position] = item
