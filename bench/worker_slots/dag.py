"""Benchmark DAG (Airflow): N independent LLM tasks, all in one mode.

``bench.worker_slots`` copies this file into its DAGs folder once per DAG, as
``worker_slots_<mode>_<n>.py``; the file reads its mode and N from its own name. One DAG per file
keeps the comparison fair: a worker that parses its task's file builds only that DAG.

Every mode uses the same layout, N plain tasks (not ``.expand()``: mapped tasks lose the
per-instance StartTriggerArgs, so they cannot start from the triggerer).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator

MODE_KWARGS = {
    "sync": {"deferrable": False},
    "deferrable": {"deferrable": True, "start_from_trigger": False},
    "worker_free": {"deferrable": True, "start_from_trigger": True},
}
_NAME = re.compile(r"worker_slots_(?P<mode>sync|deferrable|worker_free)_(?P<n>\d+)")

_match = _NAME.fullmatch(Path(__file__).stem)
if _match:
    _n = int(_match["n"])
    with DAG(
        dag_id=Path(__file__).stem,
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        # Only the worker slots ([core] parallelism) may limit the run, not the DAG's own cap.
        max_active_tasks=_n,
        # A failure must show in the results (e.g. the 3.3.2 resume race), not be retried away.
        default_args={"retries": 0},
        tags=["bench"],
    ) as dag:
        for i in range(_n):
            LLMOperator(
                task_id=f"llm_{i:03d}",
                prompt=f"Summarize item {i} in one sentence.",
                max_tokens=64,
                **MODE_KWARGS[_match["mode"]],
            )
