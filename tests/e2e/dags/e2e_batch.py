"""Batch fan-outs (``batch=True``) on real Airflow: worker-free and deferrable (tests/e2e/test_batch.py);
DAG ``e2e_batch_cancel``: the same two modes, marked failed while their batches wait.

Each task has its own prompts: the fake server counts a line answered twice by its custom_id and body,
so two tasks with the same items would look like one paid twice. The deferrable task asks gpt-4o, on
which the test puts a fault rule: the batch's first lines fail and are asked again in real time.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator

SYSTEM = "Be brief."
WORKER_FREE = [f"Batch e2e worker-free {i}: describe the number {i} in one sentence." for i in range(6)]
DEFERRABLE = [f"Batch e2e deferrable {i}: describe the number {i} in one sentence." for i in range(5)]
DEFERRABLE_MODEL = "gpt-4o"
# Quick polls: the fake server answers a batch in seconds, not hours.
POLLS = {"batch_poll_interval": 0.5, "batch_poll_max_interval": 1.0}

with DAG(
    "e2e_batch",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as dag:
    LLMFanOutOperator(
        task_id="worker_free",
        prompts=WORKER_FREE,
        system_prompt=SYSTEM,
        max_tokens=64,
        batch=True,
        **POLLS,
    )
    LLMFanOutOperator(
        task_id="deferrable",
        prompts=DEFERRABLE,
        model=DEFERRABLE_MODEL,
        max_tokens=64,
        start_from_trigger=False,
        batch=True,
        **POLLS,
    )

# Marking a waiting batch task failed cancels its batch (tests/e2e/test_batch.py): the test makes the
# fake's batches take minutes, so both tasks still wait when it marks them failed.
CANCEL_WORKER_FREE = [f"Batch e2e cancel worker-free {i}: describe the number {i}." for i in range(4)]
CANCEL_DEFERRABLE = [f"Batch e2e cancel deferrable {i}: describe the number {i}." for i in range(4)]

with DAG(
    "e2e_batch_cancel",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as cancel_dag:
    LLMFanOutOperator(
        task_id="worker_free",
        prompts=CANCEL_WORKER_FREE,
        max_tokens=64,
        batch=True,
        **POLLS,
    )
    LLMFanOutOperator(
        task_id="deferrable",
        prompts=CANCEL_DEFERRABLE,
        max_tokens=64,
        start_from_trigger=False,
        batch=True,
        **POLLS,
    )
