"""A connection's request and token buckets, and its models' circuit breakers, in Redis, shared by every host.

Opt in per connection with the extra ``"rate_limit_backend": "redis://host:6379/0"``. One Lua
script refills both buckets, takes (or gives back) and returns the wait, atomically and on
Redis's clock, so the hosts' clocks never have to agree. Only the head of each host's line
calls it: one round trip per call, at most one reservation in progress per host and
connection. The concurrency cap and the AIMD back-off stay local to each host (each host cuts
its own rate when it sees 429s; the rate it passes refills the shared bucket, and a cut or a
drain takes effect at that host's next script call). The key is ``KEY_PREFIX + conn_id``:
deployments sharing one Redis must use different databases.

If Redis cannot be reached, the connection uses this process's own buckets for
:data:`RETRY_SECONDS` and logs why: a rate limiter is a safeguard, not a reason to fail calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from airflow_llm_async import breakers
from airflow_llm_async.core import breaker
from airflow_llm_async.core.breaker import BreakerConfig, Skip, State
from airflow_llm_async.core.buckets import BURST_SECONDS, Limits, LocalBuckets

log = logging.getLogger(__name__)

KEY_PREFIX = "airflow_llm_async:ratelimit:"
# A Redis that does not answer within this many seconds counts as down (the whole line waits on it).
SOCKET_TIMEOUT = 2.0
# Connections per event loop and URL; more calls wait for one (each round trip is well under a ms).
MAX_CONNECTIONS = 16
# After a failure, how long the process limits on its own before trying Redis again.
RETRY_SECONDS = 10.0

# KEYS[1]: the connection's hash. ARGV[1]: now in seconds ('' = Redis's clock), ARGV[2]: '1' to
# drain both buckets first, then rate/s, capacity, amount for the request bucket (ARGV[3..5]) and the
# token bucket (ARGV[6..8]); rate 0 = no such bucket. A positive amount is taken, even below zero,
# and the wait until it could go is returned (as TokenBucket.reserve); a negative one is given back.
# Numbers are stored and returned as full-precision strings (Redis truncates Lua numbers to integers).
_SCRIPT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'updated', 'requests', 'tokens')
local updated = tonumber(state[1]) or now
local elapsed = math.max(0, now - updated)
local wait, ttl = 0, 1
local levels = {}
for i = 1, 2 do
  local rate = tonumber(ARGV[3 * i])
  local capacity = tonumber(ARGV[3 * i + 1])
  local amount = tonumber(ARGV[3 * i + 2])
  local level = tonumber(state[i + 1]) or capacity
  if rate > 0 then
    level = math.min(capacity, level + elapsed * rate)
    if ARGV[2] == '1' then level = math.min(level, 0) end
    if amount > 0 then
      wait = math.max(wait, (math.min(amount, capacity) - level) / rate)
      level = level - amount
    elseif amount < 0 then
      level = math.min(capacity, level - amount)
    end
    ttl = math.max(ttl, (capacity - level) / rate)
  end
  levels[i] = string.format('%.17g', level)
end
redis.call('HSET', KEYS[1], 'updated', string.format('%.17g', math.max(now, updated)),
           'requests', levels[1], 'tokens', levels[2])
-- Once a bucket would be full again its key can go: a missing key reads as full buckets.
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return {string.format('%.17g', wait), levels[1], levels[2]}
"""


class RedisBuckets:
    """The buckets of one connection in Redis, with this process's own buckets as the fallback."""

    kind = "redis"

    def __init__(
        self,
        client: Redis,
        key: str,
        limits: Limits,
        *,
        fallback: LocalBuckets,
        clock: Callable[[], float] | None = None,
        label: str = "redis",
    ) -> None:
        self._script = client.register_script(_SCRIPT)
        self.key = key
        self._per_minute = (limits.requests_per_minute, limits.tokens_per_minute)
        self._fallback = fallback
        self._clock = clock  # tests pass the time in; otherwise the script reads Redis's clock
        self._label = label  # the URL without credentials, for logs
        self._fraction = 1.0
        self._drain = False
        self._levels: dict[str, float | None] = {"requests_available": None, "tokens_available": None}
        self._down_until = -math.inf

    @classmethod
    def for_url(
        cls,
        url: str,
        conn_id: str,
        limits: Limits,
        *,
        fallback: LocalBuckets,
        key_prefix: str = KEY_PREFIX,
        clock: Callable[[], float] | None = None,
    ) -> RedisBuckets:
        key = f"{key_prefix}{conn_id}"
        return cls(client_for(url), key, limits, fallback=fallback, clock=clock, label=redacted(url))

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    async def reserve(self, tokens: int) -> float:
        if self.down:
            return self._fallback.reserve_now(tokens)
        call = asyncio.ensure_future(self._run(1, tokens))
        _track(call)
        try:
            # Shielded: a caller cancelled mid-call must not leave a reservation nobody gives back.
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._undo(done, tokens))
            raise
        except (RedisError, OSError) as exc:
            self._fail(exc)
            return self._fallback.reserve_now(tokens)

    def adjust(self, requests: float, tokens: float) -> None:
        """Take more (positive) or give back (negative), in the background: the call is not delayed."""
        if self.down:
            self._fallback.adjust(requests, tokens)
            return
        _track(asyncio.get_running_loop().create_task(self._adjust(requests, tokens)))

    def set_throttle(self, fraction: float) -> None:
        self._fraction = fraction  # sent with every script call
        self._fallback.set_throttle(fraction)

    def drain(self) -> None:
        self._drain = True  # applied by the next script call
        self._fallback.drain()

    def snapshot(self) -> dict[str, float | None]:
        """Levels as of this process's last script call (or of the fallback while Redis is down)."""
        return self._fallback.snapshot() if self.down else dict(self._levels)

    async def _run(self, requests: float, tokens: float) -> float:
        drain, self._drain = self._drain, False
        rates = [per_minute / 60 * self._fraction if per_minute else 0 for per_minute in self._per_minute]
        args = [
            "" if self._clock is None else repr(self._clock()),
            int(drain),
            rates[0],
            rates[0] * BURST_SECONDS,
            requests,
            rates[1],
            rates[1] * BURST_SECONDS,
            tokens,
        ]
        try:
            wait, requests_level, tokens_level = await self._script(keys=[self.key], args=args)
        except BaseException:
            self._drain = self._drain or drain
            raise
        self._levels = {
            "requests_available": float(requests_level) if rates[0] else None,
            "tokens_available": float(tokens_level) if rates[1] else None,
        }
        return float(wait)

    async def _adjust(self, requests: float, tokens: float) -> None:
        try:
            await self._run(requests, tokens)
        except (RedisError, OSError) as exc:
            self._fail(exc)

    def _undo(self, call: asyncio.Future[float], tokens: int) -> None:
        if not call.cancelled() and call.exception() is None:
            self.adjust(-1, -tokens)

    def _fail(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_SECONDS
        log.warning(
            "rate limit backend %s failed (%s: %s); limiting %s in this process only for %.0f s",
            self._label,
            type(exc).__name__,
            exc,
            self.key,
            RETRY_SECONDS,
        )


# --- clients, one per event loop and URL --------------------------------------------------------

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Redis]] = weakref.WeakKeyDictionary()
_pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[asyncio.Future]] = (
    weakref.WeakKeyDictionary()
)


def _track(task: asyncio.Future) -> None:
    # Keep a reference until done (the loop holds tasks only weakly), and let close_clients wait.
    pending = _pending.setdefault(asyncio.get_running_loop(), set())
    pending.add(task)
    task.add_done_callback(pending.discard)


def client_for(url: str) -> Redis:
    """The running loop's client for ``url`` (a client's connections belong to one loop)."""
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    client = clients.get(url)
    if client is None:
        # A bounded pool: a burst of calls (a fan-out's or a hundred tasks' budget reservations) queues
        # for a few connections instead of opening one each; a hundred connects at once on a busy loop
        # missed SOCKET_TIMEOUT and sent every process to its own ledger (test_budget_processes.py).
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            # One immediate retry for a pooled connection the server closed; a timeout is not retried,
            # as the script may have run. Anything longer would hold up the whole line.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        client = clients[url] = Redis.from_pool(pool)
    return client


async def close_clients() -> None:
    """Let the running loop's pending adjustments finish, then close its clients."""
    loop = asyncio.get_running_loop()
    pending = _pending.pop(loop, set())
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for client in _clients.pop(loop, {}).values():
        await client.aclose()


async def wait_for_adjustments() -> None:
    """Wait until the running loop's script calls, and the refunds and settlements they led to, are done."""
    while pending := _pending.get(asyncio.get_running_loop()):
        await asyncio.gather(*pending, return_exceptions=True)


def redacted(url: str) -> str:
    """The URL without its user, password and query (which may carry a password too)."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


# --- circuit breakers shared through Redis ------------------------------------------------------

BREAKER_PREFIX = "airflow_llm_async:breaker:"
# How stale this process's copy of a shared breaker may get while its calls go out (closed circuit):
# past it, the next call refreshes it in the background, so a circuit another host opened is seen
# here within this delay plus one round trip, and a closed circuit costs no round trip per call.
REFRESH_SECONDS = 1.0


class SharedBreaker(breakers.LocalBreaker):
    """A (connection, model)'s circuit breaker with its state in Redis, shared by every host.

    This process keeps a copy of the state and decides a closed or open circuit from it with no
    round trip; the copy is refreshed in the background at most every :data:`REFRESH_SECONDS`, and
    set from Redis after every write. Failures (and the first success after them) are written in
    the background, taking the probe is a round trip (once per cool-down): both read, apply the
    policy of ``core/breaker.py`` and write in one WATCH/MULTI transaction, so two hosts never both
    take the probe and no failure is lost. Times are wall-clock seconds (``time.time``): the hosts'
    clocks must agree to well under the window and cool-down, as Airflow's own deadlines assume. If
    Redis cannot be reached, the breaker works on this process's copy for :data:`RETRY_SECONDS`.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        conn_id: str,
        model: str,
        config: BreakerConfig,
        *,
        key_prefix: str = BREAKER_PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(conn_id, model, config, clock=clock)
        self.url = url
        self.key = f"{key_prefix}{conn_id}:{model}"
        self._client = client_for(url)
        self._label = redacted(url)
        self._synced_at = -math.inf  # time.monotonic() of the last read or write of the state
        self._down_until = -math.inf
        self._first_sync: asyncio.Future[None] | None = None
        # This process's transactions one at a time: no WATCH conflicts among them.
        self._writing = asyncio.Lock()
        # A key outlives every time the policy looks back at: the window, and a cool-down with its probe.
        self._ttl_ms = int(1000 * (config.window_s + config.cooldown_s + 600))

    async def admit(self, lease_s: float, timeout_s: float | None = None) -> str | Skip:
        if time.monotonic() < self._down_until:
            return await super().admit(lease_s, timeout_s)
        if self._synced_at == -math.inf:  # first calls of this process: learn the state before sending
            if self._first_sync is None or self._first_sync.done():  # none yet, or it failed
                self._first_sync = asyncio.ensure_future(self._sync())
            await asyncio.shield(self._first_sync)
        elif time.monotonic() - self._synced_at > REFRESH_SECONDS:
            self._synced_at = time.monotonic()  # one refresh at a time
            _track(asyncio.ensure_future(self._sync()))
        if self.state.status(self._clock()) == breaker.CLOSED:
            if not self.state.failures and self.in_flight < self.config.failures:
                return breaker.SEND
            # In doubt (failures, or a stall this process sees): the cap counts this process's
            # requests (see core/breaker.trials).
            silent_s = self.silent_s(timeout_s or lease_s)
            return breaker.admit(self.state, self.config, self._clock(), lease_s, self.in_flight, silent_s)[0]
        skip = self.peek()
        if skip is not None:
            return skip
        # Half-open in this copy: take the probe in Redis, where only one host gets it.
        decision = await self._transact(lambda state, now: breaker.admit(state, self.config, now, lease_s))
        return decision if decision is not None else await super().admit(lease_s, timeout_s)

    def record(self, failed: bool, error: str = "", *, probe: bool = False) -> None:
        before = self.state
        # This process's copy at once (its next call sees it); Redis in the background.
        self.state, _ = breaker.record(before, self.config, self._clock(), failed, error, probe=probe)
        if time.monotonic() < self._down_until:
            return
        if probe or (before.open_until is None and (failed or before.failures)):
            _track(asyncio.ensure_future(self._write_result(failed, error, probe)))

    async def _write_result(self, failed: bool, error: str, probe: bool) -> None:
        change = await self._transact(
            lambda state, now: breaker.record(state, self.config, now, failed, error, probe=probe)[::-1]
        )
        if change:  # reported by the host whose result moved the shared circuit, once
            breakers.changed(self, change)

    def release(self) -> None:
        self.state = breaker.release(self.state)
        if time.monotonic() >= self._down_until:
            _track(asyncio.ensure_future(self._transact(lambda state, now: (None, breaker.release(state)))))

    async def _sync(self) -> None:
        try:
            raw = await self._client.get(self.key)
        except (RedisError, OSError) as exc:
            self._fail(exc)
            return
        self.state = _state_of(raw)
        self._synced_at = time.monotonic()

    async def _transact(self, step: Callable[[State, float], tuple[Any, State]]) -> Any:
        """Read the shared state, apply ``step(state, now)`` and write the result, atomically; its result."""
        try:
            async with self._writing, self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(self.key)
                        state = _state_of(await pipe.get(self.key))
                        result, state = step(state, self._clock())
                        pipe.multi()
                        pipe.set(self.key, json.dumps(state.to_dict()), px=self._ttl_ms)
                        await pipe.execute()
                        break
                    except WatchError:  # another host wrote meanwhile: read it again
                        continue
        except (RedisError, OSError) as exc:
            self._fail(exc)
            return None
        self.state, self._synced_at = state, time.monotonic()
        return result

    def _fail(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_SECONDS
        log.warning(
            "circuit breaker backend %s failed (%s: %s); %s decides in this process only for %.0f s",
            *(self._label, type(exc).__name__, exc, self.key, RETRY_SECONDS),
        )


def _state_of(raw: Any) -> State:
    try:
        return State.from_dict(json.loads(raw)) if raw else State()
    except ValueError:
        return State()


def read_breakers(url: str, key_prefix: str = BREAKER_PREFIX) -> list[dict[str, Any]]:
    """Every shared breaker's state in Redis (sync, for the monitor), as ``LocalBreaker.snapshot``."""
    from redis import Redis as SyncRedis

    client = SyncRedis.from_url(url, socket_connect_timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT)
    try:
        keys = sorted(client.scan_iter(match=f"{key_prefix}*", count=500))
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    now = time.time()
    rows = []
    for key, raw in zip(keys, values, strict=True):
        conn_id, _, model = key.decode()[len(key_prefix) :].partition(":")
        state = _state_of(raw)
        rows.append(
            {
                "conn_id": conn_id,
                "model": model,
                "backend": "redis",
                "status": state.status(now),
                "failures": len(state.failures),
                "last_error": state.last_error,
                "probe_at": state.open_until,
                "opened": state.opened,
            }
        )
    return rows
