"""Fan-out in every mode: worker-free with a bad item tolerated, deferrable past max_failures, sync."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator

PROMPTS = [f"Fan-out e2e {i}: describe the number {i} in one sentence." for i in range(4)]

with DAG(
    "e2e_fanout",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
    # Rendered in the triggerer: item 2 is not a prompt and fails alone, within max_failures.
    params={"items": [PROMPTS[0], PROMPTS[1], {"not": "a prompt"}, PROMPTS[3]]},
) as dag:
    LLMFanOutOperator(
        task_id="worker_free",
        prompts="{{ params['items'] | tojson }}",
        max_failures=1,
        output_key="answers",
    )
    LLMFanOutOperator(
        task_id="deferrable_too_many_failures",
        prompts=PROMPTS,
        model="gpt-5x",  # unknown to the server: every item fails, more than the one allowed
        max_failures=1,
        start_from_trigger=False,
    )
    LLMFanOutOperator(task_id="sync", prompts=PROMPTS[:2], deferrable=False)
