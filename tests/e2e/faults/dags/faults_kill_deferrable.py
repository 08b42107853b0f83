"""50 deferrable LLM tasks (one mapped task) whose 8 s calls are in flight when a triggerer is killed."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

PROMPTS = [f"Kill test {i}: describe the number {i} in one sentence." for i in range(50)]

with DAG(
    "faults_kill_deferrable",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=64,
    default_args={"retries": 0},
) as dag:
    LLMOperator.partial(task_id="ask", llm_conn_id="llm_slow").expand(prompt=PROMPTS)
