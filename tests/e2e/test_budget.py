"""A connection's budget_usd on real Airflow (tests/e2e/dags/e2e_budget.py): the ledger in Redis holds
across triggerers and workers; the refused call never reaches the server and is not retried, the
fallback on another connection answers, and the monitor shows what is spent and left."""

from __future__ import annotations

import pytest

from airflow_llm_async.budget_store import KEY_PREFIX
from tests.e2e.dags.e2e_budget import BUDGET_USD
from tests.e2e.polling import run_dag
from tests.e2e.redis_keys import fresh_redis
from tests.e2e.server_calls import assert_requests_explained
from tests.e2e.test_monitor_dashboard import monitor_json

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_budget"


def meta_or_why(airflow, run_id: str, task_id: str) -> object:
    try:
        return airflow.xcom(DAG_ID, run_id, task_id, key="llm_meta")
    except Exception as exc:  # a task that never ran has none
        return f"no llm_meta: {exc}"


def test_a_spent_budget_refuses_calls_without_sending_them_or_retrying(airflow, fake_llm):
    # The day's ledger of an earlier session on this Redis would leave less room: start from none.
    client = fresh_redis("connection llm_budget", f"{KEY_PREFIX}llm_budget:*")
    fake_llm.reset()
    run_id, state = run_dag(airflow, DAG_ID)
    assert state == "success", airflow.describe_run(DAG_ID, run_id)  # its last task, the fallback, did
    tis = {ti["task_id"]: ti for ti in airflow.task_instances(DAG_ID, run_id)}
    states = {task_id: ti["state"] for task_id, ti in tis.items()}
    metas = {task_id: meta_or_why(airflow, run_id, task_id) for task_id in states}
    assert states == {"first": "success", "second": "success", "refused": "failed", "fallback": "success"}, (
        f"{airflow.describe_run(DAG_ID, run_id)}\nllm_meta: {metas}"
    )
    assert tis["refused"]["try_number"] == 1  # retries=2, none taken

    refused = airflow.xcom(DAG_ID, run_id, "refused", key="llm_meta")
    assert refused["error"]["kind"] == "budget"
    assert (
        "budget_usd of $" in refused["error"]["message"]
        and "would be exceeded" in refused["error"]["message"]
    )
    assert [a["status"] for a in refused["attempts"]] == [None]  # refused before sending
    fallback = airflow.xcom(DAG_ID, run_id, "fallback", key="llm_meta")
    assert fallback["conn_id"] == "llm_default" and fallback["attempts"][0]["reason"]["kind"] == "budget"
    # Three answers (first, second, fallback) and nothing else reached the server.
    assert fake_llm.stats()["requests"] == 3
    assert_requests_explained(airflow, fake_llm.stats(), [(DAG_ID, run_id)])

    spent = sum(airflow.xcom(DAG_ID, run_id, t, key="llm_meta")["cost_usd"] for t in ("first", "second"))
    [held] = [int(client.get(key)) for key in client.scan_iter(f"{KEY_PREFIX}llm_budget:*")]
    assert held / 1e9 == pytest.approx(spent, abs=1e-9)  # settled to the real costs
    client.close()

    budgets = {row["conn_id"]: row for row in monitor_json(airflow)["budgets"]}
    row = budgets["llm_budget"]
    assert (row["budget_usd"], row["per"], row["source"]) == (pytest.approx(BUDGET_USD), "day", "redis")
    assert row["spent_usd"] == pytest.approx(spent, abs=1e-6)
    assert row["left_usd"] == pytest.approx(BUDGET_USD - spent, abs=1e-6)
