"""Benchmark DAG (Airflow): N independent LLM tasks, all in one mode.

``bench.worker_slots`` copies this file into its DAGs folder once per DAG, as
``worker_slots_<mode>_<n>_<latency>s.py`` (``0.5`` written ``0p5``); the file reads its mode, N and
call latency from its own name. One DAG per file keeps the comparison fair: a worker that parses its
task's file builds only that DAG. The operator modes call through the connection ``llm_<latency>s``,
which asks the fake server for that latency (header ``x-fake-latency``); the TaskFlow modes use the
default connections, answered at the fake server's own latency.

The operator modes use one layout, N plain ``LLMOperator`` tasks (not ``.expand()``: mapped tasks
lose the per-instance StartTriggerArgs, so they cannot start from the triggerer). The TaskFlow modes
map one decorated function over N articles, as users write it (docs/taskflow.md): under common.ai's
``@task.llm`` (the call runs on the worker, through pydantic-ai) or our ``@task.llm_deferred``.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_llm_async.operators.llm import LLMOperator

MAX_TOKENS = 64
SYSTEM_PROMPT = "Summarize in one sentence."
MODE_KWARGS = {
    "sync": {"deferrable": False},
    "deferrable": {"deferrable": True, "start_from_trigger": False},
    "worker_free": {"deferrable": True, "start_from_trigger": True},
}
# The same call under each decorator: model gpt-4 (the `llm` connection's default_model; the
# `pydanticai` connection's `openai-chat:gpt-4`), one system prompt, at most 64 tokens.
TASKFLOW_DECORATORS = {
    "taskflow_common_ai": lambda: task.llm(
        llm_conn_id="pydanticai_default",
        system_prompt=SYSTEM_PROMPT,
        model_settings={"max_tokens": MAX_TOKENS},
    ),
    "taskflow_deferred": lambda: task.llm_deferred(system_prompt=SYSTEM_PROMPT, max_tokens=MAX_TOKENS),
}
_MODES = "|".join([*MODE_KWARGS, *TASKFLOW_DECORATORS])
_NAME = re.compile(rf"worker_slots_(?P<mode>{_MODES})_(?P<n>\d+)_(?P<latency>[0-9p]+)s")


def summarize(article: str) -> str:
    return f"Summarize: {article}"


_match = _NAME.fullmatch(Path(__file__).stem)
if _match:
    _mode, _n, _latency = _match["mode"], int(_match["n"]), _match["latency"]
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
        if _mode in TASKFLOW_DECORATORS:
            articles = [f"Article {i}: the committee met and agreed on item {i}." for i in range(_n)]
            TASKFLOW_DECORATORS[_mode]()(summarize).expand(article=articles)
        else:
            for i in range(_n):
                LLMOperator(
                    task_id=f"llm_{i:03d}",
                    prompt=f"Summarize item {i} in one sentence.",
                    max_tokens=MAX_TOKENS,
                    llm_conn_id=f"llm_{_latency}s",
                    **MODE_KWARGS[_mode],
                )
