"""LLMOperator / TextProcessingOperator / LLMQualityBranchOperator without a network."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import jinja2
import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from airflow_llm_async.core.outcome import Attempt, CallSpec, Outcome
from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.core.quality import QualitySpec
from airflow_llm_async.operators.branch import LLMQualityBranchOperator
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator, TextProcessingOperator
from airflow_llm_async.triggers.chat import ChatCompletionTrigger
from tests.doubles import RecordingTI


@pytest.fixture
def dag():
    with DAG("unit_dag", schedule=None) as dag:
        yield dag


def test_execute_defers_to_a_trigger_holding_only_json_safe_kwargs(dag):
    op = LLMOperator(
        task_id="ask",
        prompt="Summarize: hi",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        system_prompt="be brief",
        response_format={"type": "json_object"},
        extra_body={"seed": 7},
        max_retries=3,
        quality={"min_chars": 10},
        timeout=timedelta(minutes=2),
        llm_conn_id="llm_test",
        max_cost_usd=0.25,
    )
    before = time.time()
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    deferred = info.value
    assert deferred.method_name == "execute_complete"
    assert deferred.timeout == timedelta(minutes=3)  # our deadline + grace, so our error comes first
    classpath, kwargs = deferred.trigger.serialize()
    assert classpath == "airflow_llm_async.triggers.chat.ChatCompletionTrigger"
    assert before + 120 <= kwargs["spec"].pop("deadline") <= time.time() + 120
    assert kwargs == {
        "spec": {
            "request": {
                "seed": 7,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "Summarize: hi"},
                ],
                "temperature": 0.7,
                "max_tokens": 1000,
                "response_format": {"type": "json_object"},
            },
            "chain": [["llm_test", "gpt-4"], ["llm_test", "gpt-3.5-turbo"]],
            "max_retries": 3,
            "quality": QualitySpec(min_chars=10).to_dict(),
            "quality_retries": 0,
            "on_quality_failure": "fail",
            "max_cost_usd": 0.25,
            "output": "text",
        },
        "end": "on_success",  # a success ends the task in the triggerer: no resume, no 3.3.2 race
        "output_key": "llm_output",
        "time_limit": None,
        "prompt": None,
        "system_prompt": None,
        "messages": None,
    }
    json.dumps(kwargs)  # stored as JSON in the trigger table


def test_serialize_round_trips_exactly():
    spec = CallSpec.of(
        {"messages": [{"role": "user", "content": "x"}]},
        ["c", "backup"],
        ["a", "b"],
        deadline=1700000000.5,
        max_retries=1,
        quality=QualitySpec(min_chars=5),
        quality_retries=2,
        on_quality_failure="return",
        max_cost_usd=0.5,
    )
    trigger = ChatCompletionTrigger(
        spec=spec.to_json(),
        end="here",
        output_key="answer",
        time_limit=30.0,
        prompt="p {{ ds }}",
        system_prompt="s",
        messages=[{"role": "user", "content": "m"}],
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == f"{ChatCompletionTrigger.__module__}.ChatCompletionTrigger"
    clone = ChatCompletionTrigger(**json.loads(json.dumps(kwargs)))
    assert clone.serialize() == (classpath, kwargs)
    assert CallSpec.from_json(kwargs["spec"]) == spec
    assert kwargs["spec"]["deadline"] == 1700000000.5  # a wall-clock moment, not a remaining timeout


# Kwargs exactly as release 0.1 wrote them into the trigger table (a task deferred before an upgrade).
RELEASE_0_1_KWARGS = {
    "request": {"messages": [{"role": "user", "content": "x"}], "temperature": 0.7, "max_tokens": 1000},
    "conn_id": "llm_test",
    "models": ["gpt-4", "gpt-3.5-turbo"],
    "deadline": 1700000000.5,
    "max_retries": 3,
    "quality": {"min_chars": 10},
    "quality_retries": 1,
    "on_quality_failure": "return",
    "prompt": None,
    "system_prompt": None,
    "messages": None,
    "time_limit": None,
    "end_from_trigger": False,
    "output_key": "llm_output",
    "fallback_conn_ids": ["llm_backup"],
    "end_on_success": True,
    "max_cost_usd": 0.25,
}


def test_a_trigger_serialized_by_release_0_1_still_loads():
    trigger = ChatCompletionTrigger(**json.loads(json.dumps(RELEASE_0_1_KWARGS)))
    assert trigger.end == "on_success" and trigger.output_key == "llm_output"
    assert trigger.call_spec() == CallSpec(
        request=RELEASE_0_1_KWARGS["request"],
        chain=[
            ("llm_test", "gpt-4"),
            ("llm_test", "gpt-3.5-turbo"),
            ("llm_backup", "gpt-4"),
            ("llm_backup", "gpt-3.5-turbo"),
        ],  # fmt: skip
        deadline=1700000000.5,
        max_retries=3,
        quality=QualitySpec(min_chars=10),
        quality_retries=1,
        on_quality_failure="return",
        max_cost_usd=0.25,
    )
    worker_free = ChatCompletionTrigger(**{**RELEASE_0_1_KWARGS, "end_from_trigger": True, "prompt": "p"})
    assert worker_free.end == "here" and worker_free.call_spec().request["messages"][-1]["content"] == "p"


def test_the_execution_timeout_becomes_the_deadline(dag):
    op = LLMOperator(task_id="ask", prompt="x", execution_timeout=timedelta(seconds=30))
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    assert info.value.trigger.call_spec().deadline == pytest.approx(time.time() + 30, abs=5)
    assert info.value.timeout == timedelta(seconds=90)


def test_no_limit_means_no_deadline(dag):
    with pytest.raises(TaskDeferred) as info:
        LLMOperator(task_id="ask", prompt="x").execute({})
    assert info.value.trigger.call_spec().deadline is None
    assert info.value.timeout is None


def test_prompt_system_prompt_and_messages_are_jinja_templated(dag):
    op = LLMOperator(
        task_id="ask",
        prompt="Trends in {{ params.topic }}",
        system_prompt="You write for {{ params.team }}",
        messages=[{"role": "user", "content": "earlier: {{ params.topic }}"}],
    )
    assert set(LLMOperator.template_fields) == {"prompt", "system_prompt", "messages"}
    op.render_template_fields({"params": {"topic": "LLM", "team": "ai_team"}})
    messages = op.build_request()["messages"]
    assert messages == [
        {"role": "system", "content": "You write for ai_team"},
        {"role": "user", "content": "earlier: LLM"},
        {"role": "user", "content": "Trends in LLM"},
    ]


def test_the_article_format_placeholders_are_left_alone(dag):
    """The article used str.format(**context); we template with Jinja only, so braces are data."""
    op = LLMOperator(task_id="ask", prompt='JSON like {"a": 1} and {extracted_data}')
    op.render_template_fields({})
    assert op.build_request()["messages"][-1]["content"] == 'JSON like {"a": 1} and {extracted_data}'


def test_messages_rendered_to_json_text_are_parsed(dag):
    op = LLMOperator(task_id="ask", messages="{{ params.history }}")
    op.render_template_fields({"params": {"history": json.dumps([{"role": "user", "content": "hi"}])}})
    assert op.build_request()["messages"] == [{"role": "user", "content": "hi"}]


def test_messages_that_render_to_non_json_fail_without_retries(dag):
    op = LLMOperator(task_id="ask", messages="{{ params.history }}")
    op.render_template_fields({"params": {"history": "not json"}})
    with pytest.raises(AirflowFailException, match="not a JSON list"):
        op.execute({})


def test_a_prompt_that_renders_empty_fails_without_retries(dag):
    op = LLMOperator(task_id="ask", prompt="{{ params.text }}")
    op.render_template_fields({"params": {"text": ""}})
    with pytest.raises(AirflowFailException, match="Nothing to send"):
        op.execute({})


def test_an_undefined_template_variable_is_an_error_not_an_empty_prompt(dag):
    op = LLMOperator(task_id="ask", prompt="{{ params.missing }}")
    with pytest.raises(jinja2.UndefinedError, match="missing"):
        op.render_template_fields({"params": {}})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, "pass `prompt`"),
        ({"prompt": "x", "temperature": 3}, "temperature must be a number from 0 to 2"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"prompt": "x", "max_tokens": "100"}, "max_tokens must be a positive integer"),
        ({"prompt": "x", "output_key": ""}, "output_key must be a non-empty string"),
        ({"prompt": "x", "model": ""}, "model must be a non-empty string"),
        ({"prompt": "x", "fallback_models": ["gpt-4", None]}, "fallback_models must be a list"),
        ({"prompt": "x", "response_format": "json"}, "response_format must be a dict"),
        ({"prompt": "x", "fallback_conn_ids": "backup"}, "fallback_conn_ids must be a list"),
        ({"prompt": "x", "extra_body": {"model": "y"}}, "extra_body must not set"),
        ({"prompt": "x", "max_retries": -1}, "max_retries must be an integer"),
        ({"prompt": "x", "on_quality_failure": "ignore"}, "on_quality_failure must be one of"),
        ({"prompt": "x", "quality_retries": -2}, "quality_retries must be an integer"),
        ({"prompt": "x", "quality": {"min_len": 3}}, "bad `quality` spec: unknown quality rule"),
        ({"prompt": "x", "timeout": 0}, "timeout must be positive"),
        (
            {"prompt": "x", "timeout": "thirty"},
            "timeout must be positive seconds or a timedelta, got 'thirty'",
        ),
        ({"prompt": "x", "extra_body": {"stream": True}}, "extra_body must not set stream"),
    ],
)
def test_bad_arguments_fail_at_parse_time_with_the_fix(dag, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LLMOperator(task_id="ask", **kwargs)


def _success_event(text="答案" * 30):
    return Outcome(
        "success",
        text,
        model="gpt-3.5-turbo",
        requested_model="gpt-3.5-turbo",
        conn_id="llm_default",
        usage={"prompt_tokens": 5, "completion_tokens": 60, "total_tokens": 65},
        finish_reason="stop",
        latency_s=1.5,
        attempts=[
            Attempt("llm_default", "gpt-4", 503, 0.5, "error"),
            Attempt("llm_default", "gpt-3.5-turbo", 200, 1.0, "ok"),
        ],
        fallback_used=True,
        cost_usd=0.0001,
        started_at=1700000000.0,
        finished_at=1700000001.5,
        host="worker-1",
        pid=42,
    ).to_json()


def test_execute_complete_pushes_text_and_meta(dag):
    op = LLMOperator(task_id="ask", prompt="x", output_key="analysis")
    ti = RecordingTI()
    event = _success_event()
    assert op.execute_complete({"ti": ti}, json.loads(json.dumps(event))) == event["text"]
    assert ti.pushed == {"analysis": event["text"], "llm_meta": event["meta"]}


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        (None, "resumed without the trigger's event"),
        ({"status": "done"}, "status must be one of"),
        ({"status": "success"}, "must carry the answer"),
        ({"status": "error", "error": "boom"}, "must be a dict with 'kind'"),
        ("success", "must be a dict"),
    ],
)
def test_execute_complete_rejects_an_event_it_cannot_read(dag, event, fragment):
    with pytest.raises(AirflowException, match=fragment) as info:
        LLMOperator(task_id="ask", prompt="x").execute_complete({"ti": RecordingTI()}, event)
    assert "'ask'" in str(info.value) and "clear the task" in str(info.value).lower()


def test_output_key_return_value_is_not_pushed_twice(dag):
    ti = RecordingTI()
    LLMOperator(task_id="ask", prompt="x", output_key="return_value").execute_complete(
        {"ti": ti}, _success_event()
    )
    assert set(ti.pushed) == {"llm_meta"}


@pytest.mark.parametrize(
    ("kind", "exception"),
    [
        ("client", AirflowFailException),
        ("config", AirflowFailException),
        ("server", AirflowException),
        ("rate_limit", AirflowException),
        ("deadline", AirflowException),
        ("quality", AirflowException),
    ],
)
def test_a_failed_call_raises_with_the_api_message(dag, kind, exception):
    event = Outcome(
        "error",
        error=LLMCallError(kind, "HTTP 404: no such model", status=404, code="model_not_found"),
        attempts=[Attempt("llm_default", "gpt-5x", 404, 0.1, "error")],
    ).to_json()
    ti = RecordingTI()
    with pytest.raises(exception) as info:
        LLMOperator(task_id="ask", prompt="x").execute_complete({"ti": ti}, event)
    assert ti.pushed == {"llm_meta": {**event["meta"], "error": event["error"]}}
    assert f"LLM call failed ({kind}): HTTP 404: no such model" in str(info.value)
    assert "gpt-5x@llm_default: error" in str(info.value)
    if exception is AirflowException:
        assert not isinstance(info.value, AirflowFailException)  # task retries may still help


def test_text_processing_builds_the_article_prompts(dag):
    cases = {
        ("summarize", "zh"): "请用100字以内总结以下内容:\n原文",
        ("translate", "zh"): "将以下内容翻译成英文:\n原文",
        ("analyze", "zh"): "分析以下内容的关键要点:\n原文",
        ("summarize", "en"): "Summarize the following in at most 100 words:\n原文",
        ("translate", "en"): "Translate the following into English:\n原文",
        ("analyze", "en"): "Analyze the key points of the following:\n原文",
    }
    for (operation, language), prompt in cases.items():
        op = TextProcessingOperator(
            task_id=f"{operation}_{language}", operation=operation, language=language, text="原文"
        )
        assert op.build_request()["messages"] == [{"role": "user", "content": prompt}]


def test_text_is_templated_and_braces_in_it_are_data(dag):
    op = TextProcessingOperator(
        task_id="t",
        operation="translate",
        target_language="{{ params.lang }}",
        text="{{ ti.xcom_pull(task_ids='up') }}",
    )
    ti = RecordingTI(pulls={("up", "return_value"): "代码 {x} 与 {{ y }}"})
    op.render_template_fields({"ti": ti, "params": {"lang": "日文"}})
    assert op.build_request()["messages"][0]["content"] == "将以下内容翻译成日文:\n代码 {x} 与 {{ y }}"


def test_structured_text_is_sent_as_json(dag):
    op = TextProcessingOperator(task_id="t", operation="analyze", text={"标题": "AI"})
    assert op.build_request()["messages"][0]["content"].endswith('{"标题": "AI"}')


def test_text_processing_records_the_article_quality_verdict_by_default(dag):
    op = TextProcessingOperator(task_id="t", operation="summarize", text="x")
    assert op.quality == {
        "min_chars": 50,
        "refusal_markers": ["错误", "抱歉"],
        "regex": None,
        "reject_finish_reasons": [],
        "require_json": False,
        "json_schema": None,
    }
    assert op.on_quality_failure == "return"
    assert op.output_key == "processed_text"


def test_an_unknown_operation_lists_the_valid_ones_at_parse_time(dag):
    with pytest.raises(
        ValueError, match=r"Unknown operation 'sumarize'.*\['analyze', 'summarize', 'translate'\]"
    ):
        TextProcessingOperator(task_id="t", operation="sumarize", text="x")
    with pytest.raises(ValueError, match="language must be one of"):
        TextProcessingOperator(task_id="t2", operation="summarize", language="fr", text="x")


@pytest.mark.parametrize(
    ("answer", "branch"),
    [
        ("太短了", "retry_task"),
        (None, "retry_task"),
        ("抱歉" + "。" * 60, "fallback_task"),
        ("分析结果出现错误" + "内容" * 30, "fallback_task"),
        (
            "大语言模型正在改变数据工程的方式,自动化清洗、文档生成和代码审查都能借助模型完成,团队效率明显提升,成本持续下降。",
            "continue_task",
        ),
    ],
)
def test_quality_branch_follows_the_article_rules(dag, answer, branch):
    op = LLMQualityBranchOperator(task_id="quality_check", source_task_id="generate")
    ti = RecordingTI(pulls={("generate", "return_value"): answer})
    assert op.choose_branch({"ti": ti}) == branch


def test_quality_branch_ids_and_rules_are_configurable(dag):
    op = LLMQualityBranchOperator(
        task_id="q",
        source_task_id="g",
        source_key="analysis",
        min_chars=3,
        refusal_markers=["sorry"],
        retry_task="again",
        fallback_task="other",
        continue_task="go",
    )

    def pick(answer):
        return op.choose_branch({"ti": RecordingTI(pulls={("g", "analysis"): answer})})

    assert (pick("ab"), pick("so sorry"), pick("fine")) == ("again", "other", "go")


def test_quality_branch_rejects_bad_rules(dag):
    with pytest.raises(ValueError, match="min_chars"):
        LLMQualityBranchOperator(task_id="q", source_task_id="g", min_chars=-5)


def test_worker_free_mode_fixes_unrendered_trigger_kwargs_at_parse_time(dag):
    op = LLMOperator(
        task_id="ask",
        prompt="Trends in {{ params.topic }}",
        system_prompt="brief",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        timeout=60,
        output_key="analysis",
        start_from_trigger=True,
    )
    other = LLMOperator(task_id="other", prompt="x", start_from_trigger=True)
    args = op.start_trigger_args
    assert op.start_from_trigger is True
    assert (args.trigger_cls, args.next_method) == (
        "airflow_llm_async.triggers.chat.ChatCompletionTrigger",
        "execute_complete",
    )
    assert args.timeout == timedelta(seconds=120)
    assert args.trigger_kwargs == {
        "spec": {
            "request": {"temperature": 0.7, "max_tokens": 1000},
            "chain": [["llm_default", "gpt-4"], ["llm_default", "gpt-3.5-turbo"]],
            "deadline": None,
            "max_retries": None,
            "quality": None,
            "quality_retries": 0,
            "on_quality_failure": "fail",
            "max_cost_usd": None,
            "output": "text",
        },
        "end": "here",
        "output_key": "analysis",
        "time_limit": 60.0,
        "prompt": "Trends in {{ params.topic }}",
        "system_prompt": "brief",
        "messages": None,
    }
    json.dumps(args.trigger_kwargs)
    assert other.start_trigger_args.trigger_kwargs["prompt"] == "x"  # per instance, not shared
    assert LLMOperator.start_trigger_args is None
    # The kwargs rebuild the trigger; the triggerer renders `prompt`/`system_prompt`/`messages` in place.
    trigger = ChatCompletionTrigger(**args.trigger_kwargs)
    trigger.prompt = "Trends in LLM"
    assert trigger.call_spec().request["messages"] == [
        {"role": "system", "content": "brief"},
        {"role": "user", "content": "Trends in LLM"},
    ]


def test_worker_free_text_processing_puts_the_text_template_in_the_prompt(dag):
    pull = "{{ ti.xcom_pull(task_ids='up', map_indexes=-1) }}"
    op = TextProcessingOperator(task_id="t", operation="translate", text=pull, start_from_trigger=True)
    assert op.start_trigger_args.trigger_kwargs["prompt"] == f"将以下内容翻译成英文:\n{pull}"


@pytest.mark.parametrize(
    ("operator", "kwargs"),
    [
        (LLMOperator, {"prompt": "Sum up {{ ti.xcom_pull(task_ids='up') }}"}),
        (LLMOperator, {"messages": [{"role": "user", "content": "{{ task_instance.xcom_pull('up') }}"}]}),
        (
            TextProcessingOperator,
            {"operation": "summarize", "text": "{{ ti.xcom_pull(task_ids='up', key='k') }}"},
        ),
    ],
)
def test_worker_free_rejects_a_pull_the_triggerer_cannot_answer(dag, operator, kwargs):
    with pytest.raises(ValueError, match="add map_indexes=-1 to the xcom_pull"):
        operator(task_id="t", start_from_trigger=True, **kwargs)
    operator(task_id="deferrable", **kwargs)  # fine when a worker renders the templates


def test_worker_free_tasks_still_defer_normally_when_executed(dag):
    """dag.test() and `airflow tasks test` call execute(): it must still work there."""
    op = LLMOperator(task_id="ask", prompt="x", start_from_trigger=True)
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    assert info.value.trigger.end == "on_success"
    assert info.value.trigger.call_spec().request["messages"] == [{"role": "user", "content": "x"}]


def test_worker_free_default_comes_from_the_provider_config(dag, monkeypatch):
    monkeypatch.setenv("AIRFLOW__LLM_ASYNC__START_FROM_TRIGGER", "True")
    assert LLMOperator(task_id="on", prompt="x").start_from_trigger is True
    assert LLMOperator(task_id="off", prompt="x", start_from_trigger=False).start_from_trigger is False
    # Sync mode runs on the worker by definition, whatever the provider default says.
    assert LLMOperator(task_id="sync", prompt="x", deferrable=False).start_from_trigger is False
    monkeypatch.setenv("AIRFLOW__LLM_ASYNC__START_FROM_TRIGGER", "False")
    assert LLMOperator(task_id="default", prompt="x").start_from_trigger is False


def test_a_subclass_with_its_own_execute_complete_still_resumes(dag):
    class Custom(LLMOperator):
        def execute_complete(self, context, event):
            return super().execute_complete(context, event).upper()

    with pytest.raises(TaskDeferred) as info:
        Custom(task_id="custom", prompt="x").execute({})
    assert info.value.trigger.end == "resume"


@pytest.mark.parametrize(
    ("setting", "deferrable"),
    [(None, True), ("False", False), ("True", True)],  # unset: True, not Airflow's own False
)
def test_operators_default_deferrable_is_honoured_when_the_deployment_sets_it(
    dag, monkeypatch, setting, deferrable
):
    if setting is not None:
        monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", setting)
    assert LLMOperator(task_id="ask", prompt="x").deferrable is deferrable
    assert LLMOperator(task_id="explicit", prompt="x", deferrable=not deferrable).deferrable is not deferrable
    assert LLMFanOutOperator(task_id="fan", prompts=["x"], start_from_trigger=False).deferrable is deferrable
