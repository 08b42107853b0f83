"""50 worker-free LLM tasks (start_from_trigger) whose 8 s calls are in flight when a triggerer is killed."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

PROMPTS = [f"Worker-free kill test {i}: describe the number {i} in one sentence." for i in range(50)]

with DAG(
    "faults_kill_worker_free",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=64,
    default_args={"retries": 0},
) as dag:
    for i, prompt in enumerate(PROMPTS):
        LLMOperator(task_id=f"ask_{i:02d}", prompt=prompt, llm_conn_id="llm_slow", start_from_trigger=True)
