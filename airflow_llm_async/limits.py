"""Per-connection limits on LLM calls in this event loop: a concurrency cap, request and token buckets.

Every call to a connection goes through that connection's :class:`ConnectionLimiter` in this
event loop (the triggerer runs thousands of calls on one loop)::

    limiter = limiter_for(endpoint)
    async with limiter.slot(estimate_tokens(request)) as permit:
        ...  # the HTTP call
        permit.settle(usage["total_tokens"])

The arithmetic (token buckets, AIMD) is I/O-free in :mod:`airflow_llm_async.core.buckets`;
:class:`ConnectionLimiter` is the thin async layer on top. Waiters line up on one FIFO lock and
only the head of the line waits for a slot and for tokens, so thousands of waiters cost one timer
at a time, a rate cut takes effect at once (no pre-booked schedule to unwind), and a cancelled
waiter holds nothing to give back.

Optionally (connection extra ``rate_limit_backend: "redis://..."``) the buckets live in Redis
and are shared by every triggerer host; the concurrency cap always stays local. See
:mod:`airflow_llm_async.limits_redis`, which implements the :class:`~airflow_llm_async.core.buckets.Buckets`
interface.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from airflow_llm_async.core.buckets import (
    MIN_RATE_FRACTION,
    NO_LIMITS,
    RATE_INCREASE,
    AdaptiveRate,
    Buckets,
    Limits,
    LocalBuckets,
)

log = logging.getLogger(__name__)

# --- async layer ------------------------------------------------------------------------------


class Permit:
    """One call's place within its connection's limits; ``async with limiter.slot(...) as permit``.

    Call :meth:`settle` with the real usage once the answer arrives. An unsettled permit (a failed
    call) keeps its whole reservation: the provider may well have counted it.
    """

    __slots__ = ("_limiter", "estimated_tokens", "_timeout", "granted_at", "waited", "_reserved", "_actual")

    def __init__(self, limiter: ConnectionLimiter, estimated_tokens: int, timeout: float | None) -> None:
        self._limiter = limiter
        self.estimated_tokens = estimated_tokens
        self._timeout = timeout
        self.granted_at: float | None = None  # the limiter's clock when the call was let through
        self.waited = False  # held back: behind others in line, for a slot, or for tokens
        self._reserved = False
        self._actual: int | None = None

    def settle(self, actual_total_tokens: int | None) -> None:
        """Record the real usage; the difference to the estimate goes back to (or comes from) the bucket.

        Zero or None (a server that reports no usage) keeps the estimate.
        """
        if actual_total_tokens:
            self._actual = actual_total_tokens

    async def __aenter__(self) -> Permit:
        limiter = self._limiter
        # No rates, nobody in line and a slot free (almost every call): just count it.
        cap = limiter._cap
        if limiter._buckets is None and not limiter._waiting and (cap is None or limiter._in_flight < cap):
            limiter._in_flight += 1
            self.granted_at = limiter._clock()
        else:
            await limiter._acquire(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter._release(self)


class ConnectionLimiter:
    """The limits of one connection in one event loop; get it with :func:`limiter_for`.

    Waiters line up on a FIFO lock; only the head of the line waits, first for a concurrency slot
    and then for its tokens. A cancelled waiter is simply gone from the line: it holds nothing,
    except the head, which gives its slot and reservation back on the way out.
    """

    def __init__(
        self,
        conn_id: str,
        limits: Limits = NO_LIMITS,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        buckets: Buckets | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.limits = limits
        self._clock = clock
        self._sleep = sleep
        self._buckets = buckets if buckets is not None else _make_buckets(conn_id, limits, clock)
        self._gate = asyncio.Lock()
        self._cap = limits.max_concurrency
        self._in_flight = 0  # slots taken: calls let through, and the head of the line while it paces
        self._pacing = False  # the head of the line holds a slot while it waits for its tokens
        self._waiting = 0
        self._slot_freed: asyncio.Future[None] | None = None  # the head of the line, waiting for a slot
        self._rate_limited = 0
        # With buckets, AIMD acts on the fraction of their configured rates; without, a 429 creates
        # an adaptive concurrency cap (see on_rate_limited).
        self._adaptive: AdaptiveRate | None = None
        if self._buckets is not None:
            self._adaptive = AdaptiveRate(1.0, floor=MIN_RATE_FRACTION, increase=RATE_INCREASE)

    @property
    def in_flight(self) -> int:
        """Calls let through and not yet back (the head of the line pacing for tokens not included)."""
        return self._in_flight - self._pacing

    def slot(self, estimated_tokens: int = 0, *, timeout: float | None = None) -> Permit:
        """``async with limiter.slot(tokens) as permit``: wait for a slot and tokens, FIFO.

        ``timeout`` (seconds) bounds the wait; past it :class:`TimeoutError` is raised and nothing is held.
        """
        return Permit(self, estimated_tokens, timeout)

    def on_rate_limited(self, permit: Permit | None = None) -> None:
        """The provider answered 429: slow down. Pass the call's permit so echoes of a cut are ignored."""
        self._rate_limited += 1
        now = self._clock()
        sent_at = permit.granted_at if permit is not None else None
        if self._buckets is not None:
            assert self._adaptive is not None
            if self._adaptive.on_rate_limited(now, sent_at):
                self._buckets.set_throttle(self._adaptive.value)
                self._buckets.drain()
                log.warning(
                    "%s answered 429: rate cut to %.0f%% of the configured limits",
                    self.conn_id,
                    100 * self._adaptive.value,
                )
            return
        # No rates configured: cap concurrency instead, starting from what was in flight when the 429
        # came. Throughput then follows the cap (cap / latency), with no rate to guess.
        if self._adaptive is None:
            ceiling = self.limits.max_concurrency or max(1, self._in_flight)
            self._adaptive = AdaptiveRate(ceiling, floor=1, increase=1, start=max(1, self._in_flight))
        if self._adaptive.on_rate_limited(now, sent_at):
            self._set_cap(max(1, int(self._adaptive.value)))
            log.warning("%s answered 429: concurrency capped at %d", self.conn_id, self._cap)

    def on_success(self) -> None:
        """A call got its answer: let the rate (or the adaptive cap) recover a little."""
        adaptive = self._adaptive
        if adaptive is None:  # the hot path: nothing to recover
            return
        changed = adaptive.on_success()
        if self._buckets is not None:
            if changed:
                self._buckets.set_throttle(adaptive.value)
        elif not adaptive.throttled:  # recovered: back to the configured cap (or none: the fast path)
            self._adaptive = None
            self._set_cap(self.limits.max_concurrency)
        elif changed:
            self._set_cap(int(adaptive.value))

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: calls running, calls waiting, the current (maybe throttled) limits.

        Bucket levels go negative while reservations are being paid off.
        """
        fraction = self._adaptive.value if self._buckets is not None and self._adaptive else 1.0
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        stats: dict[str, Any] = {
            "conn_id": self.conn_id,
            "backend": self._buckets.kind if self._buckets is not None else None,
            "in_flight": self.in_flight,
            "waiting": self._waiting,
            "max_concurrency": self._cap,
            "requests_per_minute": rpm * fraction if rpm else None,
            "tokens_per_minute": tpm * fraction if tpm else None,
            "rate_fraction": fraction,
            "rate_limited": self._rate_limited,
            "requests_available": None,
            "tokens_available": None,
        }
        if self._buckets is not None:
            stats.update(self._buckets.snapshot())
        return stats

    # -- internals --

    async def _acquire(self, permit: Permit) -> None:
        permit.waited = self._gate.locked()
        self._waiting += 1
        try:
            if permit._timeout is None:
                await self._take_turn(permit)
            else:
                async with asyncio.timeout(permit._timeout):
                    await self._take_turn(permit)
        finally:
            self._waiting -= 1

    async def _take_turn(self, permit: Permit) -> None:
        async with self._gate:
            while self._cap is not None and self._in_flight >= self._cap:
                permit.waited = True
                self._slot_freed = asyncio.get_running_loop().create_future()
                try:
                    await self._slot_freed
                finally:
                    self._slot_freed = None
            self._in_flight += 1
            try:
                if self._buckets is not None:
                    await self._reserve(self._buckets, permit)
            except BaseException:
                self._in_flight -= 1
                raise
        permit.granted_at = self._clock()

    async def _reserve(self, buckets: Buckets, permit: Permit) -> None:
        wait = await buckets.reserve(permit.estimated_tokens)
        if wait > 0:
            permit.waited = True
            self._pacing = True
            try:
                await self._sleep(wait)
            except BaseException:  # cancelled or timed out while waiting: nothing was sent
                buckets.adjust(-1, -permit.estimated_tokens)
                raise
            finally:
                self._pacing = False
        permit._reserved = True

    def _release(self, permit: Permit) -> None:
        self._in_flight -= 1
        if self._slot_freed is not None:
            self._wake_head()
        if permit._reserved and permit._actual is not None and self._buckets is not None:
            self._buckets.adjust(0, permit._actual - permit.estimated_tokens)

    def _set_cap(self, cap: int | None) -> None:
        self._cap = cap
        self._wake_head()  # a raised cap may let the head of the line through

    def _wake_head(self) -> None:
        if self._slot_freed is not None and not self._slot_freed.done():
            self._slot_freed.set_result(None)


def _make_buckets(conn_id: str, limits: Limits, clock: Callable[[], float]) -> Buckets | None:
    if not (limits.requests_per_minute or limits.tokens_per_minute):
        return None
    local = LocalBuckets(limits.requests_per_minute, limits.tokens_per_minute, clock)
    if not limits.backend:
        return local
    try:
        from airflow_llm_async import limits_redis
    except ImportError:
        log.error(
            "%s: rate_limit_backend needs the redis package (pip install 'airflow-llm-async[redis]'); "
            "limiting in this process only",
            conn_id,
        )
        return local
    return limits_redis.RedisBuckets.for_url(limits.backend, conn_id, limits, fallback=local)


BACKEND_SCHEMES = ("redis://", "rediss://", "unix://")


def check_backend(url: Any) -> str:
    """Validate a ``rate_limit_backend`` extra and return it; ValueError says what to fix."""
    if not isinstance(url, str) or not url.startswith(BACKEND_SCHEMES):
        raise ValueError(
            f"'rate_limit_backend' must be a Redis URL ({', '.join(BACKEND_SCHEMES)}...), "
            f"e.g. redis://127.0.0.1:6379/0; got {_scheme(url)}"
        )
    if importlib.util.find_spec("redis") is None:
        raise ValueError(
            "'rate_limit_backend' needs the redis package: pip install 'airflow-llm-async[redis]'"
        )
    return url


def _scheme(value: Any) -> str:
    # Never echo the value: a URL may carry a password.
    if isinstance(value, str) and "://" in value:
        return f"a {value.partition('://')[0]}:// URL"
    return f"a {type(value).__name__}"


# --- registry ---------------------------------------------------------------------------------

_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ConnectionLimiter]] = (
    weakref.WeakKeyDictionary()
)


def limiter_for(endpoint: Any) -> ConnectionLimiter:
    """The limiter of ``endpoint``'s connection in the running loop; rebuilt if its limits changed.

    A rebuilt limiter starts empty: calls still in flight on the old one finish there.
    """
    loop = asyncio.get_running_loop()
    limiters = _limiters.get(loop)
    if limiters is None:
        limiters = _limiters[loop] = {}
    limits = Limits.of(endpoint)
    limiter = limiters.get(endpoint.conn_id)
    if limiter is None or limiter.limits != limits:
        limiter = limiters[endpoint.conn_id] = ConnectionLimiter(endpoint.conn_id, limits)
    return limiter


async def close_loop_limiters() -> None:
    """Forget the running loop's limiters and close their Redis clients (before a private loop ends)."""
    _limiters.pop(asyncio.get_running_loop(), None)
    try:
        from airflow_llm_async import limits_redis
    except ImportError:
        return
    await limits_redis.close_clients()
