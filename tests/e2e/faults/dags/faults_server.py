"""A server that is down when the calls start and then recovers, and one that never answers.

The test scripts the fake server: the recovering tasks' models (one model per task, so that the test
can tell when each task has met the outage) answer 503 until the test lifts the rule; gpt-4o-mini
(``llm_stall``, 3 s per-attempt timeout) never answers.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

RECOVERING = {
    "recovers_0": "gpt-4o",
    "recovers_1": "gpt-3.5-turbo",
    "recovers_2": "fake-model",
    "recovers_worker_free": "gpt-4",
}

with DAG(
    "faults_server",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as dag:
    for task_id, model in RECOVERING.items():
        # Enough retries to outlast the outage: backoff 0.5 s doubling, capped at 8 s, full jitter.
        LLMOperator(
            task_id=task_id,
            prompt=f"Outage test: is the service behind {task_id} back?",
            model=model,
            llm_conn_id="llm_flaky",
            max_retries=12,
            start_from_trigger=task_id.endswith("worker_free"),
        )
    # Two attempts of 3 s each, then the task fails with the timeout.
    LLMOperator(task_id="stalls", prompt="Stall test: anyone there?", llm_conn_id="llm_stall", max_retries=1)
    LLMOperator(
        task_id="stalls_worker_free",
        prompt="Stall test: anyone there, worker-free?",
        llm_conn_id="llm_stall",
        max_retries=1,
        start_from_trigger=True,
    )
    # The call's own 5 s limit cuts the retries short: a deadline error naming the last timeout.
    LLMOperator(
        task_id="stalls_past_deadline",
        prompt="Stall test: anyone there before the deadline?",
        llm_conn_id="llm_stall",
        max_retries=5,
        timeout=5,
    )
