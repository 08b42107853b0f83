"""The fake server speaks the real OpenAI API: every test drives it with the official ``openai`` client
(or raw HTTP for what the client cannot send), on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from airflow_llm_async.core.buckets import ServerBudget, ServerWindow, server_budget
from airflow_llm_async.testing.fake_server import (
    DEFAULT_MODELS,
    REDIRECT_TARGET,
    FakeLLMServer,
    RateLimit,
    create_app,
    estimate_tokens,
    main,
    parse_fault_spec,
)

KEY = "sk-fake-unit-test-key-7f3a"
CJK = re.compile(r"[\u4e00-\u9fff]")
REFUSAL_MARKERS = ("错误", "抱歉")
REPO_ROOT = Path(__file__).resolve().parents[2]


def user(text: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": text}]


async def until(server: FakeLLMServer, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Wait for the server's stats to satisfy ``predicate``; fail rather than hang."""
    async with asyncio.timeout(5):
        return await server.wait_for(predicate)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
async def client(server: FakeLLMServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
async def http(server: FakeLLMServer) -> AsyncIterator[aiohttp.ClientSession]:
    """Raw HTTP, for the admin API and for requests the openai client would never send."""
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session


async def ask(client: AsyncOpenAI, text: str, *, fault: str | None = None, **kwargs: Any) -> Any:
    headers = dict(kwargs.pop("extra_headers", None) or {})
    if fault is not None:
        headers["x-fake-fault"] = fault
    kwargs.setdefault("model", "gpt-4")
    kwargs.setdefault("messages", user(text))
    return await client.chat.completions.create(extra_headers=headers, **kwargs)


# --- the real API's shapes ----------------------------------------------------------------------


async def test_completion_has_the_exact_shape_of_the_real_api(client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=user("Hello there"))
    data = raw.http_response.json()

    assert set(data) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert data["id"].startswith("chatcmpl-")
    assert (data["object"], data["model"], data["system_fingerprint"]) == (
        "chat.completion",
        "gpt-4o",
        "fp_fake",
    )
    assert isinstance(data["created"], int)
    [choice] = data["choices"]
    assert set(choice) == {"index", "message", "finish_reason", "logprobs"}
    assert (choice["index"], choice["finish_reason"], choice["logprobs"]) == (0, "stop", None)
    assert choice["message"] == {
        "role": "assistant",
        "content": choice["message"]["content"],
        "refusal": None,
    }
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert raw.parse().choices[0].message.content == choice["message"]["content"]


async def test_parsed_completion_carries_content_usage_and_finish_reason(client: AsyncOpenAI) -> None:
    completion = await ask(
        client, "Summarize: the quick brown fox jumps over the lazy dog.", model="gpt-4o-mini"
    )

    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.model == "gpt-4o-mini"
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    content = choice.message.content
    assert "quick brown fox" in content
    assert completion.usage.completion_tokens == estimate_tokens(content)
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_models_can_be_listed_and_retrieved(client: AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == list(DEFAULT_MODELS)
    assert {(m.object, m.owned_by) for m in page.data} == {("model", "fake")}
    assert (await client.models.retrieve("gpt-4")).id == "gpt-4"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-99")


async def test_known_models_are_configurable() -> None:
    async with (
        FakeLLMServer(models=["my-model"]) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x") as c,
    ):
        assert [m.id for m in (await c.models.list()).data] == ["my-model"]
        assert (await ask(c, "hi", model="my-model")).choices[0].finish_reason == "stop"


# --- deterministic answers ----------------------------------------------------------------------


async def test_answers_are_deterministic_per_prompt(client: AsyncOpenAI) -> None:
    async def content(text: str, system: str | None = None) -> str:
        return (await ask(client, text, messages=user(text, system))).choices[0].message.content

    first = await content("Explain why the sky is blue.")
    assert first == await content("Explain why the sky is blue.")
    assert first != await content("Explain why grass is green.")
    assert first != await content("Explain why the sky is blue.", system="You are a pirate.")
    assert "why the sky is blue" in first


@pytest.mark.parametrize(
    "prompt",
    [
        "Summarize the following report: revenue grew 12% while costs stayed flat across all regions.",
        "Analyze the risks of deploying on Fridays.",
        "What is the capital of France?",
        "hi",
        "",
    ],
)
async def test_english_answers_read_like_sentences(client: AsyncOpenAI, prompt: str) -> None:
    content = (await ask(client, prompt)).choices[0].message.content

    assert len(content) >= 80
    assert not CJK.search(content)
    assert content.endswith(".") and ". " in content
    assert not any(marker in content for marker in REFUSAL_MARKERS)


@pytest.mark.parametrize(
    "prompt",
    [
        "请总结以下内容：今年公司收入增长了百分之十二，成本保持稳定。",
        "请分析这段日志中的错误原因，并说明我们为何感到抱歉。",  # markers in the input must not leak out
        "你好",
    ],
)
async def test_chinese_prompts_get_chinese_answers_without_refusal_markers(
    client: AsyncOpenAI, prompt: str
) -> None:
    content = (await ask(client, prompt)).choices[0].message.content

    assert len(CJK.findall(content)) >= 40
    assert len(content) >= 80
    assert not any(marker in content for marker in REFUSAL_MARKERS)
    assert prompt[:4] in content  # quotes the input


async def test_a_chinese_system_prompt_makes_the_answer_chinese(client: AsyncOpenAI) -> None:
    messages = user("Summarize the meeting notes.", system="你是一个乐于助人的助手。")
    content = (await ask(client, "", messages=messages)).choices[0].message.content
    assert CJK.search(content)


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(client: AsyncOpenAI) -> None:
    full = (await ask(client, "Describe the water cycle.")).choices[0].message.content
    cut = await ask(client, "Describe the water cycle.", max_tokens=5)

    assert cut.choices[0].finish_reason == "length"
    assert full.startswith(cut.choices[0].message.content)
    assert 0 < cut.usage.completion_tokens <= 5


async def test_json_response_formats_return_json(client: AsyncOpenAI) -> None:
    plain = await ask(client, "Rate this haiku.", response_format={"type": "json_object"})
    assert "haiku" in json.loads(plain.choices[0].message.content)["answer"]

    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "score": {"type": "integer"},
            "ok": {"type": "boolean"},
        },
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema}}
    structured = await ask(client, "Rate this haiku.", response_format=response_format)
    data = json.loads(structured.choices[0].message.content)
    assert set(data) == {"summary", "score", "ok"}
    assert (type(data["summary"]), type(data["score"]), type(data["ok"])) == (str, int, bool)


class _Entity(BaseModel):
    name: str
    mentions: int


class _Entities(BaseModel):
    entities: list[_Entity]
    note: str | None


async def test_the_openai_clients_structured_parse_gets_a_typed_answer(client: AsyncOpenAI) -> None:
    """Nested pydantic models ($defs, $ref) and optional fields (anyOf with null), as the SDK sends them."""
    completion = await client.chat.completions.parse(
        model="gpt-4", messages=user("List the entities in: Ada met Alan."), response_format=_Entities
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, _Entities) and isinstance(parsed.entities[0], _Entity)
    assert parsed.entities[0].name and parsed.entities[0].mentions > 0


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "exc_class", "status", "error_type", "code"),
    [
        ("429", openai.RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded"),
        ("429gateway", openai.RateLimitError, 429, "None", "429"),  # LiteLLM's per-model rpm limit
        ("500", openai.InternalServerError, 500, "server_error", None),
        ("502", openai.InternalServerError, 502, "server_error", None),
        ("503", openai.InternalServerError, 503, "server_error", None),
        ("401", openai.AuthenticationError, 401, "invalid_request_error", "invalid_api_key"),
        ("404", openai.NotFoundError, 404, "invalid_request_error", "model_not_found"),
        ("400", openai.BadRequestError, 400, "invalid_request_error", "context_length_exceeded"),
        # LiteLLM's proxy: the status again as the code, str(None) where it has no type
        ("400auth", openai.BadRequestError, 400, "no_db_connection", "400"),
        ("400model", openai.BadRequestError, 400, "None", "400"),
    ],
)
async def test_error_faults_raise_the_matching_openai_exception(
    client: AsyncOpenAI,
    spec: str,
    exc_class: type[openai.APIStatusError],
    status: int,
    error_type: str,
    code: str,
) -> None:
    with pytest.raises(exc_class) as caught:
        await ask(client, "hello", fault=spec)

    exc = caught.value
    assert (exc.status_code, exc.type, exc.code) == (status, error_type, code)
    assert set(exc.body) == {"message", "type", "param", "code"}
    assert exc.message.startswith(f"Error code: {status} - ")


async def test_rate_limit_carries_retry_headers(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await ask(client, "hello", fault="429")
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "200")


async def test_retry_after_is_configurable() -> None:
    async with (
        FakeLLMServer(retry_after_ms=1500) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
    ):
        with pytest.raises(openai.RateLimitError) as caught:
            await ask(c, "hello", fault="429")
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")


async def test_unknown_model_is_404_model_not_found(client: AsyncOpenAI, server: FakeLLMServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await ask(client, "hello", model="gpt-99")
    assert caught.value.code == "model_not_found"
    expected = "The model `gpt-99` does not exist or you do not have access to it."
    assert caught.value.body["message"] == expected
    assert server.stats()["by_model"] == {"gpt-99": 1}


async def test_wrong_key_is_401_and_never_echoed(server: FakeLLMServer) -> None:
    wrong = "sk-wrong-key-that-must-not-be-echoed"
    async with AsyncOpenAI(base_url=server.base_url, api_key=wrong, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as caught:
            await ask(c, "hello")
    assert caught.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in caught.value.message
    assert wrong not in caught.value.response.text
    assert KEY not in caught.value.response.text


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Basic abc"])
async def test_requests_without_a_bearer_key_are_401(
    http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with http.get("/v1/models", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_any_key_is_accepted_when_the_server_has_none() -> None:
    async with FakeLLMServer() as srv, AsyncOpenAI(base_url=srv.base_url, api_key="anything") as c:
        assert (await ask(c, "hi")).choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "gpt-4"}).encode(), "messages"),
        (json.dumps({"model": "gpt-4", "messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "model"),
        (json.dumps({"model": "gpt-4", "messages": user("x"), "max_tokens": 0}).encode(), "max_tokens"),
    ],
)
async def test_invalid_requests_are_400(http: aiohttp.ClientSession, body: bytes, param: str | None) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with http.post("/v1/chat/completions", data=body, headers=headers) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_streaming_is_refused_with_a_clear_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(client, "hello", stream=True)
    assert "Streaming is not supported by the fake server" in caught.value.message
    assert caught.value.param == "stream"


async def test_unknown_v1_url_gets_an_openai_style_404(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "Invalid URL (POST /v1/completions)"


# --- content faults -----------------------------------------------------------------------------


async def test_malformed_body_fails_json_parsing_in_the_client(
    client: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    # The openai client does not wrap this: the json module's error escapes as is.
    with pytest.raises(json.JSONDecodeError):
        await ask(client, "hello", fault="malformed")

    headers = {"Authorization": f"Bearer {KEY}", "x-fake-fault": "malformed"}
    payload = {"model": "gpt-4", "messages": user("hello")}
    async with http.post("/v1/chat/completions", json=payload, headers=headers) as resp:
        assert (resp.status, resp.content_type) == (200, "application/json")
        text = await resp.text()
    assert text.startswith('{"id":"chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_echo_fault_repeats_the_request_headers_in_a_500(
    client: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(openai.InternalServerError):
        await ask(client, "hello", fault="echo")
    headers = {"Authorization": f"Bearer {KEY}", "x-fake-fault": "echo", "api-key": "gw-1"}
    payload = {"model": "gpt-4", "messages": user("hello")}
    async with http.post("/v1/chat/completions", json=payload, headers=headers) as resp:
        assert resp.status == 500
        text = await resp.text()
    assert text.startswith("POST /v1/chat/completions\n")
    assert f"Authorization: Bearer {KEY}" in text and "api-key: gw-1" in text


async def test_redirect_fault_points_elsewhere(http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "x-fake-fault": "redirect"}
    payload = {"model": "gpt-4", "messages": user("hello")}
    async with http.post(
        "/v1/chat/completions", json=payload, headers=headers, allow_redirects=False
    ) as resp:
        assert (resp.status, resp.headers["Location"]) == (307, REDIRECT_TARGET)


async def test_endless_fault_streams_until_the_client_hangs_up(
    http: aiohttp.ClientSession, server: FakeLLMServer
) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "x-fake-fault": "endless"}
    payload = {"model": "gpt-4", "messages": user("hello")}
    read = 0
    async with http.post("/v1/chat/completions", json=payload, headers=headers) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            read += len(chunk)
            if read > 4 * 1024 * 1024:
                break
    assert read > 4 * 1024 * 1024
    await until(server, lambda s: s["in_flight"] == 0)  # the hang-up ended the handler


async def test_empty_fault_has_no_choices(client: AsyncOpenAI) -> None:
    completion = await ask(client, "hello", fault="empty")
    assert completion.choices == []
    assert completion.object == "chat.completion"


ZH_PROMPT, EN_PROMPT = "请总结这份报告。", "Summarize this report."


@pytest.mark.parametrize(("prompt", "chinese"), [(ZH_PROMPT, True), (EN_PROMPT, False)])
async def test_refusal_fault_trips_only_the_refusal_rule(
    client: AsyncOpenAI, prompt: str, chinese: bool
) -> None:
    content = (await ask(client, prompt, fault="refusal")).choices[0].message.content

    assert len(content.strip()) >= 50
    if chinese:
        assert "抱歉" in content and "错误" in content
    else:
        assert content.startswith("Sorry, ")


@pytest.mark.parametrize(("prompt", "expected"), [(ZH_PROMPT, "好的。"), (EN_PROMPT, "OK.")])
async def test_short_fault_answers_under_50_chars(client: AsyncOpenAI, prompt: str, expected: str) -> None:
    completion = await ask(client, prompt, fault="short")
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"


async def test_length_fault_truncates_with_finish_reason_length(client: AsyncOpenAI) -> None:
    full = (await ask(client, "Describe the water cycle.")).choices[0].message.content
    cut = (await ask(client, "Describe the water cycle.", fault="length")).choices[0]

    assert cut.finish_reason == "length"
    assert 0 < len(cut.message.content) < len(full)
    assert full.startswith(cut.message.content)


# --- fault rules and modifiers ------------------------------------------------------------------


async def test_count_modifier_fails_the_first_n_requests_then_answers(
    client: AsyncOpenAI, server: FakeLLMServer
) -> None:
    server.set_fault("gpt-4", "503*2")

    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await ask(client, "hello")
    assert (await ask(client, "hello")).choices[0].finish_reason == "stop"
    assert (await ask(client, "hello", model="gpt-4o")).choices  # other models are unaffected
    assert server.stats()["by_status"] == {"503": 2, "200": 2}
    assert server.faults() == {"gpt-4": "503*2"}


async def test_a_gateways_per_model_429_carries_only_the_forwarded_retry_header(
    server: FakeLLMServer,
) -> None:
    server.set_fault("gpt-4", "429gateway")
    async with AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as c:
        with pytest.raises(openai.RateLimitError) as caught:
            await ask(c, "hello")
        assert (await ask(c, "hello", model="gpt-4o")).choices[0].finish_reason == "stop"  # one model only
    headers = caught.value.response.headers
    assert headers["llm_provider-retry-after"] == "1"  # 200 ms, in LiteLLM's whole seconds
    assert "retry-after" not in headers and "retry-after-ms" not in headers


async def raw_ask(client: AsyncOpenAI, model: str = "gpt-4", **kwargs: Any) -> Any:
    """One completion with its answer's headers; a 429 as the openai client raises it."""
    return await client.chat.completions.with_raw_response.create(model=model, messages=user("hi"), **kwargs)


async def test_a_models_request_budget_is_reported_in_openais_headers_then_answered_429() -> None:
    limits = {"gpt-4": RateLimit(requests=2, window=30.0)}
    async with (
        FakeLLMServer(rate_limits=limits) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
    ):
        first, second = await raw_ask(c), await raw_ask(c)
        with pytest.raises(openai.RateLimitError) as caught:
            await raw_ask(c)
        other = await raw_ask(c, model="gpt-4o")  # a model without a limit: no headers, no 429
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"(29|30)(\.\d+)?s", second.headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-remaining-tokens" not in second.headers  # no tokens limit: not reported
    # Our reader understands them: nothing left for about 30 s.
    budget = server_budget(second.headers)
    assert budget.requests.remaining == 0 and 29 < budget.requests.reset <= 30 and budget.tokens is None
    refused = caught.value
    assert (refused.type, refused.code) == ("requests", "rate_limit_exceeded")
    assert refused.response.headers["retry-after"] == "30"
    assert 29_000 < int(refused.response.headers["retry-after-ms"]) <= 30_000
    assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-remaining-requests" not in other.headers
    assert srv.stats()["by_status"] == {"200": 3, "429": 1}


async def test_a_models_token_budget_counts_prompt_and_max_tokens() -> None:
    limits = {"gpt-4": RateLimit(tokens=100, window=30.0)}
    async with (
        FakeLLMServer(rate_limits=limits) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
    ):
        answer = await raw_ask(c, max_tokens=40)  # "hi": 1 token + 3 per message + 3: 7, and 40
        assert server_budget(answer.headers) == ServerBudget(None, ServerWindow(53, pytest.approx(30, abs=1)))
        with pytest.raises(openai.RateLimitError) as caught:
            await raw_ask(c, max_tokens=50)  # 57 more than the 53 left
        assert caught.value.type == "tokens"
        await raw_ask(c, max_tokens=46)  # fits exactly


async def test_without_rate_limit_headers_the_budget_still_answers_429() -> None:
    limits = {"gpt-4": RateLimit(requests=1, window=30.0)}
    async with (
        FakeLLMServer(rate_limits=limits, rate_limit_headers=False) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
    ):
        answer = await raw_ask(c)
        with pytest.raises(openai.RateLimitError) as caught:
            await raw_ask(c)
        srv.reset()  # closes the window
        await raw_ask(c)
    assert not [name for name in answer.headers if name.startswith("x-ratelimit")]
    assert not [name for name in caught.value.response.headers if name.startswith("x-ratelimit")]


async def test_a_window_ends_and_the_whole_budget_is_back() -> None:
    limits = {"gpt-4": RateLimit(requests=1, window=0.3)}
    async with (
        FakeLLMServer(rate_limits=limits) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
    ):
        await raw_ask(c)
        with pytest.raises(openai.RateLimitError) as caught:
            await raw_ask(c)
        await asyncio.sleep(int(caught.value.response.headers["retry-after-ms"]) / 1000)
        again = await raw_ask(c)
    assert again.headers["x-ratelimit-remaining-requests"] == "0"  # the new window's one request


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        ({"gpt-5": RateLimit(requests=1)}, "unknown model"),
        ({"gpt-4": {"requests": 1}}, "must be a RateLimit"),
    ],
)
def test_bad_rate_limits_are_refused(limits: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_app(rate_limits=limits)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"requests": 0}, {"tokens": True}, {"requests": 1, "window": 0}, {"tokens": 5, "window": math.inf}],
)
def test_a_bad_rate_limit_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="RateLimit"):
        RateLimit(**kwargs)


async def test_openai_retries_recover_from_a_counted_429(server: FakeLLMServer) -> None:
    async with AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=2) as retrying:
        started = time.monotonic()
        completion = await ask(retrying, "hello", fault="429*2")
        elapsed = time.monotonic() - started

    assert completion.choices[0].finish_reason == "stop"
    assert server.stats()["by_status"] == {"429": 2, "200": 1}
    assert elapsed >= 0.4  # the client waited retry-after-ms (200 ms) before each retry


async def run_pattern(srv: FakeLLMServer, client: AsyncOpenAI, n: int = 16) -> list[int]:
    statuses = []
    for _ in range(n):
        try:
            await ask(client, "hello", model="gpt-4o-mini")
            statuses.append(200)
        except openai.RateLimitError:
            statuses.append(429)
    return statuses


async def test_probability_modifier_is_reproducible_with_the_seed() -> None:
    patterns = []
    for seed in (7, 7, 8):
        async with (
            FakeLLMServer(faults={"gpt-4o-mini": "429%50"}, seed=seed) as srv,
            AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
        ):
            patterns.append(await run_pattern(srv, c))
            if seed == 8:
                srv.reset()  # re-seeds: the same run again
                assert await run_pattern(srv, c) == patterns[-1]

    assert patterns[0] == patterns[1]
    assert {200, 429} <= set(patterns[0])
    assert patterns[0] != patterns[2]


async def test_header_fault_overrides_the_model_rule(client: AsyncOpenAI, server: FakeLLMServer) -> None:
    server.set_fault("gpt-4", "503")

    assert (await ask(client, "hello", fault="short")).choices[0].message.content == "OK."
    assert len((await ask(client, "hello", fault="none")).choices[0].message.content) >= 80
    with pytest.raises(openai.InternalServerError):
        await ask(client, "hello")


async def test_wildcard_rule_applies_to_models_without_their_own(
    client: AsyncOpenAI, server: FakeLLMServer
) -> None:
    server.set_fault("*", "500")
    server.set_fault("gpt-4o", "none")

    with pytest.raises(openai.InternalServerError):
        await ask(client, "hello", model="gpt-4")
    assert (await ask(client, "hello", model="gpt-4o")).choices
    server.set_fault("*", None)
    assert (await ask(client, "hello", model="gpt-4")).choices


@pytest.mark.parametrize("spec", ["", "teapot", "503*0", "429%150", "503**2", "503*x"])
def test_invalid_fault_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid fault spec"):
        parse_fault_spec(spec)


def test_fault_spec_grammar() -> None:
    rule = parse_fault_spec(" 429*3%25 ")
    assert (rule.kind, rule.remaining, rule.probability, rule.spec) == ("429", 3, 0.25, "429*3%25")
    with pytest.raises(ValueError, match="unknown model"):
        create_app(faults={"gpt-99": "503"})


async def test_bad_fault_header_is_a_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="x-fake-fault"):
        await ask(client, "hello", fault="teapot")


# --- latency, stall, hold -----------------------------------------------------------------------


async def test_latency_header_delays_the_answer(client: AsyncOpenAI) -> None:
    started = time.monotonic()
    await ask(client, "hello", extra_headers={"x-fake-latency": "0.2"})
    assert time.monotonic() - started >= 0.2


async def test_server_latency_delays_the_answer() -> None:
    async with FakeLLMServer(latency=0.2) as srv, AsyncOpenAI(base_url=srv.base_url, api_key="x") as c:
        started = time.monotonic()
        await ask(c, "hello")
        assert time.monotonic() - started >= 0.2


async def test_stall_times_out_the_client_and_the_server_still_stops_cleanly(
    client: AsyncOpenAI, server: FakeLLMServer
) -> None:
    with pytest.raises(openai.APITimeoutError):
        await ask(client, "hello", fault="stall", timeout=0.3)

    await until(server, lambda s: s["in_flight"] == 0)  # the disconnect ended the handler
    assert server.stats()["by_status"] == {"499": 1}
    async with asyncio.timeout(2):
        await server.stop()


@pytest.mark.parametrize("parked_by", ["stall", "hold"])
async def test_shutdown_is_not_blocked_by_parked_requests(parked_by: str) -> None:
    # aiohttp alone would wait shutdown_timeout (30 s here) for the handler: only cancellation is fast.
    srv = FakeLLMServer(shutdown_timeout=30)
    await srv.start()
    async with AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=30) as c:
        if parked_by == "hold":
            srv.hold()
        pending = asyncio.create_task(ask(c, "hello", fault="stall" if parked_by == "stall" else None))
        try:
            await until(srv, lambda s: s["in_flight"] == 1)
            async with asyncio.timeout(3):
                await srv.stop()
            with pytest.raises(openai.APIConnectionError):  # the connection closed without an answer
                await pending
        finally:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    assert srv.stats()["in_flight"] == 0
    assert srv.stats()["by_status"] == {"499": 1}


async def test_hold_and_release_via_the_admin_api(
    client: AsyncOpenAI, server: FakeLLMServer, http: aiohttp.ClientSession
) -> None:
    async def stats() -> dict[str, Any]:
        async with http.get("/_fake/stats") as resp:
            return await resp.json()

    async with http.post("/_fake/hold") as resp:
        assert resp.status == 200
    calls = [asyncio.create_task(ask(client, f"question {i}")) for i in range(3)]
    await until(server, lambda s: s["held"] == 3)

    held = await stats()
    assert (held["held"], held["in_flight"], held["max_in_flight"]) == (3, 3, 3)
    assert not any(call.done() for call in calls)

    async with http.post("/_fake/release") as resp:
        assert resp.status == 200
    results = await asyncio.gather(*calls)
    assert [r.choices[0].finish_reason for r in results] == ["stop"] * 3
    after = await stats()
    assert (after["held"], after["in_flight"], after["requests"]) == (0, 0, 3)
    assert after["by_status"] == {"200": 3} and after["by_model"] == {"gpt-4": 3}


async def test_hold_and_release_via_the_python_api(client: AsyncOpenAI, server: FakeLLMServer) -> None:
    server.hold()
    call = asyncio.create_task(ask(client, "hello"))
    await until(server, lambda s: s["held"] == 1)
    assert not call.done()
    server.release()
    assert (await call).choices[0].finish_reason == "stop"
    assert server.stats()["held"] == 0


# --- admin API ----------------------------------------------------------------------------------


async def test_fault_rules_via_the_admin_api(http: aiohttp.ClientSession, client: AsyncOpenAI) -> None:
    async with http.post("/_fake/faults", json={"gpt-4": "503*2", "gpt-4o": "429"}) as resp:
        assert await resp.json() == {"gpt-4": "503*2", "gpt-4o": "429"}
    async with http.post("/_fake/faults", json={"gpt-4o": None}) as resp:
        assert await resp.json() == {"gpt-4": "503*2"}
    for bad in ({"gpt-4": "teapot"}, {"gpt-99": "503"}, ["gpt-4"], {"gpt-4": 503}):
        async with http.post("/_fake/faults", json=bad) as resp:
            assert resp.status == 400
    async with http.get("/_fake/faults") as resp:
        assert await resp.json() == {"gpt-4": "503*2"}  # rejected updates changed nothing
    with pytest.raises(openai.InternalServerError):
        await ask(client, "hello")


async def test_reset_restores_the_start_up_state() -> None:
    async with (
        FakeLLMServer(faults={"gpt-4": "503*1"}) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c,
        aiohttp.ClientSession(base_url=srv.url) as http,
    ):
        with pytest.raises(openai.InternalServerError):
            await ask(c, "hello")
        await ask(c, "hello")
        srv.set_fault("gpt-4o", "500")

        async with http.post("/_fake/reset") as resp:
            assert (await resp.json())["requests"] == 0
        assert srv.faults() == {"gpt-4": "503*1"}
        assert srv.stats()["by_status"] == {}
        with pytest.raises(openai.InternalServerError):  # the count rule is armed again
            await ask(c, "hello")


# --- logging ------------------------------------------------------------------------------------


async def test_api_key_never_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-key-for-the-log-test"
    async with FakeLLMServer(api_key=KEY, access_log=True) as srv:
        async with AsyncOpenAI(base_url=srv.base_url, api_key=wrong, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await ask(bad, "hello")
        async with AsyncOpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0) as good:
            await ask(good, "hello", fault="short")  # also logs the fault, at DEBUG
            await ask(good, "hello")

    access = [r.getMessage() for r in caplog.records if r.name == "airflow_llm_async.testing.fake_server"]
    assert any('"POST /v1/chat/completions" 401' in line for line in access)
    assert any('"POST /v1/chat/completions" 200' in line for line in access)
    assert wrong not in caplog.text and KEY not in caplog.text
    assert all(wrong not in r.getMessage() and KEY not in r.getMessage() for r in caplog.records)


async def test_no_per_request_logging_by_default(
    client: AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="airflow_llm_async")
    await ask(client, "hello")
    assert [r for r in caplog.records if r.name.startswith("airflow_llm_async")] == []


# --- binding and the console script ---------------------------------------------------------------


def test_only_loopback_addresses_are_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FakeLLMServer(host="0.0.0.0")
    bad_arguments = [
        ["--host", "0.0.0.0"],
        ["--fault", "gpt-4"],
        ["--fault", "gpt-4=teapot"],
        ["--latency", "-1"],
        ["--keepalive-timeout", "-1"],
    ]
    for argv in bad_arguments:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "refusing to bind" in capsys.readouterr().err


def test_the_console_script_serves_more_models_when_asked() -> None:
    from airflow_llm_async.testing.fake_server import DEFAULT_MODELS, _parse_args

    assert _parse_args([]).models == DEFAULT_MODELS
    args = _parse_args(["--model", "llama3.2", "--model", "gpt-4", "--model", "Qwen/Qwen2.5-7B-Instruct"])
    assert args.models == (*DEFAULT_MODELS, "llama3.2", "Qwen/Qwen2.5-7B-Instruct")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_console_script_serves_until_signalled(signum: int) -> None:
    secret, wrong = "sk-cli-secret-key", "sk-cli-wrong-key"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "airflow_llm_async.testing.fake_server",
        "--port", "0", "--latency", "0", "--api-key", secret, "--access-log",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        match = re.fullmatch(r"fake LLM server listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert match, line
        base_url = match[1]
        async with AsyncOpenAI(base_url=base_url, api_key=secret, max_retries=0) as c:
            assert (await ask(c, "hello from the CLI test")).choices[0].finish_reason == "stop"
        async with AsyncOpenAI(base_url=base_url, api_key=wrong, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await ask(c, "hello")

        proc.send_signal(signum)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0, stderr.decode()
    output = (line.encode() + stdout + stderr).decode()
    assert '"POST /v1/chat/completions" 200' in output and '"POST /v1/chat/completions" 401' in output
    assert secret not in output and wrong not in output


# --- idle keep-alive connections ------------------------------------------------------------------

STATS_REQUEST = b"GET /_fake/stats HTTP/1.1\r\nHost: fake\r\n\r\n"


async def _ask_for_stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive request on a raw connection; its status line, or b"" if the server hung up."""
    writer.write(STATS_REQUEST)
    status = await reader.readline()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status


async def test_a_request_on_a_connection_idle_past_the_keepalive_timeout_is_reset() -> None:
    async with FakeLLMServer(keepalive_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            assert (await _ask_for_stats(reader, writer)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.1)  # idle, but within the timeout: still served
            assert (await _ask_for_stats(reader, writer)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.3)  # past it: the server has given the connection up
            try:
                status = await _ask_for_stats(reader, writer)
            except ConnectionResetError:
                status = b""
            assert status == b""
        finally:
            writer.close()
        stats = server.stats()
    assert (stats["connections"], stats["stale_resets"]) == (1, 1)


async def test_idle_connections_are_closed_a_lag_after_the_keepalive_timeout() -> None:
    from airflow_llm_async.testing.fake_server import CLOSE_LAG_S

    async with FakeLLMServer(keepalive_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            await _ask_for_stats(reader, writer)
            started = time.monotonic()
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # the server closed the socket
            idle = time.monotonic() - started
        finally:
            writer.close()
    assert 0.2 + CLOSE_LAG_S - 0.1 <= idle <= 0.2 + CLOSE_LAG_S + 1


async def test_without_a_keepalive_timeout_idle_connections_stay_usable() -> None:
    async with FakeLLMServer(keepalive_timeout=None) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            await _ask_for_stats(reader, writer)
            await asyncio.sleep(0.3)
            assert (await _ask_for_stats(reader, writer)).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()
        assert server.stats()["stale_resets"] == 0


def test_the_keepalive_timeout_defaults_to_uvicorns_and_is_checked() -> None:
    from airflow_llm_async.testing.fake_server import DEFAULT_KEEPALIVE_TIMEOUT, _parse_args

    assert DEFAULT_KEEPALIVE_TIMEOUT == 5.0  # uvicorn's timeout_keep_alive, as LiteLLM and vLLM serve
    assert _parse_args([]).keepalive_timeout == 5.0
    assert _parse_args(["--keepalive-timeout", "0"]).keepalive_timeout is None  # never
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="keepalive_timeout"):
            create_app(keepalive_timeout=bad)


async def test_usage_details_are_reported_as_openai_does_and_a_long_prompt_sent_again_is_cached(
    client: AsyncOpenAI,
) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 150  # > 1,024 tokens
    first = await ask(client, long_prompt)
    assert first.system_fingerprint == "fp_fake"
    assert first.usage.prompt_tokens >= 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert first.usage.completion_tokens_details.reasoning_tokens == 0
    again = await ask(client, long_prompt)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens // 128 * 128 > 0
    short = await ask(client, "Hello there")
    assert (await ask(client, "Hello there")).usage.prompt_tokens_details.cached_tokens == 0
    assert short.usage.prompt_tokens < 1024


async def test_the_tool_calls_fault_answers_as_a_model_calling_a_tool(client: AsyncOpenAI) -> None:
    completion = await ask(client, "What is the weather in Paris?", fault="tool_calls")
    [choice] = completion.choices
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "What is the weather in Paris?"}
    assert call.id.startswith("call_") and completion.usage.completion_tokens == 0
