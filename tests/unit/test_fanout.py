"""The fan-out's I/O-free parts: input parsing, max_failures, the summary, progress reuse, the operator."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from airflow_llm_async import progress
from airflow_llm_async.core import fanout
from airflow_llm_async.core.outcome import Attempt, CallSpec, Outcome
from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator
from airflow_llm_async.triggers.fanout import FanOutTrigger
from tests.doubles import RecordingTI


@pytest.fixture
def dag():
    with DAG("unit_fanout", schedule=None) as dag:
        yield dag


def ok(text: str = "answer", tokens: int = 10, cost: float | None = None, **fields) -> Outcome:
    usage = {"prompt_tokens": 4, "completion_tokens": tokens - 4, "total_tokens": tokens}
    attempts = [Attempt("c", "gpt-4", 200, 1.0, "ok")]
    return Outcome(
        "success", text, model="gpt-4", usage=usage, attempts=attempts, latency_s=1.0, cost_usd=cost, **fields
    )


def failed(kind: str = "server", message: str = "HTTP 503: busy") -> Outcome:
    attempts = [Attempt("c", "gpt-4", 503, 0.5, "error")] * 3
    error = LLMCallError(kind, message, status=503)
    return Outcome("error", error=error, attempts=attempts, latency_s=2.0, cost_usd=None)


# ---- input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rendered", "items"),
    [
        (["a", "b"], ["a", "b"]),
        ('["a", "b"]', ["a", "b"]),  # an XCom rendered with | tojson
        ("['a', 'b']", ["a", "b"]),  # ... or without: the list's Python repr
        ("[]", []),
        ([[{"role": "user", "content": "hi"}]], [[{"role": "user", "content": "hi"}]]),
    ],
)
def test_rendered_prompts_become_a_list(rendered, items):
    assert fanout.parse_items(rendered) == items


@pytest.mark.parametrize(
    ("rendered", "fragment"),
    [
        ("summarize these", "not a JSON list"),
        ("__import__('os').system('true')", "not a JSON list"),  # never evaluated as code
        ('{"a": 1}', "must be a list"),
        (42, "must be a list"),
        (["x"] * (fanout.MAX_ITEMS + 1), "split the list"),
    ],
)
def test_prompts_that_are_not_a_list_say_what_to_pass(rendered, fragment):
    with pytest.raises(ValueError, match=fragment):
        fanout.parse_items(rendered)


def test_an_item_is_a_prompt_or_a_message_list_with_the_shared_system_prompt():
    assert fanout.item_messages("hi", "brief") == [
        {"role": "system", "content": "brief"},
        {"role": "user", "content": "hi"},
    ]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert fanout.item_messages(turns, None) == turns
    for bad in ({"prompt": "x"}, 3, "", [{"content": "no role"}]):
        with pytest.raises(ValueError):
            fanout.item_messages(bad, None)


def test_an_unusable_item_becomes_a_config_failure_of_that_item_only():
    base = CallSpec(request={"max_tokens": 5}, chain=[("c", "m")])
    specs = fanout.item_specs(["ok", 7], base, None)
    assert specs[0].request == {"max_tokens": 5, "messages": [{"role": "user", "content": "ok"}]}
    assert specs[0].chain == base.chain
    assert specs[1]["meta"]["error"]["kind"] == "config" and "item 1:" in specs[1]["meta"]["error"]["message"]


# ---- max_failures and the summary ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "items", "allowed"), [(0, 10, 0), (3, 10, 3), (0.1, 10, 1), (0.05, 10, 0),
                                                         (0.3, 10, 3), (1.0, 7, 7), (0.0, 5, 0)])  # fmt: skip
def test_max_failures_is_a_count_or_a_fraction_of_the_items(value, items, allowed):
    fanout.check_max_failures(value)
    assert fanout.allowed_failures(value, items) == allowed


@pytest.mark.parametrize("value", [-1, 1.5, -0.1, True, "3", None])
def test_a_bad_max_failures_is_refused(value):
    with pytest.raises(ValueError, match="max_failures"):
        fanout.check_max_failures(value)


def test_the_summary_keeps_input_order_and_adds_up_tokens_cost_and_failures():
    records = [
        fanout.to_record(o) for o in (ok("a", 10, 0.01), failed(), ok("c", 20, None, fallback_used=True))
    ]
    summary = fanout.summarize(records, max_failures=1, resumed=1)
    assert summary.status == "success"
    assert summary.results == ["a", None, "c"]
    totals = summary.meta["totals"]
    assert totals == {
        "items": 3,
        "succeeded": 2,
        "failed": 1,
        "prompt_tokens": 8,
        "completion_tokens": 22,
        "total_tokens": 30,
        "cost_usd": 0.01,  # only the calls whose cost is known
        "attempts": 5,
        "fallback_used": 1,
        "quality_failed": 0,
        "resumed": 1,
    }
    item = summary.meta["items"][1]
    assert item["error"]["kind"] == "server" and len(item["attempt_log"]) == 3  # a failure keeps its attempts
    assert "attempt_log" not in summary.meta["items"][0]  # a success keeps only the count
    assert summary.meta["failed_items"] == [1]


def test_an_items_record_keeps_its_usage_details_as_a_single_calls_llm_meta_does():
    outcome = ok(usage_details={"cached_tokens": 1024, "reasoning_tokens": 64})
    record = fanout.to_record(outcome)
    assert (
        record["meta"]["usage_details"]
        == outcome.meta()["usage_details"]
        == {
            "cached_tokens": 1024,
            "reasoning_tokens": 64,
        }
    )
    item = fanout.summarize([record], 0).meta["items"][0]
    assert item["usage_details"] == {"cached_tokens": 1024, "reasoning_tokens": 64}
    assert "usage_details" not in fanout.to_record(failed())["meta"]  # no answer, no usage


def test_more_failures_than_allowed_fail_with_the_first_errors_named():
    records = [fanout.to_record(failed(message=f"HTTP 503: busy {i}")) for i in range(8)]
    summary = fanout.summarize(records, max_failures=0.5)
    assert summary.status == "error"
    assert summary.meta["totals"]["cost_usd"] is None
    message = summary.message
    assert "0 of 8 items succeeded, 8 failed (allowed: 4)" in message
    assert "item 0: (server) HTTP 503: busy 0" in message and "busy 5" not in message
    assert "and 3 more in llm_meta" in message


def test_an_answer_returned_despite_its_quality_verdict_is_counted():
    record = fanout.to_record(ok(quality_failures=[{"rule": "min_chars", "detail": "3 chars"}]))
    assert fanout.summarize([record], 0).meta["totals"]["quality_failed"] == 1


# ---- progress ----------------------------------------------------------------------------------


def rec(status: str) -> dict:
    return fanout.to_record(ok() if status == "ok" else failed())


def test_parts_give_back_successes_of_any_try_and_failures_of_the_same_try_only():
    parts = [
        progress.make_part("fp", 1, {0: rec("ok"), 1: rec("err"), 2: rec("err")}),
        progress.make_part("fp", 2, {2: rec("ok"), 3: rec("err")}),
        progress.make_part("other input", 2, {4: rec("ok")}),
        progress.make_part("fp", 2, {99: rec("ok")}),  # not an item of this input
        None,
    ]
    parts = json.loads(json.dumps(parts))  # as XCom stores them
    kept = progress.reusable(parts, "fp", 2, items=5)
    assert {i: r["meta"]["status"] for i, r in kept.items()} == {0: "success", 2: "success", 3: "error"}
    assert set(progress.reusable(parts, "fp", 1, items=5)) == {0, 1, 2}


def test_the_fingerprint_changes_with_any_request_or_option():
    base = CallSpec(request={"messages": [{"role": "user", "content": "a"}]}, chain=[("c", None)])
    other = CallSpec(request={"messages": [{"role": "user", "content": "b"}]}, chain=[("c", None)])
    options = {"conn_id": "c", "models": [None]}
    first = progress.fingerprint([base], options)
    assert first == progress.fingerprint([base], dict(options))
    assert first != progress.fingerprint([other], options)
    assert first != progress.fingerprint([base], {**options, "models": ["gpt-4"]})
    assert first != progress.fingerprint([base, base], options)


# ---- the operator ------------------------------------------------------------------------------


def test_worker_free_is_the_default_and_the_templates_travel_unrendered(dag):
    op = LLMFanOutOperator(
        task_id="fan",
        prompts="{{ ti.xcom_pull(task_ids='up', map_indexes=-1) }}",
        system_prompt="be brief",
        model="gpt-4",
        fallback_models=["gpt-3.5-turbo"],
        max_tokens=50,
        max_failures=0.1,
        timeout=timedelta(minutes=5),
        llm_conn_id="llm_test",
    )
    assert op.start_from_trigger is True
    args = op.start_trigger_args
    assert args.trigger_cls == "airflow_llm_async.triggers.fanout.FanOutTrigger"
    assert args.next_method == "execute_complete"
    assert args.timeout == timedelta(minutes=6)
    assert args.trigger_kwargs == {
        "spec": {
            "request": {"temperature": 0.7, "max_tokens": 50},
            "chain": [["llm_test", "gpt-4"], ["llm_test", "gpt-3.5-turbo"]],
            "deadline": None,
            "max_retries": None,
            "quality": None,
            "quality_retries": 0,
            "on_quality_failure": "fail",
            "max_cost_usd": None,
            "output": "text",
        },
        "items": None,
        "prompts": "{{ ti.xcom_pull(task_ids='up', map_indexes=-1) }}",
        "system_prompt": "be brief",
        "time_limit": 300.0,
        "max_failures": 0.1,
        "output_key": "return_value",
        "end": "here",
        "mapped_output": False,
    }
    json.dumps(args.trigger_kwargs)
    assert LLMOperator.start_trigger_args is None  # set per instance, not on the shared class


# Worker-free kwargs exactly as release 0.1 wrote them (in a serialized DAG or trigger row).
RELEASE_0_1_KWARGS = {
    "prompts": None,
    "items": ["a", "b"],
    "system_prompt": "be brief",
    "time_limit": 300.0,
    "end_from_trigger": True,
    "request": {"temperature": 0.7, "max_tokens": 50},
    "options": {
        "conn_id": "llm_test",
        "models": ["gpt-4", "gpt-3.5-turbo"],
        "fallback_conn_ids": [],
        "max_retries": None,
        "quality": None,
        "quality_retries": 0,
        "on_quality_failure": "fail",
        "max_cost_usd": None,
    },
    "max_failures": 0.1,
    "output_key": "return_value",
}


def test_a_fan_out_serialized_by_release_0_1_still_loads():
    trigger = FanOutTrigger(**json.loads(json.dumps(RELEASE_0_1_KWARGS)))
    assert (trigger.end, trigger.max_failures, trigger.items) == ("here", 0.1, ["a", "b"])
    specs = trigger.item_specs()
    assert [spec.request["messages"][-1]["content"] for spec in specs] == ["a", "b"]
    assert specs[0].chain == [("llm_test", "gpt-4"), ("llm_test", "gpt-3.5-turbo")]
    assert specs[0].deadline == pytest.approx(time.time() + 300, abs=5)
    _, kwargs = trigger.serialize()
    assert FanOutTrigger(**kwargs).serialize() == trigger.serialize()


def test_a_list_without_jinja_travels_as_items_the_triggerer_does_not_render(dag):
    """The triggerer compiles every string of a templated list as a template: ~2 s for 1,000 prompts."""
    literal = LLMFanOutOperator(task_id="fan", prompts=["a", [{"role": "user", "content": "b"}]])
    kwargs = literal.start_trigger_args.trigger_kwargs
    assert (kwargs["prompts"], kwargs["items"]) == (None, ["a", [{"role": "user", "content": "b"}]])
    templated = LLMFanOutOperator(task_id="fan2", prompts=["a", "{{ params.b }}"])
    kwargs = templated.start_trigger_args.trigger_kwargs
    assert (kwargs["prompts"], kwargs["items"]) == (["a", "{{ params.b }}"], None)


def test_deferrable_mode_renders_on_the_worker_and_defers_with_the_list(dag):
    op = LLMFanOutOperator(task_id="fan", prompts=["a", "b"], start_from_trigger=False, timeout=60)
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    classpath, kwargs = info.value.trigger.serialize()
    assert classpath == "airflow_llm_async.triggers.fanout.FanOutTrigger"
    assert (kwargs["items"], kwargs["prompts"]) == (["a", "b"], None)
    assert (kwargs["end"], kwargs["mapped_output"]) == ("on_success", False)
    assert kwargs["spec"]["deadline"] is not None and kwargs["time_limit"] is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prompts": 5}, "prompts must be a list"),
        ({"prompts": ["ok", 3]}, "an item must be a prompt"),
        ({"prompts": ["ok", ""]}, "Nothing to send"),
        ({"prompts": ["a"], "max_failures": -1}, "max_failures"),
        ({"prompts": ["a"], "max_failures": 2.0}, "from 0.0 to 1.0"),
        ({"prompts": ["a"], "prompt": "x"}, "pass the items as `prompts`"),
        ({"prompts": ["a"], "temperature": 3}, "temperature"),
        ({"prompts": "{{ ti.xcom_pull(task_ids='up') }}"}, "map_indexes=-1"),
    ],
)
def test_bad_arguments_fail_at_parse_time_with_the_fix(dag, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LLMFanOutOperator(task_id="fan", **kwargs)


def test_a_templated_item_is_checked_once_rendered(dag):
    # At parse time "{{ params.topic }}" is not judged (a literal "" would be refused: above)...
    op = LLMFanOutOperator(task_id="fan", prompts=["ok", "{{ params.topic }}"], start_from_trigger=False)
    op.render_template_fields({"params": {"topic": ""}})
    assert op.prompts == ["ok", ""]
    # ...rendered empty, the item fails alone with the reason, and no request is built for it.
    specs = fanout.item_specs(op.build_trigger().items, op.call_spec(with_messages=False), None)
    assert isinstance(specs[0], CallSpec)
    error = specs[1]["meta"]["error"]
    assert (error["kind"], specs[1]["meta"]["attempts"]) == ("config", 0)
    assert error["message"].startswith("item 1: Nothing to send")


def test_execute_complete_pushes_an_inline_result_and_returns_the_list(dag):
    op = LLMFanOutOperator(task_id="fan", prompts=["a"], output_key="answers")
    summary = fanout.summarize([fanout.to_record(ok("A"))], 0)
    ti = RecordingTI()
    assert op.execute_complete({"ti": ti}, {**summary.to_json(), "stored": False}) == ["A"]
    assert ti.pushed["answers"] == ["A"] and ti.pushed["llm_meta"]["totals"]["succeeded"] == 1


def test_a_failed_fan_out_raises_its_summary_and_keeps_what_succeeded(dag):
    op = LLMFanOutOperator(task_id="fan", prompts=["a", "b"])
    summary = fanout.summarize([fanout.to_record(ok("A")), fanout.to_record(failed())], 0)
    ti = RecordingTI()
    with pytest.raises(AirflowException, match="1 of 2 items succeeded") as info:
        op.execute_complete({"ti": ti}, {**summary.to_json(), "stored": False})
    assert not isinstance(info.value, AirflowFailException)  # Airflow's retries apply
    assert ti.pushed["return_value"] == ["A", None]
    stored = {
        "status": "error",
        "message": "LLM fan-out failed before any call (config): no conn",
        "results": [],
        "stored": True,
    }
    with pytest.raises(AirflowFailException, match="no conn"):
        op.execute_complete(
            {"ti": RecordingTI()}, {**stored, "error": {"kind": "config", "message": "no conn"}}
        )
