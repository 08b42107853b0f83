"""An embedded OpenAI-compatible fake server for tests, benchmarks and demos.

It answers ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{model}`` with the
shapes of the real API, so the official ``openai`` client can talk to it. Answers are deterministic:
they are derived from the system prompt and the last user message, read like text, quote a short
excerpt of the input, and are Chinese when the prompt contains CJK characters, English otherwise.
No real API key is needed, but every ``/v1`` request must carry ``Authorization: Bearer <key>``; if
the server was given ``api_key``, any other key gets a 401. The key is never logged nor echoed.

The server only binds to loopback addresses: it has no real authentication and must never be
reachable from a network.

Scripted faults
---------------
A fault applies to a chat request when the request carries the header ``x-fake-fault: <spec>``, or,
without that header, when the server has a rule for the request's model (``faults={"gpt-4": "503"}``,
CLI ``--fault gpt-4=503``, ``POST /_fake/faults`` at runtime; the model ``*`` matches every model
without a rule of its own). The header wins over the model's rule. A spec is::

    KIND[*COUNT][%PERCENT]

``KIND`` is one of

* ``429`` - rate limited, with ``retry-after`` (seconds) and ``retry-after-ms`` headers;
* ``429gateway`` - a gateway's per-model rate limit the way LiteLLM's proxy answers it: status 429,
  ``"code": "429"``, and only ``llm_provider-retry-after`` (whole seconds of ``retry_after_ms``,
  at least 1): no ``retry-after``;
* ``500``, ``502``, ``503`` - server errors; ``401`` - invalid API key; ``404`` - model not found;
  ``400`` - context length exceeded;
* ``400auth``, ``400model`` - a rejected key and an unknown model the way LiteLLM's proxy answers
  them: status 400, ``"code": "400"`` (the status again), and only ``type`` telling them apart
  (``no_db_connection`` for the key; the string ``"None"`` for the model, ``param`` too);
* ``malformed`` - status 200 with a truncated JSON body;
* ``garbled`` - status 200, valid JSON in the wrong shape (``usage.prompt_tokens: "n/a"``, a
  choice that is a string), as a broken gateway may send;
* ``empty`` - status 200 with ``"choices": []``;
* ``tool_calls`` - status 200, ``content`` null and one ``tool_calls`` entry (``get_weather``),
  ``finish_reason`` ``"tool_calls"``: what a model that was given tools (by a gateway, or
  ``extra_body``) answers instead of text;
* ``refusal`` - status 200, the answer is an apology ("抱歉...错误..." for Chinese prompts, "Sorry, ..."
  for English ones) long enough to trip only the refusal check;
* ``short`` - status 200, an answer shorter than 50 characters;
* ``length`` - status 200, a truncated answer with ``finish_reason`` ``"length"``;
* ``redirect`` - status 307 to ``http://127.0.0.1:9/v1/chat/completions`` (where nothing listens),
  as a moved or hijacked endpoint may send;
* ``endless`` - status 200 and a body that never ends (64 KiB chunks until the client hangs up);
* ``echo`` - status 500 with a plain-text body that repeats the request line and every request
  header (``Authorization`` included), as a misconfigured debugging proxy or gateway may send;
* ``stall`` - never answers, until the client disconnects or the server shuts down;
* ``none`` - no fault (a header that overrides the model's rule for one request).

``*COUNT`` limits the fault to the first COUNT matching requests (``503*2``: two 503s, then
answers). ``%PERCENT`` applies it to that share of matching requests, drawn from a
``random.Random(seed)``, so a sequential run is reproducible. Counts are kept server-side per rule:
per model for model rules, per spec string for header rules (sending ``x-fake-fault: 503*2`` on
every request gives two 503s in total).

Test-control API (no auth)
--------------------------
* ``GET /_fake/stats`` - requests and in_flight (all ``/v1`` requests), max_in_flight, held,
  by_model (chat requests), by_status, faults_applied, connections (that carried a request),
  stale_resets and batches (both below). A request cut short by a client disconnect or by shutdown
  counts as status ``499``.
* ``GET /_fake/faults`` - the model rules as ``{model: spec}``; ``POST /_fake/faults`` with
  ``{"gpt-4": "503*2", "gpt-3.5-turbo": null}`` sets rules (``null`` clears) and returns them.
* ``POST /_fake/hold`` - every following chat request waits, after validation and before its
  latency and answer, until ``POST /_fake/release``.
* ``GET /_fake/batches`` - the batch settings (below); ``POST /_fake/batches`` with some of them,
  e.g. ``{"batch_expire_after": 0.5}``, changes them for the batches created from then on.
* ``POST /_fake/reset`` - back to the start-up state: counters, start-up fault rules (re-armed),
  header rule counts, random seed, open gate, batch settings; files and batches are forgotten.

Rate limits per model
---------------------
``rate_limits={"gpt-4": RateLimit(requests=5, tokens=None, window=2.0)}`` gives a model a budget
per window: the window opens with the model's first request and lasts ``window`` seconds; a request
counts one request and its prompt tokens plus its ``max_tokens`` (as OpenAI's limiter counts them).
A request the budget cannot take is answered 429 at once, as OpenAI does: ``type`` ``"requests"``
or ``"tokens"``, code ``rate_limit_exceeded``, ``retry-after``/``retry-after-ms`` until the
window ends. With ``rate_limit_headers`` (the default) every answer of the model, 429s included,
carries OpenAI's ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*``
(``requests``, and ``tokens`` when limited; the reset in OpenAI's format: ``350ms``, ``1.5s``,
``1m0s``); ``rate_limit_headers=False`` sends none, as a server that does not report them.
``POST /_fake/reset`` closes every window.

Idle keep-alive connections
---------------------------
Like uvicorn (LiteLLM, vLLM), the server gives up a keep-alive connection after ``keepalive_timeout``
idle seconds (default 5). A request sent on it after that is reset unanswered (stats
``stale_resets``; it reaches no handler and no counter): what a client meets when its request
crosses the server's close on the wire. The socket itself is closed ``CLOSE_LAG_S`` (1 s) later,
so until then a client pool cannot see that the connection is gone: on loopback a real close
reaches the client at once and the race is hard to hit, here it is hit every time.
``keepalive_timeout=None`` keeps idle connections open.

Usage details
-------------
Every answer's ``usage`` carries ``prompt_tokens_details`` and ``completion_tokens_details`` as
OpenAI's do, and the answer a ``system_fingerprint``. Like OpenAI's prompt caching, a prompt of
1,024 tokens or more sent again (same model and messages) reports ``cached_tokens``: the prompt's
tokens rounded down to a multiple of 128. ``reasoning_tokens`` is always 0. ``POST /_fake/reset``
forgets the prompts seen.

Files and Batches
-----------------
OpenAI's Batch API for chat completions (the code is in ``fake_batches``): ``POST /v1/files``
(multipart, read as a stream; purpose ``batch`` needs a ``.jsonl`` name), ``GET`` and ``DELETE
/v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST /v1/batches`` (endpoint
``/v1/chat/completions``, window ``24h``, metadata), ``GET /v1/batches/{id}``, ``GET
/v1/batches?limit=N&after=ID`` (newest first) and ``POST /v1/batches/{id}/cancel``, in OpenAI's shapes.
Each input line is answered once, by the chat endpoint's code: the same answer for the same body, the
model's fault rule drawn per line (``{"gpt-4": "503%20"}``: about a fifth of the lines in the error
file; ``short``, ``refusal``...: 200 lines with such content; ``stall``, ``endless``, ``redirect``,
``echo``, ``malformed``: 500 lines), no latency, hold or rate limit.

A batch's state is computed from the clock when it is looked at: ``validating`` for the first 10 % of
``batch_processing_s`` (default 1), ``in_progress`` until 90 % (lines answered in proportion to the
time passed), ``finalizing``, ``completed``. ``batch_expire_after`` (a share 0-1; default None, never)
expires it once that share of its lines is answered; a cancel while validating or in progress makes it
``cancelling``, ``cancelled`` 10 % later. Either way the lines not answered are in the error file as
``batch_expired`` or ``batch_cancelled``. Validation fails a batch, with errors naming the lines, for a
line that is not JSON, lacks custom_id/method/url/body, repeats a custom_id, or names another URL or
model; for more than ``batch_max_requests`` lines (default 50,000: ``too_many_tasks``); and, with
``batch_fail_validation``, always (``token_limit_exceeded``). A batch upload over
``batch_max_file_bytes`` (default 200 MiB) is refused: 400 ``File is too large.``.
``batch_download_failures`` (default 0) answers the next N ``GET /v1/files/{id}/content`` a 500
(``server_error``), whatever the file, counting down (it applies at once, not per batch);
``batch_retrieve_failures`` (default 0) does the same to the next N ``GET /v1/batches/{id}`` (not the
list, not a cancel). The settings
are ``create_app`` keyword arguments, CLI flags (``--batch-processing-s`` ...) and ``/_fake/batches``.
Stats ``batches``: files_uploaded, batches_created, batches_cancelled, lines_answered, lines_failed
(answered other than 200), lines_answered_twice (answered although an earlier batch had already
answered the same custom_id and body with 200: a retried failed line is not one), downloads_failed,
retrieves_failed, files_stored (uploaded and output files not deleted).

Run it standalone with ``airflow-llm-fake-server --port 0`` (or ``python -m
airflow_llm_async.testing.fake_server``); it prints ``fake LLM server listening on <base_url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import re
import signal
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from airflow_llm_async.testing.fake_batches import (
    DEFAULT_BATCH_MAX_FILE_BYTES,
    DEFAULT_BATCH_MAX_REQUESTS,
    ApiError,
    BatchSettings,
    BatchStore,
)

logger = logging.getLogger(__name__)

DEFAULT_MODELS: tuple[str, ...] = ("gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "fake-model")
DEFAULT_PORT = 8089
DEFAULT_RETRY_AFTER_MS = 200
FAULT_HEADER = "x-fake-fault"
LATENCY_HEADER = "x-fake-latency"
ANY_MODEL = "*"
ERROR_KINDS = ("400", "400auth", "400model", "401", "404", "429", "429gateway", "500", "502", "503")
FAULT_KINDS = (*ERROR_KINDS, "malformed", "garbled", "empty", "tool_calls", "refusal", "short", "length",
               "redirect", "endless", "echo", "stall", "none")  # fmt: skip
REDIRECT_TARGET = "http://127.0.0.1:9/v1/chat/completions"
# Faults whose answer is no JSON body to write into a batch output file: a batch line gets a 500.
_NOT_IN_A_FILE = frozenset({"stall", "endless", "redirect", "echo", "malformed"})
# OpenAI caches prompts from this length on (platform.openai.com/docs/guides/prompt-caching).
PROMPT_CACHE_MIN_TOKENS = 1024
# uvicorn's default (timeout_keep_alive), which LiteLLM and vLLM serve with.
DEFAULT_KEEPALIVE_TIMEOUT = 5.0
# How long after the idle timeout the socket really closes: the window in which a client still
# reuses the connection and gets it reset (the module docstring says why it is this wide).
CLOSE_LAG_S = 1.0

# A fixed creation time keeps /v1/models answers identical from run to run.
_MODEL_CREATED = 1_700_000_000
_CONTEXT_WINDOW = 8192
_INCORRECT_KEY = (
    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
)
_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_REFUSAL_MARKERS = {"错误": "差错", "抱歉": "遗憾"}  # quoted input must not trip the quality checks
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_SPEC_RE = re.compile(r"(?P<kind>[a-z0-9_]+)(?:\*(?P<count>\d+))?(?:%(?P<percent>\d+(?:\.\d+)?))?")
_STOPWORDS = frozenset(
    "this that with from have will would could should there their about what which when where your "
    "into than then them they these those been were also just only some such please text following "
    "summarize summarise summary analyze analyse analysis write give make sentence sentences".split()
)
_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


# --- fault rules ------------------------------------------------------------------------------


@dataclass
class FaultRule:
    """A parsed fault spec; ``remaining`` and the shared RNG make it fire a bounded or random share."""

    spec: str
    kind: str
    remaining: int | None = None
    probability: float | None = None

    def fires(self, rng: random.Random) -> bool:
        if self.kind == "none" or (self.remaining is not None and self.remaining <= 0):
            return False
        if self.probability is not None and rng.random() >= self.probability:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


def parse_fault_spec(spec: str) -> FaultRule:
    """Parse ``KIND[*COUNT][%PERCENT]``; raise ValueError with a readable message if it is not one."""
    match = _SPEC_RE.fullmatch(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None or match["kind"] not in FAULT_KINDS:
        raise ValueError(
            f"invalid fault spec {spec!r}: expected KIND[*COUNT][%PERCENT], KIND one of {FAULT_KINDS}"
        )
    count = int(match["count"]) if match["count"] else None
    if count is not None and count < 1:
        raise ValueError(f"invalid fault spec {spec!r}: COUNT must be at least 1")
    probability = float(match["percent"]) / 100 if match["percent"] else None
    if probability is not None and probability > 1:
        raise ValueError(f"invalid fault spec {spec!r}: PERCENT must be between 0 and 100")
    return FaultRule(spec=spec.strip(), kind=match["kind"], remaining=count, probability=probability)


def _check_rate_limits(
    rate_limits: dict[str, RateLimit] | None, models: tuple[str, ...]
) -> dict[str, RateLimit]:
    for model, limit in (rate_limits or {}).items():
        if model not in models:
            raise ValueError(f"rate limit for unknown model {model!r}; known models are {list(models)}")
        if not isinstance(limit, RateLimit):
            raise ValueError(f"rate limit for {model!r} must be a RateLimit, got {type(limit).__name__}")
    return dict(rate_limits or {})


def _parse_rules(faults: dict[str, str] | None, models: tuple[str, ...]) -> dict[str, FaultRule]:
    rules = {}
    for model, spec in (faults or {}).items():
        # A rule for a model the server rejects with 404 would never fire: catch the typo instead.
        if model != ANY_MODEL and model not in models:
            raise ValueError(f"fault rule for unknown model {model!r}; known models are {list(models)}")
        rules[model] = parse_fault_spec(spec)
    return rules


# --- rate limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """A model's budget per window (module docstring): requests and/or tokens per ``window`` seconds."""

    requests: int | None = None
    tokens: int | None = None
    window: float = 60.0

    def __post_init__(self) -> None:
        for name in ("requests", "tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"RateLimit {name} must be an integer >= 1 or None, got {value!r}")
        if self.requests is None and self.tokens is None:
            raise ValueError("a RateLimit needs requests, tokens or both")
        if not (math.isfinite(self.window) and self.window > 0):
            raise ValueError(f"RateLimit window must be seconds > 0, got {self.window!r}")


@dataclass
class _Window:
    ends: float
    requests: int = 0
    tokens: int = 0


def _duration(seconds: float) -> str:
    """Seconds the way OpenAI writes a reset: ``350ms``, ``1.5s``, ``1m0s``."""
    # Rounded up: a client that waits the reset it is told must not arrive before the window ends.
    millis = max(0, math.ceil(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms"
    minutes, rest = divmod(millis, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


# --- server state -----------------------------------------------------------------------------


@dataclass
class _State:
    models: tuple[str, ...]
    latency: float
    api_key: str | None
    seed: int
    retry_after_ms: int
    initial_faults: dict[str, str]
    keepalive_timeout: float | None = None
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)
    rate_limit_headers: bool = True
    windows: dict[str, _Window] = field(default_factory=dict)  # each rate-limited model's open window
    rules: dict[str, FaultRule] = field(default_factory=dict)
    header_rules: dict[str, FaultRule] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    # Set whenever a counter moves, so FakeLLMServer.wait_for needs no polling.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Handler tasks waiting indefinitely (stall, hold): cancelled on shutdown so it never blocks.
    parked: set[asyncio.Task[Any]] = field(default_factory=set)
    closing: bool = False
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    held: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    faults_applied: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    stale_resets: int = 0
    # Digests of the prompts answered, for prompt caching (cached_tokens).
    prompts_seen: set[str] = field(default_factory=set)
    # When each open connection last finished a request (loop time), to tell a stale one when reused.
    idle_since: weakref.WeakKeyDictionary[Any, float] = field(default_factory=weakref.WeakKeyDictionary)
    batches: BatchStore | None = None  # the Files and Batches APIs (create_app sets it)

    def reset(self) -> None:
        """Back to the start-up configuration; requests still running keep being counted in flight."""
        self.rules = _parse_rules(self.initial_faults, self.models)
        self.header_rules.clear()
        self.rng.seed(self.seed)
        self.gate.set()
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.connections = self.stale_resets = 0
        self.prompts_seen.clear()
        self.windows.clear()
        for counter in (self.by_model, self.by_status, self.faults_applied):
            counter.clear()
        if self.batches is not None:
            self.batches.reset()

    def set_fault(self, model: str, spec: str | None) -> None:
        if spec is None:
            self.rules.pop(model, None)
        else:
            self.rules.update(_parse_rules({model: spec}, self.models))

    def faults(self) -> dict[str, str]:
        return {model: rule.spec for model, rule in self.rules.items()}

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "held": self.held,
            "by_model": dict(self.by_model),
            "by_status": dict(self.by_status),
            "faults_applied": dict(self.faults_applied),
            "connections": self.connections,
            "stale_resets": self.stale_resets,
            "batches": self.batches.snapshot() if self.batches is not None else {},
        }

    def pick_fault(self, header_spec: str | None, model: str) -> str | None:
        """The fault kind for this request, or None. Raises ValueError for a bad header spec."""
        if header_spec is not None:
            rule = self.header_rules.get(header_spec)
            if rule is None:
                rule = self.header_rules[header_spec] = parse_fault_spec(header_spec)
        else:
            rule = self.rules.get(model) or self.rules.get(ANY_MODEL)
        if rule is None or not rule.fires(self.rng):
            return None
        self.faults_applied[rule.kind] += 1
        return rule.kind

    def admit(self, chat: _Chat) -> web.Response | None:
        """Count a request against its model's budget; the 429 when the budget cannot take it."""
        limit = self.rate_limits.get(chat.model)
        if limit is None:
            return None
        now = time.monotonic()
        window = self.windows.get(chat.model)
        if window is None or now >= window.ends:
            window = self.windows[chat.model] = _Window(now + limit.window)
        cost = chat.prompt_tokens + (chat.max_tokens or 0)
        if limit.requests is not None and window.requests >= limit.requests:
            return self._over_budget(chat.model, "requests", limit.requests, window.requests, 1)
        if limit.tokens is not None and window.tokens + cost > limit.tokens:
            return self._over_budget(chat.model, "tokens", limit.tokens, window.tokens, cost)
        window.requests += 1
        window.tokens += cost
        return None

    def budget_headers(self, model: str) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for ``model``'s budget now ({} without a limit or headers)."""
        limit = self.rate_limits.get(model)
        if limit is None or not self.rate_limit_headers:
            return {}
        now = time.monotonic()
        window = self.windows.get(model)
        if window is None or now >= window.ends:  # no window open: all of it is left
            window = _Window(now)
        headers = {}
        for budget, allowed, used in (
            ("requests", limit.requests, window.requests),
            ("tokens", limit.tokens, window.tokens),
        ):
            if allowed is not None:
                headers[f"x-ratelimit-limit-{budget}"] = str(allowed)
                headers[f"x-ratelimit-remaining-{budget}"] = str(max(0, allowed - used))
                headers[f"x-ratelimit-reset-{budget}"] = _duration(window.ends - now)
        return headers

    def _over_budget(self, model: str, budget: str, allowed: int, used: int, requested: int) -> web.Response:
        wait = self.windows[model].ends - time.monotonic()
        headers = {"retry-after": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000))}
        headers.update(self.budget_headers(model))
        unit = "RPM" if budget == "requests" else "TPM"
        message = (
            f"Rate limit reached for {model} in organization org-fake on {budget} per min ({unit}): "
            f"Limit {allowed}, Used {used}, Requested {requested}. Please try again in {_duration(wait)}."
        )
        return _error(429, message, type_=budget, code="rate_limit_exceeded", headers=headers)


STATE = web.AppKey("fake_llm_state", _State)


# --- answers ----------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """A deterministic token estimate: one per CJK character, one per four other characters."""
    cjk = len(_CJK_RE.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


def _truncate_to_tokens(text: str, limit: int) -> str:
    # Count in quarter tokens so the cut agrees exactly with estimate_tokens.
    budget = 4 * limit
    for index, char in enumerate(text):
        budget -= 4 if _CJK_RE.match(char) else 1
        if budget < 0:
            return text[:index]
    return text


def _excerpt(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    if len(flat) > limit:
        flat = flat[:limit].rstrip() + "…"
    for marker, replacement in _REFUSAL_MARKERS.items():
        flat = flat.replace(marker, replacement)
    return flat


def _task_kind(prompt: str) -> str:
    lowered = prompt.lower()
    if any(word in lowered for word in ("summar", "tl;dr", "总结", "摘要", "概括")):
        return "summary"
    if any(word in lowered for word in ("analy", "assess", "evaluat", "分析", "评估")):
        return "analysis"
    return "answer"


def _english_topic(text: str) -> str:
    words = [word.lower() for word in _WORD_RE.findall(text) if word.lower() not in _STOPWORDS]
    common = [word for word, _ in Counter(words).most_common(2)]
    return " and ".join(f'"{word}"' for word in common) if common else "the question as stated"


def _english_answer(kind: str, excerpt: str, user: str, ref: str, variant: int) -> str:
    count = len(user.split())
    words = f"{count} word" if count == 1 else f"{count} words"
    topic = _english_topic(user)
    if kind == "summary":
        opener = ("In short, the text", "To summarise, the passage")[variant % 2]
        return (
            f'{opener} beginning "{excerpt}" runs to about {words} and centres on {topic}. '
            f"It states its main point early and uses the remaining sentences to support it (ref {ref})."
        )
    if kind == "analysis":
        opener = ("Analysis: the input", "Looking closely, the text")[variant % 2]
        return (
            f'{opener} beginning "{excerpt}" ({words}) focuses on {topic}. Its claims are stated '
            f"clearly, the reasoning is consistent, and the conclusion follows from the evidence (ref {ref})."
        )
    opener = ("Here is a considered reply to", "Thank you for the question")[variant % 2]
    return (
        f'{opener} "{excerpt}". The request, about {words} long, is mainly about {topic}, and '
        f"this deterministic answer from the fake server reflects that input (ref {ref})."
    )


def _chinese_answer(kind: str, excerpt: str, user: str, ref: str, variant: int) -> str:
    chars = len("".join(user.split()))
    if kind == "summary":
        opener = ("摘要", "内容概述")[variant % 2]
        return (
            f"{opener}：这段以“{excerpt}”开头的文本约有{chars}个字，主要围绕输入中提到的核心主题展开。"
            f"文章先交代背景，再说明要点，最后给出结论，整体条理清楚。（编号 {ref}）"
        )
    if kind == "analysis":
        opener = ("分析", "简要分析")[variant % 2]
        return (
            f"{opener}：针对“{excerpt}”这段内容，可以看出作者的重点在于说明核心观点及其依据。"
            f"整体论述层次分明，前后信息基本一致，结论也有相应的支撑。（编号 {ref}）"
        )
    opener = ("回答", "答复")[variant % 2]
    return (
        f"{opener}：关于“{excerpt}”这一问题，根据您提供的约{chars}个字的信息，核心内容已经比较明确。"
        f"以下说明由模拟服务器根据输入确定性地生成，可用于测试。（编号 {ref}）"
    )


@functools.lru_cache(maxsize=1024)
def compose_answer(system: str, user: str) -> str:
    """The normal answer for a prompt: deterministic, at least 80 characters, no refusal markers.

    Cached because benchmarks send the same prompt thousands of times.
    """
    prompt = f"{system}\n{user}"
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    ref, variant = digest[:8], int(digest[8:10], 16)
    # Prompts such as "Summarize:\n<text>" put the material after line one: the instruction decides
    # the kind of answer (the material may well contain "summary"), the material is what is quoted.
    instruction, _, material = user.strip().partition("\n")
    kind = _task_kind(f"{system}\n{instruction}")
    user = material.strip() or instruction
    if _CJK_RE.search(prompt):
        text = _chinese_answer(kind, _excerpt(user or system or "空输入", 24), user, ref, variant)
        filler = "补充说明：以上内容仅用于测试。"
    else:
        text = _english_answer(kind, _excerpt(user or system or "(empty input)", 48), user, ref, variant)
        filler = " This answer is for testing only."
    while len(text) < 80:  # the templates are long enough; this only guards the documented minimum
        text += filler
    return text


def _refusal_text(chinese: bool) -> str:
    if chinese:
        return (
            "抱歉，处理您的请求时出现错误，请稍后再试。"
            "如果问题持续存在，请联系管理员并提供请求时间，以便我们进一步排查。"
        )
    return (
        "Sorry, an error occurred while processing your request. Please try again later, and contact "
        "support if the problem persists."
    )


def _sample_for_schema(schema: Any, text: str, depth: int = 0, root: Any = None) -> Any:
    """A value matching a JSON schema (objects, arrays, scalars, enums, local $refs and anyOf/oneOf, as
    pydantic writes them); strings get the answer."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 8:
        return text
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _sample_for_schema(target, text, depth + 1, root)
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list) and options:
        chosen = next((o for o in options if isinstance(o, dict) and o.get("type") != "null"), options[0])
        return _sample_for_schema(chosen, text, depth + 1, root)
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _sample_for_schema(sub, text, depth + 1, root) for name, sub in properties.items()}
    if kind == "array":
        return [_sample_for_schema(schema.get("items"), text, depth + 1, root)]
    if kind in ("integer", "number"):
        return len(text)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _apply_response_format(text: str, response_format: Any) -> str:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return _dumps({"answer": text})
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        return _dumps(_sample_for_schema(schema, text))
    return text


# --- request parsing --------------------------------------------------------------------------


@dataclass
class _Chat:
    """What the handler needs from a validated chat request."""

    model: str
    system: str
    user: str
    prompt_tokens: int
    max_tokens: int | None
    response_format: Any
    cached_tokens: int = 0  # of prompt_tokens: the start of a prompt this server has seen before


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        texts = (
            part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
        return "\n".join(text for text in texts if isinstance(text, str))
    return ""


def _parse_chat(body: Any, models: tuple[str, ...]) -> _Chat | web.Response:
    """The request's essentials, or the 400/404 the real API would give."""
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    if body.get("stream"):
        return _error(
            400, "Streaming is not supported by the fake server; send stream=false.", param="stream"
        )
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        return _error(400, "you must provide a model parameter", param="model")
    if messages is None:
        return _error(400, "Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "Invalid 'messages': expected a non-empty array of messages.", param="messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return _error(
            400, "Invalid 'messages': every message must be an object with a 'role'.", param="messages"
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return _error(400, "Invalid 'max_tokens': expected an integer of at least 1.", param="max_tokens")
    if model not in models:
        return _model_not_found(model)
    texts = [_content_text(m) for m in messages]
    system = next(
        (t for m, t in zip(messages, texts, strict=True) if m["role"] in ("system", "developer")), ""
    )
    user = next(
        (t for m, t in zip(reversed(messages), reversed(texts), strict=True) if m["role"] == "user"), ""
    )
    # Per-message overhead as in OpenAI's token counting recipe.
    prompt_tokens = sum(estimate_tokens(t) for t in texts) + 3 * len(messages) + 3
    return _Chat(model, system, user, prompt_tokens, max_tokens, body.get("response_format"))


def _parse_latency(request: web.Request, default: float) -> float | web.Response:
    raw = request.headers.get(LATENCY_HEADER)
    if raw is None:
        return default
    try:
        latency = float(raw)
    except ValueError:
        latency = -1.0
    if not (math.isfinite(latency) and latency >= 0):
        return _error(400, f"Invalid {LATENCY_HEADER} header: expected seconds as a number >= 0.")
    return latency


# --- responses --------------------------------------------------------------------------------


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _cached_tokens(state: _State, body: dict[str, Any], prompt_tokens: int) -> int:
    """OpenAI's prompt caching: a prompt of 1,024 tokens or more sent again (same model and messages)
    has its start cached, in steps of 128 tokens."""
    digest = hashlib.sha256(_dumps([body["model"], body["messages"]]).encode()).hexdigest()
    seen = digest in state.prompts_seen
    state.prompts_seen.add(digest)
    return prompt_tokens // 128 * 128 if seen and prompt_tokens >= PROMPT_CACHE_MIN_TOKENS else 0


def _model_not_found(model: str) -> web.Response:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return _error(404, message, code="model_not_found")


def _completion(chat: _Chat, content: str, finish_reason: str, *, with_choice: bool = True) -> dict[str, Any]:
    completion_tokens = estimate_tokens(content)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": content, "refusal": None},
        "finish_reason": finish_reason,
        "logprobs": None,
    }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [choice] if with_choice else [],
        "usage": {
            "prompt_tokens": chat.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": chat.prompt_tokens + completion_tokens,
            # As OpenAI details them; this server does no reasoning.
            "prompt_tokens_details": {"cached_tokens": chat.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "system_fingerprint": "fp_fake",
    }


def _answer(chat: _Chat) -> web.Response:
    content = _apply_response_format(compose_answer(chat.system, chat.user), chat.response_format)
    finish_reason = "stop"
    if chat.max_tokens is not None and estimate_tokens(content) > chat.max_tokens:
        content, finish_reason = _truncate_to_tokens(content, chat.max_tokens), "length"
    return web.json_response(_completion(chat, content, finish_reason), dumps=_dumps)


def _error_fault(kind: str, chat: _Chat, retry_after_ms: int) -> web.Response:
    if kind == "429":
        headers = {
            "retry-after": str(max(1, math.ceil(retry_after_ms / 1000))),
            "retry-after-ms": str(retry_after_ms),
        }
        message = (
            f"Rate limit reached for {chat.model} (fake server). Please try again in {retry_after_ms}ms."
        )
        return _error(429, message, type_="rate_limit_error", code="rate_limit_exceeded", headers=headers)
    if kind == "429gateway":  # LiteLLM's router: the deployment's rpm spent; only the prefixed header
        headers = {"llm_provider-retry-after": str(max(1, math.ceil(retry_after_ms / 1000)))}
        message = f"litellm.RateLimitError: Deployment over defined rpm limit for model={chat.model}."
        return _error(429, message, type_="None", param="None", code="429", headers=headers)
    if kind == "401":
        return _error(401, _INCORRECT_KEY, code="invalid_api_key")
    if kind == "404":
        return _model_not_found(chat.model)
    if kind == "400":
        tokens = _CONTEXT_WINDOW + chat.prompt_tokens
        message = (
            f"This model's maximum context length is {_CONTEXT_WINDOW} tokens. However, your messages "
            f"resulted in {tokens} tokens. Please reduce the length of the messages."
        )
        return _error(400, message, param="messages", code="context_length_exceeded")
    # LiteLLM's proxy puts the status in `code` and str(None) where it has no type or param.
    if kind == "400auth":  # a key that is not the master key, and no database to look it up in
        return _error(400, "No connected db.", type_="no_db_connection", code="400")
    if kind == "400model":
        message = (
            f"{{'error': '/chat/completions: Invalid model name passed in model={chat.model}. Call "
            f"`/v1/models` to view available models for your key.'}}"
        )
        return _error(400, message, type_="None", param="None", code="400")
    messages = {
        "500": "The server had an error while processing your request.",
        "502": "Bad gateway: the upstream server returned an invalid response.",
        "503": "The server is overloaded or not ready yet.",
    }
    return _error(int(kind), messages[kind], type_="server_error")


def _content_fault(kind: str, chat: _Chat) -> web.Response:
    chinese = bool(_CJK_RE.search(f"{chat.system}\n{chat.user}"))
    if kind == "malformed":
        text = _dumps(_completion(chat, compose_answer(chat.system, chat.user), "stop"))
        return web.Response(text=text[: len(text) // 2], content_type="application/json")
    if kind == "garbled":
        body = _completion(chat, compose_answer(chat.system, chat.user), "stop")
        body["choices"], body["usage"]["prompt_tokens"] = ["x"], "n/a"
        return web.json_response(body, dumps=_dumps)
    if kind == "empty":
        return web.json_response(_completion(chat, "", "stop", with_choice=False), dumps=_dumps)
    if kind == "tool_calls":
        body = _completion(chat, "", "tool_calls")
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function"}
        call["function"] = {"name": "get_weather", "arguments": _dumps({"city": chat.user[:40]})}
        body["choices"][0]["message"].update(content=None, tool_calls=[call])
        return web.json_response(body, dumps=_dumps)
    if kind == "refusal":
        content, finish_reason = _refusal_text(chinese), "stop"
    elif kind == "short":
        content, finish_reason = ("好的。" if chinese else "OK."), "stop"
    else:  # length: cut mid-answer, as a too-small max_tokens would
        answer = compose_answer(chat.system, chat.user)
        content, finish_reason = answer[: len(answer) // 3], "length"
    return web.json_response(_completion(chat, content, finish_reason), dumps=_dumps)


# --- handlers ---------------------------------------------------------------------------------

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _check_auth(request: web.Request, state: _State) -> web.Response | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return _error(401, _MISSING_KEY)
    # Constant-time compare; the key itself never reaches a log line or a response.
    if state.api_key is not None and not hmac.compare_digest(key.encode(), state.api_key.encode()):
        return _error(401, _INCORRECT_KEY, code="invalid_api_key")
    return None


def _api_endpoint(handler: _Handler) -> _Handler:
    """Authenticate a /v1 request and keep the request, in-flight and status counters."""

    @functools.wraps(handler)
    async def endpoint(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        state.changed.set()
        status = "499"  # stays so if the client went away or the server shut down mid-request
        try:
            response = _check_auth(request, state) or await handler(request)
            status = str(response.status)
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except Exception:
            status = "500"
            raise
        finally:
            state.in_flight -= 1
            state.by_status[status] += 1
            state.changed.set()

    return endpoint


async def _endless(request: web.Request, state: _State) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request)
    chunk = b"[" * 65536

    async def write_forever() -> None:
        while True:
            await response.write(chunk)

    try:
        await _park(state, write_forever())
    except ConnectionError:  # the client hung up, as it should
        pass
    return response


async def _park(state: _State, awaitable: Awaitable[Any]) -> None:
    """Wait for ``awaitable`` in a way that server shutdown can always interrupt."""
    task = asyncio.current_task()
    assert task is not None
    if state.closing:
        task.cancel()
    state.parked.add(task)
    try:
        await awaitable
    finally:
        state.parked.discard(task)


async def _pass_gate(state: _State) -> None:
    if state.gate.is_set():
        return
    state.held += 1
    state.changed.set()
    try:
        await _park(state, state.gate.wait())
    finally:
        state.held -= 1
        state.changed.set()


@_api_endpoint
async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "We could not parse the JSON body of your request. Send a valid JSON object.")
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        state.by_model[body["model"]] += 1
    chat = _parse_chat(body, state.models)
    if isinstance(chat, web.Response):
        return chat
    chat.cached_tokens = _cached_tokens(state, body, chat.prompt_tokens)
    latency = _parse_latency(request, state.latency)
    if isinstance(latency, web.Response):
        return latency
    refused = state.admit(chat)  # over the model's rate limit: answered at once, as OpenAI does
    if refused is not None:
        return refused
    try:
        fault = state.pick_fault(request.headers.get(FAULT_HEADER), chat.model)
    except ValueError as exc:
        return _error(400, f"Invalid {FAULT_HEADER} header: {exc}")
    if fault is not None:
        logger.debug("fault %s for a %s request", fault, chat.model)

    await _pass_gate(state)
    if fault == "stall":
        await _park(state, asyncio.get_running_loop().create_future())
    if latency:
        await asyncio.sleep(latency)
    if fault == "redirect":
        return web.Response(status=307, headers={"Location": REDIRECT_TARGET})
    if fault == "endless":
        return await _endless(request, state)
    if fault == "echo":
        lines = [f"{request.method} {request.path_qs}", *(f"{k}: {v}" for k, v in request.headers.items())]
        return web.Response(status=500, text="\n".join(lines))
    return _respond(state, chat, fault)


def _respond(state: _State, chat: _Chat, fault: str | None) -> web.Response:
    """The answer to a validated chat request: an error fault, a content fault or the normal answer.
    The chat endpoint and batch lines (:func:`answer_batch_line`) both answer with it."""
    if fault in ERROR_KINDS:
        return _error_fault(fault, chat, state.retry_after_ms)
    response = _answer(chat) if fault is None else _content_fault(fault, chat)
    response.headers.update(state.budget_headers(chat.model))
    return response


def answer_batch_line(state: _State, body: Any) -> tuple[int, Any]:
    """A batch input line's ``body`` answered as the chat endpoint answers it: (status, JSON body).

    The model's fault rule applies (never a header, latency, hold or rate limit: a batch has none of
    them); the faults that cannot be written into an output file (stall, endless, redirect, echo,
    malformed) give the 500 a server error gives.
    """
    chat = _parse_chat(body, state.models)
    if isinstance(chat, web.Response):
        return chat.status, json.loads(chat.body)
    chat.cached_tokens = _cached_tokens(state, body, chat.prompt_tokens)
    fault = state.pick_fault(None, chat.model)
    if fault in _NOT_IN_A_FILE:
        fault = "500"
    response = _respond(state, chat, fault)
    return response.status, json.loads(response.body)


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _MODEL_CREATED, "owned_by": "fake"}


@_api_endpoint
async def _list_models(request: web.Request) -> web.StreamResponse:
    models = request.app[STATE].models
    return web.json_response({"object": "list", "data": [_model_object(m) for m in models]}, dumps=_dumps)


@_api_endpoint
async def _retrieve_model(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    if model not in request.app[STATE].models:
        return _model_not_found(model)
    return web.json_response(_model_object(model), dumps=_dumps)


@_api_endpoint
async def _unknown_url(request: web.Request) -> web.StreamResponse:
    return _error(404, f"Invalid URL ({request.method} {request.path})")


# --- Files and Batches (the rules are fake_batches'; these handlers read and write HTTP) --------

_BatchCall = Callable[[BatchStore, web.Request], Awaitable[Any]]


def _batch_store(state: _State) -> BatchStore:
    assert state.batches is not None, "create_app gives every server its batch store"
    return state.batches


def _batch_endpoint(call: _BatchCall) -> _Handler:
    """A Files or Batches route: authenticated and counted as every /v1 route; ``call``'s result is
    the JSON answer (or the response itself), an ApiError OpenAI's error."""

    @_api_endpoint
    @functools.wraps(call)
    async def endpoint(request: web.Request) -> web.StreamResponse:
        store = _batch_store(request.app[STATE])
        try:
            result = await call(store, request)
        except ApiError as exc:
            return _error(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)
        if isinstance(result, web.StreamResponse):
            return result
        return web.json_response(result, dumps=_dumps)

    return endpoint


async def _upload_file(store: BatchStore, request: web.Request) -> Any:
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "Uploads must be multipart/form-data with the fields 'file' and 'purpose'.")
    reader = await request.multipart()
    purpose: str | None = None
    filename, data, too_large = None, None, False
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "Nested multipart bodies are not supported.")
        if part.name == "purpose":
            purpose = (await part.read_chunk(1024)).decode(errors="replace").strip()
        elif part.name == "file" and filename is None:
            filename, data, limit = part.filename or "upload", bytearray(), store.upload_limit(purpose)
            while chunk := await part.read_chunk(2**16):  # a stream: no Content-Length needed
                if len(data) + len(chunk) > limit:
                    data, too_large = None, True
                    break
                data.extend(chunk)
        await part.release()  # the rest of the part read and dropped (all of a file too large)
    return store.upload(purpose, filename or "", data, too_large=too_large)


async def _retrieve_file(store: BatchStore, request: web.Request) -> Any:
    return store.file(request.match_info["file_id"]).to_json()


async def _delete_file(store: BatchStore, request: web.Request) -> Any:
    return store.delete_file(request.match_info["file_id"])


async def _file_content(store: BatchStore, request: web.Request) -> Any:
    data = store.content(request.match_info["file_id"])
    return web.Response(body=data, content_type="application/octet-stream")


async def _create_batch(store: BatchStore, request: web.Request) -> Any:
    try:
        body = await request.json()
    except ValueError:
        body = None
    return await store.create(body)


async def _retrieve_batch(store: BatchStore, request: web.Request) -> Any:
    return await store.retrieve(request.match_info["batch_id"])


async def _cancel_batch(store: BatchStore, request: web.Request) -> Any:
    return await store.cancel(request.match_info["batch_id"])


async def _list_batches(store: BatchStore, request: web.Request) -> Any:
    return await store.list_batches(request.query.get("limit"), request.query.get("after"))


_BATCH_ROUTES = tuple(
    (method, path, _batch_endpoint(call))
    for method, path, call in (
        ("POST", "/v1/files", _upload_file),
        ("GET", "/v1/files/{file_id}", _retrieve_file),
        ("DELETE", "/v1/files/{file_id}", _delete_file),
        ("GET", "/v1/files/{file_id}/content", _file_content),
        ("POST", "/v1/batches", _create_batch),
        ("GET", "/v1/batches", _list_batches),
        ("GET", "/v1/batches/{batch_id}", _retrieve_batch),
        ("POST", "/v1/batches/{batch_id}/cancel", _cancel_batch),
    )
)


async def _get_batch_settings(request: web.Request) -> web.Response:
    store = _batch_store(request.app[STATE])
    return web.json_response(store.settings.to_json(), dumps=_dumps)


async def _post_batch_settings(request: web.Request) -> web.Response:
    store = _batch_store(request.app[STATE])
    try:
        changes = await request.json()
    except ValueError:
        changes = None
    try:
        return web.json_response(store.configure(changes), dumps=_dumps)
    except ApiError as exc:
        return _error(exc.status, exc.message)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].snapshot(), dumps=_dumps)


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].faults(), dumps=_dumps)


async def _post_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not all(v is None or isinstance(v, str) for v in body.values()):
        return _error(
            400, 'Expected a JSON object mapping model names to fault specs or null, e.g. {"gpt-4": "503*2"}.'
        )
    try:  # validate everything before changing anything
        _parse_rules({m: s for m, s in body.items() if s is not None}, state.models)
    except ValueError as exc:
        return _error(400, str(exc))
    for model, spec in body.items():
        state.set_fault(model, spec)
    return web.json_response(state.faults(), dumps=_dumps)


async def _hold(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.gate.clear()
    return web.json_response(state.snapshot(), dumps=_dumps)


async def _release(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.gate.set()
    return web.json_response(state.snapshot(), dumps=_dumps)


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.reset()
    return web.json_response(state.snapshot(), dumps=_dumps)


@web.middleware
async def _access_log(request: web.Request, handler: _Handler) -> web.StreamResponse:
    # Method, path and status only: never headers, where the API key lives.
    started = time.monotonic()
    status = 499
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        status = 500
        raise
    finally:
        elapsed_ms = (time.monotonic() - started) * 1000
        logger.info('%s "%s %s" %s %.1fms', request.remote, request.method, request.path, status, elapsed_ms)


@web.middleware
async def _connections(request: web.Request, handler: _Handler) -> web.StreamResponse:
    # Counts connections, and resets requests on those idle past keepalive_timeout: the server has
    # given them up (module docstring).
    state = request.app[STATE]
    transport = request.transport
    if transport is None:  # the client is already gone
        return await handler(request)
    clock = asyncio.get_running_loop().time
    idle_since = state.idle_since.pop(transport, None)
    if idle_since is None:
        state.connections += 1
    elif state.keepalive_timeout is not None and clock() - idle_since > state.keepalive_timeout:
        state.stale_resets += 1
        state.changed.set()
        logger.debug("reset a request on a connection idle for %.2f s", clock() - idle_since)
        transport.abort()  # RST, as a kernel answers data sent to a socket its server closed
        return web.Response(status=499)  # never sent: the connection is gone
    try:
        return await handler(request)
    finally:
        state.idle_since[transport] = clock()


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.closing = True
    for task in list(state.parked):
        task.cancel()


def create_app(
    *,
    latency: float = 0.0,
    api_key: str | None = None,
    models: Iterable[str] = DEFAULT_MODELS,
    faults: dict[str, str] | None = None,
    seed: int = 0,
    access_log: bool = False,
    retry_after_ms: int = DEFAULT_RETRY_AFTER_MS,
    keepalive_timeout: float | None = DEFAULT_KEEPALIVE_TIMEOUT,
    rate_limits: dict[str, RateLimit] | None = None,
    rate_limit_headers: bool = True,
    **batch: Any,
) -> web.Application:
    """The fake server's aiohttp application. Raises ValueError for a bad latency, model list, fault
    or batch setting.

    ``keepalive_timeout`` resets requests on connections idle that long; closing the sockets is the
    runner's part (:func:`app_runner`). ``batch``: the ``batch_*`` settings, :class:`BatchSettings`'s
    fields (the module docstring says what each does); an unknown name is a TypeError.
    """
    models = tuple(models)
    if not models:
        raise ValueError("the fake server needs at least one model")
    if not (math.isfinite(latency) and latency >= 0):
        raise ValueError(f"latency must be a number of seconds >= 0, got {latency!r}")
    if retry_after_ms < 0:
        raise ValueError(f"retry_after_ms must be >= 0, got {retry_after_ms!r}")
    if keepalive_timeout is not None and not (math.isfinite(keepalive_timeout) and keepalive_timeout > 0):
        raise ValueError(f"keepalive_timeout must be seconds > 0 or None, got {keepalive_timeout!r}")
    state = _State(
        models=models,
        latency=float(latency),
        api_key=api_key,
        seed=seed,
        retry_after_ms=retry_after_ms,
        initial_faults=dict(faults or {}),
        keepalive_timeout=keepalive_timeout,
        rate_limits=_check_rate_limits(rate_limits, models),
        rate_limit_headers=rate_limit_headers,
    )
    settings = BatchSettings(**batch)
    answer = functools.partial(answer_batch_line, state)
    state.batches = BatchStore(settings, answer=answer, notify=state.changed.set)
    state.reset()  # parses the fault rules, seeds the RNG and opens the gate
    middlewares = [_connections, _access_log] if access_log else [_connections]
    # Large prompts are how tests provoke context-length handling: accept bodies up to 64 MiB.
    app = web.Application(middlewares=middlewares, client_max_size=64 * 2**20)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model}", _retrieve_model)
    for method, path, handler in _BATCH_ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_route("*", "/v1/{tail:.*}", _unknown_url)
    app.router.add_get("/_fake/stats", _stats)
    app.router.add_get("/_fake/faults", _get_faults)
    app.router.add_post("/_fake/faults", _post_faults)
    app.router.add_post("/_fake/hold", _hold)
    app.router.add_post("/_fake/release", _release)
    app.router.add_post("/_fake/reset", _reset)
    app.router.add_get("/_fake/batches", _get_batch_settings)
    app.router.add_post("/_fake/batches", _post_batch_settings)
    app.on_shutdown.append(_on_shutdown)
    return app


# --- embedding --------------------------------------------------------------------------------


def app_runner(app: web.Application, *, shutdown_timeout: float = 5.0) -> web.AppRunner:
    """A runner for :func:`create_app`'s app that also closes idle sockets, CLOSE_LAG_S after the app
    gives them up (aiohttp's own default keeps them for an hour)."""
    timeout = app[STATE].keepalive_timeout
    # handler_cancellation: a client that disconnects ends its request (and a stall) at once.
    return web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=3630 if timeout is None else timeout + CLOSE_LAG_S,
    )


def _loopback_host(host: str) -> str:
    """The host to bind; anything but a loopback address is refused."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(f"refusing to bind to {host!r}: the fake server only listens on loopback addresses")
    return host


class FakeLLMServer:
    """The fake server running in the current event loop, on a port the OS picks by default.

    ``async with FakeLLMServer(latency=0.1) as srv:`` then point a client at ``srv.base_url``;
    ``await srv.wait_for(lambda s: s["held"] == 3)`` waits for the stats to reach a state.
    A server starts once; create a new one to start again.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        api_key: str | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
        faults: dict[str, str] | None = None,
        seed: int = 0,
        access_log: bool = False,
        retry_after_ms: int = DEFAULT_RETRY_AFTER_MS,
        shutdown_timeout: float = 5.0,
        keepalive_timeout: float | None = DEFAULT_KEEPALIVE_TIMEOUT,
        rate_limits: dict[str, RateLimit] | None = None,
        rate_limit_headers: bool = True,
        **batch: Any,
    ) -> None:
        self.host = _loopback_host(host)
        self.port = port
        self.app = create_app(
            latency=latency,
            api_key=api_key,
            models=models,
            faults=faults,
            seed=seed,
            access_log=access_log,
            retry_after_ms=retry_after_ms,
            keepalive_timeout=keepalive_timeout,
            rate_limits=rate_limits,
            rate_limit_headers=rate_limit_headers,
            **batch,
        )
        self._state = self.app[STATE]
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeLLMServer can only be started once")
        self._runner = app_runner(self.app, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        logger.info("fake LLM server listening on %s", self.base_url)

    async def stop(self) -> None:
        if self._runner is not None and self._runner.server is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeLLMServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        return self._state.snapshot()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait until ``predicate(stats)`` holds and return those stats; bound it with asyncio.timeout.

        E.g. ``await srv.wait_for(lambda s: s["held"] == 3)`` after ``srv.hold()``.
        """
        state = self._state
        while not predicate(stats := state.snapshot()):
            state.changed.clear()
            await state.changed.wait()
        return stats

    def faults(self) -> dict[str, str]:
        return self._state.faults()

    def set_fault(self, model: str, spec: str | None) -> None:
        """Set (or, with None, clear) the fault rule for a model; ``*`` matches every model."""
        self._state.set_fault(model, spec)

    def configure_batches(self, **settings: Any) -> dict[str, Any]:
        """Change batch settings for the batches created from now on (``POST /_fake/batches``), e.g.
        ``srv.configure_batches(batch_expire_after=0.5)``; returns them all. ValueError if one is bad."""
        store = _batch_store(self._state)
        store.settings = store.settings.updated(settings)
        return store.settings.to_json()

    def hold(self) -> None:
        self._state.gate.clear()

    def release(self) -> None:
        self._state.gate.set()

    def reset(self) -> None:
        self._state.reset()


# --- command line -----------------------------------------------------------------------------


def _fault_arg(value: str) -> tuple[str, str]:
    model, sep, spec = value.partition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"expected MODEL=SPEC, got {value!r}")
    try:
        parse_fault_spec(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return model, spec


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="airflow-llm-fake-server",
        description="OpenAI-compatible fake LLM server for tests and demos (loopback only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default 8089)"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer (default 0)")
    parser.add_argument("--api-key", default=None, help="accept only this bearer key (default: any key)")
    parser.add_argument(
        "--fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="MODEL=SPEC",
        help="fault rule, e.g. gpt-4=503*2 or '*=429%%10'; repeatable",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for %%PERCENT faults (default 0)")
    parser.add_argument(
        "--retry-after-ms", type=int, default=DEFAULT_RETRY_AFTER_MS, help="retry-after-ms sent with 429s"
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=DEFAULT_KEEPALIVE_TIMEOUT,
        metavar="SECONDS",
        help="give up idle keep-alive connections after this long (default 5, as uvicorn); 0: never",
    )
    parser.add_argument("--access-log", action="store_true", help="log one INFO line per request")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="serve this model too, e.g. llama3.2 (as a vLLM or Ollama server would); repeatable",
    )
    batches = parser.add_argument_group("batches", "the Files and Batches APIs")
    batches.add_argument(
        "--batch-processing-s", type=float, default=1.0, metavar="SECONDS",
        help="seconds from a batch's creation to completed (default 1)",
    )  # fmt: skip
    batches.add_argument(
        "--batch-expire-after", type=float, default=None, metavar="SHARE",
        help="batches expire once this share (0-1) of their lines is answered (default: never)",
    )  # fmt: skip
    batches.add_argument("--batch-fail-validation", action="store_true", help="every batch fails validation")
    batches.add_argument(
        "--batch-max-requests", type=int, default=DEFAULT_BATCH_MAX_REQUESTS, metavar="N",
        help="most lines in a batch's input file (default 50,000)",
    )  # fmt: skip
    batches.add_argument(
        "--batch-max-file-bytes", type=int, default=DEFAULT_BATCH_MAX_FILE_BYTES, metavar="N",
        help="largest batch input file (default 200 MiB)",
    )  # fmt: skip
    batches.add_argument(
        "--batch-download-failures", type=int, default=0, metavar="N",
        help="the next N file downloads answer 500 (default 0)",
    )  # fmt: skip
    batches.add_argument(
        "--batch-retrieve-failures", type=int, default=0, metavar="N",
        help="the next N batch retrieves (GET /v1/batches/{id}) answer 500 (default 0)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.models = (*DEFAULT_MODELS, *(m for m in args.model if m not in DEFAULT_MODELS))
    args.keepalive_timeout = args.keepalive_timeout or None  # 0: never give idle connections up
    try:
        _loopback_host(args.host)
        create_app(
            latency=args.latency,
            models=args.models,
            faults=dict(args.fault),
            retry_after_ms=args.retry_after_ms,
            keepalive_timeout=args.keepalive_timeout,
            **_batch_args(args),
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _batch_args(args: argparse.Namespace) -> dict[str, Any]:
    return {setting.name: getattr(args, setting.name) for setting in dataclasses.fields(BatchSettings)}


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = FakeLLMServer(
        host=args.host,
        port=args.port,
        latency=args.latency,
        api_key=args.api_key,
        models=args.models,
        faults=dict(args.fault),
        seed=args.seed,
        access_log=args.access_log,
        retry_after_ms=args.retry_after_ms,
        keepalive_timeout=args.keepalive_timeout,
        **_batch_args(args),
    )
    try:
        await server.start()
    except OSError as exc:
        raise SystemExit(
            f"airflow-llm-fake-server: cannot listen on {args.host}:{args.port}: {exc}"
        ) from None
    try:
        print(f"fake LLM server listening on {server.base_url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``airflow-llm-fake-server``: serve until SIGTERM or SIGINT, then exit 0."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
