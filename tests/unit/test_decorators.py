"""@task.llm_deferred and @task.llm_fanout: the function runs on the worker, then the call is deferred."""

from __future__ import annotations

import pytest
from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from pydantic import BaseModel

from airflow_llm_async.core import structured
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.decorators.llm import llm_deferred_task, llm_fanout_task
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator
from airflow_llm_async.triggers.chat import ChatCompletionTrigger
from airflow_llm_async.triggers.fanout import FanOutTrigger
from tests.doubles import RecordingTI


class Summary(BaseModel):
    title: str
    words: int


@pytest.fixture
def dag():
    with DAG("decorated", schedule=None) as dag:
        yield dag


def deferred(op, **context) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as info:
        op.execute(context)
    return info.value


def test_both_decorators_are_registered_on_task_beside_common_ais():
    assert (task.llm_deferred, task.llm_fanout) == (llm_deferred_task, llm_fanout_task)
    assert callable(task.llm)  # common.ai's own, installed beside this provider


def test_the_function_returns_the_prompt_and_the_call_defers_with_every_operator_argument(dag):
    @task.llm_deferred(
        model="gpt-4", fallback_models=["gpt-3.5-turbo"], system_prompt="Be brief.", max_tokens=50
    )
    def summarize(article: str) -> str:
        return f"Summarize: {article}"

    summarize("Ada met Alan.")
    op = dag.get_task("summarize")
    assert isinstance(op, LLMOperator) and op.deferrable and not op.start_from_trigger
    trigger = deferred(op).trigger
    assert isinstance(trigger, ChatCompletionTrigger)
    spec = CallSpec.from_json(trigger.spec)
    assert spec.request["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarize: Ada met Alan."},
    ]
    assert spec.chain == [("llm_default", "gpt-4"), ("llm_default", "gpt-3.5-turbo")]
    assert spec.request["max_tokens"] == 50


def test_the_function_may_return_messages(dag):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    @task.llm_deferred(model="gpt-4")
    def chat():
        return [*turns, {"role": "user", "content": "And now?"}]

    chat()
    spec = CallSpec.from_json(deferred(dag.get_task("chat")).trigger.spec)
    assert spec.request["messages"] == [*turns, {"role": "user", "content": "And now?"}]


def test_what_the_function_returns_is_data_and_is_not_rendered_as_a_template(dag):
    @task.llm_deferred(model="gpt-4")
    def literal():
        return "Explain the syntax {{ ds }} in Jinja."

    literal()
    spec = CallSpec.from_json(deferred(dag.get_task("literal")).trigger.spec)
    assert spec.request["messages"][-1]["content"] == "Explain the syntax {{ ds }} in Jinja."


@pytest.mark.parametrize("returned", [42, None, {"role": "user"}, ["a", "b"]])
def test_anything_else_fails_the_task_saying_what_to_return(dag, returned):
    @task.llm_deferred(model="gpt-4")
    def odd():
        return returned

    odd()
    with pytest.raises(
        AirflowFailException, match=r"@task.llm_deferred 'odd': the decorated function must return"
    ):
        dag.get_task("odd").execute({})


def test_worker_free_mode_is_refused_with_the_alternative(dag):
    with pytest.raises(
        ValueError, match="start_from_trigger=True cannot run the decorated function.*LLMOperator"
    ):

        @task.llm_deferred(model="gpt-4", start_from_trigger=True)
        def nope():
            return "x"

        nope()


def test_the_task_returns_the_answer_and_a_typed_answer_as_a_dict(dag):
    @task.llm_deferred(model="gpt-4", output_type=Summary)
    def summarize() -> dict:  # an annotation that would make a plain @task unroll the dict
        return "Summarize."

    summarize()
    op = dag.get_task("summarize")
    assert op.multiple_outputs is False
    spec = CallSpec.from_json(deferred(op).trigger.spec)
    assert spec.request["response_format"] == structured.response_format(Summary.model_json_schema())
    ti = RecordingTI()
    answer = Outcome(status="success", text='{"title": "T", "words": 3}', model="gpt-4")
    assert op.execute_complete({"ti": ti}, answer.to_json()) == {"title": "T", "words": 3}
    assert ti.pushed["llm_meta"]["model"] == "gpt-4"


def test_expand_maps_the_function_over_its_arguments(dag):
    @task.llm_deferred(model="gpt-4")
    def summarize(article: str) -> str:
        return f"Summarize: {article}"

    summarize.expand(article=["a", "b"])
    mapped = dag.get_task("summarize")
    assert mapped.operator_class.__name__ == "_LLMDeferredOperator"
    assert mapped.op_kwargs_expand_input.value == {"article": ["a", "b"]}
    assert mapped.partial_kwargs["model"] == "gpt-4"


def test_the_fan_out_decorator_asks_every_item_in_one_deferred_task(dag):
    @task.llm_fanout(model="gpt-4", max_failures=1, output_type=Summary)
    def summarize_all(articles: list[str]) -> list[str]:
        return [f"Summarize: {a}" for a in articles]

    summarize_all(["a", "b", "c"])
    op = dag.get_task("summarize_all")
    assert isinstance(op, LLMFanOutOperator) and not op.start_from_trigger
    trigger = deferred(op).trigger
    assert isinstance(trigger, FanOutTrigger)
    assert trigger.items == ["Summarize: a", "Summarize: b", "Summarize: c"]
    assert (trigger.max_failures, CallSpec.from_json(trigger.spec).output) == (1, "json")


def test_the_fan_out_function_must_return_a_list(dag):
    @task.llm_fanout(model="gpt-4")
    def one():
        return "just one prompt"

    one()
    with pytest.raises(
        AirflowFailException, match=r"@task.llm_fanout 'one': the decorated function must return a list"
    ):
        dag.get_task("one").execute({})
