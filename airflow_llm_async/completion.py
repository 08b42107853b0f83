"""One chat completion through its fallback chain: attempts, retries and quality gates.

This is the single implementation behind every mode: the trigger awaits it in the
triggerer, and sync mode (``deferrable=False``) runs it on the worker through
``asgiref.sync.async_to_sync``. The outcome is plain JSON so it can travel in a
``TriggerEvent`` and land in XCom unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from airflow_llm_async import metrics, pricing, protocol, ratelimit, transport
from airflow_llm_async.pricing import Price
from airflow_llm_async.protocol import Completion, Endpoint, LLMCallError
from airflow_llm_async.quality import QualitySpec
from airflow_llm_async.retry import RetryPolicy

log = logging.getLogger(__name__)

ON_QUALITY_FAILURE = ("fail", "return")


@dataclass(frozen=True)
class CallSpec:
    """Everything about a call except the connections' secrets; built from trigger kwargs."""

    request: dict[str, Any]
    chain: Sequence[tuple[str, str | None]]  # (conn_id, model or None for the connection's default)
    deadline: float | None = None  # wall-clock epoch seconds
    max_retries: int | None = None  # per model; None -> the connection's, else RetryPolicy's default
    quality: QualitySpec = QualitySpec()
    quality_retries: int = 0
    on_quality_failure: str = "fail"
    max_cost_usd: float | None = None  # refuse an attempt whose worst case would take the call past it


def resolve_models(spec: CallSpec, endpoints: Mapping[str, Endpoint]) -> list[tuple[Endpoint, str]]:
    """Pair each chain entry with its endpoint and a concrete model name."""
    resolved = []
    for conn_id, model in spec.chain:
        endpoint = endpoints[conn_id]
        model = model or endpoint.default_model
        if not model:
            raise LLMCallError(
                "config",
                f"No model to call on connection {conn_id!r}: pass `model=` to the operator or set "
                f'"default_model" in the connection\'s extra.',
            )
        resolved.append((endpoint, model))
    return resolved


async def complete(spec: CallSpec, endpoints: Mapping[str, Endpoint]) -> dict[str, Any]:
    """Walk the chain until an answer passes the quality gate; return a JSON-safe outcome."""
    call = _Ledger()
    attempts: list[dict[str, Any]] = []
    rejected: tuple[Completion, Endpoint, list, int] | None = None  # last answer that failed quality
    error: LLMCallError | None = None
    try:
        targets = resolve_models(spec, endpoints)
    except LLMCallError as exc:
        return _failure(exc, attempts, call, metrics.tags(spec.chain[0][0], None))

    for position, (endpoint, model) in enumerate(targets):
        policy = _retry_policy(spec, endpoint)
        price = pricing.price_of(endpoint.prices, model)
        tags = metrics.tags(endpoint.conn_id, model)
        retries = quality_tries = 0
        while True:
            if spec.max_cost_usd is not None:
                refusal = _over_budget(spec, endpoint, model, price, call.spent)
                if refusal is not None:
                    error = refusal
                    attempts.append(_refused(endpoint, model, refusal))
                    metrics.error(tags, refusal.kind)
                    log.warning("%s on %s: %s", model, endpoint.conn_id, refusal.message)
                    break
            try:
                completion = await _attempt(spec, endpoint, model, attempts, tags)
            except LLMCallError as exc:
                call.charge(price, None)
                error = exc
                if exc.kind == "deadline":
                    return _failure(exc, attempts, call, tags)
                if not policy.should_retry(exc.retryable, retries):
                    break
                wait = policy.delay(retries, exc.headers)
                if spec.deadline is not None and time.time() + wait >= spec.deadline:
                    return _failure(_deadline_error(exc), attempts, call, tags)
                retries += 1
                metrics.count("retries", tags)
                log.warning(
                    "%s on %s: %s; retry %d of %d in %.2f s",
                    model,
                    endpoint.conn_id,
                    exc.message,
                    retries,
                    policy.max_retries,
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            cost = call.charge(price or pricing.price_of(endpoint.prices, completion.model), completion)
            metrics.usage(tags, completion.usage, cost)
            failures = spec.quality.check(completion.text, completion.finish_reason)
            if not failures:
                return _success(completion, endpoint, attempts, call, tags, fallback_used=position > 0)
            attempts[-1].update(result="quality_failed", reason=failures)
            metrics.count("quality_failures", tags)
            rejected = (completion, endpoint, failures, position)
            if quality_tries >= spec.quality_retries:
                break
            quality_tries += 1
            log.warning("%s on %s: answer failed quality %s; asking again", model, endpoint.conn_id, failures)
        if position + 1 < len(targets):
            metrics.count("fallbacks", tags)
            log.warning(
                "%s on %s gave up; falling back to %s", model, endpoint.conn_id, targets[position + 1][1]
            )

    if rejected is not None and spec.on_quality_failure == "return":
        completion, endpoint, failures, position = rejected
        return _success(
            completion, endpoint, attempts, call, tags, fallback_used=position > 0, failures=failures
        )
    if attempts[-1]["result"] == "quality_failed":
        error = LLMCallError(
            "quality", f"every answer failed the quality checks; last: {attempts[-1]['reason']}"
        )
    assert error is not None  # the chain is never empty, so the last attempt failed somehow
    return _failure(error, attempts, call, tags)


class _Ledger:
    """When a call started, and what its attempts cost so far."""

    __slots__ = ("started", "started_at", "spent", "priced")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.started_at = time.time()
        self.spent = 0.0
        self.priced = True  # False once a model without a known price was tried: the total is unknown

    def charge(self, price: Price | None, completion: Completion | None) -> float | None:
        """Add an attempt's cost (an attempt without an answer reported no usage); return it."""
        if price is None:
            self.priced = False
            return None
        if completion is None:
            return 0.0
        usage = completion.usage
        cost = price.cost(usage["prompt_tokens"], usage["completion_tokens"])
        self.spent += cost
        return cost

    def meta(self) -> dict[str, Any]:
        """The fields every outcome's meta carries: cost, wall-clock span, and who ran the call."""
        return {
            "cost_usd": round(self.spent, 8) if self.priced else None,
            "started_at": self.started_at,
            "finished_at": time.time(),
            "host": metrics.hostname(),
            "pid": os.getpid(),
        }


def _over_budget(
    spec: CallSpec, endpoint: Endpoint, model: str, price: Price | None, spent: float
) -> LLMCallError | None:
    """Refuse an attempt whose worst case would take the call's spending past ``max_cost_usd``."""
    limit = spec.max_cost_usd
    assert limit is not None
    if price is None:
        return LLMCallError(
            "budget",
            f"max_cost_usd={limit:g} is set but no price is known for model {model!r}, so its cost cannot "
            f"be bounded; add it to the {endpoint.conn_id!r} connection's extra, e.g. "
            f'"prices": {{"{model}": {{"input": <USD per 1M prompt tokens>, "output": <USD per 1M completion '
            f"tokens>}}}} (or to the file named by [llm_async] prices_file)",
        )
    prompt = ratelimit.estimate_prompt_tokens(spec.request)
    completion = ratelimit.completion_budget(spec.request)
    worst = price.cost(prompt, completion)
    if spent + worst <= limit:
        return None
    return LLMCallError(
        "budget",
        f"max_cost_usd={limit:g} would be exceeded: spent ${spent:.6f} so far + this attempt's worst case "
        f"${worst:.6f} (~{prompt} prompt tokens at ${price.input:g}/M + {completion} max_tokens at "
        f"${price.output:g}/M) = ${spent + worst:.6f}; raise max_cost_usd, lower max_tokens, shorten "
        f"the prompt, or add a cheaper fallback model",
    )


def _refused(endpoint: Endpoint, model: str, error: LLMCallError) -> dict[str, Any]:
    """The attempt record of an attempt that was not sent."""
    return {
        "conn_id": endpoint.conn_id,
        "model": model,
        "status": None,
        "latency_s": 0.0,
        "result": "error",
        "reason": error.to_dict(),
    }


async def _attempt(
    spec: CallSpec, endpoint: Endpoint, model: str, attempts: list, tags: metrics.Tags
) -> Completion:
    """Wait for the connection's limits, then one round trip; tell the limiter how it went."""
    limiter = ratelimit.limiter_for(endpoint)
    wait_limit = None if spec.deadline is None else max(0.0, spec.deadline - time.time())
    asked = time.monotonic()
    try:
        async with limiter.slot(ratelimit.estimate_tokens(spec.request), timeout=wait_limit) as permit:
            metrics.queued(tags, time.monotonic() - asked, permit.waited)
            metrics.in_flight(endpoint.conn_id, limiter.in_flight)
            try:
                completion = await _round_trip(spec, endpoint, model, attempts, tags)
            except LLMCallError as exc:
                if exc.kind == "rate_limit":
                    limiter.on_rate_limited(permit)
                raise
            permit.settle(completion.usage.get("total_tokens"))
            limiter.on_success()
            return completion
    except TimeoutError:  # only the wait for the limiter raises it: the round trip classifies its own
        metrics.error(tags, "deadline")
        raise LLMCallError(
            "deadline", "the call's deadline passed while waiting for the connection's rate limits"
        ) from None
    finally:
        metrics.in_flight(endpoint.conn_id, limiter.in_flight)


async def _round_trip(
    spec: CallSpec, endpoint: Endpoint, model: str, attempts: list, tags: metrics.Tags
) -> Completion:
    """One HTTP round trip; records it in ``attempts`` and raises a classified error on failure."""
    timeout = endpoint.timeout
    capped_by_deadline = False
    if spec.deadline is not None:
        remaining = spec.deadline - time.time()
        if remaining <= 0:
            metrics.error(tags, "deadline")
            raise LLMCallError("deadline", "the call's deadline passed before it could finish")
        if remaining < timeout:
            timeout, capped_by_deadline = remaining, True
    record: dict[str, Any] = {"conn_id": endpoint.conn_id, "model": model, "status": None}
    attempts.append(record)
    started = time.monotonic()
    try:
        status, headers, body = await transport.post_json(
            endpoint.chat_url,
            endpoint.request_headers(),
            protocol.build_payload(spec.request, model),
            timeout,
        )
        record["status"] = status
        try:
            completion = protocol.parse_completion(status, body)
        except LLMCallError as exc:
            exc.headers = headers
            raise
    except TimeoutError:
        error = LLMCallError("timeout", f"no complete answer within {timeout:.1f} s")
        if capped_by_deadline:
            error = _deadline_error(error)
        _finish(record, started, error, tags)
        raise error from None
    except aiohttp.ClientError as exc:
        # The exception text names the host and the OS error, never the request headers.
        error = LLMCallError("connection", f"cannot reach {endpoint.base_url}: {type(exc).__name__}: {exc}")
        _finish(record, started, error, tags)
        raise error from None
    except LLMCallError as exc:
        _finish(record, started, exc, tags)
        raise
    _finish(record, started, None, tags)
    return completion


def _finish(record: dict[str, Any], started: float, error: LLMCallError | None, tags: metrics.Tags) -> None:
    latency = time.monotonic() - started
    record["latency_s"] = round(latency, 3)
    record["result"] = "ok" if error is None else "error"
    record["reason"] = None if error is None else error.to_dict()
    metrics.attempt(tags, latency, None if error is None else error.kind)


def _retry_policy(spec: CallSpec, endpoint: Endpoint) -> RetryPolicy:
    max_retries = spec.max_retries if spec.max_retries is not None else endpoint.max_retries
    return RetryPolicy() if max_retries is None else RetryPolicy(max_retries=max_retries)


def _deadline_error(cause: LLMCallError) -> LLMCallError:
    return LLMCallError("deadline", f"the call's deadline passed; last error: {cause.message}")


def _success(
    completion: Completion,
    endpoint: Endpoint,
    attempts: list,
    call: _Ledger,
    tags: metrics.Tags,
    *,
    fallback_used: bool,
    failures: list | None = None,
) -> dict[str, Any]:
    latency = time.monotonic() - call.started
    metrics.call(tags, latency, succeeded=True)
    meta = {
        "model": completion.model or attempts[-1]["model"],
        "requested_model": attempts[-1]["model"],
        "conn_id": endpoint.conn_id,
        "usage": completion.usage,
        "finish_reason": completion.finish_reason,
        "latency_s": round(latency, 3),
        "attempts": attempts,
        "quality": {"passed": not failures, "failures": failures or []},
        "fallback_used": fallback_used,
        **call.meta(),
    }
    return {"status": "success", "text": completion.text, "meta": meta}


def describe_failure(outcome: dict[str, Any]) -> str:
    """One line for a failed outcome: the error, then what each attempt did."""
    error = outcome.get("error") or {}
    message = f"LLM call failed ({error.get('kind')}): {error.get('message')}"
    tried = [
        f"{a['model']}@{a['conn_id']}: {a.get('result')}" for a in outcome.get("meta", {}).get("attempts", [])
    ]
    if tried:
        message += f" [attempts: {'; '.join(tried)}]"
    return message


def _failure(error: LLMCallError, attempts: list, call: _Ledger, tags: metrics.Tags) -> dict[str, Any]:
    latency = time.monotonic() - call.started
    metrics.call(tags, latency, succeeded=False)
    meta = {"latency_s": round(latency, 3), "attempts": attempts, **call.meta()}
    return {"status": "error", "error": error.to_dict(), "meta": meta}


def not_started(error: LLMCallError) -> dict[str, Any]:
    """The outcome of a call that could not start (bad configuration): nothing was sent or spent."""
    return {"status": "error", "error": error.to_dict(), "meta": {"attempts": [], **_Ledger().meta()}}
