"""The circuit breakers of this process, one per (connection, model); the policy is ``core/breaker.py``.

The driver asks a link's breaker before each request and tells it every result::

    breaker = breaker_for(endpoint, model)          # None: the connection's extra turned it off
    decision = await breaker.admit(lease_s)         # SEND, PROBE, or a Skip (nothing is sent)
    ...                                             # the round trip
    breaker.record(failed, "HTTP 503", probe=decision == PROBE)

Every call in the process shares one breaker per (conn_id, model), whichever event loop runs it.
With the connection extra ``rate_limit_backend`` (Redis) the state is shared by every triggerer and
worker instead (:class:`airflow_llm_async.limits_redis.SharedBreaker`), with this process's copy
answering the closed-circuit case without a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from airflow_llm_async import metrics
from airflow_llm_async.core import breaker
from airflow_llm_async.core.breaker import BreakerConfig, Skip, State
from airflow_llm_async.core.engine import Answer, NoAnswer, Reply
from airflow_llm_async.core.protocol import Endpoint

log = logging.getLogger(__name__)


class LocalBreaker:
    """One (connection, model)'s breaker in this process. Times are wall-clock seconds."""

    kind = "local"

    def __init__(
        self,
        conn_id: str,
        model: str,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn_id, self.model, self.config = conn_id, model, config
        self.state = State()
        self._clock = clock
        self._timer = timer  # round trips and silences (the state's times are wall-clock, shared)
        self.in_flight = 0  # this process's requests to the model now (capped while it is in doubt)
        self._waiters: list[asyncio.Future[None]] = []  # calls with no fallback waiting for a trial
        # For a stall (core/breaker.stall_after): since when requests have been out with no answer,
        # and what answers took lately (a decaying maximum; None until the first answer).
        self._quiet_since = 0.0
        self.typical_s: float | None = None

    def peek(self) -> Skip | None:
        """The Skip a call would get now (no side effect): lets a call leave before queueing for limits."""
        if self.state.open_until is None:  # closed: the hot path, no clock read
            return None
        return breaker.peek(self.state, self.config, self._clock())

    async def admit(self, lease_s: float, timeout_s: float | None = None) -> str | Skip:
        """``timeout_s``: the request's own timeout (``lease_s`` less its margin), for a stall."""
        silent_s = 0.0
        if self.state.open_until is None and not self.state.failures:  # healthy: the hot path
            # Too few requests out to be capped (no clock read), or answers coming back: send.
            if self.in_flight < self.config.failures:
                return breaker.SEND
            silent_s = self.silent_s(timeout_s or lease_s)
            if not silent_s:
                return breaker.SEND
        elif self.in_flight:
            silent_s = self.silent_s(timeout_s or lease_s)
        decision, self.state = breaker.admit(
            self.state, self.config, self._clock(), lease_s, self.in_flight, silent_s
        )
        return decision

    def silent_s(self, timeout_s: float) -> float:
        """How long requests have been out with no answer, if past ``stall_after`` (else 0)."""
        if not self.in_flight:
            return 0.0
        silent = self._timer() - self._quiet_since
        return silent if silent > breaker.stall_after(self.typical_s, timeout_s) else 0.0

    def sent(self) -> float:
        """A request goes out: when (for :meth:`answered`)."""
        now = self._timer()
        if not self.in_flight:  # the first one out: the silence starts now
            self._quiet_since = now
        self.in_flight += 1
        return now

    def answered(self, sent_at: float) -> None:
        """The server answered a request sent at ``sent_at``: the silence ends, and its time is learned.
        A slower answer raises ``typical_s`` at once; faster ones bring it down by 5 % each."""
        now = self._timer()
        self._quiet_since = now
        took = now - sent_at
        typical = self.typical_s
        self.typical_s = took if typical is None or took > typical else max(took, typical * 0.95)

    async def turn(self, seconds: float) -> None:
        """Wait until a request to the model reports (or ``seconds``): a call in doubt asks again then."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, seconds)
        except TimeoutError:
            pass
        finally:
            self._waiters.remove(waiter)

    def wake(self) -> None:
        for waiter in self._waiters:  # each on its own loop (sync mode runs calls in private loops)
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_set, waiter)

    def record(self, failed: bool, error: str = "", *, probe: bool = False) -> None:
        if not (failed or probe or self.state.failures):  # a success with nothing to forget
            return
        self.state, change = breaker.record(
            self.state, self.config, self._clock(), failed, error, probe=probe
        )
        if change:
            changed(self, change)

    def release(self) -> None:
        self.state = breaker.release(self.state)

    def snapshot(self) -> dict[str, Any]:
        """What the monitor shows: the status, the failures in the current run, when it probes."""
        state = self.state
        return {
            "conn_id": self.conn_id,
            "model": self.model,
            "backend": self.kind,
            "status": state.status(self._clock()),
            "failures": len(state.failures),
            "last_error": state.last_error,
            "probe_at": state.open_until,
            "opened": state.opened,
        }


def _set(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def changed(item: LocalBreaker, change: str) -> None:
    """The circuit opened or closed (reported once, by the process whose result moved it)."""
    state = item.state
    metrics.circuit(item.conn_id, item.model, change)
    if change == "opened":
        log.warning(
            "circuit breaker of %s on %s opened after %d consecutive failures (last: %s); "
            "calls skip it for %.0f s, then one probe call",
            *(item.model, item.conn_id, len(state.failures), state.last_error, item.config.cooldown_s),
        )
    else:
        log.warning("circuit breaker of %s on %s closed: the probe call succeeded", item.model, item.conn_id)


# --- what the driver calls -----------------------------------------------------------------------


def skip_for(endpoint: Endpoint | None, model: str | None) -> NoAnswer | None:
    """The reply to a link's Send or retry Wait when its circuit is open now: nothing is sent or slept."""
    gate = None if endpoint is None or model is None else breaker_for(endpoint, model)
    skip = None if gate is None else gate.peek()
    return None if skip is None else NoAnswer("circuit_open", circuit=skip)


async def through(
    gate: LocalBreaker | None,
    lease_s: float,
    send: Callable[..., Awaitable[Reply]],
    *args: Any,
    fallback: bool = False,
) -> Reply:
    """``send(*args)`` if the circuit lets the call go (and tell it the result), else the skip as the reply.

    ``lease_s`` bounds the round trip: a probe that has not reported by then lets another one go.
    While the model is in doubt (it failed, and enough trials are in flight) a call with a
    ``fallback`` skips to it; one without waits for a trial to report, up to ``lease_s``, then goes
    anyway: the breaker never fails a call by itself. In doubt for a stall (no failure yet, only
    silence) a call without a fallback goes at once: the model may only be slow.
    """
    if gate is None:
        return await send(*args)
    decision = await gate.admit(lease_s + LEASE_MARGIN_S, lease_s)
    if isinstance(decision, Skip) and decision.in_doubt and not fallback:
        until = time.monotonic() + lease_s
        while _held(decision) and time.monotonic() < until:
            await gate.turn(min(until - time.monotonic(), max(gate.config.cooldown_s / 10, 0.1)))
            decision = await gate.admit(lease_s + LEASE_MARGIN_S, lease_s)
        if isinstance(decision, Skip) and decision.in_doubt:
            decision = breaker.SEND
    if isinstance(decision, Skip):
        return NoAnswer("circuit_open", circuit=decision)
    probe = decision == breaker.PROBE
    sent_at = gate.sent()
    try:
        reply = await send(*args)
    except BaseException:  # cancelled mid-flight: says nothing about the server
        if probe:
            gate.release()
        raise
    finally:
        gate.in_flight -= 1
        if gate._waiters:
            gate.wake()
    status = reply.status if isinstance(reply, Answer) else None
    kind = reply.kind if isinstance(reply, NoAnswer) else None
    if status is not None:
        gate.answered(sent_at)
    failed = breaker.verdict(status, kind)
    if failed is None:
        if probe:
            gate.release()
    else:
        gate.record(failed, breaker.describe_error(status, kind), probe=probe)
    return reply


def _held(decision: str | Skip) -> bool:
    """A call with no fallback waits for the trials of a model that failed, not for a silent one."""
    return isinstance(decision, Skip) and decision.in_doubt and not decision.silent_s


# A probe's round trip is bounded by its timeout; this much more covers the reply's way back.
LEASE_MARGIN_S = 5.0


# --- registry ---------------------------------------------------------------------------------

_local: dict[tuple[str, str], LocalBreaker] = {}
# Shared breakers talk to Redis through a client of the running loop, so they are kept per loop.
_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], LocalBreaker]] = (
    weakref.WeakKeyDictionary()
)


def breaker_for(endpoint: Any, model: str) -> LocalBreaker | None:
    """The breaker of ``(endpoint.conn_id, model)``; rebuilt (closed) if the connection's extra changed."""
    config = endpoint.circuit_breaker
    if config is None:
        return None
    key = (endpoint.conn_id, model)
    backend = endpoint.rate_limit_backend
    if backend:
        registry = _shared.setdefault(asyncio.get_running_loop(), {})
    else:
        registry = _local
    item = registry.get(key)
    if item is None or item.config != config or getattr(item, "url", None) != backend:
        item = registry[key] = _make(endpoint.conn_id, model, config, backend)
    return item


def _make(conn_id: str, model: str, config: BreakerConfig, backend: str | None) -> LocalBreaker:
    if backend:
        try:
            from airflow_llm_async import limits_redis
        except ImportError:  # check_backend refuses such a connection; kept for a hand-made Endpoint
            return LocalBreaker(conn_id, model, config)
        return limits_redis.SharedBreaker(backend, conn_id, model, config)
    return LocalBreaker(conn_id, model, config)


def snapshots() -> list[dict[str, Any]]:
    """Every breaker of this process that has seen a failure (for the monitor and tests)."""
    items = list(_local.values())
    for registry in list(_shared.values()):
        items.extend(registry.values())
    return [item.snapshot() for item in items if item.state != State()]


def reset() -> None:
    """Forget every breaker (tests)."""
    _local.clear()
    _shared.clear()
