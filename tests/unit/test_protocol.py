from __future__ import annotations

import json

import pytest

from airflow_llm_async.core.protocol import (
    Endpoint,
    LLMCallError,
    build_messages,
    build_payload,
    classify_status,
    parse_completion,
)


def _answer(**overrides) -> bytes:
    data = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4-0613",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "你好"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    data.update(overrides)
    return json.dumps(data).encode()


def test_parse_completion_reads_text_model_usage_and_finish_reason():
    completion = parse_completion(200, _answer())
    assert completion.text == "你好"
    assert completion.model == "gpt-4-0613"
    assert completion.finish_reason == "stop"
    assert completion.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_parse_completion_without_usage_reports_zero_tokens():
    completion = parse_completion(200, _answer(usage=None))
    assert completion.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_parse_completion_takes_a_refusal_when_content_is_null():
    choice = {"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help"}}
    assert parse_completion(200, _answer(choices=[choice])).text == "I can't help"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"choices": [', "not valid JSON"),
        (b"[]", "no choices"),
        (_answer(choices=[]), "no choices"),
        (_answer(choices=[{"index": 0, "message": {"role": "assistant"}}]), "no content"),
        # Malformed fields must become an attempt's error, never an exception that kills the trigger.
        (_answer(choices=["x"]), "shape of a chat completion"),
        (_answer(choices={"0": {}}), "shape of a chat completion"),
        (_answer(choices=[{"message": "hi"}]), "shape of a chat completion"),
        (_answer(choices=[{"message": {"content": ["a", "list"]}}]), "content is not text"),
        (_answer(usage={"prompt_tokens": "n/a"}), "shape of a chat completion"),
        (_answer(usage={"prompt_tokens": -5}), "shape of a chat completion"),
        (_answer(usage=[1, 2]), "shape of a chat completion"),
        (_answer().replace(b'"prompt_tokens": 3', b'"prompt_tokens": Infinity'), "shape of a chat"),
        (_answer().replace(b'"prompt_tokens": 3', b'"prompt_tokens": NaN'), "shape of a chat"),
        (_answer(model=7), "shape of a chat completion"),
    ],
)
def test_parse_completion_rejects_unusable_answers_as_retryable(body, fragment):
    with pytest.raises(LLMCallError) as info:
        parse_completion(200, body)
    assert info.value.kind == "invalid_response"
    assert info.value.retryable
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (429, "rate_limit", True),
        (408, "server", True),
        (409, "server", True),
        (500, "server", True),
        (502, "server", True),
        (503, "server", True),
        (400, "client", False),
        (401, "client", False),
        (403, "client", False),
        (404, "client", False),
        (422, "client", False),
    ],
)
def test_classify_status(status, kind, retryable):
    error = classify_status(status, b'{"error": {"message": "boom", "type": "t", "code": "c"}}')
    assert (error.kind, error.retryable, error.status, error.code) == (kind, retryable, status, "c")
    assert error.message.startswith(f"HTTP {status}: boom")


def test_client_errors_carry_the_api_message_and_a_hint():
    body = b'{"error": {"message": "The model `gpt-5x` does not exist", "code": "model_not_found"}}'
    error = classify_status(404, body)
    assert "The model `gpt-5x` does not exist" in error.message
    assert "fallback_models" in error.message
    assert error.code == "model_not_found"
    assert "API key" in classify_status(401, b"{}").message


def test_a_servers_default_status_page_is_not_repeated_after_the_status():
    error = classify_status(404, b"404: Not Found")  # aiohttp's and Starlette's page for a bad path
    assert error.message.startswith("HTTP 404: Not Found (")
    assert classify_status(500, b"").message == "HTTP 500: no body"


def test_classify_status_with_a_non_json_body_keeps_its_start():
    error = classify_status(502, b"<html>Bad gateway</html>")
    assert error.message == "HTTP 502: <html>Bad gateway</html>"
    assert error.code is None


def test_build_messages_orders_system_history_then_prompt():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert build_messages("next", "be brief", history) == [
        {"role": "system", "content": "be brief"},
        *history,
        {"role": "user", "content": "next"},
    ]


@pytest.mark.parametrize(
    ("prompt", "messages", "fragment"),
    [
        ("", None, "Nothing to send"),
        (None, [], "Nothing to send"),
        (None, [{"role": "user"}], "messages[0]"),
        ("x", ["not a dict"], "messages[0]"),
    ],
)
def test_build_messages_rejects_empty_or_malformed_input(prompt, messages, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        build_messages(prompt, None, messages)


def test_a_system_prompt_alone_is_nothing_to_send():
    with pytest.raises(ValueError, match="Nothing to send"):
        build_messages(None, "system only")


def test_build_payload_adds_the_model_and_keeps_unicode():
    body = build_payload({"messages": [{"role": "user", "content": "总结"}], "temperature": 0.2}, "gpt-4")
    assert json.loads(body) == {
        "messages": [{"role": "user", "content": "总结"}],
        "temperature": 0.2,
        "model": "gpt-4",
    }
    assert "总结".encode() in body


def test_endpoint_headers_carry_the_key_but_its_repr_does_not():
    endpoint = Endpoint(
        conn_id="c",
        base_url="http://x/v1/",
        api_key="sk-secret",
        organization="org-1",
        headers={"X-Team": "ai"},
    )
    assert endpoint.chat_url == "http://x/v1/chat/completions"
    headers = endpoint.request_headers()
    assert headers["Authorization"] == "Bearer sk-secret"
    assert headers["OpenAI-Organization"] == "org-1"
    assert headers["X-Team"] == "ai"
    assert "sk-secret" not in repr(endpoint)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_client_error_naming_where_it_points(status):
    with pytest.raises(LLMCallError) as info:
        parse_completion(status, b"", {"Location": "http://elsewhere.example/v1/chat/completions"})
    assert info.value.kind == "client" and not info.value.retryable and info.value.status == status
    assert "elsewhere.example" in info.value.message and "base URL" in info.value.message


# ---- a server that echoes the request: nothing it sends back keeps a secret ----------------------

KEY = "sk-live-0123456789abcdef"
SECRET_ENDPOINT = Endpoint(
    conn_id="c",
    api_key=KEY,
    organization="org-secret-9",
    headers={"api-key": 'azure"key-77', "X-Team": "ai"},
)


def _leaks(text: str) -> list[str]:
    """The secrets (or a start of one, 8 characters or more) that ``text`` still holds."""
    secrets = (KEY, "org-secret-9", 'azure"key-77', 'azure\\"key-77')
    return [s for s in secrets if s[:8] in text]


def test_the_endpoint_knows_its_secrets_and_its_repr_shows_none_of_them():
    secrets = SECRET_ENDPOINT.secrets
    assert set(secrets) == {KEY, "org-secret-9", 'azure"key-77', 'azure\\"key-77'}  # "ai" is too short
    assert _leaks(repr(SECRET_ENDPOINT)) == []


@pytest.mark.parametrize(
    "status, body",
    [
        (401, json.dumps({"error": {"message": f"bad key Bearer {KEY} for org-secret-9"}}).encode()),
        (500, json.dumps({"request": {"headers": {"api-key": 'azure"key-77'}}}).encode()),  # no message
        (502, f'<pre>Authorization: Bearer {KEY}\napi-key: azure"key-77</pre>'.encode()),
        (500, ("x" * 285 + f" Bearer {KEY}").encode()),  # the key straddles the 300-character cut
        (400, json.dumps({"error": {"message": "no", "code": KEY}}).encode()),  # in the code field
    ],
)
def test_an_error_body_echoing_the_request_is_redacted(status, body):
    error = classify_status(status, body, SECRET_ENDPOINT.secrets)
    assert _leaks(error.message) == [] and _leaks(str(error.code)) == []
    assert "***" in error.message + str(error.code)
    with pytest.raises(LLMCallError) as raised:
        parse_completion(status, body, {}, SECRET_ENDPOINT.secrets)
    assert _leaks(json.dumps(raised.value.to_dict())) == []


@pytest.mark.parametrize(
    "body",
    [
        f"not json, Bearer {KEY}".encode(),  # the invalid-JSON message quotes the body
        _answer(usage={"prompt_tokens": KEY}),  # the malformed-shape message quotes the bad value
    ],
)
def test_an_unusable_answer_echoing_the_key_is_redacted(body):
    with pytest.raises(LLMCallError) as raised:
        parse_completion(200, body, {}, SECRET_ENDPOINT.secrets)
    assert raised.value.kind == "invalid_response"
    assert _leaks(raised.value.message) == [] and "***" in raised.value.message


def test_an_answer_echoing_the_request_is_redacted_in_its_text_model_and_finish_reason():
    choice = {"message": {"content": f"you sent Bearer {KEY} and org-secret-9"}, "finish_reason": KEY}
    completion = parse_completion(200, _answer(model=KEY, choices=[choice]), {}, SECRET_ENDPOINT.secrets)
    assert completion.text == "you sent Bearer *** and ***"
    assert (completion.model, completion.finish_reason) == ("***", "***")


def test_a_redirect_to_a_location_holding_the_key_is_redacted():
    with pytest.raises(LLMCallError) as raised:
        parse_completion(302, b"", {"Location": f"http://evil/?k={KEY}"}, SECRET_ENDPOINT.secrets)
    assert _leaks(raised.value.message) == [] and "k=***" in raised.value.message


def test_a_long_server_message_is_cut_to_a_bounded_size():
    body = json.dumps({"error": {"message": "y" * 100_000}}).encode()
    assert len(classify_status(500, body).message) < 1100


# --- the error body's fields pick the hint (issue 12, item 4) ------------------------------------

AUTH_HINT = "check the password of the LLM connection"
MODEL_HINT = "check `model`/`fallback_models`"
CONTEXT_HINT = "context window"
PERMISSION_HINT = "may not use this model"
QUOTA_HINT = "budget is used up"
GENERIC_HINT = "its message says what to change"
LITELLM_BAD_MODEL = (
    "{'error': '/chat/completions: Invalid model name passed in model=gpt-5x. Call `/v1/models` to view "
    "available models for your key.'}"
)


def _error_body(**fields) -> bytes:
    return json.dumps({"error": {"message": "refused", **fields}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "hint", "fields"),
    [
        # LiteLLM's proxy: a wrong key with no key database; `code` is only the status again
        (400, _error_body(type="no_db_connection", param=None, code="400"), AUTH_HINT,
         (None, "no_db_connection", None)),
        (400, _error_body(type="auth_error", param=None, code="400"), AUTH_HINT, (None, "auth_error", None)),
        (401, _error_body(type="key_model_access_denied", param="model", code="401"), PERMISSION_HINT,
         (None, "key_model_access_denied", "model")),
        (400, _error_body(type="budget_exceeded", param=None, code="400"), QUOTA_HINT,
         (None, "budget_exceeded", None)),
        # LiteLLM's proxy, unknown model: nothing structured says so (str(None) fields), so no cause
        (400, json.dumps({"error": {"message": LITELLM_BAD_MODEL, "type": "None", "param": "None",
                                    "code": "400"}}).encode(), GENERIC_HINT, (None, None, None)),
        # OpenAI: the code names the cause, whatever the generic type
        (400, _error_body(type="invalid_request_error", param="messages", code="context_length_exceeded"),
         CONTEXT_HINT, ("context_length_exceeded", "invalid_request_error", "messages")),
        (400, _error_body(type="invalid_request_error", param="model", code="model_not_found"), MODEL_HINT,
         ("model_not_found", "invalid_request_error", "model")),
        (401, _error_body(type="invalid_request_error", code="invalid_api_key"), AUTH_HINT,
         ("invalid_api_key", "invalid_request_error", None)),
        # Anthropic-style types
        (404, _error_body(type="not_found_error"), MODEL_HINT, (None, "not_found_error", None)),
        (400, _error_body(type="authentication_error"), AUTH_HINT, (None, "authentication_error", None)),
        # vLLM: an integer code equal to the status, a type naming an exception class: no cause
        (400, json.dumps({"object": "error", "message": "This model's maximum context length is 2048 "
                          "tokens", "type": "BadRequestError", "param": None, "code": 400}).encode(),
         GENERIC_HINT, (None, "BadRequestError", None)),
        (400, b"<html>Bad Request</html>", GENERIC_HINT, (None, None, None)),
        (422, _error_body(type="invalid_request_error"), "check the request parameters",
         (None, "invalid_request_error", None)),
    ],
)  # fmt: skip
def test_the_error_bodys_code_and_type_pick_the_hint_and_are_kept(status, body, hint, fields):
    error = classify_status(status, body)
    assert error.kind == "client"
    assert hint in error.message
    others = {AUTH_HINT, MODEL_HINT, CONTEXT_HINT, PERMISSION_HINT, QUOTA_HINT, GENERIC_HINT} - {hint}
    assert [other for other in others if other in error.message] == []
    assert (error.code, error.type, error.param) == fields


def test_a_server_error_keeps_its_fields_but_gets_no_hint():
    # LiteLLM: its key database unreachable is a 503 of the same type as a missing one
    error = classify_status(503, _error_body(type="no_db_connection", param="None", code="503"))
    assert (error.kind, error.retryable, error.code, error.type, error.param) == (
        "server", True, None, "no_db_connection", None
    )  # fmt: skip
    assert error.message == "HTTP 503: refused"


def test_a_code_is_kept_unless_it_only_repeats_the_status():
    assert classify_status(400, _error_body(code="400")).code is None
    assert classify_status(400, _error_body(code=400)).code is None
    assert classify_status(400, _error_body(code="invalid_value")).code == "invalid_value"
    assert classify_status(400, _error_body(code=1234)).code == "1234"  # not the status: may mean something
    assert classify_status(400, _error_body(code={"nested": 1})).code is None


def test_the_error_dict_carries_type_and_param_and_old_dicts_still_load():
    error = classify_status(400, _error_body(type="invalid_request_error", param="messages", code="x"))
    stored = json.loads(json.dumps(error.to_dict()))
    assert stored == {
        "kind": "client", "status": 400, "code": "x", "type": "invalid_request_error", "param": "messages",
        "message": error.message,
    }  # fmt: skip
    again = LLMCallError.from_dict(stored)
    assert (again.kind, again.status, again.code, again.type, again.param) == (
        "client", 400, "x", "invalid_request_error", "messages"
    )  # fmt: skip
    old = LLMCallError.from_dict({"kind": "client", "status": 404, "code": "model_not_found", "message": "m"})
    assert (old.code, old.type, old.param) == ("model_not_found", None, None)
    assert old.to_dict()["type"] is None


def test_the_type_and_param_fields_are_redacted_and_bounded():
    error = classify_status(400, _error_body(type=f"auth {KEY}", param="p" * 500), SECRET_ENDPOINT.secrets)
    assert KEY not in json.dumps(error.to_dict()) and "***" in error.type
    assert len(error.param) <= 103


# ---- usage details and system_fingerprint (issue 12, item 5) -----------------------------------

_DETAILED_USAGE = {
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 192,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
    },
}


def test_cached_and_reasoning_tokens_and_the_system_fingerprint_are_kept():
    completion = parse_completion(200, _answer(usage=_DETAILED_USAGE, system_fingerprint="fp_50cad350e4"))
    assert completion.usage == {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306}
    assert completion.usage_details == {"cached_tokens": 1920, "reasoning_tokens": 192}
    assert completion.system_fingerprint == "fp_50cad350e4"


def test_an_answer_without_usage_details_reports_none_rather_than_zero():
    completion = parse_completion(200, _answer(usage={**_DETAILED_USAGE, "prompt_tokens_details": None,
                                                      "completion_tokens_details": {}}))  # fmt: skip
    assert completion.usage_details == {}
    assert completion.system_fingerprint is None
    assert parse_completion(200, _answer(usage=None)).usage_details == {}


@pytest.mark.parametrize(
    "details",
    [
        {"prompt_tokens_details": {"cached_tokens": "n/a"}},
        {"prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens_details": {"cached_tokens": 1.5}},
        {"prompt_tokens_details": {"cached_tokens": True}},
        {"prompt_tokens_details": {"cached_tokens": 5000}},  # more than the prompt
        {"prompt_tokens_details": [1]},
        {"completion_tokens_details": {"reasoning_tokens": -3}},
        {"completion_tokens_details": "many"},
    ],
)
def test_malformed_usage_details_are_an_unusable_answer_not_a_crash(details):
    with pytest.raises(LLMCallError) as info:
        parse_completion(200, _answer(usage={**_DETAILED_USAGE, **details}))
    assert info.value.kind == "invalid_response" and "shape of a chat completion" in info.value.message


def test_the_system_fingerprint_is_bounded_redacted_text_or_dropped():
    endpoint = Endpoint(conn_id="c", api_key="sk-secret-key")
    long = parse_completion(
        200, _answer(system_fingerprint="fp_" + "x" * 500 + "sk-secret-key"), secrets=endpoint.secrets
    )
    assert len(long.system_fingerprint) <= 104 and "sk-secret-key" not in long.system_fingerprint
    echoed = parse_completion(200, _answer(system_fingerprint="fp_sk-secret-key"), secrets=endpoint.secrets)
    assert echoed.system_fingerprint == "fp_***"
    assert parse_completion(200, _answer(system_fingerprint={"a": 1})).system_fingerprint is None


# ---- tool calls (issue 12, item 5) ------------------------------------------------------------------


def _tool_call(name: str = "get_weather") -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("content", [None, ""])
def test_an_answer_of_tool_calls_without_content_is_an_unusable_answer_naming_them(content):
    message = {"role": "assistant", "content": content, "tool_calls": [_tool_call(), _tool_call("lookup")]}
    body = _answer(choices=[{"index": 0, "message": message, "finish_reason": "tool_calls"}])
    with pytest.raises(LLMCallError) as info:
        parse_completion(200, body)
    assert info.value.kind == "invalid_response" and info.value.retryable
    assert "the model answered with tool calls (get_weather, lookup), which this operator does not run" in (
        info.value.message
    )


def test_tool_call_names_are_redacted_bounded_and_malformed_ones_are_no_crash():
    endpoint = Endpoint(conn_id="c", api_key="sk-secret-key")
    calls = [_tool_call("sk-secret-key"), _tool_call("x" * 500), {"function": None}, "garbage"]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    with pytest.raises(LLMCallError) as info:
        parse_completion(200, _answer(choices=[{"message": message}]), secrets=endpoint.secrets)
    assert "sk-secret-key" not in info.value.message and len(info.value.message) < 600
    assert info.value.kind == "invalid_response"


def test_content_next_to_tool_calls_is_still_the_answer():
    message = {"role": "assistant", "content": "It is sunny.", "tool_calls": [_tool_call()]}
    assert parse_completion(200, _answer(choices=[{"message": message}])).text == "It is sunny."


# ---- the cost a gateway reports (issue 12, item 5) ----------------------------------------------


@pytest.mark.parametrize(
    ("headers", "cost"),
    [
        ({"x-litellm-response-cost": "0.00472"}, 0.00472),
        ({"X-LiteLLM-Response-Cost": "4.72e-05"}, 4.72e-05),
        ({"x-litellm-response-cost": "None"}, None),
        ({"x-litellm-response-cost": ""}, None),
        ({"x-litellm-response-cost": "-1"}, None),
        ({"x-litellm-response-cost": "nan"}, None),
        ({"x-litellm-response-cost": "inf"}, None),
        ({"x-litellm-response-cost": "1e400"}, None),
        ({"x-litellm-response-cost": "cheap"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_the_cost_a_gateway_reports_is_read_or_dropped_never_a_failure(headers, cost):
    completion = parse_completion(200, _answer(), headers)
    assert completion.reported_cost_usd == cost


def test_a_reported_cost_of_zero_counts_only_for_an_answer_without_tokens():
    # LiteLLM sends 0.0 for a model it cannot price: an answer with tokens is not free.
    assert parse_completion(200, _answer(), {"x-litellm-response-cost": "0"}).reported_cost_usd is None
    no_tokens = _answer(usage={"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    assert parse_completion(200, no_tokens, {"x-litellm-response-cost": "0.0"}).reported_cost_usd == 0.0


def test_an_answer_of_tool_calls_keeps_what_it_was_billed():
    message = {"role": "assistant", "content": "", "tool_calls": [_tool_call()]}
    body = _answer(
        choices=[{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        usage={"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    )
    with pytest.raises(LLMCallError) as raised:
        parse_completion(200, body, {"x-litellm-response-cost": "1.35e-05"})
    billed = raised.value.billed
    assert billed is not None and billed.text == ""
    assert billed.usage == {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    assert billed.reported_cost_usd == 1.35e-05 and billed.model == "gpt-4-0613"
