"""One worker-free LLM task: run once per triggerer so that its first in-process Execution API request
(a stall of 5 s of CPU, 20-26 s on a loaded 2-core machine) is paid before the tests' calls are in
flight (tests/e2e/faults/_support.py, ``warm_triggerers``; docs/fault-survival.md, "Calls run twice
without a fault")."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

with DAG("faults_warm_up", schedule=None, start_date=datetime(2024, 1, 1), catchup=False) as dag:
    LLMOperator(
        task_id="ask", prompt="Warm-up: are you there?", llm_conn_id="llm_fast", start_from_trigger=True
    )
