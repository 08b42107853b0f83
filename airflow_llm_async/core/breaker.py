"""The circuit breaker of one (connection, model): a pure state machine, clock passed in.

Closed: calls go out, and each retryable failure (an answer with a 5xx status, a timeout, a refused
or dropped connection) is remembered; any other answer (2xx, and 4xx too: the server is up, and a
429 is the limiter's business) forgets them. ``failures`` consecutive failures within ``window_s``
open the circuit: calls skip the model for ``cooldown_s``. Then one call goes out as the probe
(half-open; the others still skip): its success closes the circuit, its failure opens it again.

Between the first failure and the verdict (an answer, or the circuit opening) the model is in doubt:
only as many requests may be in flight to it as failures are still needed to open the circuit
(:func:`trials`); a call past that skips to its fallback, or waits for a trial to report when it has
none. So a dead model sees the requests already in flight when its first failure came back, plus
``failures`` at most, however many calls arrive meanwhile.

A stalled model sends no failure back before its first timeout, so it is also in doubt while it
has requests out and has answered none of them for :func:`stall_after` (twice what its answers took
lately): calls with a fallback take it, calls without one still go out (a slow model must not make
them wait), and its first answer ends the doubt. A model that answers is never capped.

The state is a small immutable :class:`State`, so the same functions serve a process's own
breakers (``breakers.py``) and the state shared through Redis (``limits_redis.py``), which reads
it, applies them and writes it back in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The connection extra ``circuit_breaker``; these defaults apply when the extra is absent."""

    failures: int = 5  # consecutive retryable failures that open the circuit ...
    window_s: float = 30.0  # ... all within this many seconds
    cooldown_s: float = 30.0  # open this long, then one probe call

    def to_dict(self) -> dict[str, Any]:
        return {"failures": self.failures, "window_s": self.window_s, "cooldown_s": self.cooldown_s}


DEFAULT = BreakerConfig()


@dataclass(frozen=True, slots=True)
class State:
    """What a breaker remembers. Times are seconds on the clock the caller passes in."""

    failures: tuple[float, ...] = ()  # when the current run of consecutive failures happened (latest last)
    last_error: str = ""  # the latest failure, e.g. "server 503"
    open_until: float | None = None  # open: no call until then; then half-open
    probe_until: float | None = None  # half-open with a probe out: others skip until it reports or expires
    opened: int = 0  # runs of failures that opened it (seen failures = ``failures`` until closed)

    def status(self, now: float) -> str:
        if self.open_until is None:
            return CLOSED
        return OPEN if now < self.open_until else HALF_OPEN

    def to_dict(self) -> dict[str, Any]:
        return {
            "failures": list(self.failures),
            "last_error": self.last_error,
            "open_until": self.open_until,
            "probe_until": self.probe_until,
            "opened": self.opened,
        }

    @classmethod
    def from_dict(cls, data: Any) -> State:
        """A stored state; anything unreadable is a closed circuit (a breaker must never block on its own)."""
        if not isinstance(data, dict):
            return cls()
        try:
            return cls(
                failures=tuple(float(t) for t in data.get("failures") or ()),
                last_error=str(data.get("last_error") or ""),
                open_until=_number(data.get("open_until")),
                probe_until=_number(data.get("probe_until")),
                opened=int(data.get("opened") or 0),
            )
        except (TypeError, ValueError):
            return cls()


@dataclass(frozen=True, slots=True)
class Skip:
    """Why a call must not go out: the circuit is open (or another call is its probe), or ``in_doubt``:
    the model failed and enough requests to decide are already in flight (see :func:`trials`)."""

    failures: int  # consecutive failures that opened it (in doubt: seen so far)
    last_error: str
    probe_at: float  # when a call may go out again (as the probe, or once the probe has reported)
    in_doubt: bool = False
    silent_s: float = 0.0  # in doubt because requests are out with no answer for this long (a stall)


# What admit() answers besides a Skip.
SEND, PROBE = "send", "probe"


def admit(
    state: State, config: BreakerConfig, now: float, lease_s: float, in_flight: int = 0, silent_s: float = 0.0
) -> tuple[str | Skip, State]:
    """May a call go out now? ``SEND``, ``PROBE`` (it is the one probe: report its result with
    ``probe=True``) or a :class:`Skip`; and the new state. A probe that has not reported within
    ``lease_s`` (its process died, or it was never sent and not released) lets another one go.
    ``in_flight``: this process's requests to the model now (see :func:`trials`); ``silent_s``: how
    long they have been out with no answer, when that is past :func:`stall_after` (else 0)."""
    status = state.status(now)
    if status == CLOSED:
        cap = trials(state, config, now)
        if cap is None and silent_s > 0:  # no failure, but silent: maybe a stall, none reported yet
            cap = config.failures
        else:
            silent_s = 0.0  # failures decide (their cap holds a call with no fallback)
        if cap is not None and in_flight >= cap:
            return doubt(state, config, now, silent_s), state
        return SEND, state
    if status == HALF_OPEN and (state.probe_until is None or state.probe_until <= now):
        return PROBE, replace(state, probe_until=now + lease_s)
    return skip_of(state, now, config), state


def trials(state: State, config: BreakerConfig, now: float) -> int | None:
    """How many requests may be in flight to a closed circuit's model: None (no cap) until it fails
    (or, see :func:`admit`, stalls: then ``failures``).

    After a failure, as many as failures are still needed to open it: if they all fail it opens
    having been sent no more than that; one success ends the doubt. A cap of its own per process
    (the in-flight count is local), so with shared state each host sends at most that many.
    """
    if state.open_until is not None or not state.failures:
        return None
    recent = sum(1 for t in state.failures if now - t <= config.window_s)
    return None if recent == 0 else max(1, config.failures - recent)


def doubt(state: State, config: BreakerConfig, now: float, silent_s: float = 0.0) -> Skip:
    """The Skip of a call past :func:`trials`: the trials in flight report within the cool-down's tenth
    or their own timeout; look again then (a waiting call is woken as soon as one reports)."""
    probe_at = now + max(config.cooldown_s / 10, 0.1)
    return Skip(len(state.failures), state.last_error, probe_at, in_doubt=True, silent_s=silent_s)


# Requests out with no answer for less than this never make a model in doubt: event-loop pauses
# and network jitter, on a model whose answers are fast (unless the timeout is shorter still).
STALL_FLOOR_S = 2.0


def stall_after(typical_s: float | None, timeout_s: float) -> float:
    """How long a model may have requests out and answer none before it is in doubt (a stall).

    ``typical_s``: what its answers took lately in this process (a decaying maximum, so one slow
    answer raises it at once and it comes down over the next ones); twice that, at least
    :data:`STALL_FLOOR_S` (or half the timeout when that is shorter: the user says answers take less).
    None (it has not answered in this process yet): half the timeout, so a first answer that is
    legitimately slow is not doubted unless it takes over half the time the user allows it.
    """
    half = timeout_s / 2
    if typical_s is None:
        return half
    return max(2 * typical_s, min(STALL_FLOOR_S, half))


def peek(state: State, config: BreakerConfig, now: float) -> Skip | None:
    """The :class:`Skip` a call would get now, without taking the probe: None if it may go (or probe)."""
    decision, _ = admit(state, config, now, 0.0)
    return decision if isinstance(decision, Skip) else None


def skip_of(state: State, now: float, config: BreakerConfig) -> Skip:
    assert state.open_until is not None
    if now < state.open_until:
        probe_at = state.open_until
    else:  # a probe is out: look again when it should have reported, or within a tenth of the cool-down
        probe_at = min(state.probe_until or now, now + max(config.cooldown_s / 10, 0.1))
    return Skip(len(state.failures), state.last_error, probe_at)


def record(
    state: State, config: BreakerConfig, now: float, failed: bool, error: str = "", *, probe: bool = False
) -> tuple[State, str | None]:
    """A call's result: the new state, and ``"opened"`` / ``"closed"`` when the circuit changed.

    Only the probe's result moves an open circuit: calls sent before it opened report late and
    prove nothing about the server now (their failures would only keep it open longer).
    """
    if state.open_until is not None and not probe:
        return state, None
    if not failed:
        if state.open_until is not None:
            return State(opened=state.opened), "closed"
        return (replace(state, failures=()) if state.failures else state), None
    if probe:  # the probe failed: open again for a full cool-down
        return replace(
            state, last_error=error, open_until=now + config.cooldown_s, probe_until=None
        ), "opened"
    recent = tuple(t for t in state.failures if now - t <= config.window_s)[-(config.failures - 1) :]
    failures = (*recent, now) if config.failures > 1 else (now,)
    if len(failures) < config.failures:
        return replace(state, failures=failures, last_error=error), None
    opened = State(failures, error, now + config.cooldown_s, None, state.opened + 1)
    return opened, "opened"


def release(state: State) -> State:
    """The probe was never sent (cancelled, or held by the limits until its deadline): let another go."""
    return replace(state, probe_until=None) if state.probe_until is not None else state


# Attempt outcomes (``llm_meta`` attempts: HTTP status, error kind) that say the server is down.
FAILURE_KINDS = frozenset({"timeout", "connection"})


def verdict(status: int | None, error_kind: str | None) -> bool | None:
    """True: a retryable failure; False: the server answered; None: says nothing (never sent)."""
    if status is not None:
        return status >= 500
    if error_kind in FAILURE_KINDS:
        return True
    return None


def describe_error(status: int | None, error_kind: str | None) -> str:
    return f"HTTP {status}" if status is not None else str(error_kind)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
