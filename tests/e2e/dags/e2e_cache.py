"""The response cache on real Airflow: each way a call can run, with cache_ttl, on connection llm_cache
(its answers kept in Redis, shared by both triggerers and the workers). tests/e2e/test_cache.py runs it,
clears the run, and runs it again: the second time, nothing reaches the server.

The prompts hold the run id: a run of another day (or of an earlier test session) asks other questions,
and a cleared run asks the same ones again.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator

CACHE_TTL = 600  # seconds: longer than the test, short enough that Redis soon forgets its entries
ITEMS = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]

with DAG(
    "e2e_cache", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, default_args={"retries": 0}
) as dag:
    deferred = LLMOperator(
        task_id="deferred",
        prompt="In one sentence, what does a triggerer do? ({{ run_id }})",
        llm_conn_id="llm_cache",
        model="gpt-4",
        cache_ttl=CACHE_TTL,
        start_from_trigger=False,
    )
    worker_free = LLMOperator(
        task_id="worker_free",
        prompt="In one sentence, what is a DAG? ({{ run_id }})",
        llm_conn_id="llm_cache",
        model="gpt-4",
        cache_ttl=CACHE_TTL,
        start_from_trigger=True,
    )
    fan_out = LLMFanOutOperator(
        task_id="fan_out",
        prompts=[f"Who was {name}? ({{{{ run_id }}}})" for name in ITEMS],
        llm_conn_id="llm_cache",
        model="gpt-4",
        cache_ttl=CACHE_TTL,
    )

    @task.llm_deferred(llm_conn_id="llm_cache", model="gpt-4", cache_ttl=CACHE_TTL)
    def decorated(run_id: str | None = None) -> str:
        return f"In one sentence, what is XCom? ({run_id})"

    @task
    def report(answer: str, answers: list[str]) -> dict:
        return {"answer": len(answer) > 0, "answers": [len(a) > 0 for a in answers]}

    decorated_answer = decorated()
    [deferred, worker_free] >> fan_out
    report(decorated_answer, fan_out.output)
