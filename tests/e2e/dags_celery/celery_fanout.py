"""Fan-outs on a connection whose primary model is dead (tests/e2e/test_celery.py): four tasks at once,
so that they run on both triggerers (each takes three at most), each item falling back."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator

GROUPS = 4
ITEMS = 4

with DAG(
    "celery_fanout",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as dag:
    for group in range(GROUPS):
        LLMFanOutOperator(
            task_id=f"fan_out_{group}",
            llm_conn_id="llm_celery",
            model="gpt-4o",
            fallback_models=["gpt-3.5-turbo"],
            prompts=[
                f"Celery fan-out {group}.{i}: describe the number {i} in one sentence." for i in range(ITEMS)
            ],
        )
