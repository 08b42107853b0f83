"""Benchmark DAG (Airflow): N prompts in one of three shapes.

``bench.fanout`` copies this file into its DAGs folder once per (variant, N), as
``fanout_bench_<variant>_<n>.py``; the file reads its variant and N from its own name:

* ``fanout``: one ``LLMFanOutOperator`` task with the N prompts (worker-free, its default);
* ``worker_free``: N separate worker-free ``LLMOperator`` tasks (``start_from_trigger=True``),
  generated in a loop: mapped operators cannot start from the triggerer in Airflow 3.3.2 (only the
  class-level ``start_trigger_args`` is used for them), so this is how N worker-free tasks are made;
* ``mapped_deferrable``: ``LLMOperator.partial(...).expand(prompt=...)``, N mapped deferrable tasks
  (each starts on a worker, defers, and ends in the triggerer).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG

from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator

_NAME = re.compile(r"fanout_bench_(?P<variant>fanout|worker_free|mapped_deferrable)_(?P<n>\d+)")


def prompts(n: int) -> list[str]:
    return [f"Summarize item {i} in one sentence." for i in range(n)]


_match = _NAME.fullmatch(Path(__file__).stem)
if _match:
    _n, _variant = int(_match["n"]), _match["variant"]
    with DAG(
        dag_id=Path(__file__).stem,
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        max_active_tasks=max(_n, 16),  # only Airflow's own machinery may limit the run
        default_args={"retries": 0},  # a failure must show in the results, not be retried away
        tags=["bench"],
    ) as dag:
        if _variant == "fanout":
            LLMFanOutOperator(task_id="llm", prompts=prompts(_n), max_tokens=64)
        elif _variant == "worker_free":
            for _i, _prompt in enumerate(prompts(_n)):
                LLMOperator(task_id=f"llm_{_i:04d}", prompt=_prompt, max_tokens=64, start_from_trigger=True)
        else:
            LLMOperator.partial(task_id="llm", max_tokens=64, start_from_trigger=False).expand(
                prompt=prompts(_n)
            )
