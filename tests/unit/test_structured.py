"""Typed answers (``output_type``): the schema, the request it makes, the checks and what the task returns."""

from __future__ import annotations

import json

import pytest
from airflow.sdk import DAG
from pydantic import BaseModel

from airflow_llm_async.core import structured
from airflow_llm_async.core.outcome import CallSpec, FanOutOutcome, Outcome, answer_value, task_xcoms
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator
from tests.doubles import RecordingTI
from tests.schemas import Entities, Entity


class Loose(BaseModel):
    title: str
    note: str | None = None  # optional: strict mode cannot express it


@pytest.fixture
def dag():
    with DAG("structured", schedule=None) as dag:
        yield dag


# ---- the schema and the response_format --------------------------------------------------------------


def test_a_pydantic_model_gives_its_json_schema_and_a_dict_is_taken_as_is():
    assert structured.schema_of(Entities) == Entities.model_json_schema()
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert structured.schema_of(schema) is schema


@pytest.mark.parametrize("bad", [Entity(name="x", mentions=1), str, "Entities", 3])
def test_anything_else_is_refused_saying_what_is_expected(bad):
    with pytest.raises(TypeError, match="pydantic model class or a JSON Schema dict"):
        structured.schema_of(bad)


def test_a_schema_with_every_property_required_is_made_strict_everywhere_without_touching_the_original():
    schema = Entities.model_json_schema()
    before = json.dumps(schema, sort_keys=True)
    strict = structured.strict(schema)
    assert strict is not None and json.dumps(schema, sort_keys=True) == before
    assert strict["additionalProperties"] is False
    assert strict["$defs"]["Entity"]["additionalProperties"] is False  # the nested model too


@pytest.mark.parametrize(
    "schema",
    [
        Loose.model_json_schema(),  # an optional property
        {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "required": ["a"],
            "additionalProperties": True,
        },
    ],
)
def test_a_schema_strict_mode_cannot_express_stays_as_it_is_with_strict_off(schema):
    assert structured.strict(schema) is None
    request = structured.response_format(schema)["json_schema"]
    assert (request["strict"], request["schema"]) == (False, schema)


def test_the_response_format_is_named_after_the_schema_in_the_characters_openai_allows():
    assert structured.response_format(Entities.model_json_schema())["json_schema"]["name"] == "Entities"
    assert structured.response_format({"title": "a b/c", "type": "string"})["json_schema"]["name"] == "a_b_c"
    assert structured.response_format({"type": "string"})["json_schema"]["name"] == "answer"


# ---- the operators -------------------------------------------------------------------------------------


def test_output_type_asks_for_the_schema_checks_it_and_returns_json(dag):
    op = LLMOperator(task_id="t", prompt="x", output_type=Entities, quality={"min_chars": 2})
    spec = op.call_spec()
    assert spec.request["response_format"] == structured.response_format(Entities.model_json_schema())
    assert spec.request["response_format"]["json_schema"]["strict"] is True
    assert spec.quality.json_schema == Entities.model_json_schema() and spec.quality.min_chars == 2
    assert spec.output == "json"
    assert CallSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec  # travels as JSON


def test_a_server_without_json_schema_support_gets_json_mode_and_the_same_checks(dag):
    op = LLMOperator(task_id="t", prompt="x", output_type=Entities, response_format={"type": "json_object"})
    spec = op.call_spec()
    assert spec.request["response_format"] == {"type": "json_object"}
    assert spec.quality.json_schema == Entities.model_json_schema() and spec.output == "json"


def test_without_output_type_nothing_changes(dag):
    spec = LLMOperator(task_id="t", prompt="x").call_spec()
    assert "response_format" not in spec.request and spec.quality.json_schema is None
    assert spec.output == "text"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"output_type": Entity(name="x", mentions=1)}, "bad output_type: output_type must be a pydantic"),
        ({"output_type": {"type": "nonsense"}}, "bad output_type: quality json_schema is not a valid"),
        ({"output_type": Entities, "quality": {"json_schema": {"type": "object"}}}, "give the schema once"),
    ],
)
def test_bad_output_types_fail_when_the_dag_is_parsed(dag, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LLMOperator(task_id="t", prompt="x", **kwargs)


def test_the_task_returns_and_pushes_the_parsed_document(dag):
    op = LLMOperator(task_id="t", prompt="x", output_type=Entities, output_key="entities")
    document = {"entities": [{"name": "Ada", "mentions": 2}], "language": "en"}
    outcome = Outcome(status="success", text=json.dumps(document), model="gpt-4")
    ti = RecordingTI()
    assert op.execute_complete({"ti": ti}, outcome.to_json()) == document
    assert ti.pushed["entities"] == document and ti.pushed["llm_meta"]["model"] == "gpt-4"


def test_a_fan_out_returns_one_document_per_item(dag):
    op = LLMFanOutOperator(task_id="f", prompts=["a", "b"], output_type=Entities, start_from_trigger=False)
    assert op.call_spec(with_messages=False).output == "json"
    outcome = FanOutOutcome(
        status="success", results=['{"language": "en", "entities": []}', None], meta={}, message=""
    )
    assert task_xcoms(outcome, "return_value", "json")["return_value"] == [
        {"language": "en", "entities": []},
        None,
    ]


def test_an_answer_returned_although_it_is_not_json_stays_text():
    # on_quality_failure="return" lets an answer through that failed the schema: nothing is lost.
    assert answer_value("not json", "json") == "not json"
    assert answer_value('{"a": 1}', "text") == '{"a": 1}'
