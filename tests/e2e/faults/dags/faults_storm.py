"""50 calls into a 429 storm: the test makes the server refuse 80 % of the calls for a while.

Half the tasks resume on a worker after the call (deferrable), half never touch one (worker-free).
``llm_storm`` allows 1,200 requests/min per triggerer; a 429 makes the limiter cut that rate.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

TASKS = 50
MAX_RETRIES = 10

with DAG(
    "faults_storm",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as dag:
    for i in range(TASKS):
        LLMOperator(
            task_id=f"storm_{i}",
            prompt=f"Storm test: call {i}",
            llm_conn_id="llm_storm",
            max_retries=MAX_RETRIES,
            start_from_trigger=i % 2 == 1,
        )
