"""Batch mode (``LLMFanOutOperator(batch=True)``) on real Airflow against the fake server's Batch API:
worker-free and deferrable (tests/e2e/dags/e2e_batch.py), the article pipeline's batch variant, and a
waiting batch task marked failed through the REST API (its batch is cancelled: the trigger's on_kill).

What the server counts is the proof: one batch per task, no chat request but the real-time re-asks a
fault rule provokes, no line answered twice; the answers are the fake's deterministic ones, in order,
at half the real-time price.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.operators.llm import TEXT_PROMPTS
from airflow_llm_async.testing.airflow_stack import AirflowApiError
from airflow_llm_async.testing.fake_server import compose_answer
from tests.e2e.conftest import API_KEY
from tests.e2e.dags.e2e_batch import DEFERRABLE, DEFERRABLE_MODEL, SYSTEM, WORKER_FREE
from tests.e2e.polling import run_dag, wait_for

pytestmark = pytest.mark.e2e

DAG_ID = "e2e_batch"
PIPELINE = "llm_content_pipeline_batch"
CANCEL_DAG = "e2e_batch_cancel"
# The fake's batches take this long in the cancel test: they still wait when their tasks are marked failed.
SLOW_BATCH_S = 120.0
# What Airflow 3.3.2's triggerer logs before it calls a trigger's on_kill (triggerer_job_runner.py,
# run_trigger: only for a cancel carrying _USER_ACTION_CANCEL_MSG, sent by cancel_triggers()).
ON_KILL_LOG = "Trigger cancelled by user action, invoking on_kill"
REASKED = 2  # the deferrable task's batch lines that the fault rule fails: asked again in real time


def server_batches(fake_llm) -> list[dict[str, Any]]:
    """Every batch the fake server holds (GET /v1/batches, newest first)."""
    response = httpx.get(
        f"{fake_llm.base_url}/batches",
        params={"limit": 100},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["data"]


def check_batch_meta(airflow, dag_id: str, run_id: str, task_id: str, model: str, items: int) -> dict:
    """The task's batch summary: one completed batch of ``items`` lines, stored in ``llm_batch`` too,
    at half the real-time price of its answers."""
    meta = airflow.xcom(dag_id, run_id, task_id, key="llm_meta")
    summary = meta["batch"]
    [found] = summary["batches"]
    assert (found["status"], found["total"]) == ("completed", items), summary
    stored = airflow.xcom(dag_id, run_id, task_id, key="llm_batch")
    assert stored["batches"]["0"]["id"] == found["id"] and stored["batches"]["0"]["status"] == "completed"
    batch_items = [item for item in meta["items"] if not item.get("realtime")]
    prompt = sum(item["usage"]["prompt_tokens"] for item in batch_items)
    completion = sum(item["usage"]["completion_tokens"] for item in batch_items)
    realtime = DEFAULT_PRICES[model].cost(prompt, completion)
    assert realtime > 0
    assert summary["realtime_cost_usd"] == pytest.approx(realtime, rel=1e-6)
    assert summary["cost_usd"] == pytest.approx(realtime / 2, rel=1e-6)
    return meta


def test_batch_fan_outs_end_worker_free_and_deferrable_with_one_batch_each(airflow, fake_llm):
    fake_llm.reset()
    # The deferrable task's first lines get a server error in the batch; their re-asks are answered.
    fake_llm.set_faults({DEFERRABLE_MODEL: f"500*{REASKED}"})
    try:
        run_id, state = run_dag(airflow, DAG_ID)
        stats, listed = fake_llm.stats(), server_batches(fake_llm)
    finally:
        fake_llm.reset()
    assert state == "success", airflow.describe_run(DAG_ID, run_id)
    tis = {ti["task_id"]: ti for ti in airflow.task_instances(DAG_ID, run_id)}
    assert {task: (ti["state"], ti["try_number"]) for task, ti in tis.items()} == {
        "worker_free": ("success", 1),
        "deferrable": ("success", 1),
    }
    assert tis["worker_free"]["queued_when"] is None  # never handed to a worker

    assert airflow.xcom(DAG_ID, run_id, "worker_free") == [compose_answer(SYSTEM, p) for p in WORKER_FREE]
    assert airflow.xcom(DAG_ID, run_id, "deferrable") == [compose_answer("", p) for p in DEFERRABLE]

    meta = check_batch_meta(airflow, DAG_ID, run_id, "worker_free", "gpt-4", len(WORKER_FREE))
    assert {(i["status"], i["model"], i["attempts"]) for i in meta["items"]} == {("success", "gpt-4", 1)}
    assert meta["batch"]["realtime_items"] == 0

    meta = check_batch_meta(airflow, DAG_ID, run_id, "deferrable", DEFERRABLE_MODEL, len(DEFERRABLE))
    again = [index for index, item in enumerate(meta["items"]) if item.get("realtime")]
    assert len(again) == REASKED and meta["batch"]["realtime_items"] == REASKED
    for index in again:
        item = meta["items"][index]
        assert (item["status"], item["attempts"], item["batch_error"]["kind"]) == ("success", 2, "server")
    assert meta["totals"]["succeeded"] == len(DEFERRABLE)

    # At the server: one batch per task, named by its task; no chat request but the re-asks.
    assert sorted((b["metadata"]["airflow_task_id"], b["metadata"]["airflow_run_id"]) for b in listed) == [
        ("deferrable", run_id),
        ("worker_free", run_id),
    ]
    assert stats["by_model"] == {DEFERRABLE_MODEL: REASKED}, stats
    batches = stats["batches"]
    assert (batches["files_uploaded"], batches["batches_created"], batches["batches_cancelled"]) == (2, 2, 0)
    assert batches["lines_answered"] == len(WORKER_FREE) + len(DEFERRABLE)
    assert (batches["lines_failed"], batches["lines_answered_twice"]) == (REASKED, 0)


def test_the_batch_pipeline_summarises_every_article_through_one_batch(airflow, fake_llm):
    fake_llm.reset()
    run_id, state = run_dag(airflow, PIPELINE)
    stats = fake_llm.stats()
    assert state == "success", airflow.describe_run(PIPELINE, run_id)
    assert set(airflow.task_states(PIPELINE, run_id).values()) == {"success"}
    articles = airflow.xcom(PIPELINE, run_id, "validate_data")
    summaries = airflow.xcom(PIPELINE, run_id, "summarize_articles")
    system = TEXT_PROMPTS["zh"]["summarize"].split("\n")[0]  # the example's system prompt
    assert summaries == [compose_answer(system, article) for article in articles]
    assert airflow.xcom(PIPELINE, run_id, "aggregate_results") == "\n\n".join(summaries)
    assert airflow.xcom(PIPELINE, run_id, "analyze_trends", key="analysis")
    meta = check_batch_meta(airflow, PIPELINE, run_id, "summarize_articles", "gpt-4", len(articles))
    assert {(i["model"], i["quality"]["passed"]) for i in meta["items"]} == {("gpt-4", True)}
    # One batch, named by its task instance; the only chat request is analyze_trends'.
    [listed] = server_batches(fake_llm)
    assert listed["metadata"]["airflow_dag_id"] == PIPELINE
    assert listed["metadata"]["airflow_task_id"] == "summarize_articles"
    assert listed["metadata"]["airflow_run_id"] == run_id
    assert stats["by_model"] == {"gpt-4": 1}, stats
    assert (stats["batches"]["batches_created"], stats["batches"]["lines_answered_twice"]) == (1, 0)


def batch_of(fake_llm, run_id: str, task_id: str) -> dict[str, Any]:
    """The one batch at the server made for ``task_id`` of ``run_id``."""
    [found] = [
        b
        for b in server_batches(fake_llm)
        if (b["metadata"]["airflow_run_id"], b["metadata"]["airflow_task_id"]) == (run_id, task_id)
    ]
    return found


def stored_batch_id(airflow, run_id: str, task_id: str) -> str | None:
    """The batch id the task's trigger stored in XCom ``llm_batch`` (None until it did)."""
    try:
        return airflow.xcom(CANCEL_DAG, run_id, task_id, key="llm_batch")["batches"]["0"]["id"]
    except AirflowApiError as err:
        if err.status_code == 404:
            return None
        raise


def trigger_log(airflow, run_id: str, task_id: str) -> str:
    """The trigger part of the task's log (try 1), as the triggerer wrote it: what ran in the trigger, on_kill
    included (Airflow's log template: ``attempt=1.log.trigger.<triggerer job id>.log``)."""
    folder = airflow.log_dir / f"dag_id={CANCEL_DAG}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "\n".join(
        path.read_text(errors="replace") for path in sorted(folder.glob("attempt=1.log.trigger.*"))
    )


def cancelled_since(fake_llm, base: dict[str, int]) -> int:
    return fake_llm.stats()["batches"]["batches_cancelled"] - base["batches_cancelled"]


def describe(airflow, fake_llm, run_id: str) -> str:
    """For a timeout's message: the server's counters, the run, the end of the triggerers' logs."""
    run = airflow.describe_run(CANCEL_DAG, run_id)
    logs = "\n".join(trigger_log(airflow, run_id, task)[-3000:] for task in ("worker_free", "deferrable"))
    return f"{fake_llm.stats()['batches']}\n{run}\n{logs}"


def test_marking_a_waiting_batch_task_failed_cancels_its_batch(airflow, fake_llm):
    """Worker-free and deferrable: PATCH the deferred task instance to ``failed`` while its batch waits;
    Airflow's triggerer cancels the trigger as a user action and calls its on_kill, which cancels the
    batch (POST /batches/{id}/cancel). The task stays failed, and nothing is sent again."""
    previous = fake_llm.configure_batches()["batch_processing_s"]
    fake_llm.configure_batches(batch_processing_s=SLOW_BATCH_S)
    try:
        base = fake_llm.stats()["batches"]
        airflow.wait_for_dag(CANCEL_DAG)
        airflow.unpause(CANCEL_DAG)
        run_id = airflow.trigger(CANCEL_DAG)
        tasks = ("worker_free", "deferrable")

        def waiting() -> bool:
            states = airflow.task_states(CANCEL_DAG, run_id)
            created = fake_llm.stats()["batches"]["batches_created"] - base["batches_created"]
            return (
                created == len(tasks)
                and all(states.get(task) == "deferred" for task in tasks)
                and all(stored_batch_id(airflow, run_id, task) for task in tasks)
            )

        wait_for(
            waiting,
            120,
            "both tasks deferred with their batch stored",
            lambda: airflow.describe_run(CANCEL_DAG, run_id),
        )
        ids = {task: stored_batch_id(airflow, run_id, task) for task in tasks}
        assert {task: batch_of(fake_llm, run_id, task)["id"] for task in tasks} == ids

        for done, task in enumerate(tasks, start=1):
            assert batch_of(fake_llm, run_id, task)["status"] in ("validating", "in_progress")
            marked = airflow.api(
                "PATCH",
                f"dags/{CANCEL_DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task}",
                json={"new_state": "failed"},
            )
            assert [ti["state"] for ti in marked["task_instances"]] == ["failed"], marked
            started = time.monotonic()
            wait_for(
                lambda done=done: cancelled_since(fake_llm, base) >= done,
                60,
                f"the batch of {task} cancelled",
                lambda: describe(airflow, fake_llm, run_id),
            )
            took = time.monotonic() - started
            # That task's batch, and only it: the other still runs until its own task is marked.
            assert airflow.task_states(CANCEL_DAG, run_id)[task] == "failed"
            assert cancelled_since(fake_llm, base) == done
            assert batch_of(fake_llm, run_id, task)["status"] in ("cancelling", "cancelled")
            for other in tasks[done:]:
                assert batch_of(fake_llm, run_id, other)["status"] in ("validating", "in_progress")
            print(f"{task}: marked failed -> batch cancelled in {took:.1f} s")

        state = airflow.wait_for_run(CANCEL_DAG, run_id, timeout=60)
        # A few polls later: still failed, one try, nothing created or cancelled again.
        time.sleep(5)
        stats = fake_llm.stats()["batches"]
    finally:
        fake_llm.configure_batches(batch_processing_s=previous)
    assert state == "failed", airflow.describe_run(CANCEL_DAG, run_id)
    tis = {ti["task_id"]: ti for ti in airflow.task_instances(CANCEL_DAG, run_id)}
    assert {task: (ti["state"], ti["try_number"]) for task, ti in tis.items()} == {
        "worker_free": ("failed", 1),
        "deferrable": ("failed", 1),
    }
    assert tis["worker_free"]["queued_when"] is None  # worker-free: never handed to a worker
    assert stats["batches_created"] - base["batches_created"] == len(tasks), stats
    assert stats["batches_cancelled"] - base["batches_cancelled"] == len(tasks), stats
    assert stats["lines_answered_twice"] == base["lines_answered_twice"], stats
    # Airflow's own word that it called on_kill because of the user's action, then ours that it cancelled.
    for task in tasks:
        log = trigger_log(airflow, run_id, task)
        assert log.count(ON_KILL_LOG) == 1, log
        assert log.index(ON_KILL_LOG) < log.index(f"LLM batch: cancelled {ids[task]}"), log
