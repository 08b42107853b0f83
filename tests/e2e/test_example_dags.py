"""The example DAGs on real Airflow processes, driven through the REST API, against the fake server."""

from __future__ import annotations

import json
import subprocess

import pytest

from airflow_llm_async.core import cache
from tests.e2e.conftest import API_KEY, ECHOED_SECRETS
from tests.e2e.polling import run_dag, wait_for
from tests.e2e.redis_keys import fresh_redis
from tests.e2e.server_calls import assert_requests_explained

pytestmark = pytest.mark.e2e

PIPELINE = "llm_content_pipeline"
ERRORS = "llm_error_handling"
CACHED_PIPELINE = "e2e_pipeline_cached"


def test_content_pipeline_waits_in_the_triggerer_and_ends_with_an_analysis(airflow, fake_llm):
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
        in_flight = [
            ti for ti in airflow.task_instances(PIPELINE, run_id) if ti["task_id"] == "summarize_articles"
        ]
        # While their calls are in flight the LLM tasks are deferred: no worker slot is held.
        assert sorted(ti["map_index"] for ti in in_flight) == [0, 1, 2, 3, 4]
        assert {ti["state"] for ti in in_flight} == {"deferred"}
    finally:
        fake_llm.release()
    assert airflow.wait_for_run(PIPELINE, run_id, timeout=300) == "success", airflow.describe_run(
        PIPELINE, run_id
    )

    states = airflow.task_states(PIPELINE, run_id)
    assert states == {
        "start": "success",
        "extract_data": "success",
        "validate_data": "success",
        **{f"summarize_articles[{i}]": "success" for i in range(5)},
        "aggregate_results": "success",
        "analyze_trends": "success",
        "end": "success",
    }
    articles = airflow.xcom(PIPELINE, run_id, "validate_data")
    summaries = [airflow.xcom(PIPELINE, run_id, "summarize_articles", map_index=i) for i in range(5)]
    for article, summary in zip(articles, summaries, strict=True):
        assert summary and article.split(":")[0] in summary  # each summary is about its own article
    assert len(set(summaries)) == 5
    assert airflow.xcom(PIPELINE, run_id, "aggregate_results") == "\n\n".join(summaries)
    meta = airflow.xcom(PIPELINE, run_id, "summarize_articles", key="llm_meta", map_index=0)
    assert meta["quality"] == {"passed": True, "failures": []}

    analysis = airflow.xcom(PIPELINE, run_id, "analyze_trends", key="analysis")
    assert analysis and analysis == airflow.xcom(PIPELINE, run_id, "analyze_trends")
    meta = airflow.xcom(PIPELINE, run_id, "analyze_trends", key="llm_meta")
    assert (meta["model"], meta["conn_id"], meta["fallback_used"]) == ("gpt-4", "llm_default", False)
    assert meta["usage"]["total_tokens"] > 0
    assert [a["status"] for a in meta["attempts"]] == [200]
    prompt, completion = meta["usage"]["prompt_tokens"], meta["usage"]["completion_tokens"]
    assert meta["cost_usd"] == pytest.approx((prompt * 30 + completion * 60) / 1e6)  # gpt-4's default price
    assert meta["started_at"] <= meta["finished_at"] and meta["host"] == "127.0.0.1" and meta["pid"] > 0
    # No fault injected: each call reached the server once per attempt its llm_meta records.
    assert_requests_explained(airflow, fake_llm.stats(), [(PIPELINE, run_id)])
    assert fake_llm.stats()["requests"] == 6


def test_a_second_run_of_the_pipeline_with_the_cache_on_sends_nothing(airflow, fake_llm):
    """tests/e2e/dags/e2e_pipeline_cached.py: the article pipeline with cache_ttl on connection llm_cache."""
    # Answers an earlier session kept (the articles never change) would make the first run free too.
    fresh_redis("connection llm_cache", f"{cache.KEY_PREFIX}*").close()
    llm_tasks = [("summarize_articles", i) for i in range(5)] + [("analyze_trends", -1)]
    runs = []
    for _ in range(2):
        fake_llm.reset()
        run_id, state = run_dag(airflow, CACHED_PIPELINE)
        assert state == "success", airflow.describe_run(CACHED_PIPELINE, run_id)
        answers = {
            task: airflow.xcom(CACHED_PIPELINE, run_id, task, map_index=index) for task, index in llm_tasks
        }
        answers["aggregate_results"] = airflow.xcom(CACHED_PIPELINE, run_id, "aggregate_results")
        answers["analysis"] = airflow.xcom(CACHED_PIPELINE, run_id, "analyze_trends", key="analysis")
        metas = [
            airflow.xcom(CACHED_PIPELINE, run_id, task, key="llm_meta", map_index=index)
            for task, index in llm_tasks
        ]
        runs.append((fake_llm.stats()["requests"], answers, metas))
    (first_requests, first, first_metas), (second_requests, second, second_metas) = runs
    assert first_requests == 6 and not any(meta["cache_hit"] for meta in first_metas)
    assert second_requests == 0  # every answer came from the cache
    assert second == first  # the same XComs
    assert all(meta["cache_hit"] and meta["cost_usd"] == 0 for meta in second_metas), second_metas


@pytest.mark.parametrize(
    ("fault", "branch"),
    [(None, "continue_task"), ("short", "retry_task"), ("refusal", "fallback_task")],
)
def test_error_handling_routes_by_the_article_quality_rules(airflow, fake_llm, fault, branch):
    fake_llm.reset()
    if fault:
        fake_llm.set_faults({"gpt-4": fault})
    run_id, state = run_dag(airflow, ERRORS)
    assert state == "success", airflow.describe_run(ERRORS, run_id)
    states = airflow.task_states(ERRORS, run_id)
    expected = {
        "continue_task": "skipped",
        "retry_task": "skipped",
        "fallback_task": "skipped",
        branch: "success",
    }
    assert states == {"generate_answer": "success", "quality_check": "success", **expected}
    if branch != "continue_task":
        # gpt-4 keeps answering badly: the trigger's quality gate moved the call on to gpt-3.5-turbo.
        meta = airflow.xcom(ERRORS, run_id, branch, key="llm_meta")
        assert meta["model"] == "gpt-3.5-turbo" and meta["fallback_used"] is True
        assert [a["result"] for a in meta["attempts"]][-1] == "ok"
        assert "quality_failed" in [a["result"] for a in meta["attempts"]]


def test_failed_calls_fail_their_task_with_the_reason_and_sync_mode_works(airflow, fake_llm):
    fake_llm.reset()
    run_id, state = run_dag(airflow, "e2e_failures")
    assert state == "failed"
    assert airflow.task_states("e2e_failures", run_id) == {
        "unknown_model": "failed",
        "undefined_connection": "failed",
        "server_down": "failed",
        "sync_mode": "success",
    }
    expected = {
        "unknown_model": "The model `gpt-5x` does not exist",
        "undefined_connection": "airflow connections add llm_nowhere",
        "server_down": "cannot reach http://127.0.0.1:9/v1",
    }
    for task_id, fragment in expected.items():
        assert fragment in airflow.task_log("e2e_failures", run_id, task_id, contains=(fragment,)), task_id
    assert airflow.xcom("e2e_failures", run_id, "sync_mode", key="answer")


def test_worker_free_tasks_never_reach_a_worker_and_their_xcoms_read_back(airflow, fake_llm):
    fake_llm.reset()
    dag_id = "e2e_worker_free"
    airflow.wait_for_dag(dag_id)
    airflow.unpause(dag_id)
    fake_llm.hold()
    try:
        run_id = airflow.trigger(dag_id)
        # `fails` is refused at once (unknown model); `ask` waits at the server.
        wait_for(
            lambda: fake_llm.stats()["held"] == 1,
            180,
            "ask in flight",
            lambda: airflow.describe_run(dag_id, run_id),
        )
        assert airflow.task_states(dag_id, run_id)["ask"] == "deferred"
    finally:
        fake_llm.release()
    assert airflow.wait_for_run(dag_id, run_id, timeout=300) == "failed"  # `fails` fails, as it should
    states = airflow.task_states(dag_id, run_id)
    assert states == {
        "topic": "success",
        "ask": "success",
        "translate": "success",
        "fails": "failed",
        "read_results": "success",
    }
    by_task = {ti["task_id"]: ti for ti in airflow.task_instances(dag_id, run_id)}
    for task_id in ("ask", "translate", "fails"):
        # Never queued for an executor: the scheduler handed it straight to the triggerer.
        assert by_task[task_id]["queued_when"] is None, by_task[task_id]
    assert by_task["topic"]["queued_when"] is not None  # a normal task, for contrast
    analysis = airflow.xcom(dag_id, run_id, "ask", key="analysis")
    assert "大语言模型与数据工程" in analysis  # params and the XCom pull were rendered in the triggerer
    result = airflow.xcom(dag_id, run_id, "read_results")
    meta = airflow.xcom(dag_id, run_id, "ask", key="llm_meta")
    assert result == {
        "answer_chars": len(analysis),
        "model": "gpt-4",
        "tokens": meta["usage"]["total_tokens"],
        "translation_chars": len(airflow.xcom(dag_id, run_id, "translate")),
    }
    failed_meta = airflow.xcom(dag_id, run_id, "fails", key="llm_meta")
    assert failed_meta["error"]["code"] == "model_not_found"
    missing_model = "The model `gpt-5x` does not exist"
    assert missing_model in airflow.task_log(dag_id, run_id, "fails", contains=(missing_model,))


def test_airflow_dags_test_runs_every_mode_in_process(airflow, fake_llm):
    """`airflow dags test` (dag.test()) ignores start_from_trigger: both LLM tasks must still work."""
    fake_llm.reset()  # no fault another test set on the shared server
    airflow.wait_for_dag("e2e_dag_test")
    extra = json.dumps({"default_model": "gpt-4"})
    airflow.airflow("connections", "add", "llm_db", "--conn-type", "llm", "--conn-host", fake_llm.base_url,
                    "--conn-password", API_KEY, "--conn-extra", extra)  # fmt: skip
    result = airflow.airflow("dags", "test", "e2e_dag_test", check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = airflow.api("GET", "dags/e2e_dag_test/dagRuns")["dag_runs"]
    assert [run["state"] for run in runs] == ["success"]
    states = airflow.task_states("e2e_dag_test", runs[0]["dag_run_id"])
    assert states == {
        "deferrable": "success",
        "worker_free": "success",
        "check": "success",
        "db_connection": "success",  # looked up in the metadata DB from dags test's inline trigger
    }


def test_hostile_servers_fail_their_tasks_cleanly_and_the_triggerer_carries_on(airflow, fake_llm):
    fake_llm.reset()  # re-arms garbled*1
    run_id, _ = run_dag(airflow, "e2e_hostile")
    states = airflow.task_states("e2e_hostile", run_id)
    assert states == {"redirected": "failed", "endless": "failed", "garbled": "success", "after": "success"}
    expected = {
        "redirected": "redirects to 'http://127.0.0.1:9/v1/chat/completions'; LLM calls do not follow",
        "endless": "larger than the connection allows (more than 1048576 bytes",
    }
    for task_id, fragment in expected.items():
        assert fragment in airflow.task_log("e2e_hostile", run_id, task_id, contains=(fragment,)), task_id
    answers = airflow.xcom("e2e_hostile", run_id, "garbled")
    assert answers.count(None) == 1 and len(answers) == 3  # the wrong shape failed its item alone
    items = airflow.xcom("e2e_hostile", run_id, "garbled", key="llm_meta")["items"]
    assert items[answers.index(None)]["error"]["kind"] == "invalid_response"


def test_no_secret_appears_in_any_log_or_table_even_when_the_server_echoes_them(airflow, fake_llm):
    """Runs last (conftest.LAST), so it reads the logs of every DAG run on the deployment; its own DAG's
    server echoes the request, so even alone it reads task logs whose text held every secret."""
    fake_llm.reset()
    run_id, state = run_dag(airflow, "e2e_echo")
    tasks = ("deferrable", "worker_free", "sync", "fan_out")
    assert (state, airflow.task_states("e2e_echo", run_id)) == ("failed", dict.fromkeys(tasks, "failed"))
    for task_id in ("deferrable", "worker_free", "sync"):  # the echo reached the log, redacted
        log = airflow.task_log("e2e_echo", run_id, task_id, contains=("Authorization: Bearer ***",))
        assert "Authorization: Bearer ***" in log, task_id
    meta = airflow.xcom("e2e_echo", run_id, "deferrable", key="llm_meta")
    assert "api-key: ***" in meta["error"]["message"]
    fan_out_meta = airflow.xcom("e2e_echo", run_id, "fan_out", key="llm_meta")
    assert "api-key: ***" in fan_out_meta["items"][0]["error"]["message"]

    logs = {path: path.read_text(errors="replace") for path in airflow.home.rglob("*.log")}
    logs[fake_llm.log] = fake_llm.log.read_text(errors="replace")
    assert len([path for path in logs if "dag_id=e2e_echo" in str(path)]) >= 4
    secrets = (API_KEY, *ECHOED_SECRETS)
    assert [(str(path), s) for path, text in logs.items() for s in secrets if s in text] == []
    dump = dump_metadata_db(airflow)
    assert [s for s in secrets if s in dump] == []


def dump_metadata_db(airflow) -> str:
    """Every row of every table as text (the connection lives in env vars, never in the DB)."""
    url = airflow.db_url.replace("postgresql+psycopg2://", "postgresql://")
    dump = subprocess.run(
        ["pg_dump", "--data-only", url], capture_output=True, text=True, check=True, timeout=120
    )
    assert "COPY public.xcom" in dump.stdout  # the dump really holds the tables
    return dump.stdout
