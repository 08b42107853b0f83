"""The response cache's rules, without I/O: what a request's key is, what is kept, and when it is found.

A call with ``cache_ttl`` (seconds) looks up the request of each link of its chain, primary first,
before sending anything (an answer that came from a fallback is found too); the first fresh entry
that passes the call's quality gate is its answer, and nothing is sent. After a miss, an answer
that passed the gate is stored under its own link's key. The store (``cache_store.py``) and the
driver do the I/O; everything they decide is here.

* **Key**: sha256 over the URL the request is posted to and the exact bytes of its body
  (:func:`~airflow_llm_async.core.protocol.build_payload`: model, messages, temperature, seed,
  response_format, every extra). Never the API key or any header: two connections with the same
  base URL and the same request share an answer (docs/cache.md).
* **Entry**: the answer's text and details as JSON bytes, with the wall-clock time it was stored.
  An entry is found only while it is younger than the *reading* call's ``cache_ttl`` (the store
  also drops it after the *storing* call's ``cache_ttl``).
* **A hit** costs nothing: ``cost_usd`` 0, no attempt, ``cache_hit`` true in ``llm_meta``; its
  ``usage`` is the original answer's (what the answer is, not what this call spent: the spending
  metrics count nothing for a hit).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_llm_async.core import protocol
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.core.protocol import Endpoint

# Bumped when the entry's shape changes: entries of another version are misses, never misread.
VERSION = 1
KEY_PREFIX = f"airflow_llm_async:cache:v{VERSION}:"
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class Link:
    """One link of a call's chain, as the cache sees it: where it goes, and its request's key."""

    position: int  # in the chain: 0 is the primary
    endpoint: Endpoint
    model: str
    key: str


@dataclass(frozen=True, slots=True)
class Entry:
    """An answer as the cache keeps it."""

    stored_at: float  # wall-clock epoch seconds
    text: str
    model: str
    finish_reason: str | None = None
    usage: Mapping[str, int] = field(default_factory=dict)
    usage_details: Mapping[str, int] = field(default_factory=dict)
    system_fingerprint: str | None = None


def key(url: str, body: bytes) -> str:
    """The key of one request: the URL it goes to and its body, hashed (length-prefixed: unambiguous)."""
    digest = hashlib.sha256(f"{len(url)}:{url}\n".encode())
    digest.update(body)
    return KEY_PREFIX + digest.hexdigest()


def check_ttl(value: Any) -> float:
    """``cache_ttl`` as seconds (a positive, finite number); ValueError says what is wrong."""
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
        raise ValueError(
            f"cache_ttl must be a positive number of seconds (or a timedelta), got {value!r}; "
            "leave it unset (None) to call the server every time"
        )
    return float(seconds)


def links(spec: CallSpec, endpoints: Mapping[str, Endpoint]) -> list[Link]:
    """The chain's links and their keys, primary first; none for a call without ``cache_ttl``.

    A link with no model to call (the engine reports that error) ends the list: nothing after it
    could be the call's answer without the engine first failing on it.
    """
    if spec.cache_ttl is None:
        return []
    found = []
    for position, (conn_id, model) in enumerate(spec.chain):
        endpoint = endpoints[conn_id]
        model = model or endpoint.default_model
        if not model:
            break
        body = protocol.build_payload(dict(spec.request), model)
        found.append(Link(position, endpoint, model, key(endpoint.chat_url, body)))
    return found


def storable(outcome: Outcome) -> bool:
    """Only an answer that passed the quality gate is kept; a hit is not stored again (it would live on)."""
    return outcome.ok and outcome.text is not None and not outcome.quality_failures and not outcome.cache_hit


def encode(outcome: Outcome, now: float) -> bytes:
    """The entry of a :func:`storable` outcome, as the bytes the store keeps."""
    return json.dumps(
        {
            "v": VERSION,
            "stored_at": now,
            "text": outcome.text,
            "model": outcome.model,
            "finish_reason": outcome.finish_reason,
            "usage": dict(outcome.usage),
            "usage_details": dict(outcome.usage_details),
            "system_fingerprint": outcome.system_fingerprint,
        },
        ensure_ascii=False,
    ).encode()


def decode(data: bytes | None) -> Entry | None:
    """The entry in stored bytes; None (a miss) for none, another version, or anything malformed."""
    if data is None:
        return None
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("v") != VERSION:
            return None
        entry = Entry(
            stored_at=float(raw["stored_at"]),
            text=raw["text"],
            model=raw["model"] or "",
            finish_reason=raw.get("finish_reason"),
            usage={name: _count(raw["usage"].get(name)) for name in _USAGE_FIELDS},
            usage_details={name: _count(value) for name, value in (raw.get("usage_details") or {}).items()},
            system_fingerprint=raw.get("system_fingerprint"),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # a store shared with something else, or a truncated value: call the server
    texts = (entry.model, entry.finish_reason or "", entry.system_fingerprint or "")
    if not isinstance(entry.text, str) or not all(isinstance(text, str) for text in texts):
        return None
    return entry


def fresh(entry: Entry, ttl: float, now: float) -> bool:
    """Whether a reader with ``ttl`` takes the entry: stored at most ``ttl`` seconds ago."""
    return now - entry.stored_at <= ttl


def find(
    spec: CallSpec, found: Mapping[str, bytes | None], chain: list[Link], now: float
) -> tuple[Link, Entry] | None:
    """The first link (primary first) whose stored answer is fresh and passes the call's quality gate.

    The gate is checked again: the key holds the request, not the rules of the call that stored it.
    """
    assert spec.cache_ttl is not None
    for link in chain:
        entry = decode(found.get(link.key))
        if entry is None or not fresh(entry, spec.cache_ttl, now):
            continue
        if spec.quality.check(entry.text, entry.finish_reason):
            continue
        return link, entry
    return None


def hit(
    link: Link, entry: Entry, *, started_at: float, latency_s: float, host: str | None, pid: int | None
) -> Outcome:
    """The outcome of a call answered by the cache: no attempt, nothing spent."""
    return Outcome(
        status="success",
        text=entry.text,
        model=entry.model or link.model,
        requested_model=link.model,
        conn_id=link.endpoint.conn_id,
        usage=dict(entry.usage),
        usage_details=dict(entry.usage_details),
        system_fingerprint=entry.system_fingerprint,
        finish_reason=entry.finish_reason,
        fallback_used=link.position > 0,
        attempts=(),
        latency_s=round(latency_s, 3),
        cost_usd=0.0,
        started_at=started_at,
        finished_at=started_at + latency_s,
        host=host,
        pid=pid,
        cache_hit=True,
    )


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a token count of {value!r}")
    return value
