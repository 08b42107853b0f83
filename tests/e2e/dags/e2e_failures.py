"""Calls that must fail cleanly on real Airflow (never stuck in deferred), and one in sync mode."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

with DAG(
    "e2e_failures", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, default_args={"retries": 0}
) as dag:
    LLMOperator(task_id="unknown_model", prompt="hello", model="gpt-5x")
    LLMOperator(task_id="undefined_connection", prompt="hello", llm_conn_id="llm_nowhere")
    LLMOperator(task_id="server_down", prompt="hello", model="gpt-4", llm_conn_id="llm_down", max_retries=1)
    LLMOperator(task_id="sync_mode", prompt="同步模式的调用", deferrable=False, output_key="answer")
