"""The typed contract of a call: what to ask (:class:`CallSpec`), and what came of it (:class:`Outcome`).

A spec travels in trigger kwargs and an outcome in the trigger's event, so both turn into plain
JSON and back (``to_json`` / ``from_json``). :func:`task_xcoms` is the one place that says which
XComs a finished task holds, for a single call and for a fan-out alike; every place that ends a
task (the triggers, both ``execute_complete``) pushes what it returns.

XCom contract: ``return_value`` = the answer (a fan-out: the list of answers in input order,
``None`` for a failed item), as text, or as the parsed JSON document when the call asked for one
(``output_type``); ``output_key`` holds it too; ``llm_meta`` = the call's details
(:meth:`Outcome.meta`), with ``error`` when it failed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.core.quality import QualitySpec

META_KEY = "llm_meta"
RETURN_KEY = "return_value"
ON_QUALITY_FAILURE = ("fail", "return")
# What a call does when its last link's circuit breaker is open: fail at once, or wait for the probe.
CIRCUIT_OPEN = ("fail", "wait")
STATUSES = ("success", "error")
# What a task returns of an answer: its text, or ("json") the document the text holds.
OUTPUTS = ("text", "json")


@dataclass(frozen=True, slots=True)
class CallSpec:
    """Everything about a call except the connections' secrets (trigger kwargs are stored in plain text)."""

    request: Mapping[str, Any]  # the body without "model": messages, temperature, max_tokens, ...
    chain: Sequence[tuple[str, str | None]]  # (conn_id, model or None for the connection's default)
    deadline: float | None = None  # wall-clock epoch seconds
    max_retries: int | None = None  # per model; None -> the connection's, else RetryPolicy's default
    quality: QualitySpec = QualitySpec()
    quality_retries: int = 0
    on_quality_failure: str = "fail"
    max_cost_usd: float | None = None  # refuse an attempt whose worst case would take the call past it
    output: str = "text"  # one of OUTPUTS
    circuit_open: str = "fail"  # one of CIRCUIT_OPEN
    cache_ttl: float | None = None  # seconds an answer is kept and reused (core/cache.py); None: off

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "request": dict(self.request),
            "chain": [[conn_id, model] for conn_id, model in self.chain],
            "deadline": self.deadline,
            "max_retries": self.max_retries,
            "quality": self.quality.to_dict() if self.quality != QualitySpec() else None,
            "quality_retries": self.quality_retries,
            "on_quality_failure": self.on_quality_failure,
            "max_cost_usd": self.max_cost_usd,
            "output": self.output,
        }
        if self.cache_ttl is not None:  # only when set: the kwargs of a call without it stay as they were
            data["cache_ttl"] = self.cache_ttl
        if self.circuit_open != "fail":  # likewise
            data["circuit_open"] = self.circuit_open
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallSpec:
        """ValueError (naming the field) for a spec that cannot make a call."""
        chain = [tuple(link) for link in data.get("chain") or ()]
        if not chain or not all(len(link) == 2 and isinstance(link[0], str) for link in chain):
            raise ValueError(f"a call needs a chain of (conn_id, model) pairs, got {data.get('chain')!r}")
        if data.get("on_quality_failure", "fail") not in ON_QUALITY_FAILURE:
            raise ValueError(f"on_quality_failure must be one of {list(ON_QUALITY_FAILURE)}")
        if data.get("output", "text") not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {data.get('output')!r}")
        if data.get("circuit_open", "fail") not in CIRCUIT_OPEN:
            raise ValueError(
                f"circuit_open must be one of {list(CIRCUIT_OPEN)}, got {data.get('circuit_open')!r}"
            )
        ttl = data.get("cache_ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0):
            raise ValueError(f"cache_ttl must be a positive number of seconds, got {ttl!r}")
        return cls(
            request=dict(data.get("request") or {}),
            chain=chain,
            deadline=data.get("deadline"),
            max_retries=data.get("max_retries"),
            quality=QualitySpec.from_dict(data.get("quality")),
            quality_retries=data.get("quality_retries", 0),
            on_quality_failure=data.get("on_quality_failure", "fail"),
            max_cost_usd=data.get("max_cost_usd"),
            output=data.get("output", "text"),
            cache_ttl=data.get("cache_ttl"),
            circuit_open=data.get("circuit_open", "fail"),
        )

    @classmethod
    def of(
        cls,
        request: Mapping[str, Any],
        conn_ids: Sequence[str],
        models: Sequence[str | None],
        **options: Any,
    ) -> CallSpec:
        """Every model on the first connection, then every model on the next one, and so on."""
        chain = [(conn_id, model) for conn_id in conn_ids for model in (models or [None])]
        return cls(request=request, chain=chain, **options)


@dataclass(slots=True)
class Attempt:
    """One request sent (or refused before sending) and what came of it; ``llm_meta.attempts`` holds these."""

    conn_id: str
    model: str
    status: int | None = None  # the HTTP status; None: no answer (or not sent)
    latency_s: float = 0.0
    result: str = "error"  # "ok" | "error" | "quality_failed"
    reason: Any = None  # the error (a dict), or the quality rules broken (a list)
    tokens: int | None = field(default=None, repr=False)  # an answer's total tokens, for the limiter
    # What the attempt cost (0.0: no answer; None: answered at an unknown price), for budget_usd.
    cost_usd: float | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "model": self.model,
            "status": self.status,
            "latency_s": self.latency_s,
            "result": self.result,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        return cls(
            **{name: data.get(name) for name in ("conn_id", "model", "status", "result", "reason")},
            latency_s=data.get("latency_s") or 0.0,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What came of one call: the answer or the error, and how it went."""

    status: str  # "success" | "error"
    text: str | None = None
    error: LLMCallError | None = None
    attempts: Sequence[Attempt] = ()
    latency_s: float = 0.0
    cost_usd: float | None = 0.0  # None: a model tried has no known price
    started_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    host: str | None = None  # the process that ran the call
    pid: int | None = None
    # An answer's details (success only):
    model: str | None = None  # as the server named it
    requested_model: str | None = None
    conn_id: str | None = None
    usage: Mapping[str, int] = field(default_factory=dict)
    usage_details: Mapping[str, int] = field(default_factory=dict)  # cached_tokens, reasoning_tokens
    system_fingerprint: str | None = None
    finish_reason: str | None = None
    quality_failures: Sequence[Mapping[str, str]] = ()  # an answer returned although it failed them
    fallback_used: bool = False
    cache_hit: bool = False  # answered from the response cache: nothing sent, nothing spent

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def meta(self) -> dict[str, Any]:
        """``llm_meta``: the answer's details and the attempts; a failure's error."""
        common = {
            "latency_s": self.latency_s,
            "attempts": [attempt.to_json() for attempt in self.attempts],
            "cost_usd": self.cost_usd,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "host": self.host,
            "pid": self.pid,
        }
        if not self.ok:
            return {**common, "error": self.error.to_dict() if self.error else None}
        return {
            "model": self.model,
            "requested_model": self.requested_model,
            "conn_id": self.conn_id,
            "usage": dict(self.usage),
            "usage_details": dict(self.usage_details),
            "system_fingerprint": self.system_fingerprint,
            "finish_reason": self.finish_reason,
            "quality": {"passed": not self.quality_failures, "failures": list(self.quality_failures)},
            "fallback_used": self.fallback_used,
            "cache_hit": self.cache_hit,
            **common,
        }

    def describe(self) -> str:
        """One line: what was answered, or the error and what each attempt did."""
        tried = "; ".join(f"{a.model}@{a.conn_id}: {a.result}" for a in self.attempts)
        if self.ok and self.cache_hit:
            return f"LLM call success: {self.model}, from the response cache (nothing sent)"
        if self.ok:
            attempts = len(self.attempts)
            return f"LLM call success: {self.model} after {attempts} attempt(s) in {self.latency_s:.2f} s"
        kind, message = (self.error.kind, self.error.message) if self.error else (None, None)
        line = f"LLM call failed ({kind}): {message}"
        return f"{line} [attempts: {tried}]" if tried else line

    def to_json(self) -> dict[str, Any]:
        """The trigger event's payload."""
        meta = self.meta()
        if self.ok:
            return {"status": "success", "text": self.text, "meta": meta}
        error = meta.pop("error")
        return {"status": "error", "error": error, "meta": meta}

    @classmethod
    def from_json(cls, payload: Any) -> Outcome:
        """Read an event's payload; ValueError says what is wrong with it."""
        status = _status_of(payload)
        meta = payload.get("meta") or {}
        common = {
            "attempts": [Attempt.from_json(a) for a in meta.get("attempts") or ()],
            "latency_s": meta.get("latency_s") or 0.0,
            "cost_usd": meta.get("cost_usd"),
            "started_at": meta.get("started_at"),
            "finished_at": meta.get("finished_at"),
            "host": meta.get("host"),
            "pid": meta.get("pid"),
        }
        if status == "error":
            return cls(status=status, error=LLMCallError.from_dict(payload.get("error")), **common)
        if not isinstance(payload.get("text"), str):
            raise ValueError("a successful LLM event must carry the answer as 'text'")
        quality = meta.get("quality") or {}
        return cls(
            status=status,
            text=payload["text"],
            model=meta.get("model"),
            requested_model=meta.get("requested_model"),
            conn_id=meta.get("conn_id"),
            usage=meta.get("usage") or {},
            usage_details=meta.get("usage_details") or {},  # older events have none
            system_fingerprint=meta.get("system_fingerprint"),
            finish_reason=meta.get("finish_reason"),
            quality_failures=quality.get("failures") or (),
            fallback_used=bool(meta.get("fallback_used")),
            cache_hit=bool(meta.get("cache_hit")),  # older events have none
            **common,
        )


@dataclass(frozen=True, slots=True)
class FanOutOutcome:
    """What came of a fan-out: one answer (or ``None``) per item in input order, and ``llm_meta``."""

    status: str  # "success" (at most max_failures items failed) | "error"
    results: Sequence[str | None]
    meta: Mapping[str, Any]  # {"items": [...], "totals": {...}, "failed_items", "max_failures", ...}
    message: str  # one line for the log, or the task's error
    error: LLMCallError | None = None  # set when the fan-out could not start at all

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def describe(self) -> str:
        """One line: the counts, tokens and first failures (as :meth:`Outcome.describe` for one call)."""
        return self.message

    @classmethod
    def not_started(cls, error: LLMCallError) -> FanOutOutcome:
        return cls(
            status="error",
            results=[],
            meta={"error": error.to_dict(), "items": [], "totals": None},
            message=f"LLM fan-out failed before any call ({error.kind}): {error.message}",
            error=error,
        )

    def to_json(self) -> dict[str, Any]:
        payload = {
            "status": self.status,
            "results": list(self.results),
            "meta": dict(self.meta),
            "message": self.message,
        }
        if self.error is not None:
            payload["error"] = self.error.to_dict()
        return payload

    @classmethod
    def from_json(cls, payload: Any) -> FanOutOutcome:
        status = _status_of(payload)
        if not isinstance(payload.get("results"), list) or not isinstance(payload.get("message"), str):
            raise ValueError("an LLM fan-out event must carry 'results' (a list) and 'message'")
        error = payload.get("error")
        return cls(
            status=status,
            results=payload["results"],
            meta=payload.get("meta") or {},
            message=payload["message"],
            error=LLMCallError.from_dict(error) if error else None,
        )


def task_xcoms(outcome: Outcome | FanOutOutcome, output_key: str, output: str = "text") -> dict[str, Any]:
    """The XComs a finished task holds, by key. ``return_value`` is the answer; a failed call has none."""
    if isinstance(outcome, FanOutOutcome):
        # A failed fan-out keeps its partial list too.
        value: Any = [answer_value(text, output) for text in outcome.results]
        xcoms = {RETURN_KEY: value, META_KEY: dict(outcome.meta)}
    elif outcome.ok:
        value = answer_value(outcome.text, output)
        xcoms = {RETURN_KEY: value, META_KEY: outcome.meta()}
    else:
        return {META_KEY: outcome.meta()}
    if output_key != RETURN_KEY:
        xcoms[output_key] = value
    return xcoms


def answer_value(text: str | None, output: str) -> Any:
    """An answer as the task returns it: its text, or (``output="json"``) the document it holds."""
    if output != "json" or text is None:
        return text
    try:
        return json.loads(text)
    except ValueError:  # an answer returned although it failed the checks (on_quality_failure="return")
        return text


def _status_of(payload: Any) -> str:
    if not isinstance(payload, Mapping):
        raise ValueError(f"an LLM event must be a dict with a 'status', got {type(payload).__name__}")
    status = payload.get("status")
    if status not in STATUSES:
        raise ValueError(f"an LLM event's status must be one of {list(STATUSES)}, got {status!r}")
    return status
