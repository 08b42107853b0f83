"""LLMFanOutOperator on real Airflow processes: the fan-out pipeline example, and every mode."""

from __future__ import annotations

import pytest

from airflow_llm_async.testing.fake_server import compose_answer
from tests.e2e.dags.e2e_fanout import PROMPTS
from tests.e2e.polling import wait_for
from tests.e2e.server_calls import assert_requests_explained

pytestmark = pytest.mark.e2e

PIPELINE = "llm_content_pipeline_fanout"


def test_the_fanout_pipeline_summarises_every_article_in_one_worker_free_task(airflow, fake_llm):
    airflow.wait_for_dag(PIPELINE)
    airflow.unpause(PIPELINE)
    fake_llm.reset()
    fake_llm.hold()  # every LLM call waits at the server until released
    try:
        run_id = airflow.trigger(PIPELINE)
        wait_for(
            lambda: fake_llm.stats()["held"] == 5,
            180,
            "five summaries in flight",
            lambda: airflow.describe_run(PIPELINE, run_id),
        )
        # All five calls wait in one task, deferred: no worker slot held, one task instance.
        summarize = [
            ti for ti in airflow.task_instances(PIPELINE, run_id) if ti["task_id"] == "summarize_articles"
        ]
        assert [(ti["map_index"], ti["state"]) for ti in summarize] == [(-1, "deferred")]
    finally:
        fake_llm.release()
    assert airflow.wait_for_run(PIPELINE, run_id, timeout=300) == "success", airflow.describe_run(
        PIPELINE, run_id
    )
    by_task = {ti["task_id"]: ti for ti in airflow.task_instances(PIPELINE, run_id)}
    assert {task: ti["state"] for task, ti in by_task.items()} == dict.fromkeys(
        [
            "start",
            "extract_data",
            "validate_data",
            "summarize_articles",
            "aggregate_results",
            "analyze_trends",
            "end",
        ],
        "success",
    )
    assert by_task["summarize_articles"]["queued_when"] is None  # never handed to a worker
    articles = airflow.xcom(PIPELINE, run_id, "validate_data")
    summaries = airflow.xcom(PIPELINE, run_id, "summarize_articles")
    assert len(summaries) == 5 and len(set(summaries)) == 5
    for article, summary in zip(articles, summaries, strict=True):
        assert summary == compose_answer("请用100字以内总结以下内容:", article)  # its own article, in order
    assert airflow.xcom(PIPELINE, run_id, "aggregate_results") == "\n\n".join(summaries)
    meta = airflow.xcom(PIPELINE, run_id, "summarize_articles", key="llm_meta")
    assert meta["totals"]["succeeded"] == 5 and meta["totals"]["total_tokens"] > 0
    assert {(i["model"], i["quality"]["passed"]) for i in meta["items"]} == {("gpt-4", True)}
    assert airflow.xcom(PIPELINE, run_id, "analyze_trends", key="analysis")
    # No fault injected: each call reached the server once per attempt its llm_meta records.
    assert_requests_explained(airflow, fake_llm.stats(), [(PIPELINE, run_id)])
    assert fake_llm.stats()["requests"] == 6
    # The progress parts are gone once the list is pushed.
    keys = airflow.api(
        "GET", f"dags/{PIPELINE}/dagRuns/{run_id}/taskInstances/summarize_articles/xcomEntries"
    )["xcom_entries"]
    assert sorted(x["key"] for x in keys) == ["llm_meta", "return_value"]


def test_every_mode_ends_with_its_list_or_a_summary_of_the_failures(airflow, fake_llm):
    fake_llm.reset()
    dag_id = "e2e_fanout"
    airflow.wait_for_dag(dag_id)
    airflow.unpause(dag_id)
    run_id = airflow.trigger(dag_id)
    assert airflow.wait_for_run(dag_id, run_id, timeout=300) == "failed"
    assert airflow.task_states(dag_id, run_id) == {
        "worker_free": "success",
        "deferrable_too_many_failures": "failed",
        "sync": "success",
    }
    answers = airflow.xcom(dag_id, run_id, "worker_free", key="answers")
    assert answers == [
        compose_answer("", PROMPTS[0]),
        compose_answer("", PROMPTS[1]),
        None,
        compose_answer("", PROMPTS[3]),
    ]
    assert answers == airflow.xcom(dag_id, run_id, "worker_free")
    meta = airflow.xcom(dag_id, run_id, "worker_free", key="llm_meta")
    assert (meta["totals"]["failed"], meta["failed_items"]) == (1, [2])
    assert "item 2: an item must be a prompt" in meta["items"][2]["error"]["message"]

    # Deferrable: the failure resumes the task on a worker, which fails it with the summary.
    log = airflow.task_log(
        dag_id,
        run_id,
        "deferrable_too_many_failures",
        contains=("0 of 4 items succeeded", "The model `gpt-5x` does not exist"),
    )
    assert "0 of 4 items succeeded, 4 failed (allowed: 1)" in log
    assert "The model `gpt-5x` does not exist" in log
    assert airflow.xcom(dag_id, run_id, "deferrable_too_many_failures") == [None] * 4

    assert airflow.xcom(dag_id, run_id, "sync") == [compose_answer("", p) for p in PROMPTS[:2]]
