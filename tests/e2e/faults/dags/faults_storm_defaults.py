"""20 calls with default settings into a 429 storm: the test makes its server refuse 80 % for ~10 s.

``llm_storm_defaults`` (created by the test) sets no limits and no retries: ``max_retries`` 2 and
``rate_limit_patience_s`` 120 s, the defaults. Half the tasks resume on a worker, half are worker-free.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

TASKS = 20

with DAG(
    "faults_storm_defaults",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as dag:
    for i in range(TASKS):
        LLMOperator(
            task_id=f"storm_{i}",
            prompt=f"Storm with defaults: call {i}",
            llm_conn_id="llm_storm_defaults",
            start_from_trigger=i % 2 == 1,
        )
