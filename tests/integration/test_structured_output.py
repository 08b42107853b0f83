"""Typed answers through the real trigger and the fake server: the schema asked for, checked, returned."""

from __future__ import annotations

import pytest
from airflow.sdk import DAG

from airflow_llm_async.operators.llm import LLMOperator
from tests.doubles import RecordingTI
from tests.schemas import Entities


@pytest.fixture
def dag():
    with DAG("structured_output", schedule=None) as dag:
        yield dag


async def resumed(op: LLMOperator) -> tuple[object, RecordingTI]:
    """Run the trigger the operator defers with, then resume the task with its event."""
    events = [event async for event in op.build_trigger().run()]
    ti = RecordingTI()
    return op.execute_complete({"ti": ti}, events[0].payload), ti


async def test_a_typed_answer_reaches_xcom_as_a_dict_that_the_model_accepts(dag, fake_llm):
    op = LLMOperator(
        task_id="t", prompt="Entities in: Ada met Alan.", llm_conn_id="llm_fake", output_type=Entities
    )
    value, ti = await resumed(op)
    assert isinstance(value, dict) and Entities.model_validate(value).entities[0].mentions > 0
    assert ti.pushed["llm_output"] == value
    assert ti.pushed["llm_meta"]["quality"] == {"passed": True, "failures": []}


async def test_an_answer_that_does_not_match_the_schema_goes_down_the_fallback_chain(dag, fake_llm):
    fake_llm.set_fault("gpt-4", "short")  # "OK.": not JSON at all
    op = LLMOperator(
        task_id="t", prompt="Entities in: Ada met Alan.", llm_conn_id="llm_fake", output_type=Entities,
        model="gpt-4", fallback_models=["gpt-3.5-turbo"], quality_retries=1,
    )  # fmt: skip
    value, ti = await resumed(op)
    Entities.model_validate(value)
    meta = ti.pushed["llm_meta"]
    assert meta["model"] == "gpt-3.5-turbo" and meta["fallback_used"] is True
    assert [a["result"] for a in meta["attempts"]] == ["quality_failed", "quality_failed", "ok"]
    assert meta["attempts"][0]["reason"][0]["rule"] == "require_json"
