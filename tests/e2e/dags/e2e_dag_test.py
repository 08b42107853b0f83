"""Run with `airflow dags test`: dag.test() ignores start_from_trigger and runs triggers inline."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from airflow_llm_async.operators.llm import LLMOperator

with DAG("e2e_dag_test", schedule=None, start_date=datetime(2024, 1, 1), catchup=False) as dag:
    deferrable = LLMOperator(task_id="deferrable", prompt="Summarize: dag.test runs triggers inline.")
    worker_free = LLMOperator(
        task_id="worker_free", prompt="Analyze: the same in worker-free mode.", start_from_trigger=True
    )
    # A connection stored in the metadata DB (the test adds it), not in an environment variable.
    LLMOperator(task_id="db_connection", prompt="Translate: a stored connection.", llm_conn_id="llm_db")

    @task(task_id="check")
    def check(first: str, second: str) -> int:
        assert first and second and first != second
        return len(first) + len(second)

    check(deferrable.output, worker_free.output)
