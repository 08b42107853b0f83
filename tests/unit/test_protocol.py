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
