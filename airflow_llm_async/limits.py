"""Per-connection limits on LLM calls in this event loop: a concurrency cap, request and token buckets.

Every call to a connection goes through that connection's :class:`ConnectionLimiter` in this
event loop (the triggerer runs thousands of calls on one loop)::

    limiter = limiter_for(endpoint)
    async with limiter.slot(estimate_tokens(request), model=model) as permit:
        ...  # the HTTP call
        permit.settle(usage["total_tokens"])
    limiter.on_success(permit, answer.headers)  # or limiter.on_rate_limited(permit) after a 429

The arithmetic (token buckets, AIMD) is I/O-free in :mod:`airflow_llm_async.core.buckets`;
:class:`ConnectionLimiter` is the thin async layer on top. Waiters line up on one FIFO lock and
only the head of the line waits for a slot and for tokens, so thousands of waiters cost one timer
at a time, a rate cut takes effect at once (no pre-booked schedule to unwind), and a cancelled
waiter holds nothing to give back.

The configured limits are the connection's; the adaptive back-off is per model, because gateways
and providers rate-limit per model: a 429 cuts only its model's concurrency or rates, in a line of
that model's own (a :class:`ConnectionLimiter` of its own, created by the 429 and dropped once the
model has recovered) which its calls pass before the connection's. A model's cut cap counts its
calls in flight, so the connection counts them per model (a dict increment and decrement per call);
calls to a model that is not backing off see only an empty-dict check more than that.

The model's line also heeds what the server says is left before the 429: an answer's
``x-ratelimit-remaining-requests/-tokens`` and ``x-ratelimit-reset-requests/-tokens`` (or the
``llm_provider-`` forms a gateway forwards). When what is left, spread over the time to the reset,
spaces the model's calls apart (:class:`~airflow_llm_async.core.buckets.ServerPace`), its calls
are paced in its line; nothing left holds them until the reset. An answer without those headers
costs four header look-ups.

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
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from airflow_llm_async.core.buckets import (
    MIN_RATE_FRACTION,
    NO_LIMITS,
    RATE_INCREASE,
    AdaptiveRate,
    Buckets,
    Limits,
    LocalBuckets,
    ServerBudget,
    ServerPace,
    server_budget,
)

log = logging.getLogger(__name__)

# --- async layer ------------------------------------------------------------------------------


class Permit:
    """One call's place within its connection's limits; ``async with limiter.slot(...) as permit``.

    Call :meth:`settle` with the real usage once the answer arrives. An unsettled permit (a failed
    call) keeps its whole reservation: the provider may well have counted it.
    """

    __slots__ = (
        "_limiter",
        "model",
        "estimated_tokens",
        "_timeout",
        "granted_at",
        "waited",
        "_reserved",
        "_actual",
        "_line",
        "_in_line",
        "_pace_mark",
    )

    def __init__(
        self, limiter: ConnectionLimiter, model: str | None, estimated_tokens: int, timeout: float | None
    ) -> None:
        self._limiter = limiter
        self.model = model
        self.estimated_tokens = estimated_tokens
        self._timeout = timeout
        self.granted_at: float | None = None  # the limiter's clock when the call was let through
        self.waited = False  # held back: behind others in line, for a slot, or for tokens
        self._reserved = False
        self._actual: int | None = None
        self._line: ConnectionLimiter | None = None  # the model's own line, while the model backs off
        self._in_line: Permit | None = None  # the place taken in it
        self._pace_mark: tuple[int, int] | None = None  # the model's pace's sends counted when it went

    def settle(self, actual_total_tokens: int | None) -> None:
        """Record the real usage; the difference to the estimate goes back to (or comes from) the bucket.

        Zero or None (a server that reports no usage) keeps the estimate.
        """
        if actual_total_tokens:
            self._actual = actual_total_tokens

    async def __aenter__(self) -> Permit:
        limiter = self._limiter
        if limiter._backing_off:  # some model answered 429 lately: is it this one?
            self._line = limiter._backing_off.get(self.model)
        # No rates, no back-off, nobody in line and a slot free (almost every call): just count it.
        cap = limiter._cap
        if (
            limiter._buckets is None
            and self._line is None
            and not limiter._waiting
            and (cap is None or limiter._in_flight < cap)
        ):
            limiter._in_flight += 1
            limiter._model_in_flight[self.model] += 1
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
        self._model_in_flight: defaultdict[str | None, int] = defaultdict(int)  # the same, per model
        self._pacing = False  # the head of the line holds a slot while it waits for its tokens
        self._waiting = 0
        self._slot_freed: asyncio.Future[None] | None = None  # the head of the line, waiting for a slot
        self._rate_limited = 0
        # The models backing off after a 429, each with a line of its own (see on_rate_limited).
        self._backing_off: dict[str | None, ConnectionLimiter] = {}
        # In a model's line: with buckets, AIMD acts on the fraction of their configured rates;
        # without, a 429 creates an adaptive concurrency cap (see _cut).
        self._adaptive: AdaptiveRate | None = None
        if self._buckets is not None:
            self._adaptive = AdaptiveRate(1.0, floor=MIN_RATE_FRACTION, increase=RATE_INCREASE)
        # In a model's line: the pace the server's x-ratelimit-* headers set (see on_success).
        self._pace: ServerPace | None = None

    @property
    def in_flight(self) -> int:
        """Calls let through and not yet back (the head of the line pacing for tokens not included)."""
        return self._in_flight - self._pacing

    def slot(
        self, estimated_tokens: int = 0, *, timeout: float | None = None, model: str | None = None
    ) -> Permit:
        """``async with limiter.slot(tokens, model=model) as permit``: wait for a slot and tokens, FIFO.

        ``timeout`` (seconds) bounds the wait; past it :class:`TimeoutError` is raised and nothing is held.
        A model backing off after a 429 waits in its own line first (see :meth:`on_rate_limited`).
        """
        return Permit(self, model, estimated_tokens, timeout)

    def on_rate_limited(self, permit: Permit | None = None) -> None:
        """The provider answered 429 for ``permit``'s model: slow that model down, not the connection.

        Pass the call's permit: it names the model, and its send time tells echoes of a cut apart.
        The first 429 of a model opens its line: a limiter with the connection's configured rates
        (halved, drained) or, with none configured, a concurrency cap at half of the model's calls in
        flight. The connection's own cap and buckets stay as configured.
        """
        self._rate_limited += 1
        model = permit.model if permit is not None else None
        line = self._line(model)
        line._rate_limited += 1
        line._cut(permit.granted_at if permit is not None else None, self._model_in_flight[model])

    def on_success(self, permit: Permit | None = None, headers: Mapping[str, str] | None = None) -> None:
        """A call got its answer: heed what its ``headers`` say is left, let its model recover a little.

        Pass the answer's headers (case-insensitive, as aiohttp's): when their ``x-ratelimit-*``
        budgets run short, the model's calls are paced until the reset (:meth:`_heed`).
        """
        if headers:
            budget = server_budget(headers)
            if budget is not None:
                self._heed(permit, budget)
        backing_off = self._backing_off
        if not backing_off:  # the hot path: nothing to recover
            return
        model = permit.model if permit is not None else None
        line = backing_off.get(model)
        if line is not None and not line._recover():
            del backing_off[model]  # recovered: its calls take the fast path again

    def _line(self, model: str | None) -> ConnectionLimiter:
        """The model's own line, opened with the connection's configured limits if it has none."""
        line = self._backing_off.get(model)
        if line is None:
            limits = self.limits
            configured = Limits(
                None if self._buckets is not None else limits.max_concurrency,
                limits.requests_per_minute,
                limits.tokens_per_minute,
            )
            name = f"{self.conn_id} ({model})"
            line = self._backing_off[model] = ConnectionLimiter(
                name, configured, clock=self._clock, sleep=self._sleep
            )
        return line

    def _heed(self, permit: Permit | None, budget: ServerBudget) -> None:
        """An answer said what is left of its model's budgets: pace the model while that is short."""
        model = permit.model if permit is not None else None
        tokens = permit.estimated_tokens if permit is not None else 0  # what one call of it costs
        tight = budget.tight(tokens)
        line = self._backing_off.get(model)
        if line is None:
            if not tight:  # plenty left: the model keeps the fast path
                return
            line = self._line(model)
        if not tight:
            line._pace = None  # the latest word: plenty left (the line goes once it has recovered)
            return
        if line._pace is None:
            line._pace = ServerPace()
            log.info(
                "%s: the server says little is left until its reset (%s): pacing the model's calls",
                line.conn_id,
                _describe(budget),
            )
        line._pace.update(budget, self._clock(), permit._pace_mark if permit is not None else None)

    def _cut(self, sent_at: float | None, in_flight: int) -> None:
        """AIMD of a model's line: cut its rates, or its concurrency cap from the model's ``in_flight``."""
        now = self._clock()
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
        # No rates configured: cap the model's concurrency instead, starting from its calls in flight
        # when the 429 came. Throughput then follows the cap (cap / latency), with no rate to guess.
        if self._adaptive is None:
            ceiling = self.limits.max_concurrency or max(1, in_flight)
            self._adaptive = AdaptiveRate(ceiling, floor=1, increase=1, start=max(1, in_flight))
        if self._adaptive.on_rate_limited(now, sent_at):
            self._set_cap(max(1, int(self._adaptive.value)))
            log.warning("%s answered 429: concurrency capped at %d", self.conn_id, self._cap)

    def _recover(self) -> bool:
        """A success in a model's line: recover a little; False once fully recovered."""
        paced = self._pace is not None and self._pace.active(self._clock())
        adaptive = self._adaptive
        if adaptive is None:
            return paced
        changed = adaptive.on_success()
        if self._buckets is not None:
            if changed:
                self._buckets.set_throttle(adaptive.value)
            return adaptive.throttled or paced
        if not adaptive.throttled:  # recovered: no cap of the model's own, the connection's governs
            self._adaptive = None
            self._set_cap(None)  # wakes its line: calls still in it go on to the connection's line
            return paced
        if changed:
            self._set_cap(int(adaptive.value))
        return True

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: calls running, calls waiting, the current (maybe throttled) limits.

        Bucket levels go negative while reservations are being paid off.
        """
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        fraction = self._adaptive.value if self._buckets is not None and self._adaptive else 1.0
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
        # The models backing off after a 429: their own cut cap or rates.
        stats["models"] = {}
        for model, line in self._backing_off.items():
            line_stats = line.stats()
            line_stats["in_flight"] = self._model_in_flight[model]
            stats["models"][model] = {key: line_stats[key] for key in _MODEL_STATS}
            stats["models"][model]["paced"] = line._pace is not None  # by the server's x-ratelimit-*
        return stats

    # -- internals --

    async def _acquire(self, permit: Permit) -> None:
        permit.waited = self._gate.locked()
        self._waiting += 1
        try:
            if permit._timeout is None:
                await self._wait_in_lines(permit)
            else:
                async with asyncio.timeout(permit._timeout):
                    await self._wait_in_lines(permit)
        finally:
            self._waiting -= 1

    async def _wait_in_lines(self, permit: Permit) -> None:
        line = permit._line
        if line is None:
            if await self._take_turn(permit, paced_off=True):
                return
            # The server said its model has little left while the call waited here: its pace first.
            line = permit._line = self._backing_off[permit.model]
        # The model backs off: its own line first, FIFO, for its cut cap (on its calls in flight)
        # and its cut rates, holding nothing of the connection's meanwhile, so that other models'
        # calls pass it by. Its head then takes its turn in the connection's line, still at the head
        # of its own: the model's count goes up before the next of its line looks at it.
        line._waiting += 1
        permit.waited = permit.waited or line._gate.locked()
        try:
            async with line._gate:
                await line._slot_under_cap(permit, lambda: self._model_in_flight[permit.model])
                in_line = Permit(line, permit.model, permit.estimated_tokens, None)
                if line._pace is not None:  # the server said little is left: spread it to the reset
                    wait = line._pace.reserve(permit.estimated_tokens, line._clock())
                    permit._pace_mark = line._pace.mark()  # its answer speaks of the sends until here
                    if wait > 0:
                        permit.waited = True
                        await line._sleep(wait)
                if line._buckets is not None:
                    await line._reserve(line._buckets, in_line)
                    permit.waited = permit.waited or in_line.waited
                try:
                    await self._take_turn(permit)
                except BaseException:  # nothing was sent: the model's line gets its tokens back
                    if in_line._reserved and line._buckets is not None:
                        line._buckets.adjust(-1, -in_line.estimated_tokens)
                    raise
                permit._in_line = in_line
        finally:
            line._waiting -= 1

    async def _slot_under_cap(self, permit: Permit, taken: Callable[[], int]) -> None:
        """As the head of this line (holding its gate), wait until ``taken()`` is under the cap.

        A release (or a raised cap) wakes the head through ``_slot_freed``.
        """
        while self._cap is not None and taken() >= self._cap:
            permit.waited = True
            self._slot_freed = asyncio.get_running_loop().create_future()
            try:
                await self._slot_freed
            finally:
                self._slot_freed = None

    async def _take_turn(self, permit: Permit, paced_off: bool = False) -> bool:
        """Take a slot (and tokens) in this line; with ``paced_off``, False (holding nothing) if the
        permit's model has come to be paced by the server's headers meanwhile: it must pass its pace."""
        async with self._gate:
            await self._slot_under_cap(permit, lambda: self._in_flight)
            if paced_off and self._backing_off:  # (the pace may have begun while it waited for a slot)
                line = self._backing_off.get(permit.model)
                if line is not None and line._pace is not None:
                    return False
            self._in_flight += 1
            self._model_in_flight[permit.model] += 1
            try:
                if self._buckets is not None:
                    await self._reserve(self._buckets, permit)
            except BaseException:
                self._in_flight -= 1
                self._model_in_flight[permit.model] -= 1
                raise
        permit.granted_at = self._clock()
        return True

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
        self._model_in_flight[permit.model] -= 1
        if self._slot_freed is not None:
            self._wake_head()
        actual = permit._actual
        if permit._reserved and actual is not None and self._buckets is not None:
            self._buckets.adjust(0, actual - permit.estimated_tokens)
        if self._backing_off:  # a slot freed for the model's line
            line = self._backing_off.get(permit.model)
            if line is not None and line._slot_freed is not None:
                line._wake_head()
        in_line = permit._in_line
        if in_line is not None and in_line._reserved and actual is not None:  # the line's own tokens
            buckets = in_line._limiter._buckets
            if buckets is not None:
                buckets.adjust(0, actual - in_line.estimated_tokens)

    def _set_cap(self, cap: int | None) -> None:
        self._cap = cap
        self._wake_head()  # a raised cap may let the head of the line through

    def _wake_head(self) -> None:
        if self._slot_freed is not None and not self._slot_freed.done():
            self._slot_freed.set_result(None)


def _describe(budget: ServerBudget) -> str:
    said = [
        f"{window.remaining} {name} in {window.reset:g} s"
        for name, window in (("requests", budget.requests), ("tokens", budget.tokens))
        if window is not None
    ]
    return ", ".join(said)


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


_MODEL_STATS = (
    "in_flight",
    "waiting",
    "max_concurrency",
    "requests_per_minute",
    "tokens_per_minute",
    "rate_fraction",
    "rate_limited",
)

BACKEND_SCHEMES = ("redis://", "rediss://", "unix://")


def check_backend(url: Any, extra: str = "rate_limit_backend") -> str:
    """Validate a Redis URL extra (``rate_limit_backend``, ``cache_backend``); ValueError says what to fix."""
    if not isinstance(url, str) or not url.startswith(BACKEND_SCHEMES):
        raise ValueError(
            f"'{extra}' must be a Redis URL ({', '.join(BACKEND_SCHEMES)}...), "
            f"e.g. redis://127.0.0.1:6379/0; got {_scheme(url)}"
        )
    if importlib.util.find_spec("redis") is None:
        raise ValueError(f"'{extra}' needs the redis package: pip install 'airflow-llm-async[redis]'")
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
