"""One chat completion as a state machine: every decision, no I/O.

:func:`call_flow` is a generator, as httpx's ``Auth.auth_flow`` is: it yields what to do next
(:class:`Send` this request, :class:`Wait` this long) and is sent what happened (an
:class:`Answer`, or :class:`NoAnswer` when the transport or the limiter gave up); it returns the
:class:`~airflow_llm_async.core.outcome.Outcome`. The driver (``driver.py``) owns every byte of
I/O and every sleep, so the rules here (the chain walk over connections and models, retries and
their back-off, the quality gate, the cost budget and ledger, the deadline) are tested in
microseconds with no server, no sleeps and a fake clock::

    flow = call_flow(spec, endpoints)
    step = next(flow)
    while True:
        reply = await do(step)          # send the request, or sleep
        step = flow.send(reply)         # StopIteration.value is the Outcome

What the engine decides is reported to an :class:`Observer` (the driver passes the ``metrics``
module, which implements it).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_llm_async.core import pricing, protocol, tokens
from airflow_llm_async.core.breaker import Skip
from airflow_llm_async.core.outcome import Attempt, CallSpec, Outcome
from airflow_llm_async.core.pricing import Price
from airflow_llm_async.core.protocol import Completion, Endpoint, LLMCallError
from airflow_llm_async.core.retry import RetryPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``body`` to the endpoint, under its connection's limits, and reply with what came back."""

    endpoint: Endpoint
    model: str
    body: bytes
    timeout: float  # seconds for the round trip (the connection's timeout, or less near the deadline)
    estimated_tokens: int  # what to reserve from the connection's tokens-per-minute bucket
    deadline: float | None  # wall-clock: the limiter must not hold the request past it
    attempt: Attempt  # its record in llm_meta, filled in once the reply is sent back
    # The attempt's worst case in USD, for a connection with budget_usd (reserved before sending).
    worst_cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep, then reply with ``None``.

    A back-off before retrying a link names it: when that link's circuit is open the driver replies
    at once with ``NoAnswer("circuit_open")`` instead, and the call moves on without waiting.
    """

    seconds: float
    endpoint: Endpoint | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The server answered (any status)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """No answer: ``timeout`` (none within the time), ``connection`` (``detail`` says why),
    ``too_large`` (more than the connection's ``max_response_bytes``; not read), ``limits`` (the
    connection's limits held the request until the deadline; it was never sent), ``budget`` (the
    connection's ``budget_usd`` could not hold its worst case, ``detail`` says why; never sent), or
    ``circuit_open`` (the link's circuit breaker is open, ``circuit`` says why; never sent)."""

    kind: str
    detail: str = ""
    circuit: Skip | None = None


Step = Send | Wait
Reply = Answer | NoAnswer | None
Flow = Generator[Step, Reply, Outcome]


class Observer(Protocol):
    """What the engine reports as it decides; the driver's observer turns it into metrics."""

    def attempt(self, conn_id: str, model: str, latency_s: float, error_kind: str | None) -> None: ...

    def count(self, name: str, conn_id: str, model: str) -> None: ...  # retries, fallbacks, ...

    def error(self, conn_id: str, model: str, kind: str) -> None: ...  # a refusal, never sent

    def usage(self, conn_id: str, model: str, usage: Mapping[str, int], cost: float | None) -> None: ...

    def call(self, conn_id: str, model: str, latency_s: float, succeeded: bool) -> None: ...


class _Silent:
    """The observer when nobody listens."""

    def attempt(self, conn_id: str, model: str, latency_s: float, error_kind: str | None) -> None:
        pass

    def count(self, name: str, conn_id: str, model: str) -> None:
        pass

    def error(self, conn_id: str, model: str, kind: str) -> None:
        pass

    def usage(self, conn_id: str, model: str, usage: Mapping[str, int], cost: float | None) -> None:
        pass

    def call(self, conn_id: str, model: str, latency_s: float, succeeded: bool) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Clock:
    """Wall-clock time (deadlines, ``started_at``) and a monotonic one (latencies); fakes in tests."""

    now: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


def call_flow(
    spec: CallSpec,
    endpoints: Mapping[str, Endpoint],
    *,
    clock: Clock = Clock(),
    rand: Callable[[], float] = random.random,
    observer: Observer | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> Flow:
    """Walk the chain until an answer passes the quality gate; see the module docstring.

    ``host`` and ``pid`` name the process that runs the call, for ``llm_meta``.
    """
    call = _Call(spec, clock, observer or _Silent(), host, pid)
    try:
        targets = resolve_models(spec, endpoints)
    except LLMCallError as exc:
        return call.failure(exc, spec.chain[0][0], None)
    for position, (endpoint, model) in enumerate(targets):
        last = position + 1 == len(targets)
        outcome = yield from _ask(call, endpoint, model, position, rand, last)
        if outcome is not None:
            return outcome
        if position + 1 < len(targets):
            call.observer.count("fallbacks", endpoint.conn_id, model)
            log.warning(
                "%s on %s gave up; falling back to %s", model, endpoint.conn_id, targets[position + 1][1]
            )
    return call.gave_up(endpoint.conn_id, model)


def _ask(
    call: _Call, endpoint: Endpoint, model: str, position: int, rand: Callable[[], float], last: bool
) -> Generator[Step, Reply, Outcome | None]:
    """One link of the chain: attempts until an answer passes (its outcome), or the link is done (None).

    An open circuit ends the link at once, even in its retry loop; on the ``last`` link a call that
    says ``circuit_open="wait"`` waits for the probe instead.
    """
    spec, conn_id = call.spec, endpoint.conn_id
    policy = retry_policy(spec, endpoint)
    price = pricing.price_of(endpoint.prices, model)
    retries = refusals = quality_tries = 0
    refused_since: float | None = None  # the link's first rate-limit refusal (monotonic), for the patience
    while True:
        refusal = call.refusal(endpoint, model, price)
        if refusal is not None:
            call.error = refusal
            return call.failure(refusal, conn_id, model) if refusal.kind == "deadline" else None
        try:
            completion = yield from _attempt(call, endpoint, model, price)
        except LLMCallError as exc:
            call.error = exc
            if exc.kind == "deadline":
                return call.failure(exc, conn_id, model)
            if exc.kind == "circuit_open":
                pause = call.circuit_wait(exc, conn_id, model, last)
                if isinstance(pause, Outcome) or pause is None:
                    return pause
                yield Wait(pause)
                continue
            # A 429 on the last link is waited out within the connection's patience, not counted: no
            # other model can answer instead (an earlier link hands over to its fallback after its count).
            refused_for = None
            if last and policy.patient(exc.kind, exc.code):
                refused_since = call.clock.monotonic() if refused_since is None else refused_since
                refused_for = call.clock.monotonic() - refused_since
            patient = refused_for is not None
            decision = policy.decide(
                *(exc.retryable, refusals if patient else retries, exc.headers),
                rand=rand,
                now=call.clock.now,
                refused_for=refused_for,
            )
            if decision.wait is None:
                if patient:
                    call.error = _impatient_error(exc, decision.why)
                if patient or (exc.retryable and retries < policy.max_retries):  # not the count
                    log.warning("%s on %s: not retried: %s", model, conn_id, decision.why)
                return None
            if spec.deadline is not None and call.clock.now() + decision.wait >= spec.deadline:
                return call.failure(_deadline_error(exc), conn_id, model)
            call.observer.count("retries", conn_id, model)
            if patient:
                refusals += 1
                log.warning(
                    "%s on %s: %s; rate-limited for %.1f s (patience %g s): retry in %.2f s",
                    *(model, conn_id, exc.message, refused_for),
                    *(policy.rate_limit_patience, decision.wait),
                )
            else:
                retries += 1
                log.warning(
                    "%s on %s: %s; retry %d of %d in %.2f s",
                    *(model, conn_id, exc.message, retries, policy.max_retries, decision.wait),
                )
            reply = yield Wait(decision.wait, endpoint, model)
            if isinstance(reply, NoAnswer) and reply.kind == "circuit_open":  # opened meanwhile: move on now
                exc = call.skipped(Attempt(conn_id, model), reply, endpoint)
                pause = call.circuit_wait(exc, conn_id, model, last)
                if isinstance(pause, Outcome) or pause is None:
                    return pause
                yield Wait(pause)
            continue
        failures = spec.quality.check(completion.text, completion.finish_reason)
        if not failures:
            return call.success(completion, conn_id, model, position, ())
        call.rejected = (completion, conn_id, model, position, failures)
        call.attempts[-1].result, call.attempts[-1].reason = "quality_failed", failures
        call.observer.count("quality_failures", conn_id, model)
        if quality_tries >= spec.quality_retries:
            return None
        quality_tries += 1
        log.warning("%s on %s: answer failed quality %s; asking again", model, conn_id, failures)


def _attempt(
    call: _Call, endpoint: Endpoint, model: str, price: Price | None
) -> Generator[Step, Reply, Completion]:
    """Send one request; its completion, or LLMCallError. The attempt is recorded either way."""
    attempt = Attempt(endpoint.conn_id, model)
    call.attempts.append(attempt)
    timeout, capped = call.timeout(endpoint)
    sent = call.clock.monotonic()
    spec = call.spec
    body = protocol.build_payload(spec.request, model)
    worst = None if endpoint.budget_usd is None or price is None else _worst_case(spec, price)
    reply = yield Send(
        endpoint, model, body, timeout, tokens.estimate_tokens(spec.request), spec.deadline, attempt, worst
    )
    attempt.status = reply.status if isinstance(reply, Answer) else None
    if isinstance(reply, NoAnswer) and reply.kind == "circuit_open":
        raise call.skipped(attempt, reply, endpoint, recorded=True)
    try:
        completion = _interpret(reply, endpoint, timeout, capped or call.past_deadline())
    except LLMCallError as exc:
        call.failed(attempt, sent, exc, endpoint, price)
        raise
    call.answered(attempt, sent, completion, endpoint, price)
    return completion


def resolve_models(spec: CallSpec, endpoints: Mapping[str, Endpoint]) -> list[tuple[Endpoint, str]]:
    """Pair each chain link with its endpoint and a concrete model name."""
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


def retry_policy(spec: CallSpec, endpoint: Endpoint) -> RetryPolicy:
    max_retries = spec.max_retries if spec.max_retries is not None else endpoint.max_retries
    try:
        return _shared_policy(max_retries, endpoint.rate_limit_patience_s)
    except TypeError:  # an unhashable value: RetryPolicy says what is wrong with it
        return _policy(max_retries, endpoint.rate_limit_patience_s)


def _policy(max_retries: int | None, patience: float) -> RetryPolicy:
    if max_retries is None:
        return RetryPolicy(rate_limit_patience=patience)
    return RetryPolicy(max_retries=max_retries, rate_limit_patience=patience)


# Immutable and the same for most calls: one shared object instead of one per link and call. typed:
# 2.0 must still be refused where 2 is accepted (an invalid value raises, and is never cached).
_shared_policy = functools.lru_cache(maxsize=256, typed=True)(_policy)


def _interpret(reply: Reply, endpoint: Endpoint, timeout: float, capped: bool) -> Completion:
    """The completion in a reply to :class:`Send`; LLMCallError (with the answer's headers) otherwise."""
    if isinstance(reply, Answer):
        try:
            return protocol.parse_completion(reply.status, reply.body, reply.headers, endpoint.secrets)
        except LLMCallError as exc:
            exc.headers = reply.headers
            raise
    if isinstance(reply, NoAnswer) and reply.kind == "limits":
        raise LLMCallError(
            "deadline", "the call's deadline passed while waiting for the connection's rate limits"
        )
    if isinstance(reply, NoAnswer) and reply.kind == "budget":
        raise LLMCallError("budget", reply.detail)
    if isinstance(reply, NoAnswer) and reply.kind == "too_large":
        raise LLMCallError(
            "invalid_response",
            f"the answer is larger than the connection allows ({reply.detail}; max_response_bytes="
            f"{endpoint.max_response_bytes}); if such answers are expected, raise that extra",
        )
    if isinstance(reply, NoAnswer) and reply.kind == "connection":
        detail = protocol.redact(reply.detail, endpoint.secrets)
        raise LLMCallError("connection", f"cannot reach {endpoint.base_url}: {detail}")
    if isinstance(reply, NoAnswer) and reply.kind == "timeout":
        error = LLMCallError("timeout", f"no complete answer within {timeout:.1f} s")
        raise _deadline_error(error) if capped else error
    raise TypeError(f"a Send step must be answered with an Answer or a NoAnswer, got {reply!r}")


def _impatient_error(cause: LLMCallError, why: str) -> LLMCallError:
    """The last 429 of a link that stopped waiting it out: what happened, and what to change."""
    error = LLMCallError(
        cause.kind,
        f"{cause.message} (not retried: {why}; raise the connection's rate_limit_patience_s, lower the "
        f"calls' concurrency or rate (max_concurrency, requests_per_minute), or add a fallback model)",
        status=cause.status,
        code=cause.code,
        type_=cause.type,
        param=cause.param,
    )
    error.headers = cause.headers
    return error


def _deadline_error(cause: LLMCallError) -> LLMCallError:
    return LLMCallError("deadline", f"the call's deadline passed; last error: {cause.message}")


class _Call:
    """One call's running state: its attempts, what they cost, and how it ends."""

    __slots__ = ("spec", "clock", "observer", "host", "pid", "error", "rejected", "attempts", "started",
                 "started_at", "spent", "priced", "skip")  # fmt: skip

    def __init__(
        self, spec: CallSpec, clock: Clock, observer: Observer, host: str | None, pid: int | None
    ) -> None:
        self.spec = spec
        self.host, self.pid = host, pid
        self.error: LLMCallError | None = None  # the last attempt's error, or refusal
        self.rejected: tuple | None = None  # the last answer that failed quality: success() arguments
        self.clock = clock
        self.observer = observer
        self.attempts: list[Attempt] = []
        self.started = clock.monotonic()
        self.started_at = clock.now()
        self.spent = 0.0
        self.priced = True  # False once a model without a known price answered with tokens: total unknown
        self.skip: Skip | None = None  # why the last link skipped was open

    def timeout(self, endpoint: Endpoint) -> tuple[float, bool]:
        """The attempt's time limit, and whether the deadline (not the connection's timeout) set it."""
        remaining = None if self.spec.deadline is None else self.spec.deadline - self.clock.now()
        if remaining is not None and remaining < endpoint.timeout:
            return remaining, True
        return endpoint.timeout, False

    def refusal(self, endpoint: Endpoint, model: str, price: Price | None) -> LLMCallError | None:
        """Why the next attempt must not be sent (its deadline passed, or the budget forbids it)."""
        if self.past_deadline():
            self.observer.error(endpoint.conn_id, model, "deadline")
            return LLMCallError("deadline", "the call's deadline passed before it could finish")
        if self.spec.max_cost_usd is None and endpoint.budget_usd is None:
            return None
        refusal = _over_budget(self.spec, endpoint, model, price, self.spent)
        if refusal is not None:
            self.attempts.append(Attempt(endpoint.conn_id, model, reason=refusal.to_dict()))
            self.observer.error(endpoint.conn_id, model, refusal.kind)
            log.warning("%s on %s: %s", model, endpoint.conn_id, refusal.message)
        return refusal

    def skipped(
        self, attempt: Attempt, reply: NoAnswer, endpoint: Endpoint, *, recorded: bool = False
    ) -> LLMCallError:
        """A request not sent because its link's circuit is open: recorded in ``llm_meta`` as refused."""
        skip = reply.circuit or Skip(0, reply.detail, self.clock.now())
        self.skip = skip
        conn_id, model = endpoint.conn_id, attempt.model
        probe_in = max(0.0, skip.probe_at - self.clock.now())
        probe_at = time.strftime("%H:%M:%S UTC", time.gmtime(skip.probe_at))
        message = (
            f"the circuit breaker of {model} on {conn_id!r} is open after {skip.failures} consecutive "
            f"failures (last: {skip.last_error}); it probes the model again at {probe_at} (in {probe_in:.0f} "
            f's). Add a fallback (fallback_models, fallback_conn_ids), pass circuit_open="wait" to wait for '
            f'the probe, or turn the breaker off with the connection\'s extra "circuit_breaker": false'
        )
        if skip.in_doubt:  # failed, and the requests that decide it are in flight (core/breaker.trials)
            message = (
                f"the circuit breaker of {model} on {conn_id!r} is in doubt after {skip.failures} "
                f"consecutive failures (last: {skip.last_error}): the requests that decide whether it "
                "opens are in flight, so this call went on to its fallback"
            )
            if skip.silent_s:  # no failure yet: requests out and none answered (core/breaker.stall_after)
                message = (
                    f"the circuit breaker of {model} on {conn_id!r} is in doubt: its requests in flight "
                    f"have had no answer for {skip.silent_s:.1f} s, longer than its answers take, so it "
                    "may be stalled: this call went on to its fallback"
                )
        error = LLMCallError("circuit_open", message)
        attempt.result, attempt.reason = "error", error.to_dict()
        attempt.cost_usd = 0.0  # never sent: a budget reservation made for it settles to nothing
        if not recorded:
            self.attempts.append(attempt)
        self.error = error
        self.observer.error(conn_id, model, "circuit_open")
        return error

    def circuit_wait(
        self, error: LLMCallError, conn_id: str, model: str, last: bool
    ) -> Outcome | float | None:
        """After a skip: None (the link is done), seconds to wait for the probe, or the deadline's outcome."""
        if not last or self.spec.circuit_open != "wait":
            log.warning("%s on %s: circuit open, not sent", model, conn_id)
            return None
        assert self.skip is not None
        pause = max(0.01, self.skip.probe_at - self.clock.now())
        if self.spec.deadline is not None and self.clock.now() + pause >= self.spec.deadline:
            return self.failure(_deadline_error(error), conn_id, model)
        log.info("%s on %s: circuit open; waiting %.1f s for its probe", model, conn_id, pause)
        return pause

    def past_deadline(self) -> bool:
        return self.spec.deadline is not None and self.spec.deadline <= self.clock.now()

    def failed(
        self, attempt: Attempt, sent: float, error: LLMCallError, endpoint: Endpoint, price: Price | None
    ) -> None:
        attempt.latency_s = round(self.clock.monotonic() - sent, 3)
        attempt.result, attempt.reason = "error", error.to_dict()
        self.observer.attempt(attempt.conn_id, attempt.model, attempt.latency_s, error.kind)
        if error.billed is not None:  # an answer we cannot use (tool calls) was still billed
            self._charge(attempt, error.billed, endpoint, price)
        else:
            # No answer, so no usage: it adds nothing to the cost, whatever the model's price (``price``
            # is None for an unpriced model; the total stays known).
            attempt.cost_usd = 0.0

    def answered(
        self, attempt: Attempt, sent: float, completion: Completion, endpoint: Endpoint, price: Price | None
    ) -> None:
        attempt.result = "ok"
        attempt.tokens = completion.usage.get("total_tokens")
        attempt.latency_s = round(self.clock.monotonic() - sent, 3)
        self.observer.attempt(attempt.conn_id, attempt.model, attempt.latency_s, None)
        self._charge(attempt, completion, endpoint, price)

    def _charge(
        self, attempt: Attempt, completion: Completion, endpoint: Endpoint, price: Price | None
    ) -> None:
        """Add what an answer cost to the call's spending (and to the attempt, for budget_usd)."""
        price = price or pricing.price_of(endpoint.prices, completion.model)
        usage = completion.usage
        cost = completion.reported_cost_usd  # the server's own figure (a gateway's), when it gives one
        if cost is None and price is not None:
            cached = completion.usage_details.get("cached_tokens", 0)
            cost = price.cost(usage["prompt_tokens"], usage["completion_tokens"], cached)
        if cost is not None:
            self.spent += cost
        elif usage["prompt_tokens"] or usage["completion_tokens"]:
            self.priced = False  # tokens paid for at a price nobody knows: the total is unknown
        else:
            cost = 0.0  # no tokens cost nothing at any price
        attempt.cost_usd = cost
        self.observer.usage(attempt.conn_id, attempt.model, completion.usage, cost)

    def success(
        self, completion: Completion, conn_id: str, model: str, position: int, failures: Any
    ) -> Outcome:
        latency = self.clock.monotonic() - self.started
        self.observer.call(conn_id, model, latency, True)
        return Outcome(
            status="success",
            text=completion.text,
            model=completion.model or model,
            requested_model=model,
            conn_id=conn_id,
            usage=completion.usage,
            usage_details=completion.usage_details,
            system_fingerprint=completion.system_fingerprint,
            finish_reason=completion.finish_reason,
            quality_failures=list(failures),
            fallback_used=position > 0,
            **self._ledger(latency),
        )

    def gave_up(self, conn_id: str, model: str) -> Outcome:
        """Every link is done: the last answer that failed quality (if the call returns those), or why."""
        if self.rejected is not None and self.spec.on_quality_failure == "return":
            return self.success(*self.rejected)
        last = self.attempts[-1] if self.attempts else None
        error = self.error
        if last is not None and last.result == "quality_failed":
            error = LLMCallError("quality", f"every answer failed the quality checks; last: {last.reason}")
        assert error is not None  # the chain is never empty, so the last link failed somehow
        return self.failure(error, conn_id, model)

    def failure(self, error: LLMCallError, conn_id: str, model: str | None) -> Outcome:
        latency = self.clock.monotonic() - self.started
        self.observer.call(conn_id, model, latency, False)
        return Outcome(status="error", error=error, **self._ledger(latency))

    def _ledger(self, latency: float) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "latency_s": round(latency, 3),
            "cost_usd": round(self.spent, 8) if self.priced else None,
            "started_at": self.started_at,
            "finished_at": self.clock.now(),
            "host": self.host,
            "pid": self.pid,
        }


def _over_budget(
    spec: CallSpec, endpoint: Endpoint, model: str, price: Price | None, spent: float
) -> LLMCallError | None:
    """Refuse an attempt that cannot be bounded (no price) under ``max_cost_usd`` or the connection's
    ``budget_usd``, or whose worst case would take the call's spending past ``max_cost_usd``.

    The connection's budget itself is kept by the driver (``budget_store.py``), across calls.
    """
    limit = spec.max_cost_usd
    if price is None:
        if limit is not None:
            which = f"max_cost_usd={limit:g} is set"
        else:
            which = f"the {endpoint.conn_id!r} connection has budget_usd of {endpoint.budget_usd.describe()}"
        return LLMCallError(
            "budget",
            f"{which} but no price is known for model {model!r}, so its cost cannot "
            f"be bounded; add it to the {endpoint.conn_id!r} connection's extra, e.g. "
            f'"prices": {{"{model}": {{"input": <USD per 1M prompt tokens>, "output": <USD per 1M completion '
            f"tokens>}}}} (or to the file named by [llm_async] prices_file)",
        )
    if limit is None:
        return None
    worst = _worst_case(spec, price)
    if spent + worst <= limit:
        return None
    prompt = tokens.estimate_prompt_tokens(spec.request)
    completion = tokens.completion_budget(spec.request)
    return LLMCallError(
        "budget",
        f"max_cost_usd={limit:g} would be exceeded: spent ${spent:.6f} so far + this attempt's worst case "
        f"${worst:.6f} (~{prompt} prompt tokens at ${price.input:g}/M + {completion} max_tokens at "
        f"${price.output:g}/M) = ${spent + worst:.6f}; raise max_cost_usd, lower max_tokens, shorten "
        f"the prompt, or add a cheaper fallback model",
    )


def _worst_case(spec: CallSpec, price: Price) -> float:
    """What an attempt can cost at most: the whole prompt and every max_tokens at the model's price."""
    return price.cost(tokens.estimate_prompt_tokens(spec.request), tokens.completion_budget(spec.request))
