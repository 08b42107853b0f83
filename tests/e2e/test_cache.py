"""The response cache on real Airflow (tests/e2e/dags/e2e_cache.py): a run is cleared and runs again,
and none of its calls reaches the server the second time; the XComs are the same, marked cache_hit."""

from __future__ import annotations

import pytest

from tests.e2e.dags.e2e_cache import ITEMS
from tests.e2e.polling import run_dag
from tests.e2e.redis_keys import fresh_redis

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_cache"
CALLS = ("deferred", "worker_free", "decorated")  # one call each; fan_out makes one per item


def answers(airflow, run_id: str) -> dict:
    return {task_id: airflow.xcom(DAG_ID, run_id, task_id) for task_id in (*CALLS, "fan_out", "report")}


def metas(airflow, run_id: str) -> dict:
    return {task_id: airflow.xcom(DAG_ID, run_id, task_id, key="llm_meta") for task_id in (*CALLS, "fan_out")}


def test_a_cleared_run_sends_no_request_for_the_answers_it_already_has(airflow, fake_llm):
    fresh_redis("connection llm_cache").close()
    fake_llm.reset()
    run_id, state = run_dag(airflow, DAG_ID)
    assert state == "success", airflow.describe_run(DAG_ID, run_id)
    assert fake_llm.stats()["by_model"] == {"gpt-4": len(CALLS) + len(ITEMS)}  # each call once
    first, first_metas = answers(airflow, run_id), metas(airflow, run_id)
    assert not any(first_metas[task_id]["cache_hit"] for task_id in CALLS)
    assert first["report"] == {"answer": True, "answers": [True] * len(ITEMS)}

    fake_llm.reset()
    airflow.api(
        "POST",
        f"dags/{DAG_ID}/clearTaskInstances",
        json={"dag_run_id": run_id, "dry_run": False, "only_failed": False, "reset_dag_runs": True},
    )
    assert airflow.wait_for_run(DAG_ID, run_id, timeout=300) == "success", airflow.describe_run(
        DAG_ID, run_id
    )
    assert all(ti["try_number"] == 2 for ti in airflow.task_instances(DAG_ID, run_id))  # really ran again
    assert fake_llm.stats()["requests"] == 0
    assert answers(airflow, run_id) == first  # the same XComs
    second = metas(airflow, run_id)
    for task_id in CALLS:
        assert (second[task_id]["cache_hit"], second[task_id]["cost_usd"]) == (True, 0.0), second[task_id]
        assert second[task_id]["attempts"] == [] and second[task_id]["usage"] == first_metas[task_id]["usage"]
    assert [item.get("cache_hit") for item in second["fan_out"]["items"]] == [True] * len(ITEMS)
    assert second["fan_out"]["totals"]["attempts"] == 0 and second["fan_out"]["totals"]["cost_usd"] == 0
