"""A connection's budget_usd on real Airflow: connection llm_budget keeps its ledger in the test Redis
(shared by both triggerers and the workers) and has room for two of these calls, not three.
tests/e2e/test_budget.py runs it: two calls answer (one deferrable, one worker-free), the third is
refused without reaching the server and fails without Airflow retries, and the fourth falls back to
another connection.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens
from airflow_llm_async.operators.llm import LLMOperator

PROMPT = "In one sentence, what is a budget? Answer briefly and clearly."
MAX_TOKENS = 40  # the fake server's answer fills it, so an answer costs about its worst case
WORST_USD = DEFAULT_PRICES["gpt-4"].cost(
    estimate_prompt_tokens({"messages": [{"role": "user", "content": PROMPT}]}),
    completion_budget({"max_tokens": MAX_TOKENS}),
)
BUDGET_USD = 2.5 * WORST_USD  # two answers, and no room for a third one's worst case

with DAG(
    "e2e_budget", schedule=None, start_date=datetime(2024, 1, 1), catchup=False, default_args={"retries": 0}
) as dag:
    ask = {"prompt": PROMPT, "llm_conn_id": "llm_budget", "model": "gpt-4", "max_tokens": MAX_TOKENS}
    first = LLMOperator(task_id="first", start_from_trigger=False, **ask)
    second = LLMOperator(task_id="second", start_from_trigger=True, **ask)
    # Retries allowed, yet none taken: a new try would only be refused again.
    refused = LLMOperator(task_id="refused", retries=2, retry_delay=timedelta(seconds=1), **ask)
    fallback = LLMOperator(
        task_id="fallback", fallback_conn_ids=["llm_default"], trigger_rule="all_done", **ask
    )
    first >> second >> refused >> fallback
