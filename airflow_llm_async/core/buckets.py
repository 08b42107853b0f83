"""Rate-limit arithmetic, without I/O: token buckets, AIMD, and a connection's buckets in this process.

The clock is always passed in (``now``), so every rule here is tested without sleeping.
:class:`TokenBucket` holds requests or tokens per minute, reserved up front and settled
afterwards; :class:`AdaptiveRate` is AIMD: a 429 halves the allowed rate, successes add it back.
:class:`Buckets` is the interface of a connection's request and token buckets, which
:class:`LocalBuckets` implements in this process and ``limits_redis.RedisBuckets`` in Redis.
:func:`server_budget` reads what an answer's ``x-ratelimit-*`` headers say is left of a model's
budgets, and :class:`ServerPace` spreads it over the time to their resets.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from airflow_llm_async.core.retry import FORWARDED_PREFIXES

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


# --- what the server says is left: x-ratelimit-* headers on an answer -------------------------

# Pace a model only when spreading what is left over the time to its reset spaces its calls at
# least this far apart; below it (a high tier's 9,999 requests left, reset in 6 ms) the pace would
# hold nothing back, and the model's calls keep the fast path.
PACE_MIN_INTERVAL = 0.001
# A reset further away than this is no window a chat model has; the header is garbage.
MAX_RESET_SECONDS = 86_400.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PLAIN_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_COUNT = re.compile(r"\d{1,15}")


class ServerWindow(NamedTuple):
    """One budget as the server reported it: ``remaining`` requests or tokens, full again in ``reset`` s."""

    remaining: int
    reset: float


class ServerBudget(NamedTuple):
    """What an answer's ``x-ratelimit-*`` headers say is left of the model's budgets (None: not said)."""

    requests: ServerWindow | None
    tokens: ServerWindow | None

    def tight(self, tokens: int) -> bool:
        """Would spreading what is left over the time to the reset space calls of ``tokens`` apart?"""
        return any(
            window is not None and _spacing(window, cost) >= PACE_MIN_INTERVAL
            for window, cost in ((self.requests, 1), (self.tokens, tokens))
        )


def _spacing(window: ServerWindow, cost: int) -> float:
    if cost <= 0 or window.reset <= 0:
        return 0.0
    return math.inf if window.remaining <= 0 else window.reset * cost / window.remaining


def server_budget(headers: Mapping[str, str]) -> ServerBudget | None:
    """The budgets an answer's headers report; None when they report none (almost every answer).

    ``headers`` must look names up case-insensitively (aiohttp's do) or have lowercase names. Each
    budget is read from one source, the gateway's own headers first, then the ones it forwards from
    the provider behind it (``llm_provider-x-ratelimit-...``), as for ``retry-after``; a source whose
    remaining count or reset is missing or malformed is skipped.
    """
    requests = _window(headers, "requests")
    tokens = _window(headers, "tokens")
    if requests is None and tokens is None:
        return None
    return ServerBudget(requests, tokens)


# Per budget, per source: the names of its remaining and reset headers (built once: every answer asks).
_BUDGET_HEADERS = {
    budget: tuple(
        (f"{prefix}x-ratelimit-remaining-{budget}", f"{prefix}x-ratelimit-reset-{budget}")
        for prefix in FORWARDED_PREFIXES
    )
    for budget in ("requests", "tokens")
}


def _window(headers: Mapping[str, str], budget: str) -> ServerWindow | None:
    for remaining_name, reset_name in _BUDGET_HEADERS[budget]:
        remaining = headers.get(remaining_name)
        if remaining is None:
            continue
        reset = parse_duration(headers.get(reset_name))
        remaining = remaining.strip()
        if reset is not None and _COUNT.fullmatch(remaining):
            return ServerWindow(int(remaining), reset)
    return None


def parse_duration(text: str | None) -> float | None:
    """Seconds in OpenAI's reset format (Go's: ``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``) or plain
    seconds (``12``, ``0.5``); None for anything else, or beyond a day."""
    if not isinstance(text, str) or len(text) > 40:
        return None
    text = text.strip()
    if _PLAIN_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    return seconds if seconds <= MAX_RESET_SECONDS else None


class ServerPace:
    """Spreads what the server last said is left of a model's budgets over the time to their resets.

    After :meth:`update` (an answer's budgets, at ``now``), a send of ``tokens`` may go once the share
    of each budget booked since then is no larger than the share of its window gone by; a send that
    does not fit in what is left waits for the reset. Nothing left: every send waits for the reset.
    Past its reset a budget holds nothing back (the next answer says what is left of the new one).

    An answer speaks of the requests the server had when it answered, not of the sends made while it
    travelled: the sends after the answered request (counted by :meth:`mark` when it went) stay
    booked against what the answer says is left.
    """

    __slots__ = ("_windows", "_sent")

    def __init__(self) -> None:
        # Per budget: [remaining, reset_at, since (the update's time), booked since then].
        self._windows: dict[str, list[float]] = {}
        self._sent = [0, 0]  # requests and tokens this pace let go, ever

    def mark(self) -> tuple[int, int]:
        """The sends counted so far: take it as a request goes, give it back with its answer's budgets."""
        return self._sent[0], self._sent[1]

    def update(self, budget: ServerBudget, now: float, mark: tuple[int, int] | None = None) -> None:
        """The budgets an answer reported at ``now``, for a request that went at ``mark`` (None: before
        this pace began, so every send it let go came after it)."""
        since = mark or (0, 0)
        for name, window, sent, before in (
            ("requests", budget.requests, self._sent[0], since[0]),
            ("tokens", budget.tokens, self._sent[1], since[1]),
        ):
            if window is not None:
                self._windows[name] = [window.remaining, now + window.reset, now, float(sent - before)]

    def reserve(self, tokens: int, now: float) -> float:
        """Book a send of ``tokens``; the seconds to wait before sending it (0.0: go now)."""
        go = now
        booked = []
        for name, cost in (("requests", 1), ("tokens", tokens)):
            window = self._windows.get(name)
            if window is None or cost <= 0:
                continue
            remaining, reset_at, since, used = window
            if now >= reset_at:  # its window is over
                del self._windows[name]
                continue
            if used + cost > remaining:
                go = max(go, reset_at)
            else:
                go = max(go, since + (reset_at - since) * used / remaining)
            booked.append((window, cost))
        for window, cost in booked:
            window[3] += cost
        self._sent[0] += 1
        self._sent[1] += max(0, tokens)
        return go - now

    def active(self, now: float) -> bool:
        """Does any budget's window still run?"""
        return any(now < window[1] for window in self._windows.values())
