"""deferrable=False: the same async core, run on the worker through async_to_sync."""

from __future__ import annotations

import asyncio

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airflow_llm_async.operators.llm import LLMOperator, TextProcessingOperator
from tests.doubles import RecordingTI


@pytest.fixture
def dag():
    with DAG("sync_dag", schedule=None) as dag:
        yield dag


def test_sync_mode_returns_the_same_answer_as_the_trigger_would(dag, threaded_fake_llm):
    op = LLMOperator(task_id="ask", prompt="分析以下内容的趋势: AI", llm_conn_id="llm_fake", deferrable=False)
    ti = RecordingTI()
    text = op.execute({"ti": ti})
    assert "AI" in text and len(text) >= 50
    assert ti.pushed["llm_output"] == text
    meta = ti.pushed["llm_meta"]
    assert meta["model"] == "gpt-4" and meta["attempts"][0]["status"] == 200
    # The same task deferred: its trigger sends the same request and the resumed task returns the same.
    deferred = LLMOperator(task_id="ask2", prompt="分析以下内容的趋势: AI", llm_conn_id="llm_fake")
    with pytest.raises(TaskDeferred) as info:
        deferred.execute({})
    assert info.value.trigger.call_spec().request == op.build_request()
    [event] = asyncio.run(_events(info.value.trigger))
    resumed = RecordingTI()
    assert deferred.execute_complete({"ti": resumed}, event.payload) == text
    assert resumed.pushed["llm_meta"]["usage"] == meta["usage"]


async def _events(trigger) -> list:
    return [event async for event in trigger.run()]


def test_sync_mode_runs_the_fallback_chain(dag, threaded_fake_llm):
    threaded_fake_llm.set_fault("gpt-4", "503")
    op = TextProcessingOperator(
        task_id="sum",
        operation="summarize",
        text="大语言模型改变了开发方式。",
        llm_conn_id="llm_fake",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        max_retries=0,
        deferrable=False,
    )
    ti = RecordingTI()
    op.execute({"ti": ti})
    assert ti.pushed["llm_meta"]["model"] == "gpt-3.5-turbo"
    assert ti.pushed["llm_meta"]["fallback_used"] is True
    assert ti.pushed["processed_text"]


def test_sync_mode_can_run_repeatedly_in_one_process(dag, threaded_fake_llm):
    for index in range(3):
        LLMOperator(
            task_id=f"ask{index}", prompt=f"q{index}", llm_conn_id="llm_fake", deferrable=False
        ).execute({"ti": RecordingTI()})
    assert threaded_fake_llm.stats()["requests"] == 3


def test_sync_mode_fails_clearly_on_a_client_error(dag, threaded_fake_llm):
    op = LLMOperator(task_id="ask", prompt="x", model="gpt-5x", llm_conn_id="llm_fake", deferrable=False)
    with pytest.raises(
        AirflowFailException, match=r"\(client\): HTTP 404: The model `gpt-5x` does not exist"
    ):
        op.execute({"ti": RecordingTI()})


def test_sync_mode_fails_clearly_without_a_connection(dag):
    op = LLMOperator(task_id="ask", prompt="x", llm_conn_id="llm_nowhere", deferrable=False)
    with pytest.raises(AirflowFailException, match="airflow connections add llm_nowhere"):
        op.execute({"ti": RecordingTI()})


def test_a_subclass_execute_complete_sees_the_answer_in_sync_mode_too(dag, threaded_fake_llm):
    class Shouting(LLMOperator):
        def execute_complete(self, context, event=None):
            return super().execute_complete(context, event).upper()

    op = Shouting(task_id="shout", prompt="Summarize: quiet words", llm_conn_id="llm_fake", deferrable=False)
    answer = op.execute({"ti": RecordingTI()})
    assert answer == answer.upper() and "QUIET" in answer
