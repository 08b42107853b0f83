"""Where the response cache keeps answers, and the driver's two questions to it: found? keep this.

The rules (keys, entries, freshness, what is kept) are in ``core/cache.py``; this module does the I/O.

* Without the connection extra ``cache_backend``: :class:`LocalStore`, this process's memory,
  bounded (:data:`MAX_ENTRIES` answers, :data:`MAX_BYTES` in all; the least recently used go
  first). Every event loop of the process shares it (sync mode runs each task in a private loop).
* With ``cache_backend: "redis://..."``: :class:`RedisStore`, shared by every host. The lookups and
  writes made in one turn of the event loop go to Redis together, in one pipeline (one MGET for a
  whole fan-out), so a thousand calls starting at once cost one round trip, not a thousand. If Redis
  cannot be reached, calls go to the server as if nothing were cached, for :data:`RETRY_SECONDS`,
  with a warning: a cache is a saving, never a reason to fail a call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from airflow_llm_async import metrics
from airflow_llm_async.core import cache
from airflow_llm_async.core.cache import Link
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.core.protocol import Endpoint

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000
MAX_BYTES = 64 * 1024 * 1024  # an entry is an answer: kilobytes, up to the connection's max_response_bytes
RETRY_SECONDS = 10.0  # after a Redis failure, how long calls skip the cache before trying it again
MGET_CHUNK = 1000  # keys per MGET: one huge command would hold up Redis for everyone else
# A fan-out's keys are computed (and its hits read) this many items at a time, then the loop gets a
# turn: 10,000 items take ~0.3 s of hashing, which would stall every other trigger at once.
YIELD_EVERY = 200


class Store(Protocol):
    def now(self) -> float: ...  # wall-clock seconds: when an entry is stored, and how old it is

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put(self, key: str, value: bytes, ttl: float) -> None: ...


class LocalStore:
    """This process's answers: expire after their TTL, the least recently used go first when full."""

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.now = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires at, value)
        self._bytes = 0
        self._lock = threading.Lock()  # sync mode's private loops may run in other threads

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self.now()
        with self._lock:
            return [self._get(key, now) for key in keys]

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            self._drop(key)
            self._entries[key] = (self.now() + ttl, value)
            self._bytes += len(value)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _get(self, key: str, now: float) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < now:  # as core/cache.fresh: an entry exactly ttl old is still found
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])


class RedisStore:
    """Answers in Redis (``SET ... PX``, read with ``MGET``), batched per turn of the event loop."""

    def __init__(
        self,
        client: Any,
        label: str,
        errors: tuple[type[BaseException], ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._label = label  # the URL without credentials, for logs
        self._errors = errors  # what the client raises when Redis cannot answer
        self.now = clock
        self._gets: list[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]] = []
        self._puts: list[tuple[str, bytes, int]] = []
        self._waiting_puts: list[asyncio.Future[None]] = []
        self._flushing: asyncio.Task | None = None
        self._down_until = -math.inf

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if time.monotonic() < self._down_until or not keys:
            return [None] * len(keys)
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._gets.append((keys, future))
        self._schedule()
        return await future

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        if time.monotonic() < self._down_until:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._puts.append((key, value, max(1, math.ceil(ttl * 1000))))
        self._waiting_puts.append(future)
        self._schedule()
        await future

    def _schedule(self) -> None:
        if self._flushing is None:
            # Started now, it runs after every call already ready in this turn has queued its keys.
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._gets or self._puts:
                gets, self._gets = self._gets, []
                puts, self._puts = self._puts, []
                waiting, self._waiting_puts = self._waiting_puts, []
                keys = [key for batch, _ in gets for key in batch]
                values: list[bytes | None] = [None] * len(keys)
                try:
                    values = await self._round_trip(keys, puts)
                finally:  # whatever happened (a bug, a cancelled task), nobody waits forever: a miss
                    for batch, future in gets:
                        if not future.done():
                            future.set_result(values[: len(batch)])
                        values = values[len(batch) :]
                    for future in waiting:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._flushing = None

    async def _round_trip(self, keys: list[str], puts: list[tuple[str, bytes, int]]) -> list[bytes | None]:
        """One pipeline: MGET the keys (in chunks), SET the puts; on failure, every key is a miss."""
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(keys), MGET_CHUNK):
            pipe.mget(keys[start : start + MGET_CHUNK])
        for key, value, ttl_ms in puts:
            pipe.set(key, value, px=ttl_ms)
        try:
            replies = await pipe.execute()
        except self._errors as exc:
            self._down_until = time.monotonic() + RETRY_SECONDS
            log.warning(
                "cache backend %s failed (%s: %s); calls skip the cache for %.0f s",
                *(self._label, type(exc).__name__, exc, RETRY_SECONDS),
            )
            return [None] * len(keys)
        return [value for chunk in replies[: math.ceil(len(keys) / MGET_CHUNK)] for value in chunk]


# --- the stores, and what the driver asks them -------------------------------------------------

_local = LocalStore()
_redis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RedisStore]] = (
    weakref.WeakKeyDictionary()
)


def reset_local(**options: Any) -> LocalStore:
    """A new, empty process store (``max_entries``, ``max_bytes``, ``clock``): for tests and benchmarks."""
    global _local
    _local = LocalStore(**options)
    return _local


def store_for(endpoint: Endpoint) -> Store:
    """The store of a connection: its ``cache_backend`` (one client per event loop), or this process's."""
    url = endpoint.cache_backend
    if not url:
        return _local
    stores = _redis.setdefault(asyncio.get_running_loop(), {})
    from airflow_llm_async import limits_redis  # the hook checked that redis is installed

    # The rate limiter's client for the same URL and loop, closed with the loop's limiters (then a new one).
    client = limits_redis.client_for(url)
    store = stores.get(url)
    if store is None or store.client is not client:
        store = stores[url] = RedisStore(
            client, limits_redis.redacted(url), (limits_redis.RedisError, OSError)
        )
    return store


async def fetch(chains: Sequence[Sequence[Link]]) -> dict[str, bytes | None]:
    """What is stored under every link's key of every chain: one ``get_many`` per store."""
    by_store: dict[int, tuple[Store, dict[str, None]]] = {}
    for chain in chains:
        for link in chain:
            store = store_for(link.endpoint)
            by_store.setdefault(id(store), (store, {}))[1][link.key] = None
    found: dict[str, bytes | None] = {}
    for store, keys in by_store.values():
        for key, value in zip(keys, await store.get_many(list(keys)), strict=True):
            if value is not None or key not in found:
                found[key] = value
    return found


def answer(
    spec: CallSpec, chain: Sequence[Link], found: Mapping[str, bytes | None], began: float
) -> Outcome | None:
    """The outcome of a call whose answer was found (counted in the metrics), or None for a miss.

    ``began``: ``time.monotonic()`` when the lookup started (the hit's latency).
    """
    now = store_for(chain[0].endpoint).now()
    found_link = cache.find(spec, found, list(chain), now)
    if found_link is None:
        return None
    link, entry = found_link
    latency = time.monotonic() - began
    metrics.count("cache_hits", link.endpoint.conn_id, link.model)
    metrics.call(link.endpoint.conn_id, link.model, latency, True)
    return cache.hit(link, entry, started_at=time.time() - latency, latency_s=latency,
                     host=metrics.hostname(), pid=os.getpid())  # fmt: skip


async def lookup(spec: CallSpec, chain: Sequence[Link]) -> Outcome | None:
    """One call's answer from the cache, or None: the driver then sends its request."""
    began = time.monotonic()
    return answer(spec, chain, await fetch([chain]), began)


async def lookup_many(
    specs: Sequence[CallSpec | Any], endpoints: Mapping[str, Endpoint]
) -> tuple[dict[int, Outcome], set[int]]:
    """A fan-out's answers from the cache, by item index, and the items looked up (anything in
    ``specs`` that is not a CallSpec is skipped): one ``get_many`` per store for the whole list."""
    chains = {}
    for index, spec in enumerate(specs):
        if index % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)
        chain = cache.links(spec, endpoints) if isinstance(spec, CallSpec) else None
        if chain:
            chains[index] = chain
    if not chains:
        return {}, set()
    began = time.monotonic()
    found = await fetch(list(chains.values()))
    hits = {}
    for count, (index, chain) in enumerate(chains.items()):
        if count % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)
        outcome = answer(specs[index], chain, found, began)
        if outcome is not None:
            hits[index] = outcome
    return hits, set(chains)


async def keep(spec: CallSpec, chain: Sequence[Link], outcome: Outcome) -> None:
    """Store an answer that passed the gate, under the key of the link that gave it."""
    if spec.cache_ttl is None or not cache.storable(outcome):
        return
    for link in chain:
        if link.endpoint.conn_id == outcome.conn_id and link.model == outcome.requested_model:
            store = store_for(link.endpoint)
            await store.put(link.key, cache.encode(outcome, store.now()), spec.cache_ttl)
            return
