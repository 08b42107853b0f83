"""Two LLM calls for the metrics e2e test: one waits in the triggerer, one runs on a worker (sync mode).

Their models are used by no other DAG of the shared e2e deployment, so their metrics are theirs alone.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

with DAG("metrics_smoke", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    LLMOperator(task_id="in_triggerer", prompt="Summarize: metrics from the triggerer.", model="gpt-4o")
    LLMOperator(
        task_id="on_worker",
        prompt="Summarize: metrics from a worker.",
        model="gpt-4o-mini",
        deferrable=False,
    )
