"""@task.llm_deferred and @task.llm_fanout on real Airflow processes (tests/e2e/dags/e2e_taskflow.py)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_taskflow"


def test_decorated_calls_wait_in_the_triggerer_and_typed_answers_reach_the_next_task(airflow, fake_llm):
    airflow.wait_for_dag(DAG_ID)
    airflow.unpause(DAG_ID)
    fake_llm.reset()
    fake_llm.set_faults({"gpt-4o": "short"})  # not JSON: digest's schema check moves on to gpt-4o-mini
    try:
        fake_llm.hold()
        try:
            run_id = airflow.trigger(DAG_ID)
            wait_for(
                lambda: fake_llm.stats()["held"] == 3,
                180,
                "the three mapped summaries held at the server",
                lambda: airflow.describe_run(DAG_ID, run_id),
            )
            states = airflow.task_states(DAG_ID, run_id)
            assert [states[f"summarize[{i}]"] for i in range(3)] == ["deferred"] * 3, states
        finally:
            fake_llm.release()
        assert airflow.wait_for_run(DAG_ID, run_id, timeout=300) == "success"
    finally:
        fake_llm.set_faults({"gpt-4o": None})
    summaries = [airflow.xcom(DAG_ID, run_id, "summarize", map_index=i) for i in range(3)]
    assert all(isinstance(s, str) and s for s in summaries)
    digest = airflow.xcom(DAG_ID, run_id, "digest")
    assert isinstance(digest, dict) and set(digest) == {"title", "words"}  # a dict, in XCom
    meta = airflow.xcom(DAG_ID, run_id, "digest", key="llm_meta")
    assert (meta["model"], meta["fallback_used"]) == ("gpt-4o-mini", True)
    assert meta["attempts"][0]["reason"][0]["rule"] == "require_json"
    assert airflow.xcom(DAG_ID, run_id, "report") == {
        "summaries": 3,
        "digest": digest,
        "translations": [True, True, True],
    }


def test_airflow_lists_the_providers_task_decorators_beside_common_ais(airflow):
    ours = json.loads(airflow.airflow("providers", "get", "airflow-llm-async", "--full", "-o", "json").stdout)
    assert ours[0]["task-decorators"] == [
        {"name": "llm_deferred", "class-name": "airflow_llm_async.decorators.llm.llm_deferred_task"},
        {"name": "llm_fanout", "class-name": "airflow_llm_async.decorators.llm.llm_fanout_task"},
    ]
    theirs = json.loads(
        airflow.airflow(
            "providers", "get", "apache-airflow-providers-common-ai", "--full", "-o", "json"
        ).stdout
    )
    assert {d["name"] for d in theirs[0]["task-decorators"]} & {"llm_deferred", "llm_fanout"} == set()
