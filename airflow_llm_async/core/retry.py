"""When to try again, and after how long: an I/O-free policy the engine consults after a failed attempt.

The semantics follow the official OpenAI client (openai-python ``_should_retry`` and
``_calculate_retry_timeout``): a server's ``x-should-retry: true|false`` decides first; otherwise
408/409/429/5xx, timeouts and connection errors are retried. ``retry-after-ms`` and
``retry-after`` (seconds or an HTTP date) are honoured when positive, and so are the forms a
gateway forwards from the provider behind it (LiteLLM's ``llm_provider-retry-after``); ``0`` (or a bad value)
means our own back-off. A server asking for a longer pause than ``max_retry_after`` is not
waited on: the call moves down its fallback chain instead. The back-off is exponential with
full jitter (a uniform draw up to the capped delay), so hundreds of triggers hit by the same 429
do not come back in lockstep.

A rate-limit refusal (429) says "later", not "never": with ``rate_limit_patience`` (the connection
extra ``rate_limit_patience_s``) the engine retries it within that many seconds from the link's
first 429, whatever ``max_retries`` (which still counts every other retryable failure). Each such
wait is the longer of what the server asked and our own back-off (grown by the refusals so far, so a
long storm is met with ever sparser retries, not a flood). ``0`` counts 429s as ``max_retries``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import NamedTuple

# How long a link waits out rate-limit refusals by default: a nightly pipeline gladly waits out a
# storm of a minute or two; longer, and the task is better failed and retried by Airflow.
DEFAULT_RATE_LIMIT_PATIENCE_S = 120.0
# A 429 with one of these codes is a used-up quota, not a passing storm.
QUOTA_CODES = frozenset({"insufficient_quota"})


class Decision(NamedTuple):
    """Retry after ``wait`` seconds, or (``wait`` None) stop trying this model; ``why`` says which rule."""

    wait: float | None
    why: str


@dataclass(frozen=True)
class RetryPolicy:
    """Retries per model, and the back-off between them (seconds)."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    # A server asking for a longer pause than this is not waited on: the chain moves on.
    max_retry_after: float = 60.0
    # Seconds a link keeps retrying rate-limit refusals (from its first one); 0: they count as retries.
    rate_limit_patience: float = DEFAULT_RATE_LIMIT_PATIENCE_S

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("retry delays must satisfy 0 <= initial_delay <= max_delay")
        if self.rate_limit_patience < 0:
            raise ValueError(f"rate_limit_patience must be >= 0 seconds, got {self.rate_limit_patience!r}")

    def decide(
        self,
        retryable: bool,
        retries_done: int,
        headers: Mapping[str, str] | None = None,
        *,
        rand: Callable[[], float] = random.random,
        now: Callable[[], float] = time.time,
        refused_for: float | None = None,
    ) -> Decision:
        """After a failed attempt (``retryable`` by its kind), and ``retries_done`` retries of this model.

        ``refused_for``: the attempt was a rate-limit refusal to wait out (see :meth:`patient`), this
        many seconds after the link's first one; ``retries_done`` then counts the link's refusals.
        """
        lowered = {k.lower(): v for k, v in headers.items()} if headers else {}
        told = lowered.get("x-should-retry")
        if told == "false":
            return Decision(None, "the server said x-should-retry: false")
        if not retryable and told != "true":
            return Decision(None, "not retryable")
        patient = refused_for is not None and self.rate_limit_patience > 0
        if not patient and retries_done >= self.max_retries:
            return Decision(None, f"{self.max_retries} retries done")
        asked = retry_after_seconds(lowered, now=now)
        if asked is not None and asked > self.max_retry_after:
            return Decision(
                None, f"the server asked to wait {asked:.0f} s, more than {self.max_retry_after:.0f} s"
            )
        if patient:
            assert refused_for is not None
            # Never sooner than asked; later as the refusals go on: a storm's retries thin out.
            pause = max(asked or 0.0, self.backoff(retries_done, rand))
            if refused_for + pause > self.rate_limit_patience:
                return Decision(
                    None,
                    f"rate-limited for {refused_for:.0f} s; another {pause:.1f} s would pass the "
                    f"rate_limit_patience_s of {self.rate_limit_patience:g} s",
                )
            return Decision(pause, "rate limit: patience")
        if asked is not None and asked > 0:
            return Decision(asked, "retry-after")
        return Decision(self.backoff(retries_done, rand), "back-off")

    def patient(self, kind: str, code: str | None) -> bool:
        """Whether a failure of this ``kind`` (and body ``code``) is a refusal to wait out, not to count.

        An exhausted quota (OpenAI's 429 ``insufficient_quota``) says "never" until someone pays: counted.
        """
        return self.rate_limit_patience > 0 and kind == "rate_limit" and code not in QUOTA_CODES

    def backoff(self, retries_done: int, rand: Callable[[], float] = random.random) -> float:
        """Our own pause before retry number ``retries_done + 1``: full jitter under a capped exponential."""
        ceiling = min(self.max_delay, self.initial_delay * 2**retries_done)
        return ceiling * rand()


def retry_after_seconds(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """The pause a server asked for, from ``retry-after-ms`` or ``retry-after``; None if absent or bad."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = _first(lowered, "retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = _first(lowered, "retry-after")
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


# A gateway's own header first, then the one it forwards from the provider behind it (LiteLLM's
# prefix); the rate-limit headers of an answer are read the same way (core.buckets.server_budget).
FORWARDED_PREFIXES = ("", "llm_provider-")


def _first(lowered: Mapping[str, str], name: str) -> str | None:
    return next((lowered[p + name] for p in FORWARDED_PREFIXES if p + name in lowered), None)
