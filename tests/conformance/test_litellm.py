"""The provider against LiteLLM's proxy (mocked models, litellm-config.yaml), beside the official client.

Each test drives our call path (the driver, or the trigger as the triggerer runs it) against one of
the proxy's models and, where the two can be compared, asks the official ``openai`` client the same:
what the reference client sees is what our ``llm_meta`` must report.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from airflow_llm_async import driver
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.operators.llm import LLMOperator
from tests.conformance.conftest import BAD_KEY_CONN_ID, CONN_ID, point_connection
from tests.conformance.litellm_proxy import MASTER_KEY
from tests.integration.conftest import chat_trigger

MESSAGES = [{"role": "user", "content": "Summarize: the triggerer waits on the network for many tasks."}]
REQUEST = {"messages": MESSAGES, "max_tokens": 200}
# litellm-config.yaml's mocked answers.
PLAIN_ANSWER = (
    "Hello from the LiteLLM mock. This answer is long enough to pass the fifty-character quality rule."
)
HOUSE_ANSWER = "House model answer, mocked by LiteLLM, long enough to pass quality checks of fifty chars."
GPT_4O_ANSWER = "gpt-4o mock answer with 1024 cached prompt tokens, long enough for quality."
RICH_ANSWER = "A rich answer with details: cached tokens, reasoning tokens and a fingerprint attached."
COST_HEADER = "x-litellm-response-cost"
# The hints an error message ends with (core/protocol.py), by what the user should check.
KEY_HINT = "check the password of the LLM connection"
MODEL_HINT = "the model or endpoint does not exist"
CONTEXT_HINT = "shorten the prompt"
SERVER_MESSAGE_HINT = "its message says what to change"


def spec(models, *, max_retries=0, conn_id=CONN_ID, **options) -> CallSpec:
    return CallSpec.of(REQUEST, [conn_id], models, max_retries=max_retries, **options)


async def ask(models, **options) -> Outcome:
    return await driver.complete(spec(models, **options))


def attempts(outcome: Outcome) -> list[tuple]:
    return [(a.model, a.status, a.result) for a in outcome.attempts]


def client(proxy, api_key=MASTER_KEY, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=api_key, max_retries=0, **options)


async def reference(proxy, model: str, **options):
    """The official client's answer for ``model``, and the answer's headers."""
    async with client(proxy, **options) as official:
        raw = await official.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        return raw.parse(), raw.headers


# --- answers -----------------------------------------------------------------------------------------


async def test_a_plain_answer_through_the_trigger_matches_the_official_client(litellm_conn):
    events = [event async for event in chat_trigger(REQUEST, conn_id=CONN_ID, models=[None]).run()]
    assert len(events) == 1
    payload = events[0].payload
    answer, headers = await reference(litellm_conn, "gpt-4o-mini")

    assert payload["status"] == "success"
    assert payload["text"] == answer.choices[0].message.content == PLAIN_ANSWER
    meta = payload["meta"]
    assert (meta["model"], meta["requested_model"], meta["conn_id"]) == (
        "gpt-4o-mini",
        "gpt-4o-mini",
        CONN_ID,
    )
    assert meta["usage"] == answer.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    )
    assert meta["finish_reason"] == answer.choices[0].finish_reason == "stop"
    assert meta["cost_usd"] == pytest.approx(float(headers[COST_HEADER]))
    assert [(a["model"], a["status"], a["result"]) for a in meta["attempts"]] == [("gpt-4o-mini", 200, "ok")]


async def test_the_gateways_model_name_and_cost_are_reported_for_models_the_price_table_lacks(litellm_conn):
    # rich-model's upstream answer names gpt-4o-2024-08-06; LiteLLM renames it to the model group.
    rich, headers = await reference(litellm_conn, "rich-model")
    house, _ = await reference(litellm_conn, "house-model")
    rich_outcome, house_outcome = await asyncio.gather(ask(["rich-model"]), ask(["house-model"]))

    assert rich_outcome.model == rich.model == "rich-model"
    assert (
        (house_outcome.model, house_outcome.text)
        == (house.model, HOUSE_ANSWER)
        == ("house-model", HOUSE_ANSWER)
    )
    # rich-model is not in the provider's price table: the cost is the gateway's, not unknown (None).
    assert rich_outcome.cost_usd == pytest.approx(float(headers[COST_HEADER])) == pytest.approx(0.00472)


async def test_usage_details_and_the_system_fingerprint_are_kept(litellm_conn):
    answer, _ = await reference(litellm_conn, "rich-model")
    outcome = await ask(["rich-model"])

    assert outcome.ok, outcome.describe()
    meta = outcome.meta()
    assert meta["usage"] == {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}
    assert (
        meta["usage_details"]
        == {
            "cached_tokens": answer.usage.prompt_tokens_details.cached_tokens,
            "reasoning_tokens": answer.usage.completion_tokens_details.reasoning_tokens,
        }
        == {"cached_tokens": 1024, "reasoning_tokens": 100}
    )
    assert meta["system_fingerprint"] == answer.system_fingerprint == "fp_mock_123"
    assert meta["finish_reason"] == answer.choices[0].finish_reason == "length"


async def test_a_tool_call_answer_is_a_failed_attempt_naming_the_tool_not_an_empty_success(litellm_conn):
    answer, _ = await reference(litellm_conn, "tool-model")
    outcome = await ask(["tool-model"])

    assert answer.choices[0].message.content == ""
    assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert not outcome.ok and outcome.text is None
    assert outcome.error.kind == "invalid_response"
    assert "tool calls (get_weather)" in outcome.error.message
    assert attempts(outcome) == [("tool-model", 200, "error")]


async def test_a_tool_call_answer_costs_what_the_gateway_billed(litellm_conn):
    """The model ran and was billed (usage 10 + 20 tokens) although its answer is of no use here."""
    _, headers = await reference(litellm_conn, "tool-model")
    outcome = await ask(["tool-model"])

    assert not outcome.ok
    assert outcome.cost_usd == pytest.approx(float(headers[COST_HEADER])) == pytest.approx(1.35e-05)


# --- failures, retries and fallbacks -----------------------------------------------------------------


async def test_a_500_is_retried_then_the_call_falls_back_and_is_priced(litellm_conn):
    outcome = await ask(["error-500", "gpt-4o-mini"], max_retries=1)
    async with client(litellm_conn) as official:
        with pytest.raises(openai.InternalServerError) as raised:
            await official.chat.completions.create(model="error-500", messages=MESSAGES)

    assert raised.value.status_code == 500
    assert outcome.ok, outcome.describe()
    assert attempts(outcome) == [
        ("error-500", 500, "error"),
        ("error-500", 500, "error"),
        ("gpt-4o-mini", 200, "ok"),
    ]
    assert outcome.fallback_used and outcome.text == PLAIN_ANSWER
    # error-500 has no price, but its failed attempts used no tokens (and LiteLLM says they cost 0).
    assert outcome.cost_usd == pytest.approx(1.35e-05)


async def test_the_routers_own_fallback_is_one_attempt_answered_by_the_fallback_model(litellm_conn):
    answer, headers = await reference(litellm_conn, "fallback-primary")
    outcome = await ask(["fallback-primary"])

    assert headers["x-litellm-attempted-fallbacks"] == "1"
    assert outcome.ok, outcome.describe()
    assert outcome.model == answer.model == "gpt-4o-mini"
    assert outcome.requested_model == "fallback-primary"
    assert attempts(outcome) == [("fallback-primary", 200, "ok")]
    assert not outcome.fallback_used  # our chain did not move: the gateway's router did
    assert outcome.cost_usd == pytest.approx(float(headers[COST_HEADER]))


async def test_a_per_model_429_with_llm_provider_retry_after_is_honoured(litellm_conn):
    """rpm-limited admits 2 requests a minute, then answers 429 with only ``llm_provider-retry-after: 60``.

    Honoured, that wait passes the call's 30 s deadline: the call ends at once after one 429, instead of
    three quick retries into the same limit.
    """
    outcomes = []
    for _ in range(5):  # 2 admitted a minute: at most 4 answers even if the minute turns during the loop
        outcomes.append(await ask(["rpm-limited"], max_retries=2, deadline=time.time() + 30))
        if not outcomes[-1].ok:
            break
    limited = outcomes[-1]

    assert [o.ok for o in outcomes[:-1]] == [True] * (len(outcomes) - 1) and 2 <= len(outcomes) <= 5
    assert not limited.ok
    assert attempts(limited) == [("rpm-limited", 429, "error")]
    assert limited.error.kind == "deadline" and "deadline" in limited.error.message
    assert limited.latency_s < 30  # ended before its deadline: it did not sleep into it


async def test_a_context_window_error_is_not_retried_and_moves_down_the_chain(litellm_conn):
    alone = await ask(["context-window"], max_retries=2)
    chained = await ask(["context-window", "gpt-4o-mini"], max_retries=2)

    assert attempts(alone) == [("context-window", 400, "error")]
    error = alone.error
    assert (error.kind, error.status, error.type, error.code) == (
        "client",
        400,
        "invalid_request_error",
        None,
    )
    # LiteLLM's body has no context_length_exceeded code, only its exception's name in the message: the
    # message reaches the user, and the hint neither blames the key nor the model name.
    assert "ContextWindowExceededError" in error.message
    assert KEY_HINT not in error.message and MODEL_HINT not in error.message
    assert attempts(chained) == [("context-window", 400, "error"), ("gpt-4o-mini", 200, "ok")]


async def test_a_wrong_key_gets_the_key_hint_and_keeps_the_error_type(litellm_conn):
    outcome = await ask(["gpt-4o-mini"], conn_id=BAD_KEY_CONN_ID, max_retries=2)
    async with client(litellm_conn, api_key="sk-not-the-master-key-9d2e") as official:
        with pytest.raises(openai.BadRequestError) as raised:
            await official.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert raised.value.status_code == 400 and raised.value.type == "no_db_connection"
    assert attempts(outcome) == [("gpt-4o-mini", 400, "error")]
    error = outcome.meta()["error"]
    assert (error["kind"], error["status"], error["type"], error["code"]) == (
        "client",
        400,
        "no_db_connection",
        None,
    )
    assert KEY_HINT in error["message"]
    assert "sk-not-the-master-key-9d2e" not in str(outcome.meta())


async def test_an_unknown_model_is_a_client_error_that_points_to_the_servers_message(litellm_conn):
    outcome = await ask(["no-such-model"], max_retries=2)
    async with client(litellm_conn) as official:
        with pytest.raises(openai.BadRequestError) as raised:
            await official.chat.completions.create(model="no-such-model", messages=MESSAGES)

    assert raised.value.type == "invalid_request_error"
    assert attempts(outcome) == [("no-such-model", 400, "error")]
    error = outcome.error
    assert (error.kind, error.type) == ("client", "invalid_request_error")
    assert "Invalid model name passed in model=no-such-model" in error.message
    assert SERVER_MESSAGE_HINT in error.message
    assert KEY_HINT not in error.message and CONTEXT_HINT not in error.message


async def test_stream_true_is_refused_when_the_dag_is_parsed(litellm_conn):
    # The proxy would stream: server-sent events, not the one JSON answer a call reads.
    async with client(litellm_conn) as official:
        chunks = [c async for c in await official.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )]  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PLAIN_ANSWER

    with pytest.raises(ValueError, match="extra_body must not set stream"):
        LLMOperator(task_id="ask", prompt="x", llm_conn_id=CONN_ID, extra_body={"stream": True})


async def test_a_slow_answer_times_out_and_the_gateways_408_is_retried(litellm_conn, monkeypatch):
    point_connection(monkeypatch, "llm_litellm_1s", litellm_conn.base_url, MASTER_KEY, timeout=1)
    ours = await ask(["slow-model"], conn_id="llm_litellm_1s")  # slow-model answers after 3 s
    async with client(litellm_conn, timeout=1) as official:
        with pytest.raises(openai.APITimeoutError):
            await official.chat.completions.create(model="slow-model", messages=MESSAGES)
    gateway = await ask(["timeout-model"], max_retries=1)  # LiteLLM's own 1 s timeout: 408

    assert ours.error.kind == "timeout" and attempts(ours) == [("slow-model", None, "error")]
    assert ours.latency_s >= 1  # the connection's timeout, not earlier
    assert gateway.error.kind == "server"
    assert attempts(gateway) == [("timeout-model", 408, "error")] * 2


# --- connections and load ----------------------------------------------------------------------------


async def test_calls_on_connections_the_server_closed_while_the_loop_was_busy_succeed(litellm_conn):
    """uvicorn closes a connection after 5 s idle; a busy loop (a full triggerer) has not seen it yet.

    Both clients call, then their loop is blocked until the proxy has closed both idle connections, then
    they call again at once: a pool that hands out the closed connection fails the call (the aiohttp
    pool of 0.2 did: ServerDisconnectedError), with no retries to hide it.
    """
    async with client(litellm_conn) as official:
        first = await asyncio.gather(ask(["gpt-4o-mini"]), official.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        ))  # fmt: skip
        waited = litellm_conn.block_until_idle_connections_closed()
        second = await asyncio.gather(ask(["gpt-4o-mini"]), official.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        ))  # fmt: skip

    assert waited > 4  # uvicorn's keep-alive timeout is 5 s (measured from its answer)
    for outcome, answer in (first, second):
        assert outcome.ok, outcome.describe()
        assert attempts(outcome) == [("gpt-4o-mini", 200, "ok")]
        assert answer.choices[0].message.content == outcome.text


async def test_a_small_fan_out_keeps_order_and_reports_each_item(litellm_conn):
    # One failing item only: several failures of one model would bring its circuit breaker into play.
    models = ["gpt-4o-mini", "rich-model", "gpt-4o"] * 4 + ["tool-model"]
    specs = [spec([model]) for model in models]
    endpoints = await driver.resolve(specs[0])
    records = await driver.fan_out(specs, endpoints)

    assert [r["meta"]["status"] for r in records] == ["success"] * 12 + ["error"]
    assert [r["meta"].get("model") for r in records] == models[:12] + [None]
    assert [r["text"] for r in records[:3]] == [PLAIN_ANSWER, RICH_ANSWER, GPT_4O_ANSWER]
    assert records[-1]["meta"]["error"]["kind"] == "invalid_response"
    assert all(r["meta"]["attempts"] == 1 for r in records)
    assert [r["meta"]["usage_details"] for r in records[1:3]] == [
        {"cached_tokens": 1024, "reasoning_tokens": 100}
    ] * 2
    # What the gateway billed for each answer, the unpriced rich-model's included.
    answered = records[:12]
    assert sum(r["meta"]["cost_usd"] for r in answered) == pytest.approx(4 * (1.35e-05 + 0.00472 + 0.00472))
