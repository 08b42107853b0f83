"""The OpenAI Chat Completions wire protocol, without I/O.

Builds the JSON request, parses the JSON answer into a small :class:`Completion`, and
classifies failures by HTTP status and the error body's structured fields (never by
matching message text), so the trigger and the sync path share one set of rules.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_llm_async.core import breaker
from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.core.pricing import DEFAULT_PRICES, Price
from airflow_llm_async.core.retry import DEFAULT_RATE_LIMIT_PATIENCE_S

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Chat answers are kilobytes; a body past this is a broken or hostile server (connection extra
# max_response_bytes raises it).
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 1000

# What the server sends back (error bodies, answers) can echo the request's key and headers; they
# are replaced by this before the text is stored or logged. Shorter values are not secrets (Airflow's
# masker skips them too: [logging] min_length_masked_secret).
REDACTED = "***"
MIN_SECRET_LENGTH = 5
# Server text kept in an error message: enough to diagnose, bounded for XCom and logs.
MAX_SERVER_TEXT = 1000

# Statuses worth another try on the same model: timeouts, conflicts, rate limits, server errors.
RETRYABLE_STATUSES = frozenset({408, 409, 429})

# What the user should fix after a client error, by cause.
_HINTS = {
    "auth": "the API key was rejected; check the password of the LLM connection",
    "permission": "the API key may not use this model or endpoint; check the key's permissions",
    "model": "the model or endpoint does not exist; check `model`/`fallback_models` and the connection's "
    "base URL (host)",
    "context": "the prompt and max_tokens do not fit the model's context window; shorten the prompt, "
    "lower max_tokens or choose a model with a larger window",
    "quota": "the key's budget is used up; raise it at the provider or gateway",
    "rejected": "the server rejected the request; its message says what to change",
    "unprocessable": "the server could not process the request; check the request parameters for this model",
}
# The cause a status alone names. A bare 400 names none (gateways answer it for a bad key and an unknown
# model alike), so its hint only points to the server's message.
_CLIENT_ERROR_HINTS = {400: "rejected", 401: "auth", 403: "permission", 404: "model", 422: "unprocessable"}
# The causes the error body's `code` (first) or `type` name: OpenAI's codes, the types of Anthropic-style
# APIs, and those of LiteLLM's proxy (ProxyErrorTypes; with no database, a key that is not its master key
# gets no_db_connection). Anything else falls back to the status.
_FIELD_CAUSES = {
    "invalid_api_key": "auth",
    "authentication_error": "auth",
    "auth_error": "auth",
    "no_db_connection": "auth",
    "token_not_found_in_db": "auth",
    "expired_key": "auth",
    "permission_error": "permission",
    "key_model_access_denied": "permission",
    "team_model_access_denied": "permission",
    "user_model_access_denied": "permission",
    "org_model_access_denied": "permission",
    "model_not_found": "model",
    "not_found_error": "model",
    "context_length_exceeded": "context",
    "budget_exceeded": "quota",
}
# What a gateway writes where it has no value: LiteLLM's proxy sends str(None).
_NO_VALUE = frozenset({"", "None", "null"})


@dataclass(frozen=True)
class Endpoint:
    """A resolved LLM connection. Holds the API key, so it is never serialized or logged."""

    conn_id: str
    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)
    organization: str | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold keys (api-key: ...)
    timeout: float = 600.0
    default_model: str | None = None
    # Calls in flight per triggerer process, each on its own socket: a fan-out of thousands of items
    # must not open thousands of sockets at once. The openai client's pool has the same default.
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_retries: int | None = None
    # Seconds the last link of a chain keeps retrying 429s, from its first (core/retry.py); 0: counted.
    rate_limit_patience_s: float = DEFAULT_RATE_LIMIT_PATIENCE_S
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # a larger answer is not read
    # Shared request/token buckets across triggerer hosts, e.g. redis://host:6379/0 (may hold a password).
    rate_limit_backend: str | None = field(default=None, repr=False)
    # Where answers of calls with cache_ttl are kept: a Redis URL shared by every host (may hold a
    # password), or None for this process's own bounded cache (cache_store.py).
    cache_backend: str | None = field(default=None, repr=False)
    # USD per million tokens by model: the defaults, the prices file, the connection's `prices` extra.
    prices: Mapping[str, Price] = field(default_factory=lambda: DEFAULT_PRICES, repr=False)
    # Per model on this connection (core/breaker.py); None: the extra `circuit_breaker: false` turned it off.
    circuit_breaker: breaker.BreakerConfig | None = breaker.DEFAULT
    # The connection's spending limit per UTC day or month, across calls (core/budget.py); None: none.
    budget_usd: BudgetConfig | None = None

    @functools.cached_property
    def secrets(self) -> tuple[str, ...]:
        """The texts to redact from what the server sends back: the key, organization and header values."""
        values = {self.api_key, self.organization or "", *self.headers.values()}
        # As sent, and as a JSON string would carry them (an echoed request body escapes quotes).
        values |= {json.dumps(value)[1:-1] for value in values}
        # Longest first, so a secret that contains another is replaced whole.
        return tuple(sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True))

    @property
    def chat_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"

    @functools.cached_property
    def chat_headers(self) -> Mapping[str, str]:
        """:meth:`request_headers`, built once per endpoint for the chat requests, which only read them
        (aiohttp copies them into each request). A resolved endpoint serves its connection's calls until
        the connection is looked up again."""
        return self.request_headers()

    def request_headers(self) -> dict[str, str]:
        headers = {**self.headers, "Content-Type": "application/json", "Accept": "application/json"}
        headers["Authorization"] = f"Bearer {self.api_key}"
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        return headers


@dataclass(frozen=True)
class Completion:
    """The parts of a chat completion that the operators use."""

    text: str
    model: str
    finish_reason: str | None
    usage: dict[str, int]
    # What the answer's usage details report, only those it reports: cached_tokens (of prompt_tokens)
    # and reasoning_tokens (of completion_tokens).
    usage_details: dict[str, int] = field(default_factory=dict)
    system_fingerprint: str | None = None  # the backend configuration that answered (OpenAI's fp_...)
    # What the server says the answer cost, in USD (a gateway's header: LiteLLM's x-litellm-response-cost).
    reported_cost_usd: float | None = None


class LLMCallError(Exception):
    """A failed attempt, classified so the retry policy can decide without parsing messages.

    ``kind`` is one of: ``rate_limit``, ``server``, ``timeout``, ``connection``,
    ``invalid_response`` (retryable), or ``client``, ``config``, ``deadline``, ``quality``,
    ``budget``, ``circuit_open``, ``batch`` (the Batch API did not answer the item; not retryable).
    """

    RETRYABLE_KINDS = frozenset({"rate_limit", "server", "timeout", "connection", "invalid_response"})

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type_: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        # The error body's own fields (redacted): code, e.g. model_not_found; type, e.g. auth_error;
        # param, the request field at fault.
        self.code = code
        self.type = type_
        self.param = param
        # The answer's headers, when there was an answer: the retry policy reads retry-after from them.
        self.headers: Mapping[str, str] | None = None
        # An answer that could not be used but was billed (tool calls and no text): what it cost counts.
        self.billed: Completion | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in self.RETRYABLE_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "status": self.status,
            "code": self.code,
            "type": self.type,
            "param": self.param,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LLMCallError:
        """The error an event carries (``to_dict``, or an older one without type and param)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("kind"), str):
            raise ValueError(f"an LLM error must be a dict with 'kind' and 'message', got {data!r:.200}")
        return cls(
            data["kind"],
            str(data.get("message")),
            status=data.get("status"),
            code=data.get("code"),
            type_=data.get("type"),
            param=data.get("param"),
        )


def build_messages(
    prompt: str | None, system_prompt: str | None = None, messages: list[dict] | None = None
) -> list[dict[str, Any]]:
    """Compose the message list: system prompt, then ``messages``, then ``prompt`` as the last user turn."""
    result: list[dict[str, Any]] = []
    if system_prompt:
        result.append({"role": "system", "content": system_prompt})
    for index, message in enumerate(messages or []):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content' keys, got {message!r:.200}"
            )
        result.append(message)
    if prompt:
        result.append({"role": "user", "content": prompt})
    if not result or all(m.get("role") == "system" for m in result):
        raise ValueError("Nothing to send: the rendered `prompt` and `messages` are both empty.")
    return result


def build_payload(request: dict[str, Any], model: str) -> bytes:
    """The POST body for one attempt: the model-independent ``request`` plus the model."""
    return json.dumps({**request, "model": model}, ensure_ascii=False).encode()


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _server_text(text: str, secrets: Sequence[str], limit: int = MAX_SERVER_TEXT) -> str:
    """Text the server chose, fit to store: redacted first (so no cut leaves part of a key), then cut."""
    text = redact(text, secrets)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _body_start(body: bytes, secrets: Sequence[str], limit: int) -> str:
    # Decoded past the limit, so a secret that straddles the cut is still recognised and redacted.
    return _server_text(body[: limit + 4096].decode("utf-8", "replace").strip(), secrets, limit)


def classify_status(status: int, body: bytes, secrets: Sequence[str] = ()) -> LLMCallError:
    """Turn a non-2xx answer into an :class:`LLMCallError` carrying the API's own message and fields.

    A client error's hint comes from the body's ``code`` or ``type`` when they name the cause, else
    from the status; a ``code`` that only repeats the status (LiteLLM's proxy sends that) is dropped.
    """
    error = _error_fields(body)
    message = error.get("message")
    api_message = _server_text(str(message), secrets) if message else _body_start(body, secrets, 300)
    code, type_, param = (_field(error.get(name), secrets) for name in ("code", "type", "param"))
    if code == str(status):
        code = None
    if status == 429:
        kind = "rate_limit"
    elif status in RETRYABLE_STATUSES or status >= 500:
        kind = "server"
    else:
        kind = "client"
    # A server's default page for a status ("404: Not Found") says nothing the status does not.
    api_message = api_message.removeprefix(f"{status}:").strip()
    message = f"HTTP {status}: {api_message or 'no body'}"
    cause = _cause(status, code, type_) if kind == "client" else None
    if cause:
        message = f"{message} ({_HINTS[cause]})"
    return LLMCallError(kind, message, status=status, code=code, type_=type_, param=param)


def _cause(status: int, code: str | None, type_: str | None) -> str | None:
    for field_value in (code, type_):
        if field_value and field_value.lower() in _FIELD_CAUSES:
            return _FIELD_CAUSES[field_value.lower()]
    return _CLIENT_ERROR_HINTS.get(status)


def _field(value: Any, secrets: Sequence[str]) -> str | None:
    """An error body's code, type or param as stored: text, redacted and cut, or None when it has none."""
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return None if text in _NO_VALUE else _server_text(text, secrets, 100)


def redirect_error(
    status: int, headers: Mapping[str, str] | None, secrets: Sequence[str] = ()
) -> LLMCallError:
    """A redirect is not followed: it would carry the key, the headers and the prompt to another host."""
    location = _header(headers, ("location",))
    return LLMCallError(
        "client",
        f"HTTP {status}: the server redirects to {_server_text(str(location), secrets, 200)!r}; "
        f"LLM calls do not follow "
        f"redirects (they would send the API key and the prompt there): set the connection's base URL "
        f"(host) to the address that answers",
        status=status,
    )


def parse_completion(
    status: int, body: bytes, headers: Mapping[str, str] | None = None, secrets: Sequence[str] = ()
) -> Completion:
    """Parse one HTTP answer; raise :class:`LLMCallError` for anything but a usable completion.

    Every text taken from the answer (its content included) has ``secrets`` redacted: a server may echo
    the request, and what this returns goes to XCom and logs.
    """
    if 300 <= status < 400:
        raise redirect_error(status, headers, secrets)
    if not 200 <= status < 300:
        raise classify_status(status, body, secrets)
    try:
        data = json.loads(body)
    except ValueError:
        raise LLMCallError(
            "invalid_response",
            f"HTTP {status}: the answer is not valid JSON: {_body_start(body, secrets, 120)!r}",
            status=status,
        ) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices:
        raise LLMCallError("invalid_response", "the answer has no choices", status=status)
    try:
        return _completion(data, choices, status, secrets, headers)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        # A malformed answer is a failed attempt (retried, then the fallback chain), never a crash.
        raise LLMCallError(
            "invalid_response",
            f"HTTP {status}: the answer does not have the shape of a chat completion "
            f"({type(exc).__name__}: {_server_text(str(exc), secrets, 120)})",
            status=status,
        ) from None


def _completion(
    data: dict[str, Any],
    choices: Any,
    status: int,
    secrets: Sequence[str],
    headers: Mapping[str, str] | None = None,
) -> Completion:
    choice = choices[0]
    message = choice.get("message") or {}
    text = message.get("content")
    if not text and message.get("tool_calls"):
        error = _tool_calls_error(message["tool_calls"], status, secrets)
        error.billed = _completion_of(data, choice, "", secrets, headers)  # unusable, but paid for
        raise error
    if text is None:
        # A model-side refusal comes back as message.refusal with no content.
        text = message.get("refusal")
        if not text:
            raise LLMCallError("invalid_response", "the answer's first choice has no content", status=status)
    if not isinstance(text, str):
        raise LLMCallError("invalid_response", "the answer's content is not text", status=status)
    return _completion_of(data, choice, redact(text, secrets), secrets, headers)


def _completion_of(
    data: dict[str, Any], choice: Any, text: str, secrets: Sequence[str], headers: Mapping[str, str] | None
) -> Completion:
    """The answer's text (already redacted) with its model, usage and cost."""
    model = data.get("model") or ""
    finish_reason = choice.get("finish_reason")
    if not isinstance(model, str) or not isinstance(finish_reason, str | None):
        raise TypeError("model and finish_reason must be text")
    usage = data.get("usage") or {}
    counts = {
        key: _token_count(usage.get(key)) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    fingerprint = data.get("system_fingerprint")
    cost = _reported_cost(headers)
    if cost == 0 and (counts["prompt_tokens"] or counts["completion_tokens"]):
        cost = None  # LiteLLM reports 0.0 for a model it cannot price: tokens are not free, use the table
    return Completion(
        text=text,
        model=_server_text(model, secrets, 200),
        finish_reason=finish_reason and _server_text(finish_reason, secrets, 100),
        usage=counts,
        usage_details=_usage_details(usage, counts["prompt_tokens"]),
        system_fingerprint=_server_text(fingerprint, secrets, 100) if isinstance(fingerprint, str) else None,
        reported_cost_usd=cost,
    )


# The headers in which a gateway reports what an answer cost, in USD.
COST_HEADERS = ("x-litellm-response-cost",)


def _reported_cost(headers: Mapping[str, str] | None) -> float | None:
    """The cost the server reports for the answer; None when it reports none or nothing usable."""
    value = _header(headers, COST_HEADERS)
    if value is None:
        return None
    try:
        cost = float(value)
    except (TypeError, ValueError):  # LiteLLM sends "None" when it could not price the answer
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


def _header(headers: Mapping[str, str] | None, names: Sequence[str]) -> str | None:
    """The value of the first header named one of ``names`` (lowercase), whatever its case."""
    return next((value for name, value in (headers or {}).items() if name.lower() in names), None)


def _tool_calls_error(calls: Any, status: int, secrets: Sequence[str]) -> LLMCallError:
    """An answer of tool calls and no text: nothing to return, and running tools is not this call's job."""
    names = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        names.append(_server_text(name, secrets, 60) if isinstance(name, str) else "?")
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return LLMCallError(
        "invalid_response",
        f"HTTP {status}: the model answered with tool calls ({shown or '?'}), which this operator does "
        "not run; it makes one chat completion and returns its text. Ask for the answer itself: remove "
        "tools, tool_choice or functions from extra_body, or use a model or gateway that does not add tools",
        status=status,
    )


# Where a usage detail sits in the answer: (the usage field, the detail's name).
_USAGE_DETAILS = (
    ("prompt_tokens_details", "cached_tokens"),
    ("completion_tokens_details", "reasoning_tokens"),
)


def _usage_details(usage: dict[str, Any], prompt_tokens: int) -> dict[str, int]:
    """The usage details the answer reports (absent or null: left out, not 0), as token counts."""
    details = {}
    for group, name in _USAGE_DETAILS:
        values = usage.get(group) or {}
        if not isinstance(values, dict):
            raise TypeError(f"usage.{group} must be an object")
        if values.get(name) is not None:
            details[name] = _token_count(values[name])
    if details.get("cached_tokens", 0) > prompt_tokens:  # it would price the prompt below zero
        raise ValueError(f"{details['cached_tokens']} cached tokens of a {prompt_tokens}-token prompt")
    return details


def _token_count(value: Any) -> int:
    """A usage field: a whole number >= 0 (absent or null: 0); anything else is a malformed answer."""
    if value is None:
        return 0
    count = int(value)  # OverflowError for Infinity, ValueError for NaN or text
    if count < 0 or isinstance(value, bool) or count != value:
        raise ValueError(f"a token count of {value!r}")
    return count


def _error_fields(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    if isinstance(data, dict) and data.get("object") == "error":  # older vLLM: the fields at the top
        return data
    return {}
