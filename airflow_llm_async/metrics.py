"""Metrics of LLM calls, sent through Airflow's ``Stats`` (StatsD, Datadog or OpenTelemetry).

Names and tags are listed in docs/metrics.md. Every metric carries the tags ``conn_id`` and
``model`` (the in-flight gauge: ``conn_id`` and ``hostname``); plain StatsD only carries tags with
``[metrics] statsd_influxdb_enabled = True``.

The triggerer runs thousands of calls a second on one loop, and one ``Stats`` call costs about
1 µs with no backend and 50-100 µs with StatsD (Airflow validates the name and tags on every
call). So:

* whether metrics are on is read once per process from the options Airflow reads
  (``statsd_on``, ``statsd_datadog_enabled``, ``otel_on``); with all off, every function here
  returns at once;
* with a backend, calls only add to in-process totals, and :func:`flush` sends them at most
  once per :data:`FLUSH_INTERVAL` per series: counters summed, the gauge's current value, and
  for timers up to :data:`TIMER_SAMPLES` samples per interval drawn uniformly (reservoir
  sampling; counts come from the counters, not from the timers).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Mapping

from airflow.sdk.observability import stats

log = logging.getLogger(__name__)

PREFIX = "llm."
FLUSH_INTERVAL = 1.0  # seconds; StatsD daemons aggregate over 10 s by default
TIMER_SAMPLES = 20  # per timer series and interval
_BACKEND_OPTIONS = ("statsd_on", "statsd_datadog_enabled", "otel_on")

Tags = tuple[str, str]  # (conn_id, model): hashable, so it keys the totals

_on: bool | None = None  # None: not read yet
_hostname: str | None = None
_counts: dict[tuple[str, Tags], int] = {}
_timers: dict[tuple[str, Tags], list] = {}  # [seen, samples in ms]
_gauges: dict[str, int] = {}  # conn_id -> calls in flight
_flush_loop: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on


def enabled() -> bool:
    """True when a metrics backend is configured (read once per process)."""
    global _on
    if _on is None:
        from airflow.sdk.configuration import conf

        _on = any(conf.getboolean("metrics", option, fallback=False) for option in _BACKEND_OPTIONS)
    return _on


def reset() -> None:
    """Read the configuration again on next use, and forget unsent totals (after a test changed it)."""
    global _on, _flush_loop
    _on = _flush_loop = None
    _counts.clear()
    _timers.clear()
    _gauges.clear()


# --- what the engine reports (this module is its Observer: core/engine.py) and the driver -------


def attempt(conn_id: str, model: str | None, latency_s: float, error_kind: str | None) -> None:
    """One HTTP round trip: counted, timed, and its error counted by kind."""
    if not (_on if _on is not None else enabled()):
        return
    tags = (conn_id, model or "none")
    _count("attempts", tags)
    _time("attempt.duration", tags, latency_s)
    if error_kind is not None:
        _count("errors." + error_kind, tags)


def error(conn_id: str, model: str | None, kind: str) -> None:
    """A failed or refused attempt (``budget``, ``deadline``) that made no round trip."""
    if not (_on if _on is not None else enabled()):
        return
    _count("errors." + kind, (conn_id, model or "none"))


def queued(conn_id: str, model: str | None, seconds: float, waited: bool) -> None:
    """Time from asking the connection's limiter for a slot to being let through."""
    if not (_on if _on is not None else enabled()):
        return
    tags = (conn_id, model or "none")
    _time("queued.duration", tags, seconds)
    if waited:
        _count("rate_limit_waits", tags)


def usage(conn_id: str, model: str | None, usage: Mapping[str, int], cost_usd: float | None) -> None:
    """Tokens an answer used, and what they cost (in micro-dollars: StatsD counters are integers)."""
    if not (_on if _on is not None else enabled()):
        return
    tags = (conn_id, model or "none")
    _count("prompt_tokens", tags, usage.get("prompt_tokens") or 0)
    _count("completion_tokens", tags, usage.get("completion_tokens") or 0)
    if cost_usd:
        _count("cost_micro_usd", tags, round(cost_usd * 1_000_000))


def count(name: str, conn_id: str, model: str | None) -> None:
    """``retries``, ``fallbacks``, ``quality_failures``, ``cache_hits`` (no tokens, no cost: see usage())."""
    if not (_on if _on is not None else enabled()):
        return
    _count(name, (conn_id, model or "none"))


def circuit(conn_id: str, model: str, change: str) -> None:
    """A circuit breaker ``opened`` or ``closed`` (the calls it skipped count as ``errors.circuit_open``)."""
    if not (_on if _on is not None else enabled()):
        return
    _count("circuit." + change, (conn_id, model))


def call(conn_id: str, model: str | None, duration_s: float, succeeded: bool) -> None:
    """A whole call (retries and fallbacks included) ended; tagged with the last model tried."""
    if not (_on if _on is not None else enabled()):
        return
    tags = (conn_id, model or "none")
    _count("calls", tags)
    if not succeeded:
        _count("calls.failed", tags)
    _time("call.duration", tags, duration_s)


def in_flight(conn_id: str, value: int) -> None:
    """Calls of a connection holding a slot in this process's limiter (sent, awaiting the answer)."""
    if not (_on if _on is not None else enabled()):
        return
    _gauges[conn_id] = value
    _schedule_flush()


# --- totals and flushing ----------------------------------------------------------------------


def _count(name: str, tags: Tags, amount: int = 1) -> None:
    key = (name, tags)
    _counts[key] = _counts.get(key, 0) + amount
    _schedule_flush()


def _time(name: str, tags: Tags, seconds: float) -> None:
    key = (name, tags)
    timer = _timers.get(key)
    if timer is None:
        timer = _timers[key] = [0, []]
    timer[0] += 1
    samples = timer[1]
    if len(samples) < TIMER_SAMPLES:
        samples.append(seconds * 1000)
    else:
        slot = random.randrange(timer[0])
        if slot < TIMER_SAMPLES:
            samples[slot] = seconds * 1000
    _schedule_flush()


def _schedule_flush() -> None:
    global _flush_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not in a loop: nothing will come back to flush later
        flush()
        return
    if _flush_loop is not loop or loop.is_closed():
        _flush_loop = loop
        loop.call_later(FLUSH_INTERVAL, flush)


def flush() -> None:
    """Send the totals gathered since the last flush (call it before a private event loop ends)."""
    global _flush_loop
    _flush_loop = None
    counts, timers, gauges = dict(_counts), dict(_timers), dict(_gauges)
    _counts.clear()
    _timers.clear()
    _gauges.clear()
    try:
        for (name, (conn_id, model)), amount in counts.items():
            stats.incr(PREFIX + name, amount, tags={"conn_id": conn_id, "model": model})
        for (name, (conn_id, model)), (_, samples) in timers.items():
            tag_dict = {"conn_id": conn_id, "model": model}
            for milliseconds in samples:
                stats.timing(PREFIX + name, milliseconds, tags=tag_dict)
        for conn_id, value in gauges.items():
            stats.gauge(PREFIX + "in_flight", value, tags={"conn_id": conn_id, "hostname": hostname()})
    except Exception:  # a metrics backend must never fail an LLM call
        log.warning("could not send LLM metrics", exc_info=True)


def hostname() -> str:
    """This host's name as Airflow reports it (``[core] hostname_callable``); once per process."""
    global _hostname
    if _hostname is None:
        try:
            from airflow.utils.net import get_hostname

            _hostname = get_hostname()
        except Exception:  # a broken hostname_callable must not fail LLM calls
            _hostname = socket.getfqdn()
    return _hostname
