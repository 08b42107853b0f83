"""Batch fan-outs (``batch=True``) that must never pay twice (tests/e2e/faults/test_batch_kill.py).

* ``faults_batch_kill``: a worker-free batch whose triggerer is killed (kill -9) while the batch waits.
* ``faults_batch_retry_deferrable`` / ``faults_batch_retry_worker_free``: the test makes every download
  of try 1 fail (the fake server's ``batch_download_failures``), so the task fails and Airflow retries
  it; try 2 finds the batch instead of sending a new one.

``llm_batch_faults`` is created by the test. Each DAG has its own prompts: the fake server counts a line
answered twice by its custom_id and body.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator

CONN_ID = "llm_batch_faults"
KILL_PROMPTS = [f"Batch kill test {i}: describe the number {i} in one sentence." for i in range(8)]
RETRY_PROMPTS = {
    mode: [f"Batch retry test ({mode}) {i}: describe the number {i} in one sentence." for i in range(6)]
    for mode in ("deferrable", "worker_free")
}

with DAG(
    "faults_batch_kill",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 0},
) as kill_dag:
    # Polled every second at most: the batch is re-attached, not waited for from the start.
    LLMFanOutOperator(
        task_id="waits",
        prompts=KILL_PROMPTS,
        llm_conn_id=CONN_ID,
        max_tokens=64,
        batch=True,
        batch_poll_interval=0.5,
        batch_poll_max_interval=1.0,
    )

for mode in ("deferrable", "worker_free"):
    with DAG(
        f"faults_batch_retry_{mode}",
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        default_args={"retries": 1, "retry_delay": timedelta(seconds=1)},
    ) as retry_dag:
        # A 0.1 s poll interval: a failed download is tried again after 0.1, 0.2, 0.4 ... s (6 tries
        # in 3.1 s), then the try fails.
        LLMFanOutOperator(
            task_id="retried",
            prompts=RETRY_PROMPTS[mode],
            llm_conn_id=CONN_ID,
            max_tokens=64,
            start_from_trigger=mode == "worker_free",
            batch=True,
            batch_poll_interval=0.1,
            batch_poll_max_interval=0.5,
        )
