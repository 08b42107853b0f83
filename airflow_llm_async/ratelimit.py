"""Per-connection limits on LLM calls: a concurrency cap, request and token buckets, AIMD back-off.

Every call to a connection goes through that connection's :class:`ConnectionLimiter` in this
event loop (the triggerer runs thousands of calls on one loop)::

    limiter = limiter_for(endpoint)
    async with limiter.slot(estimate_tokens(request)) as permit:
        ...  # the HTTP call
        permit.settle(usage["total_tokens"])

The core is I/O-free and takes the time as an argument: :class:`TokenBucket` (requests or
tokens per minute, reserved up front, settled afterwards) and :class:`AdaptiveRate` (AIMD:
a 429 halves the allowed rate, successes add it back). :class:`ConnectionLimiter` is the thin
async layer on top. Waiters line up on one FIFO lock and only the head of the line waits for a
slot and for tokens, so thousands of waiters cost one timer at a time, a rate cut takes effect
at once (no pre-booked schedule to unwind), and a cancelled waiter holds nothing to give back.

Optionally (connection extra ``rate_limit_backend: "redis://..."``) the buckets live in Redis
and are shared by every triggerer host; the concurrency cap always stays local. See
:mod:`airflow_llm_async.ratelimit_redis`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

# Buckets hold this many seconds of their rate: a short burst (or one large request) goes at once,
# while thousands of queued calls do not all land on a provider that enforces its per-minute
# limit over shorter windows.
BURST_SECONDS = 10.0
# AIMD on the configured rates: a 429 halves them, down to 1/16; each success adds back 1 %.
RATE_DECREASE = 0.5
MIN_RATE_FRACTION = 1 / 16
RATE_INCREASE = 0.01
# A 429 within this many seconds of the last cut (when we cannot tell when its request was sent)
# is an echo of the old rate, not news about the new one.
RATE_LIMIT_COOLDOWN = 1.0

# Token estimate: one token per CJK character, one per four other characters (as the fake server).
_CJK_RUNS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, per message
NON_TEXT_PART_TOKENS = 765  # an image part: a 1024x1024 image at high detail, a generous guess
DEFAULT_COMPLETION_TOKENS = 1000  # when the request sets no max_tokens


# --- estimate ---------------------------------------------------------------------------------


def estimate_tokens(request: dict[str, Any]) -> int:
    """A cheap upper-bound-ish guess of the tokens a chat request will use: prompt + ``max_tokens``.

    It only has to be good enough to reserve from the tokens-per-minute bucket: the real usage
    settles the difference once the answer arrives.
    """
    return estimate_prompt_tokens(request) + completion_budget(request)


def estimate_prompt_tokens(request: dict[str, Any]) -> int:
    """A guess of the prompt tokens of a chat request (messages, and schemas sent as prompt)."""
    prompt = 0
    for message in request.get("messages") or ():
        prompt += MESSAGE_OVERHEAD_TOKENS
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            prompt += _text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                prompt += _text_tokens(text) if isinstance(text, str) else NON_TEXT_PART_TOKENS
    for key in ("tools", "functions", "response_format"):  # schemas are sent as prompt tokens
        if request.get(key):
            prompt += _text_tokens(json.dumps(request[key], ensure_ascii=False))
    return prompt


def completion_budget(request: dict[str, Any]) -> int:
    """The most completion tokens a request allows: ``max_tokens`` (or a default) times ``n``."""
    completion = request.get("max_completion_tokens") or request.get("max_tokens")
    if not isinstance(completion, int) or completion < 1:
        completion = DEFAULT_COMPLETION_TOKENS
    choices = request.get("n")
    if isinstance(choices, int) and choices > 1:
        completion *= choices
    return completion


def _text_tokens(text: str) -> int:
    if text.isascii():  # O(1) in CPython: the common case skips the regex
        return (len(text) + 3) // 4
    cjk = sum(map(len, _CJK_RUNS.findall(text)))
    return cjk + (len(text) - cjk + 3) // 4


# --- I/O-free core ----------------------------------------------------------------------------


class TokenBucket:
    """Tokens flow in at ``rate`` per second up to ``capacity``; the clock is passed in as ``now``.

    :meth:`reserve` takes its amount at once, even below zero, and returns how long the caller
    must wait before acting on it. The debt is what the next reservation waits out, so the
    long-run rate is exact, reservations made in order are served in order, and a request larger
    than the whole bucket still goes (once the bucket is full) instead of waiting forever.
    """

    __slots__ = ("rate", "capacity", "level", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        _check_positive(rate=rate, capacity=capacity)
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (negative while reservations are still being paid off)."""
        self._refill(now)
        return self.level

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until a reservation of ``amount`` would not have to wait."""
        self._refill(now)
        if amount <= 0:
            return 0.0
        missing = min(amount, self.capacity) - self.level
        return missing / self.rate if missing > 0 else 0.0

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount``; return the seconds to wait before using it (0.0: go now)."""
        wait = self.wait_time(amount, now)
        self.level -= amount
        return wait

    def refund(self, amount: float, now: float) -> None:
        """Give back tokens taken but not used (an over-estimate, a cancelled wait); capped at capacity."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def charge(self, amount: float, now: float) -> None:
        """Take tokens already spent (usage above the estimate): no wait, later callers pay."""
        self._refill(now)
        self.level -= amount

    def adjust(self, amount: float, now: float) -> None:
        """Take ``amount`` more without waiting; a negative amount gives it back."""
        if amount >= 0:
            self.charge(amount, now)
        else:
            self.refund(-amount, now)

    def set_rate(self, rate: float, now: float, capacity: float | None = None) -> None:
        """Switch to a new rate (and capacity) from ``now`` on; time before ``now`` refills at the old one."""
        _check_positive(rate=rate, capacity=self.capacity if capacity is None else capacity)
        self._refill(now)
        self.rate = rate
        if capacity is not None:
            self.capacity = capacity
            self.level = min(self.level, capacity)

    def drain(self, now: float) -> None:
        """Empty the bucket (keep any debt): the provider just said its own bucket is empty."""
        self._refill(now)
        self.level = min(self.level, 0.0)

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:  # a clock that steps back refills nothing
            self.level = min(self.capacity, self.level + elapsed * self.rate)
            self.updated = now


class AdaptiveRate:
    """AIMD: a 429 multiplies ``value`` by ``decrease``, a success adds ``increase``; in [floor, ceiling].

    Used on the fraction of the configured rates (ceiling 1.0), or on a concurrency cap. One burst
    of 429s is one signal: a 429 for a request sent before the last cut (or, when the send time is
    unknown, within ``cooldown`` seconds of it) was caused by the old value and is ignored.
    """

    __slots__ = ("ceiling", "floor", "increase", "decrease", "cooldown", "value", "_cut_at")

    def __init__(
        self,
        ceiling: float,
        *,
        floor: float,
        increase: float,
        decrease: float = RATE_DECREASE,
        cooldown: float = RATE_LIMIT_COOLDOWN,
        start: float | None = None,
    ) -> None:
        _check_positive(ceiling=ceiling, floor=floor, increase=increase)
        if floor > ceiling or not 0 < decrease < 1 or cooldown < 0:
            raise ValueError("AdaptiveRate needs floor <= ceiling, 0 < decrease < 1 and cooldown >= 0")
        self.ceiling = ceiling
        self.floor = floor
        self.increase = increase
        self.decrease = decrease
        self.cooldown = cooldown
        self.value = ceiling if start is None else min(max(start, floor), ceiling)
        self._cut_at = -math.inf

    @property
    def throttled(self) -> bool:
        return self.value < self.ceiling

    def on_rate_limited(self, now: float, sent_at: float | None = None) -> bool:
        """Cut the value unless this 429 echoes the last cut; True if it was cut."""
        since = sent_at if sent_at is not None else now - self.cooldown
        if since < self._cut_at:
            return False
        self._cut_at = now
        self.value = max(self.floor, self.value * self.decrease)
        return True

    def on_success(self) -> bool:
        """Add ``increase`` back; True if the value changed."""
        if self.value >= self.ceiling:
            return False
        self.value = min(self.ceiling, self.value + self.increase)
        return True


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


# --- buckets of one connection ----------------------------------------------------------------


class Buckets(Protocol):
    """The request and token buckets of a connection: in this process or in Redis."""

    kind: str

    async def reserve(self, tokens: int) -> float: ...

    def adjust(self, requests: float, tokens: float) -> None: ...

    def set_throttle(self, fraction: float) -> None: ...

    def drain(self) -> None: ...

    def snapshot(self) -> dict[str, float | None]: ...


class LocalBuckets:
    """A connection's buckets in this process: rates are the configured ones times ``fraction``."""

    kind = "local"

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        now = clock()
        self._clock = clock
        self.configured = (requests_per_minute, tokens_per_minute)
        self.requests = _bucket(requests_per_minute, now)
        self.tokens = _bucket(tokens_per_minute, now)

    async def reserve(self, tokens: int) -> float:
        return self.reserve_now(tokens)

    def reserve_now(self, tokens: int) -> float:
        """Take one request and ``tokens``; the seconds to wait before sending."""
        now = self._clock()
        wait = 0.0
        if self.requests is not None:
            wait = self.requests.reserve(1, now)
        if self.tokens is not None and tokens > 0:
            wait = max(wait, self.tokens.reserve(tokens, now))
        return wait

    def adjust(self, requests: float, tokens: float) -> None:
        """Take more (positive) or give back (negative), without waiting."""
        now = self._clock()
        if self.requests is not None and requests:
            self.requests.adjust(requests, now)
        if self.tokens is not None and tokens:
            self.tokens.adjust(tokens, now)

    def set_throttle(self, fraction: float) -> None:
        now = self._clock()
        for bucket, per_minute in zip((self.requests, self.tokens), self.configured, strict=True):
            if bucket is not None and per_minute:
                rate = per_minute / 60 * fraction
                bucket.set_rate(rate, now, capacity=rate * BURST_SECONDS)

    def drain(self) -> None:
        now = self._clock()
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.drain(now)

    def snapshot(self) -> dict[str, float | None]:
        now = self._clock()
        return {
            "requests_available": None if self.requests is None else self.requests.available(now),
            "tokens_available": None if self.tokens is None else self.tokens.available(now),
        }


def _bucket(per_minute: int | None, now: float) -> TokenBucket | None:
    if not per_minute:
        return None
    rate = per_minute / 60
    return TokenBucket(rate, rate * BURST_SECONDS, now)


# --- async layer ------------------------------------------------------------------------------


class Limits(NamedTuple):
    """A connection's configured limits (a tuple: cheap to build and compare on every call)."""

    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    backend: str | None = None  # a redis:// URL: keep the buckets there

    @classmethod
    def of(cls, endpoint: Any) -> Limits:
        return cls(
            endpoint.max_concurrency,
            endpoint.requests_per_minute,
            endpoint.tokens_per_minute,
            endpoint.rate_limit_backend,
        )


NO_LIMITS = Limits()


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
        if limiter._fast:  # no limits: just count it
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
        self._fast = self._cap is None and self._buckets is None

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
        self._fast = cap is None and self._buckets is None
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
        from airflow_llm_async import ratelimit_redis
    except ImportError:
        log.error(
            "%s: rate_limit_backend needs the redis package (pip install 'airflow-llm-async[redis]'); "
            "limiting in this process only",
            conn_id,
        )
        return local
    return ratelimit_redis.RedisBuckets.for_url(limits.backend, conn_id, limits, fallback=local)


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


def loop_stats() -> list[dict[str, Any]]:
    """:meth:`ConnectionLimiter.stats` of every limiter in the running loop."""
    limiters = _limiters.get(asyncio.get_running_loop()) or {}
    return [limiter.stats() for limiter in limiters.values()]


async def close_loop_limiters() -> None:
    """Forget the running loop's limiters and close their Redis clients (before a private loop ends)."""
    _limiters.pop(asyncio.get_running_loop(), None)
    try:
        from airflow_llm_async import ratelimit_redis
    except ImportError:
        return
    await ratelimit_redis.close_clients()
