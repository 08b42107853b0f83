"""The Batch API's pure part (core/batch.py) and LLMFanOutOperator(batch=True)'s arguments, with no I/O.

Lines are built in the shapes of OpenAI's batch output and error files: an answer or an HTTP error
under ``response`` (``status_code``, ``request_id``, ``body``), or no response and an ``error`` (an
expired or cancelled batch). A good answer is compared with what the real-time engine makes of the
same chat completion: the record a real-time fan-out item gets, plus the batch's id, at half the price.
"""

from __future__ import annotations

import json
import math

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import TaskDeferred

from airflow_llm_async.core import batch, fanout, protocol
from airflow_llm_async.core.batch import BatchOptions, LineResult
from airflow_llm_async.core.engine import Answer, Clock, Send, call_flow
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.pricing import Price
from airflow_llm_async.core.protocol import Endpoint, LLMCallError
from airflow_llm_async.core.quality import ARTICLE_RULES
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.triggers.batch import BatchTrigger

KEY = "sk-live-0123456789abcdef"
CONN = "llm_batch"
BATCH_ID = "batch_abc123"
PRICES = {
    "gpt-4o": Price(2.5, 10.0, 1.25),
    "house": Price(1.0, 2.0, batch_input=0.2, batch_output=0.3),
}
LONG = "A long enough answer, well past the article's fifty characters minimum."
REQUEST = {
    "temperature": 0.7,
    "max_tokens": 100,
    "messages": [{"role": "system", "content": "简短"}, {"role": "user", "content": "总结:\nhi"}],
}
DEFAULT_OPTIONS = {
    "completion_window": "24h",
    "poll_interval": 30.0,
    "poll_max_interval": 600.0,
    "retry": "realtime",
    "max_requests": 50_000,
    "max_bytes": 200_000_000,
    "resubmit": False,
}


def endpoint(**fields) -> Endpoint:
    fields.setdefault("prices", PRICES)
    fields.setdefault("api_key", KEY)
    return Endpoint(conn_id=CONN, **fields)


def spec(model: str | None = "gpt-4o", **options) -> CallSpec:
    return CallSpec(request=REQUEST, chain=[(CONN, model), (CONN, "gpt-4o-mini")], **options)


def completion(
    text: str | None = LONG,
    model: str = "gpt-4o-2024-08-06",
    usage: tuple[int, int] = (1000, 200),
    cached: int | None = None,
    finish_reason: str = "stop",
    tool_calls: list | None = None,
) -> dict:
    """A chat completion as the body of an output line carries it."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    counts = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    if cached is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": counts,
        "system_fingerprint": "fp_1",
    }


def output_line(body: dict, index: int = 3, status: int = 200) -> dict:
    return {
        "id": "batch_req_1",
        "custom_id": f"item-{index}",
        "response": {"status_code": status, "request_id": "req_1", "body": body},
        "error": None,
    }


def error_line(status: int, message: str, index: int = 3, **fields) -> dict:
    error = {"message": message, "type": "server_error", "param": None, "code": None, **fields}
    return output_line({"error": error}, index, status)


REALTIME = BatchOptions()  # retry="realtime", the default
EXPIRED = "This request could not be executed before the completion window expired."


def expired_line(index: int = 3, message: str = EXPIRED, code: str = "batch_expired") -> dict:
    return {
        "id": "batch_req_2",
        "custom_id": f"item-{index}",
        "response": None,
        "error": {"code": code, "message": message},
    }


def record_of(
    line: dict,
    call: CallSpec | None = None,
    where: Endpoint | None = None,
    options: BatchOptions = REALTIME,
) -> LineResult:
    """What the trigger makes of a line: the batch goes to the chain's first link."""
    call = call or spec()
    where = where or endpoint()
    target, model = batch.primary(call, {CONN: where})
    return batch.line_record(json.loads(json.dumps(line)), call, target, model, options, BATCH_ID)


def realtime(call: CallSpec, where: Endpoint, body: dict) -> tuple[Send, fanout.Record]:
    """The same item asked in real time, answered with ``body``: the request sent, and the item's record."""
    flow = call_flow(call, {CONN: where}, clock=Clock(now=lambda: 1_700_000_000.0, monotonic=lambda: 50.0))
    send = next(flow)
    assert isinstance(send, Send)
    with pytest.raises(StopIteration) as done:
        flow.send(Answer(200, {}, json.dumps(body).encode()))
    return send, fanout.to_record(done.value.value)


# ---- options ------------------------------------------------------------------------------------


def test_the_default_options_are_openais_limits_and_travel_as_json():
    options = BatchOptions()
    assert options.to_json() == DEFAULT_OPTIONS
    assert BatchOptions.from_json(json.loads(json.dumps(options.to_json()))) == options
    assert BatchOptions.from_json(None) == BatchOptions.from_json({}) == options


def test_options_read_back_ignore_keys_a_later_release_added():
    data = {**DEFAULT_OPTIONS, "retry": "none", "max_bytes": 1000, "a_later_option": 1}
    assert BatchOptions.from_json(data) == BatchOptions(retry="none", max_bytes=1000)


@pytest.mark.parametrize(
    "fields",
    [
        {"poll_interval": 5, "poll_max_interval": 5},  # equal is allowed; ints are seconds too
        {"poll_interval": 0.5, "poll_max_interval": 86_400.0},
        {"max_requests": 1, "max_bytes": 1},
        {"retry": "none", "resubmit": True, "completion_window": "48h"},
    ],
)
def test_good_options_are_taken(fields):
    assert BatchOptions(**fields).to_json() == {**DEFAULT_OPTIONS, **fields}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"completion_window": ""}, "batch_completion_window must be text"),
        ({"completion_window": 24}, "batch_completion_window must be text"),
        ({"completion_window": None}, "batch_completion_window must be text"),
        ({"poll_interval": 0}, "batch_poll_interval must be a number of seconds > 0, got 0"),
        ({"poll_interval": -1.0}, "batch_poll_interval must be a number"),
        ({"poll_interval": True}, "batch_poll_interval must be a number"),
        ({"poll_interval": "30"}, "batch_poll_interval must be a number"),
        ({"poll_interval": math.inf}, "batch_poll_interval must be a number"),
        ({"poll_interval": math.nan}, "batch_poll_interval must be a number"),
        ({"poll_max_interval": 0.0}, "batch_poll_max_interval must be a number"),
        ({"poll_max_interval": None}, "batch_poll_max_interval must be a number"),
        (
            {"poll_interval": 60, "poll_max_interval": 30},
            r"batch_poll_max_interval \(30\) must be at least batch_poll_interval \(60\)",
        ),
        ({"poll_interval": 900}, r"batch_poll_max_interval \(600.0\) must be at least"),
        ({"retry": "always"}, r"batch_retry must be one of \['realtime', 'none'\], got 'always'"),
        ({"retry": None}, "batch_retry must be one of"),
        ({"max_requests": 0}, "batch_max_requests must be a positive integer, got 0"),
        ({"max_requests": 1.5}, "batch_max_requests must be a positive integer"),
        ({"max_requests": True}, "batch_max_requests must be a positive integer"),
        ({"max_requests": "10"}, "batch_max_requests must be a positive integer"),
        ({"max_bytes": -1}, "batch_max_bytes must be a positive integer"),
        ({"max_bytes": 2e8}, "batch_max_bytes must be a positive integer"),
        ({"resubmit": "yes"}, "batch_resubmit must be True or False, got 'yes'"),
        ({"resubmit": 1}, "batch_resubmit must be True or False"),
    ],
)
def test_bad_options_are_refused_naming_the_operators_argument(fields, message):
    with pytest.raises(ValueError, match=message):
        BatchOptions(**fields)


# ---- custom ids ---------------------------------------------------------------------------------


def test_every_item_is_found_again_by_its_custom_id():
    assert [batch.item_index(batch.custom_id(i), 12) for i in range(12)] == list(range(12))
    assert batch.custom_id(0) == "item-0" and batch.custom_id(49_999) == "item-49999"


@pytest.mark.parametrize(
    "value",
    [
        "item-5",  # out of range: this fan-out has 5 items
        "item-12",
        "item-05",  # a leading zero: never a custom id we sent
        "item-00",
        "item-",
        "item--1",
        "item-+1",
        "item- 1",
        "item-1 ",
        "item-1.0",
        "item-1e0",
        "item-0x1",
        "Item-1",
        "xitem-1",
        "request-1",
        "1",
        "",
        "item-²",  # digits to str.isdigit, not to int()
        "item-٣",  # an Arabic-Indic 3: int() reads it, but we never sent it
        "item-３",  # a fullwidth 3
        1,
        None,
        ["item-1"],
    ],
)
def test_a_custom_id_this_fan_out_did_not_send_names_no_item(value):
    assert batch.item_index(value, 5) is None


def test_an_empty_fan_out_has_no_items_to_name():
    assert batch.item_index("item-0", 0) is None
    assert batch.item_index("item-0", 1) == 0


# ---- request lines and parts --------------------------------------------------------------------


def test_a_request_line_is_one_json_line_with_the_exact_body_of_the_real_time_request():
    line = batch.request_line(3, spec(), "gpt-4o")
    assert line.endswith(b"}\n") and line.count(b"\n") == 1  # the prompt's newline stays escaped
    assert json.loads(line) == {
        "custom_id": "item-3",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {**REQUEST, "model": "gpt-4o"},
    }
    body = line[line.index(b'"body": ') + len(b'"body": ') : -len(b"}\n")]
    assert body == protocol.build_payload(REQUEST, "gpt-4o")
    send, _ = realtime(spec(), endpoint(), completion())
    assert body == send.body  # byte for byte what the engine sends for the same item
    assert "总结".encode() in line  # UTF-8, as the real-time body, not \\u escapes


def test_request_lines_of_different_items_differ_only_by_custom_id_and_model():
    first, other = batch.request_line(0, spec(), "gpt-4o"), batch.request_line(17, spec(), "gpt-4o-mini")
    assert json.loads(first)["custom_id"] == "item-0" and json.loads(other)["custom_id"] == "item-17"
    assert json.loads(other)["body"]["model"] == "gpt-4o-mini"


def test_the_batch_goes_to_the_first_link_of_the_chain_or_its_connections_default_model():
    where = endpoint(default_model="gpt-4.1")
    assert batch.primary(spec(), {CONN: where}) == (where, "gpt-4o")
    assert batch.primary(spec(model=None), {CONN: where}) == (where, "gpt-4.1")
    with pytest.raises(LLMCallError, match=f"No model to call on connection '{CONN}'") as info:
        batch.primary(spec(model=None), {CONN: endpoint()})
    assert info.value.kind == "config"


@pytest.mark.parametrize(
    ("sizes", "max_requests", "max_bytes", "parts"),
    [
        ([], 10, 100, []),
        ([(i, 1) for i in range(5)], 2, 100, [[0, 1], [2, 3], [4]]),  # max_requests lines each
        ([(i, 1) for i in range(4)], 2, 100, [[0, 1], [2, 3]]),  # exactly full: no empty part
        ([(i, 1) for i in range(4)], 4, 100, [[0, 1, 2, 3]]),
        ([(0, 4), (1, 6), (2, 10), (3, 1)], 10, 10, [[0, 1], [2], [3]]),  # 4 + 6 = exactly max_bytes
        ([(0, 4), (1, 7)], 10, 10, [[0], [1]]),  # one byte over
        ([(0, 10)], 10, 10, [[0]]),  # a line of exactly max_bytes fits alone
        ([(0, 3), (1, 11), (2, 3)], 10, 10, [[0, 2]]),  # too large: left out, and takes no room
        ([(0, 11)], 10, 10, []),
        ([(i, 3) for i in range(7)], 3, 10, [[0, 1, 2], [3, 4, 5], [6]]),  # 9 bytes: requests first
        ([(i, 4) for i in range(7)], 3, 10, [[0, 1], [2, 3], [4, 5], [6]]),  # 12 bytes: bytes first
        ([(5, 1), (2, 1), (9, 1), (0, 1)], 3, 100, [[5, 2, 9], [0]]),  # input order, whatever the indices
    ],
)
def test_items_split_into_parts_at_exactly_the_limits_in_order(sizes, max_requests, max_bytes, parts):
    assert batch.plan_parts(iter(sizes), max_requests, max_bytes) == parts


def test_parts_of_real_request_lines_hold_at_most_max_bytes():
    lines = [batch.request_line(i, spec(), "gpt-4o") for i in range(5)]
    assert len({len(line) for line in lines[:5]}) == 1  # item-0 ... item-4: the same length
    size = len(lines[0])
    parts = batch.plan_parts(((i, len(line)) for i, line in enumerate(lines)), 50_000, 2 * size)
    assert parts == [[0, 1], [2, 3], [4]]
    one_each = batch.plan_parts(((i, len(line)) for i, line in enumerate(lines)), 50_000, 2 * size - 1)
    assert one_each == [[0], [1], [2], [3], [4]]


def test_a_line_too_large_for_any_part_says_what_to_do():
    error = batch.too_large(300_000_000, 200_000_000)
    assert error.kind == "client" and not error.retryable
    assert "300000000 bytes" in error.message and "batch_max_bytes=200000000" in error.message
    assert "without batch=True" in error.message


# ---- metadata: finding the batch a part paid for -------------------------------------------------

WHERE = {
    "dag_id": "article_pipeline",
    "run_id": "scheduled__2026-06-01",
    "task_id": "summarize",
    "map_index": -1,
}


def test_a_parts_metadata_names_the_task_instance_the_input_and_the_part():
    assert batch.batch_metadata(WHERE, "f" * 32, 1, 3) == {
        "airflow_dag_id": "article_pipeline",
        "airflow_run_id": "scheduled__2026-06-01",
        "airflow_task_id": "summarize",
        "airflow_map_index": "-1",
        "llm_async_input": "f" * 32,
        "llm_async_part": "2/3",
    }


def test_metadata_values_are_cut_to_openais_512_characters_and_still_match():
    long = {**WHERE, "run_id": "r" * 511 + "XY", "dag_id": "d" * 512}
    meta = batch.batch_metadata(long, "fp", 0, 1)
    assert meta["airflow_run_id"] == "r" * 511 + "X"
    assert meta["airflow_dag_id"] == "d" * 512
    assert len(meta) <= 16 and all(len(value) <= 512 for value in meta.values())
    assert batch.same_part({"status": "in_progress", "metadata": dict(meta)}, meta)


def test_without_a_task_instance_the_metadata_still_names_the_input_and_part():
    assert batch.batch_metadata({}, "fp", 0, 1) == {
        "airflow_dag_id": "",
        "airflow_run_id": "",
        "airflow_task_id": "",
        "airflow_map_index": "",
        "llm_async_input": "fp",
        "llm_async_part": "1/1",
    }


@pytest.mark.parametrize(
    "status", ["validating", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
)
def test_a_batch_made_for_the_same_part_is_used_again_whatever_its_state_but_failed(status):
    meta = batch.batch_metadata(WHERE, "fp", 0, 2)
    listed = {"id": "batch_1", "status": status, "metadata": {**meta, "set_by_someone_else": "x"}}
    assert batch.same_part(listed, meta)


def test_a_batch_that_failed_validation_or_was_made_for_something_else_is_not_the_part():
    meta = batch.batch_metadata(WHERE, "fp", 0, 2)
    assert not batch.same_part({"status": "failed", "metadata": meta}, meta)  # answered nothing, cost nothing
    for other in (
        batch.batch_metadata(WHERE, "fp", 1, 2),  # another part
        batch.batch_metadata(WHERE, "fp2", 0, 2),  # another input
        batch.batch_metadata({**WHERE, "run_id": "manual__1"}, "fp", 0, 2),  # another run
        batch.batch_metadata({**WHERE, "map_index": 0}, "fp", 0, 2),  # another mapped instance
    ):
        assert not batch.same_part({"status": "completed", "metadata": other}, meta), other
    assert not batch.same_part({"status": "completed", "metadata": None}, meta)
    assert not batch.same_part({"status": "completed"}, meta)
    without_part = {key: value for key, value in meta.items() if key != batch.META_PART}
    assert not batch.same_part({"status": "completed", "metadata": without_part}, meta)


# ---- polling and progress -----------------------------------------------------------------------


def test_the_poll_interval_grows_half_again_each_time_up_to_its_cap():
    options = BatchOptions(poll_interval=30, poll_max_interval=200)
    waits, interval = [], options.poll_interval
    for _ in range(7):
        interval = batch.next_poll(interval, options)
        waits.append(interval)
    assert waits == [45.0, 67.5, 101.25, 151.875, 200, 200, 200]
    assert batch.next_poll(10, BatchOptions(poll_interval=10, poll_max_interval=10)) == 10


BATCH = {
    "id": "batch_1",
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "status": "in_progress",
    "created_at": 1_700_000_000,
    "output_file_id": None,
    "error_file_id": None,
    "request_counts": {"total": 100, "completed": 40, "failed": 2},
}


def test_a_batchs_counts_and_progress_line():
    assert batch.counts(BATCH) == {
        "id": "batch_1",
        "status": "in_progress",
        "total": 100,
        "completed": 40,
        "failed": 2,
        "created_at": 1_700_000_000,
        "output_file_id": None,
        "error_file_id": None,
    }
    assert (
        batch.describe(0, 2, BATCH)
        == "LLM batch 1/2 batch_1: in_progress, 42 of 100 requests done (2 failed)"
    )


def test_a_batch_still_validating_has_no_counts_yet():
    validating = {"id": "batch_2", "status": "validating", "request_counts": None}
    assert batch.counts(validating)["total"] == batch.counts(validating)["completed"] == 0
    assert (
        batch.describe(1, 2, validating)
        == "LLM batch 2/2 batch_2: validating, 0 of 0 requests done (0 failed)"
    )


def test_a_failed_validation_names_the_first_errors_and_their_lines():
    failed = {
        "id": "batch_3",
        "status": "failed",
        "errors": {
            "object": "list",
            "data": [
                {"code": "invalid_json_line", "message": "not JSON", "param": None, "line": 2},
                {"code": "missing_body", "message": "no body", "param": None, "line": None},
                "not an error object",
                {"code": "fourth", "message": "never shown", "line": 9},
            ],
        },
    }
    error = batch.validation_error(failed)
    assert (error.kind, error.code, error.retryable) == ("batch", "invalid_json_line", False)
    assert error.message == (
        "batch batch_3 failed validation: line 2: (invalid_json_line) not JSON; (missing_body) no body; fix "
        "the items, or send them without batch=True"
    )


@pytest.mark.parametrize("errors", [None, {}, {"data": None}, {"data": []}])
def test_a_failed_validation_without_errors_says_so(errors):
    error = batch.validation_error({"id": "batch_4", "status": "failed", "errors": errors})
    assert error.code is None
    assert error.message.startswith("batch batch_4 failed validation: no reason given;")


# ---- a line's record ----------------------------------------------------------------------------


def test_a_good_answer_is_a_real_time_items_record_plus_its_batch_id_at_half_the_price():
    body = completion(usage=(1000, 200))
    result = record_of(output_line(body))
    _, live = realtime(spec(), endpoint(), body)
    assert result.again is False
    assert result.cost_usd == pytest.approx((1000 * 1.25 + 200 * 5.0) / 1e6)  # half of 2.5 and 10 per 1M
    assert result.realtime_cost_usd == pytest.approx((1000 * 2.5 + 200 * 10.0) / 1e6)
    assert live["meta"]["cost_usd"] == pytest.approx(result.realtime_cost_usd)
    assert result.record == {
        "text": LONG,
        "meta": {**live["meta"], "cost_usd": pytest.approx(0.00225), "batch_id": BATCH_ID},
    }
    assert result.record["meta"] == {
        "status": "success",
        "attempts": 1,
        "model": "gpt-4o-2024-08-06",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
        "usage_details": {},
        "quality": {"passed": True, "failures": []},
        "fallback_used": False,
        "latency_s": 0.0,
        "cost_usd": pytest.approx(0.00225),
        "batch_id": BATCH_ID,
    }
    json.dumps(result.record)  # goes to XCom as is


def test_cached_prompt_tokens_cost_half_the_cached_input_price():
    body = completion(usage=(2000, 500), cached=1920)
    result = record_of(output_line(body))
    assert result.record["meta"]["usage_details"] == {"cached_tokens": 1920}
    assert result.cost_usd == pytest.approx((80 * 1.25 + 1920 * 0.625 + 500 * 5.0) / 1e6)
    assert result.realtime_cost_usd == pytest.approx((80 * 2.5 + 1920 * 1.25 + 500 * 10.0) / 1e6)
    _, live = realtime(spec(), endpoint(), body)
    assert live["meta"]["cost_usd"] == pytest.approx(result.realtime_cost_usd)
    assert {**result.record["meta"], "cost_usd": live["meta"]["cost_usd"]} == {
        **live["meta"],
        "batch_id": BATCH_ID,
    }


def test_a_price_table_may_give_the_batch_price_itself():
    result = record_of(output_line(completion(model="house", usage=(1000, 500))), spec("house"))
    assert result.cost_usd == pytest.approx((1000 * 0.2 + 500 * 0.3) / 1e6)  # not half of 1.0 and 2.0
    assert result.realtime_cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert result.record["meta"]["cost_usd"] == pytest.approx(0.00035)


def test_an_answer_is_priced_by_the_requested_model_else_by_the_snapshot_that_answered():
    unpriced_request = record_of(output_line(completion(model="gpt-4o-2024-08-06")), spec("my-gpt-4o-alias"))
    assert unpriced_request.cost_usd == pytest.approx((1000 * 1.25 + 200 * 5.0) / 1e6)
    named_by_us = record_of(output_line(completion(model="house")), spec("gpt-4o"))
    assert named_by_us.cost_usd == pytest.approx((1000 * 1.25 + 200 * 5.0) / 1e6)  # gpt-4o's, not house's


def test_an_unpriced_model_with_tokens_has_an_unknown_cost():
    result = record_of(output_line(completion(model="llama3", usage=(10, 5))), spec("llama3"))
    assert (result.cost_usd, result.realtime_cost_usd, result.again) == (None, None, False)
    assert result.record["meta"]["status"] == "success"
    assert "cost_usd" not in result.record["meta"]  # as a real-time item of an unpriced model
    _, live = realtime(spec("llama3"), endpoint(), completion(model="llama3", usage=(10, 5)))
    assert "cost_usd" not in live["meta"]


def test_an_unpriced_model_that_used_no_tokens_cost_nothing():
    result = record_of(output_line(completion(model="llama3", usage=(0, 0))), spec("llama3"))
    assert (result.cost_usd, result.realtime_cost_usd) == (0.0, 0.0)
    assert result.record["meta"]["cost_usd"] == 0.0


def test_the_answers_model_falls_back_to_the_requested_one_when_the_server_names_none():
    result = record_of(output_line(completion(model="")))
    assert result.record["meta"]["model"] == "gpt-4o"
    assert result.cost_usd == pytest.approx(0.00225)


SHORT = "太短了。"  # 4 characters: under the article's 50


@pytest.mark.parametrize(
    ("retry", "on_failure", "status", "again"),
    [
        ("realtime", "fail", "error", True),
        ("realtime", "return", "error", True),  # asked again: real time may do better
        ("none", "fail", "error", False),
        ("none", "return", "success", False),  # returned with its verdict, as real time would
    ],
)
def test_a_short_answer_fails_the_articles_quality_rule(retry, on_failure, status, again):
    call = spec(quality=ARTICLE_RULES, on_quality_failure=on_failure)
    result = record_of(output_line(completion(text=SHORT)), call, options=BatchOptions(retry=retry))
    meta = result.record["meta"]
    failures = [{"rule": "min_chars", "detail": "4 chars, at least 50 needed"}]
    assert (meta["status"], result.again, meta["batch_id"]) == (status, again, BATCH_ID)
    assert result.cost_usd == pytest.approx(0.00225)  # answered, so billed, whatever the verdict
    assert meta["cost_usd"] == pytest.approx(0.00225)
    if status == "success":
        assert result.record["text"] == SHORT
        assert meta["quality"] == {"passed": False, "failures": failures}
        assert fanout.summarize([result.record], 0).meta["totals"]["quality_failed"] == 1
    else:
        assert result.record["text"] is None
        assert meta["error"]["kind"] == "quality"
        assert meta["error"]["message"] == f"the batch answer failed the quality checks: {failures}"
        assert meta["attempt_log"] == [
            {
                "conn_id": CONN,
                "model": "gpt-4o",
                "status": 200,
                "latency_s": 0.0,
                "result": "quality_failed",
                "reason": failures,
            },
        ]


def test_a_refusal_marker_fails_the_articles_quality_rule_however_long_the_answer():
    result = record_of(output_line(completion(text="抱歉，" + LONG)), spec(quality=ARTICLE_RULES))
    assert result.again is True
    assert result.record["meta"]["attempt_log"][0]["reason"] == [
        {"rule": "refusal_markers", "detail": "contains ['抱歉']"}
    ]


def test_an_answer_of_tool_calls_is_billed_but_not_usable():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    body = completion(text=None, tool_calls=calls, finish_reason="tool_calls")
    result = record_of(output_line(body))
    meta = result.record["meta"]
    assert result.record["text"] is None and result.again is True
    assert (meta["status"], meta["error"]["kind"], meta["error"]["status"]) == (
        "error",
        "invalid_response",
        200,
    )
    assert "tool calls (lookup)" in meta["error"]["message"]
    assert result.cost_usd == pytest.approx(0.00225) and meta["cost_usd"] == pytest.approx(0.00225)
    assert result.realtime_cost_usd == pytest.approx(0.0045)
    assert meta["attempt_log"][0]["result"] == "error" and meta["attempt_log"][0]["status"] == 200
    unpriced = record_of(output_line({**body, "model": "llama3"}), spec("llama3"))
    assert (unpriced.cost_usd, unpriced.realtime_cost_usd) == (None, None)
    assert "cost_usd" not in unpriced.record["meta"]


@pytest.mark.parametrize(("retry", "again"), [("realtime", True), ("none", False)])
def test_a_server_error_line_is_a_failed_item_that_cost_nothing(retry, again):
    line = error_line(500, "The server had an error while processing your request.")
    result = record_of(line, options=BatchOptions(retry=retry))
    assert (result.again, result.cost_usd, result.realtime_cost_usd) == (again, 0.0, 0.0)
    assert result.record["text"] is None
    assert result.record["meta"] == {
        "status": "error",
        "attempts": 1,
        "error": {
            "kind": "server",
            "status": 500,
            "code": None,
            "type": "server_error",
            "param": None,
            "message": "HTTP 500: The server had an error while processing your request.",
        },
        "attempt_log": [
            {
                "conn_id": CONN,
                "model": "gpt-4o",
                "status": 500,
                "latency_s": 0.0,
                "result": "error",
                "reason": result.record["meta"]["error"],
            }
        ],
        "latency_s": 0.0,
        "cost_usd": 0.0,
        "batch_id": BATCH_ID,
    }


def test_a_client_error_line_keeps_the_servers_code_and_hint():
    message = "This model's maximum context length is 8192 tokens."
    line = error_line(
        400, message, type="invalid_request_error", param="messages", code="context_length_exceeded"
    )
    error = record_of(line).record["meta"]["error"]
    assert (error["kind"], error["status"], error["code"], error["param"]) == (
        "client",
        400,
        "context_length_exceeded",
        "messages",
    )
    assert error["message"].startswith("HTTP 400: This model's maximum context length is 8192 tokens.")
    assert "shorten the prompt" in error["message"]


@pytest.mark.parametrize(("retry", "again"), [("realtime", True), ("none", False)])
def test_an_expired_line_was_never_answered(retry, again):
    result = record_of(expired_line(), options=BatchOptions(retry=retry))
    meta = result.record["meta"]
    assert (result.again, result.cost_usd, result.realtime_cost_usd) == (again, 0.0, 0.0)
    assert meta["error"] == {
        "kind": "batch",
        "status": None,
        "code": "batch_expired",
        "type": None,
        "param": None,
        "message": f"batch {BATCH_ID}: {EXPIRED}",
    }
    assert meta["attempt_log"][0]["status"] is None and meta["batch_id"] == BATCH_ID


def test_a_line_with_neither_response_nor_error_is_a_failure_that_says_so():
    result = record_of({"id": "batch_req_3", "custom_id": "item-3", "response": None, "error": None})
    assert result.record["meta"]["error"]["message"] == f"batch {BATCH_ID}: no answer"
    assert result.record["meta"]["error"]["code"] is None


def test_a_long_error_message_is_cut():
    result = record_of(expired_line(message="x" * 2000, code="c" * 300))
    assert result.record["meta"]["error"]["message"] == f"batch {BATCH_ID}: " + "x" * 500
    assert result.record["meta"]["error"]["code"] == "c" * 100


def test_a_malformed_answer_is_a_failed_item_not_a_crash():
    for body in ({"choices": []}, None, {"choices": [{"message": {"content": 3}}]}, {"error": "no"}):
        result = record_of(output_line(body))
        assert result.record["meta"]["error"]["kind"] == "invalid_response", body
        assert result.cost_usd == 0.0
    odd_status = record_of({**output_line(completion()), "response": {"status_code": "200", "body": {}}})
    assert odd_status.record["meta"]["status"] == "error"
    assert odd_status.record["meta"]["attempt_log"][0]["status"] is None


def test_the_connections_secrets_never_reach_the_record():
    where = endpoint(headers={"api-key": "azure-header-secret"}, organization="org-secret-42")
    lines = [
        error_line(
            401,
            f"Incorrect API key provided: {KEY}. You can find your API key at ...",
            type="invalid_request_error",
            code="invalid_api_key",
        ),
        error_line(500, f"upstream said: {KEY} / azure-header-secret / org-secret-42"),
        expired_line(message=f"key {KEY} expired with header azure-header-secret", code=f"expired_{KEY}"),
        output_line(completion(text=f"Your key is {KEY}, well past the article's fifty characters.")),
    ]
    for line in lines:
        record = record_of(line, where=where).record
        stored = json.dumps(record)
        for secret in (KEY, "azure-header-secret", "org-secret-42"):
            assert secret not in stored, line
        assert protocol.REDACTED in stored
    auth = record_of(lines[0], where=where).record["meta"]["error"]
    assert auth["message"].startswith("HTTP 401: Incorrect API key provided: ***.")
    assert auth["code"] == "invalid_api_key" and "check the password of the LLM connection" in auth["message"]


def test_records_of_lines_summarize_as_a_fan_outs_in_input_order():
    results = [
        record_of(output_line(completion(text="first " + LONG), index=0)),
        record_of(expired_line(index=1), options=BatchOptions(retry="none")),
        record_of(output_line(completion(text="third " + LONG), index=2)),
    ]
    summary = fanout.summarize([r.record for r in results], max_failures=1)
    assert summary.status == "success"
    assert summary.results == ["first " + LONG, None, "third " + LONG]
    assert summary.meta["totals"]["cost_usd"] == pytest.approx(2 * 0.00225)
    assert summary.meta["failed_items"] == [1]


# ---- items the files do not mention -------------------------------------------------------------


def test_an_item_of_a_batch_that_failed_validation_is_not_asked_again():
    failed = {"id": "batch_5", "status": "failed", "errors": {"data": [{"code": "bad", "message": "m"}]}}
    result = batch.unanswered(failed, BatchOptions(retry="realtime"))
    assert (result.again, result.cost_usd, result.realtime_cost_usd) == (False, 0.0, 0.0)
    assert result.record == {
        "text": None,
        "meta": {"status": "error", "attempts": 0, "error": batch.validation_error(failed).to_dict()},
    }


@pytest.mark.parametrize(("retry", "again"), [("realtime", True), ("none", False)])
def test_an_item_a_finished_batch_lost_is_asked_again_if_so_chosen(retry, again):
    result = batch.unanswered({"id": "batch_6", "status": "cancelled"}, BatchOptions(retry=retry))
    assert (result.again, result.cost_usd) == (again, 0.0)
    error = result.record["meta"]["error"]
    assert (error["kind"], result.record["meta"]["attempts"]) == ("batch", 0)
    assert error["message"] == "batch batch_6 ended cancelled without an answer or an error for the item"


# ---- asked again in real time -------------------------------------------------------------------


def live_record(cost: float | None, attempts: int = 1, text: str = LONG) -> fanout.Record:
    meta = {"status": "success", "attempts": attempts, "model": "gpt-4o-mini", "latency_s": 1.5}
    if cost is not None:
        meta["cost_usd"] = cost
    return {"text": text, "meta": meta}


def test_an_item_asked_again_adds_the_batch_answers_cost_and_attempt():
    call = spec(quality=ARTICLE_RULES)
    failed = record_of(output_line(completion(text=SHORT)), call)
    live = live_record(0.001, attempts=2)
    merged = batch.merge_realtime(failed, live)
    assert merged == {
        "text": LONG,
        "meta": {
            "status": "success",
            "attempts": 3,
            "model": "gpt-4o-mini",
            "latency_s": 1.5,
            "cost_usd": pytest.approx(0.001 + 0.00225),
            "batch_error": failed.record["meta"]["error"],
            "realtime": True,
        },
    }
    assert live["meta"]["cost_usd"] == 0.001 and live["meta"]["attempts"] == 2  # not changed in place
    assert merged["meta"]["batch_error"]["kind"] == "quality"


def test_an_item_asked_again_after_an_unbilled_failure_costs_what_real_time_cost():
    expired = record_of(expired_line())
    merged = batch.merge_realtime(expired, live_record(0.001))
    assert merged["meta"]["cost_usd"] == 0.001 and merged["meta"]["attempts"] == 2
    assert merged["meta"]["batch_error"]["code"] == "batch_expired"
    unanswered = batch.unanswered({"id": "b", "status": "expired"}, BatchOptions())
    assert batch.merge_realtime(unanswered, live_record(0.001, attempts=3))["meta"]["attempts"] == 3


def test_an_unknown_cost_on_either_side_leaves_the_items_cost_unknown():
    billed = record_of(output_line(completion(text=SHORT)), spec(quality=ARTICLE_RULES))
    assert batch.merge_realtime(billed, live_record(None))["meta"].get("cost_usd") is None
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    unpriced = record_of(output_line(completion(text=None, model="llama3", tool_calls=calls)), spec("llama3"))
    assert unpriced.cost_usd is None  # billed tokens at a price nobody knows
    merged = batch.merge_realtime(unpriced, live_record(0.001))
    assert merged["meta"].get("cost_usd") is None  # 0.001 would leave the batch answer's tokens out
    total = fanout.summarize([merged], 0).meta["totals"]["cost_usd"]
    assert total is None


def test_a_failed_real_time_answer_stays_failed_with_the_batch_attempt_counted():
    failed_live = {
        "text": None,
        "meta": {
            "status": "error",
            "attempts": 2,
            "error": {"kind": "server"},
            "attempt_log": [],
            "latency_s": 3.0,
            "cost_usd": 0.0,
        },
    }
    merged = batch.merge_realtime(record_of(error_line(500, "busy")), failed_live)
    meta = merged["meta"]
    assert merged["text"] is None
    assert (meta["status"], meta["attempts"], meta["cost_usd"]) == ("error", 3, 0.0)
    assert meta["error"] == {"kind": "server"}  # the real-time error is the item's
    assert meta["batch_error"]["status"] == 500


# ---- the summary --------------------------------------------------------------------------------


def test_the_summary_says_what_the_batch_cost_and_what_real_time_would_have():
    lines = [
        record_of(output_line(completion(usage=(1000, 200)))),
        record_of(output_line(completion(usage=(2000, 500), cached=1920))),
        record_of(expired_line()),
    ]
    finished = {**BATCH, "status": "completed", "output_file_id": "file-out"}
    summary = batch.summary([finished, BATCH], iter(lines), 1, BatchOptions(retry="realtime"))
    cost = 0.00225 + 0.0038
    realtime_cost = 0.0045 + 0.0076
    assert summary == {
        "batches": [batch.counts(finished), batch.counts(BATCH)],
        "cost_usd": pytest.approx(cost),
        "realtime_cost_usd": pytest.approx(realtime_cost),
        "saved_usd": pytest.approx(realtime_cost - cost),
        "realtime_items": 1,
        "retry": "realtime",
        "completion_window": "24h",
    }
    assert summary["batches"][0]["output_file_id"] == "file-out"


def test_the_summary_of_an_unpriced_answer_has_an_unknown_cost():
    lines = [
        record_of(output_line(completion())),
        record_of(output_line(completion(model="llama3", usage=(10, 5))), spec("llama3")),
    ]
    summary = batch.summary([BATCH], lines, 0, BatchOptions(retry="none"))
    assert (summary["cost_usd"], summary["realtime_cost_usd"], summary["saved_usd"]) == (None, None, None)
    assert (summary["retry"], summary["realtime_items"]) == ("none", 0)


def test_the_summary_of_no_answers_cost_nothing():
    summary = batch.summary([], [], 0, BatchOptions())
    costs = (summary["cost_usd"], summary["realtime_cost_usd"], summary["saved_usd"])
    assert (summary["batches"], costs) == ([], (0.0, 0.0, 0.0))


# ---- the operator's arguments -------------------------------------------------------------------


@pytest.fixture
def dag():
    with DAG("unit_batch", schedule=None) as dag:
        yield dag


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch": "yes"}, "batch must be True or False, got 'yes'"),
        ({"batch": 1}, "batch must be True or False, got 1"),
        ({"batch_completion_window": ""}, "batch_completion_window must be text"),
        ({"batch_poll_interval": 0}, "batch_poll_interval must be a number of seconds > 0"),
        ({"batch_poll_interval": "30"}, "batch_poll_interval must be a number"),
        ({"batch_poll_max_interval": -5}, "batch_poll_max_interval must be a number"),
        ({"batch_poll_interval": 60, "batch_poll_max_interval": 30}, "batch_poll_max_interval .* at least"),
        ({"batch_retry": "later"}, "batch_retry must be one of"),
        ({"batch_max_requests": 0}, "batch_max_requests must be a positive integer"),
        ({"batch_max_bytes": 1.5}, "batch_max_bytes must be a positive integer"),
        ({"batch_resubmit": "no"}, "batch_resubmit must be True or False"),
        ({"deferrable": False}, r"batch=True waits hours .* pass deferrable=True"),
        (
            {"deferrable": False, "start_from_trigger": False},
            "batch=True waits hours .* pass deferrable=True",
        ),
        ({"cache_ttl": 3600}, "batch=True does not take cache_ttl"),
    ],
)
def test_bad_batch_arguments_fail_at_parse_time_naming_the_argument(dag, kwargs, message):
    kwargs = {"batch": True, **kwargs}
    with pytest.raises(ValueError, match=f"^LLMFanOutOperator 'fan': {message}"):
        LLMFanOutOperator(task_id="fan", prompts=["a"], **kwargs)


def test_without_batch_a_fan_out_takes_the_real_time_trigger_and_its_limit(dag):
    op = LLMFanOutOperator(task_id="fan", prompts=["a"])
    assert op.start_trigger_args.trigger_cls == "airflow_llm_async.triggers.fanout.FanOutTrigger"
    assert "batch" not in op.start_trigger_args.trigger_kwargs
    with pytest.raises(ValueError, match=r"at most 10000: split the list \(batch=True takes more\)"):
        LLMFanOutOperator(task_id="big", prompts=["x"] * (fanout.MAX_ITEMS + 1))
    assert LLMFanOutOperator(task_id="big_batch", prompts=["x"] * (fanout.MAX_ITEMS + 1), batch=True)
    with pytest.raises(ValueError, match=r"at most 200000: split the list\.$"):
        fanout.parse_items(["x"] * (batch.MAX_ITEMS + 1), batch.MAX_ITEMS)


def test_worker_free_batch_mode_starts_the_batch_trigger_with_its_options(dag):
    op = LLMFanOutOperator(
        task_id="fan",
        prompts=["a", "b"],
        model="gpt-4o",
        llm_conn_id="llm_test",
        max_failures=1,
        batch=True,
        batch_poll_interval=60,
        batch_poll_max_interval=3600,
        batch_retry="none",
        batch_max_requests=1000,
        batch_max_bytes=10_000_000,
        batch_resubmit=True,
    )
    args = op.start_trigger_args
    assert args.trigger_cls == "airflow_llm_async.triggers.batch.BatchTrigger"
    assert args.next_method == "execute_complete" and args.timeout is None
    assert args.trigger_kwargs == {
        "spec": {
            "request": {"temperature": 0.7, "max_tokens": 1000},
            "chain": [["llm_test", "gpt-4o"]],
            "deadline": None,
            "max_retries": None,
            "quality": None,
            "quality_retries": 0,
            "on_quality_failure": "fail",
            "max_cost_usd": None,
            "output": "text",
        },
        "items": ["a", "b"],
        "prompts": None,
        "system_prompt": None,
        "time_limit": None,
        "max_failures": 1,
        "output_key": "return_value",
        "end": "here",
        "mapped_output": False,
        "batch": {
            "completion_window": "24h",
            "poll_interval": 60,
            "poll_max_interval": 3600,
            "retry": "none",
            "max_requests": 1000,
            "max_bytes": 10_000_000,
            "resubmit": True,
        },
    }
    assert json.loads(json.dumps(args.trigger_kwargs)) == args.trigger_kwargs
    trigger = BatchTrigger(**args.trigger_kwargs)
    assert BatchOptions.from_json(trigger.batch) == BatchOptions(
        poll_interval=60,
        poll_max_interval=3600,
        retry="none",
        max_requests=1000,
        max_bytes=10_000_000,
        resubmit=True,
    )


def test_deferrable_batch_mode_defers_to_the_batch_trigger(dag):
    op = LLMFanOutOperator(
        task_id="fan", prompts=["a", "b"], start_from_trigger=False, batch=True, timeout=60
    )
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    classpath, kwargs = info.value.trigger.serialize()
    assert classpath == "airflow_llm_async.triggers.batch.BatchTrigger"
    assert (kwargs["items"], kwargs["end"], kwargs["batch"]) == (["a", "b"], "on_success", DEFAULT_OPTIONS)


SPEC_JSON = {
    "request": {"temperature": 0.7, "max_tokens": 64},
    "chain": [["llm_test", "gpt-4o"], ["llm_test", "gpt-4o-mini"]],
    "deadline": None,
    "max_retries": None,
    "quality": None,
    "quality_retries": 0,
    "on_quality_failure": "fail",
    "max_cost_usd": None,
    "output": "text",
}


def test_the_batch_trigger_serializes_its_class_and_json_safe_kwargs():
    options = BatchOptions(retry="none", max_requests=500).to_json()
    trigger = BatchTrigger(
        spec=SPEC_JSON,
        items=["a", "b"],
        system_prompt="be brief",
        max_failures=0.1,
        output_key="answers",
        end="here",
        batch=options,
    )
    assert trigger.serialize() == (
        "airflow_llm_async.triggers.batch.BatchTrigger",
        {
            "spec": SPEC_JSON,
            "items": ["a", "b"],
            "prompts": None,
            "system_prompt": "be brief",
            "time_limit": None,
            "max_failures": 0.1,
            "output_key": "answers",
            "end": "here",
            "mapped_output": False,
            "batch": {**DEFAULT_OPTIONS, "retry": "none", "max_requests": 500},
        },
    )
    classpath, kwargs = trigger.serialize()
    again = BatchTrigger(**json.loads(json.dumps(kwargs)))
    assert again.serialize() == (classpath, kwargs)


def test_a_batch_trigger_without_options_takes_the_defaults():
    trigger = BatchTrigger(spec=SPEC_JSON, items=["a"])
    assert trigger.serialize()[1]["batch"] == {}
    assert BatchOptions.from_json(trigger.batch) == BatchOptions()
