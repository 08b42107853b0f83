"""When to try again, and after how long: an I/O-free policy shared by the trigger and sync mode.

The semantics follow the official OpenAI client: retry 408/409/429/5xx, timeouts and
connection errors; honour ``retry-after-ms`` and ``retry-after`` (seconds or an HTTP date)
when the server gives a sane value; otherwise back off exponentially. The jitter is full
(a uniform draw up to the capped exponential delay) so that hundreds of triggers hit by
the same 429 do not come back in lockstep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    """Retries per model, and the backoff between them (seconds)."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    # A server asking for a longer pause than this is ignored in favour of our own backoff.
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("retry delays must satisfy 0 <= initial_delay <= max_delay")

    def should_retry(self, retryable: bool, retries_done: int) -> bool:
        return retryable and retries_done < self.max_retries

    def delay(
        self,
        retries_done: int,
        headers: Mapping[str, str] | None = None,
        *,
        rand: Callable[[], float] = random.random,
        now: Callable[[], float] = time.time,
    ) -> float:
        """Seconds to wait before retry number ``retries_done + 1``."""
        asked = retry_after_seconds(headers, now=now)
        if asked is not None and 0 <= asked <= self.max_retry_after:
            return asked
        ceiling = min(self.max_delay, self.initial_delay * 2**retries_done)
        return ceiling * rand()


def retry_after_seconds(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """The pause a server asked for, from ``retry-after-ms`` or ``retry-after``; None if absent or bad."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment is None or moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now())
