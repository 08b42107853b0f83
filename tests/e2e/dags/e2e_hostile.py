"""Servers that misbehave (redirect, endless body, wrong shapes): each task fails or succeeds cleanly."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator

# Each connection sends one of the fake server's fault headers (tests/e2e/conftest.py).
with DAG(
    "e2e_hostile", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, default_args={"retries": 0}
) as dag:
    redirected = LLMOperator(
        task_id="redirected", prompt="hello", llm_conn_id="llm_redirected", max_retries=0
    )
    endless = LLMOperator(
        task_id="endless", prompt="hello", llm_conn_id="llm_endless", max_retries=0, start_from_trigger=True
    )
    garbled = LLMFanOutOperator(
        task_id="garbled", prompts=["a", "b", "c"], llm_conn_id="llm_garbled", max_retries=0, max_failures=1
    )
    # The triggerer that met them still answers.
    after = LLMOperator(task_id="after", prompt="hello", start_from_trigger=True, trigger_rule="all_done")
    [redirected, endless, garbled] >> after
