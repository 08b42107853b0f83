"""A server that echoes the request (key and headers) in its errors, in every mode: nothing may leak."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator

# Connection llm_echo (tests/e2e/conftest.py) sends the fake server's `echo` fault header: every
# answer is a 500 whose body repeats the request headers, the key and the gateway secret included.
with DAG(
    "e2e_echo", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, default_args={"retries": 0}
) as dag:
    common = {"llm_conn_id": "llm_echo", "model": "gpt-4", "max_retries": 0}
    LLMOperator(task_id="deferrable", prompt="hello", **common)
    LLMOperator(task_id="worker_free", prompt="hello", start_from_trigger=True, **common)
    LLMOperator(task_id="sync", prompt="hello", deferrable=False, **common)
    LLMFanOutOperator(task_id="fan_out", prompts=["a", "b"], **common)
