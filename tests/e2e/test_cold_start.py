"""A fresh triggerer builds its in-process Execution API as it starts, before any LLM call.

Airflow 3.3.2's triggerer builds that API on its one main thread on the first request that needs it
(compat.py, entry 7): if that request is the first answer's XCom push, the task ends seconds after its
answer. The provider's listener plugin builds it in the background as the triggerer starts, and the
first trigger's warm-up request covers a triggerer where that is switched off. Here the build is done
before any DAG runs, the supervisor uses that instance, and the first call is held at the fake server
until the trigger's warm-up has its answer. Its own deployment: the shared one's triggerers are warm.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_llm_async.testing.airflow_stack import AirflowStack
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.e2e.conftest import API_KEY, llm_connection, postgres_database
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_cold_start"
_DAG = f"""
from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

with DAG("{DAG_ID}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
         default_args={{"retries": 0}}):
    LLMOperator(task_id="ask", prompt="Say hello.", start_from_trigger=True)
"""
READY = "Triggerer's in-process Execution API ready"
BUILT_AT_START = "Built the triggerer's in-process Execution API at its start"
USED = "The triggerer uses the Execution API built at its start"


def trigger_log(stack: AirflowStack, run_id: str) -> str:
    folder = stack.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"
    return "".join(path.read_text(errors="replace") for path in sorted(folder.rglob("*.trigger.*.log")))


def test_a_fresh_triggerer_builds_the_execution_api_as_it_starts(tmp_path: Path, postgres_template):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(_DAG)
    with (
        FakeServerProcess(latency=0, api_key=API_KEY, log_path=tmp_path / "fake-llm.log") as fake,
        postgres_database(postgres_template, "airflow_llm_e2e_cold") as db_url,
    ):
        env = {"AIRFLOW_CONN_LLM_DEFAULT": llm_connection(fake.base_url, default_model="gpt-4", timeout=120)}
        with AirflowStack(tmp_path / "home", dags, db_url=db_url, env=env, migrate=False) as stack:
            triggerer_log = stack.log_path("triggerer-0")
            # No DAG has run: only the listener plugin can have started the build.
            wait_for(
                lambda: BUILT_AT_START in triggerer_log.read_text(errors="replace"),
                120,
                "the Execution API built at the triggerer's start",
                stack.process_logs,
            )
            stack.wait_for_dag(DAG_ID)
            stack.unpause(DAG_ID)
            fake.hold()  # the answer waits at the server until released
            try:
                run_id = stack.trigger(DAG_ID)
                wait_for(lambda: fake.stats()["held"] == 1, 180, "the call in flight", stack.process_logs)
                # The triggerer never ran a task before: its first one's call is in flight, unanswered.
                wait_for(
                    lambda: READY in trigger_log(stack, run_id), 120, "the API built", stack.process_logs
                )
                assert fake.stats()["held"] == 1  # built before the answer left the server
            finally:
                fake.release()
            assert stack.wait_for_run(DAG_ID, run_id, timeout=120) == "success", stack.describe_run(
                DAG_ID, run_id
            )
            text = triggerer_log.read_text(errors="replace")
            assert text.count(USED) == 1, text[-5000:]  # the supervisor took it, and built no other
