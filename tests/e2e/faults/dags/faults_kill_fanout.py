"""One worker-free fan-out of 200 prompts whose calls are mid-way when its triggerer is killed."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator

ITEMS = 200
PROMPTS = [f"Fan-out kill test {i}: describe the number {i} in one sentence." for i in range(ITEMS)]

with DAG(
    "faults_kill_fanout",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as dag:
    # llm_fanout_kill is created by the test: 20 calls at a time, 2 s each, so answers come in waves.
    LLMFanOutOperator(task_id="fan_out", prompts=PROMPTS, llm_conn_id="llm_fanout_kill", max_tokens=64)
