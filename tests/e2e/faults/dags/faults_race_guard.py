"""Many short worker-free LLM tasks: the shape that meets Airflow 3.3.2's deferral race in the
default deferrable mode (see race_study.py), in the mode we recommend for it.

100 tasks with ``start_from_trigger=True``, every answer taking 0.2 s (``llm_fast``).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

PROMPTS = [f"Race guard {i}: what is {i} plus {i}?" for i in range(100)]

with DAG(
    "faults_race_guard",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=256,
    default_args={"retries": 0},
) as dag:
    for i, prompt in enumerate(PROMPTS):
        LLMOperator(task_id=f"ask_{i:03d}", prompt=prompt, llm_conn_id="llm_fast", start_from_trigger=True)
