"""One real Airflow deployment and one fake LLM server process, shared by the e2e tests of a module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from airflow_llm_async.testing.airflow_stack import (
    AirflowStack,
    create_postgres_database,
    drop_postgres_database,
)
from airflow_llm_async.testing.fake_server_process import FakeServerProcess

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-e2e-secret-9d2b7c"


def llm_connection(base_url: str, **extra) -> str:
    return json.dumps({"conn_type": "llm", "host": base_url, "password": API_KEY, "extra": extra})


@pytest.fixture(scope="module")
def fake_llm(tmp_path_factory):
    log = tmp_path_factory.mktemp("fake-llm") / "fake-llm.log"
    with FakeServerProcess(latency=1.0, api_key=API_KEY, log_path=log) as server:
        server.log = log
        yield server


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, fake_llm):
    """The example DAGs plus tests/e2e/dags, on PostgreSQL when a server answers, else SQLite."""
    dags = tmp_path_factory.mktemp("dags")
    for source in [
        *sorted((ROOT / "example_dags").glob("*.py")),
        *sorted((ROOT / "tests/e2e/dags").glob("*.py")),
    ]:
        shutil.copy(source, dags / source.name)
    db_url = create_postgres_database()
    env = {
        "AIRFLOW_CONN_LLM_DEFAULT": llm_connection(fake_llm.base_url, default_model="gpt-4", timeout=30),
        "AIRFLOW_CONN_LLM_DOWN": llm_connection("http://127.0.0.1:9/v1", timeout=2),
    }
    stack = AirflowStack(tmp_path_factory.mktemp("airflow"), dags, db_url=db_url, env=env)
    try:
        with stack:
            yield stack
    finally:
        if db_url:
            drop_postgres_database(db_url)
