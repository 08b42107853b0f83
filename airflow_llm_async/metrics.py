"""Metrics of LLM calls, sent through Airflow's ``Stats`` (StatsD, Datadog or OpenTelemetry).

Names and tags are listed in docs/metrics.md. Every metric carries the tags ``conn_id`` and
``model`` (the in-flight gauge: ``conn_id`` and ``hostname``); plain StatsD only carries tags with
``[metrics] statsd_influxdb_enabled = True``.

The triggerer runs thousands of calls a second on one loop, and Airflow's ``Stats`` costs about a
microsecond per metric even when no backend is configured. So whether metrics are on is read
once per process from the same options Airflow reads (``statsd_on``, ``statsd_datadog_enabled``,
``otel_on``), and with all of them off every function here returns at once.
"""

from __future__ import annotations

import socket

from airflow.sdk.observability import stats

PREFIX = "llm."
_BACKEND_OPTIONS = ("statsd_on", "statsd_datadog_enabled", "otel_on")

_on: bool | None = None  # None: not read yet
_tags: dict[tuple[str, str | None], dict[str, str]] = {}
_gauge_tags: dict[str, dict[str, str]] = {}
_hostname: str | None = None


def enabled() -> bool:
    """True when a metrics backend is configured (read once per process)."""
    global _on
    if _on is None:
        from airflow.sdk.configuration import conf

        _on = any(conf.getboolean("metrics", option, fallback=False) for option in _BACKEND_OPTIONS)
    return _on


def reset() -> None:
    """Read the configuration again on next use (after a test changed it)."""
    global _on
    _on = None


def tags(conn_id: str, model: str | None) -> dict[str, str]:
    """The tags of one (connection, model) pair; cached, so a call builds no dict of its own."""
    key = (conn_id, model)
    found = _tags.get(key)
    if found is None:
        found = _tags[key] = {"conn_id": conn_id, "model": model or "none"}
    return found


def attempt(tags: dict[str, str], latency_s: float, error_kind: str | None) -> None:
    """One HTTP round trip: counted, timed, and its error counted by kind."""
    if not (_on if _on is not None else enabled()):
        return
    stats.incr(PREFIX + "attempts", tags=tags)
    stats.timing(PREFIX + "attempt.duration", latency_s * 1000, tags=tags)
    if error_kind is not None:
        error(tags, error_kind)


def error(tags: dict[str, str], kind: str) -> None:
    """A failed attempt (or a refused one: ``budget``, ``deadline``), counted under its kind."""
    if not (_on if _on is not None else enabled()):
        return
    stats.incr(f"{PREFIX}errors.{kind}", tags=tags)


def queued(tags: dict[str, str], seconds: float, waited: bool) -> None:
    """Time from asking the connection's limiter for a slot to being let through."""
    if not (_on if _on is not None else enabled()):
        return
    stats.timing(PREFIX + "queued.duration", seconds * 1000, tags=tags)
    if waited:
        stats.incr(PREFIX + "rate_limit_waits", tags=tags)


def usage(tags: dict[str, str], usage: dict[str, int], cost_usd: float | None) -> None:
    """Tokens an answer used, and what they cost (in micro-dollars: StatsD counters are integers)."""
    if not (_on if _on is not None else enabled()):
        return
    stats.incr(PREFIX + "prompt_tokens", usage.get("prompt_tokens") or 0, tags=tags)
    stats.incr(PREFIX + "completion_tokens", usage.get("completion_tokens") or 0, tags=tags)
    if cost_usd:
        stats.incr(PREFIX + "cost_micro_usd", round(cost_usd * 1_000_000), tags=tags)


def count(name: str, tags: dict[str, str]) -> None:
    """``retries``, ``fallbacks``, ``quality_failures``."""
    if not (_on if _on is not None else enabled()):
        return
    stats.incr(PREFIX + name, tags=tags)


def call(tags: dict[str, str], duration_s: float, succeeded: bool) -> None:
    """A whole call (retries and fallbacks included) ended; ``tags`` name the last model tried."""
    if not (_on if _on is not None else enabled()):
        return
    stats.incr(PREFIX + "calls", tags=tags)
    if not succeeded:
        stats.incr(PREFIX + "calls.failed", tags=tags)
    stats.timing(PREFIX + "call.duration", duration_s * 1000, tags=tags)


def in_flight(conn_id: str, value: int) -> None:
    """Calls of a connection holding a slot in this process's limiter (sent, awaiting the answer)."""
    if not (_on if _on is not None else enabled()):
        return
    found = _gauge_tags.get(conn_id)
    if found is None:
        found = _gauge_tags[conn_id] = {"conn_id": conn_id, "hostname": hostname()}
    stats.gauge(PREFIX + "in_flight", value, tags=found)


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
