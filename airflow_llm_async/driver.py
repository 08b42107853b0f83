"""Runs the call engine (``core/engine.py``) against the network and the connections' limits.

The engine decides; this module does what it says: it sends each request through the connection's
limiter (``limits.py``) and the shared HTTP session (``transport.py``), sleeps the back-offs, and
feeds every reply back. The same driver serves every mode: the triggers await :func:`complete`
(one call) and :func:`fan_out` (many, on one loop); sync mode (``deferrable=False``) runs them on
the worker through :func:`run_sync`, the one bridge from sync code into this async world.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import gc
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from asgiref.sync import async_to_sync

from airflow_llm_async import breakers, budget_store, cache_store, limits, metrics, transport
from airflow_llm_async.core import budget, cache, fanout
from airflow_llm_async.core.engine import Flow, NoAnswer, Reply, Send, Step, Wait, call_flow
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.core.protocol import Endpoint, LLMCallError
from airflow_llm_async.hooks.llm import LLMConfigError, LLMHook, shared_endpoint

T = TypeVar("T")

# True in the private loop of sync mode (run_sync): a worker's process, not a triggerer's.
_sync_mode: contextvars.ContextVar[bool] = contextvars.ContextVar("llm_sync_mode", default=False)
_heap_frozen = False


def freeze_heap() -> None:
    """Once per process, at its first call on a triggerer's loop: ``gc.freeze()``.

    Every object alive then (Airflow's and the provider's modules, classes, configuration: some
    200,000 in a triggerer) moves to the collector's permanent generation, which its full passes
    no longer walk. A full pass then walks only what the calls since keep alive, instead of that
    heap on top, and a full pass is what stalls the loop longest with thousands of calls in flight
    (docs/performance.md, section 1). The cost: an object alive at that moment that later becomes
    cyclic garbage is never freed (reference counting still frees everything else); what the
    triggerer builds afterwards is collected as before. Not in sync mode: a worker's process ends
    with its task.
    """
    global _heap_frozen
    if not _heap_frozen and not _sync_mode.get():
        _heap_frozen = True
        gc.freeze()


async def complete(spec: CallSpec) -> Outcome:
    """One call, in the running loop: resolve its connections, then run it. Never raises for a failed call."""
    freeze_heap()
    try:
        endpoints = await resolve(spec)
    except LLMConfigError as exc:
        return not_started(LLMCallError("config", str(exc)))
    return await run(spec, endpoints)


def complete_sync(spec: CallSpec) -> Outcome:
    """:func:`complete` for sync code (a worker): the connections are looked up the sync way first."""
    try:
        endpoints = resolve_sync(spec)
    except LLMConfigError as exc:
        return not_started(LLMCallError("config", str(exc)))
    return run_sync(run, spec, endpoints)


def run_sync(work: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run ``work(*args)`` to completion in a private event loop, then close what the loop opened."""
    return async_to_sync(_then_close)(work, *args)


async def _then_close(work: Callable[..., Awaitable[T]], *args: object) -> T:
    sync = _sync_mode.set(True)
    try:
        return await work(*args)
    finally:
        _sync_mode.reset(sync)  # asgiref copies the context back to the caller: leave it as it was
        # The loop ends with this work: its metrics must be sent, its session and limiters closed.
        metrics.flush()
        await transport.close_shared_session()
        await limits.close_loop_limiters()


def conn_ids(spec: CallSpec) -> list[str]:
    return list(dict.fromkeys(conn_id for conn_id, _ in spec.chain))


async def resolve(spec: CallSpec) -> dict[str, Endpoint]:
    """The endpoints of a spec's connections, looked up without blocking the loop (LLMConfigError)."""
    return {conn_id: await shared_endpoint(conn_id) for conn_id in conn_ids(spec)}


def resolve_sync(spec: CallSpec) -> dict[str, Endpoint]:
    return {conn_id: LLMHook(conn_id).get_endpoint() for conn_id in conn_ids(spec)}


def not_started(error: LLMCallError) -> Outcome:
    """The outcome of a call that could not start (bad configuration): nothing was sent or spent."""
    now = time.time()
    return Outcome(
        status="error", error=error, started_at=now, finished_at=now, host=metrics.hostname(), pid=os.getpid()
    )


def run(spec: CallSpec, endpoints: Mapping[str, Endpoint], *, looked_up: bool = False) -> Awaitable[Outcome]:
    """The call's answer from the response cache (``cache_ttl``), else what the engine's I/O gives.

    ``looked_up``: the cache was asked already (a fan-out asks for all its items at once). Without
    a cache this is :func:`_drive` itself, awaited by the caller: one coroutine less per call in flight.
    """
    chain = cache.links(spec, endpoints)
    if not chain:
        return _drive(spec, endpoints)
    return _cached(spec, endpoints, chain, looked_up)


async def _cached(
    spec: CallSpec, endpoints: Mapping[str, Endpoint], chain: Sequence[object], looked_up: bool
) -> Outcome:
    if not looked_up:
        hit = await cache_store.lookup(spec, chain)
        if hit is not None:
            return hit
    outcome = await _drive(spec, endpoints)
    await cache_store.keep(spec, chain, outcome)
    return outcome


async def _drive(spec: CallSpec, endpoints: Mapping[str, Endpoint]) -> Outcome:
    """Drive the engine until it returns the outcome.

    The coroutines awaited per request are few on purpose (this one, :func:`_round_trip`, the
    breaker's and the transport's): each is an object every call in flight keeps alive, and
    thousands in flight make the collector's full passes longer (docs/performance.md, section 1).
    """
    flow = call_flow(spec, endpoints, observer=metrics, host=metrics.hostname(), pid=os.getpid())
    conn_id, model = spec.chain[-1]
    last = (conn_id, model or endpoints[conn_id].default_model)  # a model in doubt is skipped for a later one
    step = _advance(flow, None)
    while not isinstance(step, Outcome):
        if isinstance(step, Wait):
            skip = breakers.skip_for(step.endpoint, step.model)  # a retry's link opened: do not wait for it
            if skip is None:
                await asyncio.sleep(step.seconds)
            step = _advance(flow, skip)
            continue
        # Send: an open circuit is answered before queueing for the limits.
        endpoint = step.endpoint
        skip = breakers.skip_for(endpoint, step.model)
        fallback = (endpoint.conn_id, step.model) != last
        if skip is not None:
            step = _advance(flow, skip)
        elif endpoint.budget_usd is None:
            step = await _round_trip(flow, step, fallback)
        else:
            step = await _budgeted(flow, step, fallback)
    return step


def _advance(flow: Flow, reply: Reply) -> Step | Outcome:
    # Not a bare flow.send() inside a coroutine: a StopIteration escaping one becomes a RuntimeError.
    try:
        return flow.send(reply)
    except StopIteration as done:
        return done.value


async def _budgeted(flow: Flow, step: Send, fallback: bool) -> Step | Outcome:
    """The round trip of a connection with a budget: the worst case is held before the request queues,
    so a refused request never reaches the server, and settled to the real cost once the engine has
    priced it."""
    endpoint, model = step.endpoint, step.model
    held = await budget_store.reserve(endpoint, step.worst_cost_usd or 0.0)
    if isinstance(held, str):
        metrics.error(endpoint.conn_id, model, "budget")
        return _advance(flow, NoAnswer("budget", held))
    try:
        return await _round_trip(flow, step, fallback)
    finally:
        cost = step.attempt.cost_usd  # None: not priced (or cancelled mid-flight): keep the worst case
        await budget_store.settle(endpoint, held, budget.to_usd(held.nano) if cost is None else cost)


async def _round_trip(flow: Flow, step: Send, fallback: bool) -> Step | Outcome:
    """Wait for the connection's limits, make the round trip, tell the engine, then the limiter."""
    endpoint, model = step.endpoint, step.model
    limiter = limits.limiter_for(endpoint)
    deadline = step.deadline
    asked = time.monotonic()
    try:
        wait_limit = None if deadline is None else max(0.0, deadline - time.time())
        async with limiter.slot(step.estimated_tokens, timeout=wait_limit, model=model) as permit:
            metrics.queued(endpoint.conn_id, model, time.monotonic() - asked, permit.waited)
            metrics.in_flight(endpoint.conn_id, limiter.in_flight)
            # Time spent waiting for the limiter comes off a deadline-bound attempt.
            timeout = step.timeout if deadline is None else min(step.timeout, deadline - time.time())
            if timeout > 0:
                # The request's arguments, not a closure over them: fewer objects per call in flight.
                reply = await breakers.through(
                    breakers.breaker_for(endpoint, model),
                    timeout,
                    transport.post_json,
                    endpoint.chat_url,
                    endpoint.chat_headers,
                    step.body,
                    timeout,
                    endpoint.max_response_bytes,
                    fallback=fallback,
                )
            else:
                reply = NoAnswer("limits")
            turn = _pacer().turn()
            if turn is not None:  # many answers came together: this one's work waits for a later slice
                await turn
            following = _advance(flow, reply)  # the engine classifies it while the permit is held
            if getattr(reply, "status", None) == 429:
                limiter.on_rate_limited(permit)
            elif step.attempt.result != "error":  # answered (a failed quality gate is still an answer)
                permit.settle(step.attempt.tokens)
                limiter.on_success(permit, getattr(reply, "headers", None))  # x-ratelimit-* pace the model
            return following
    except TimeoutError:  # only the wait for the limiter raises it: the round trip returns its own
        metrics.error(endpoint.conn_id, model, "deadline")
        return _advance(flow, NoAnswer("limits"))
    finally:
        metrics.in_flight(endpoint.conn_id, limiter.in_flight)


# --- paced resumption ---------------------------------------------------------------------------

# Loop time the answers' work may take in one turn of the event loop before the rest wait for the next.
PACE_SLICE_S = 0.005


class _Pacer:
    """Spreads the work of answers that arrive together over several turns of the event loop.

    When thousands of answers come at once (a server, or a gateway, answering a burst together), every
    call would parse its answer, end its trigger and log its line in the same turn of the loop, and
    nothing else on the loop (other triggers, the triggerer's heartbeat) would run for the whole burst.
    Here the calls of one turn go on until their work has taken :data:`PACE_SLICE_S`; the others wait,
    first come first served, and go on in batches, one batch per turn. A batch starts as large as what
    fitted in the slice, doubles after a turn that took less than the slice and halves after one that
    took more than two, so the line drains at whatever rate the loop can go. No work is skipped or
    reordered within a call: the burst takes as long, but the loop turns in between. An answer alone
    (the usual case) costs a clock read and a comparison.
    """

    __slots__ = ("_loop", "_began", "_passed", "_fit", "_waiting", "_scheduled", "_released_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._began: float | None = None  # when this turn's first answer went on
        self._passed = 0  # answers that went on in this turn
        self._fit = 1  # how many went on within the slice in the last full turn
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._scheduled = False
        self._released_at: float | None = None  # when the last batch was let go (it runs in the next turn)

    def turn(self) -> asyncio.Future[None] | None:
        """None: go on now; else a future to await, done when it is this answer's turn."""
        now = self._loop.time()
        if not self._waiting:
            if self._began is None:
                self._began, self._passed = now, 1
                self._schedule()
                return None
            if now - self._began < PACE_SLICE_S:
                self._passed += 1
                return None
            self._fit = max(1, self._passed)
        waiter = self._loop.create_future()
        self._waiting.append(waiter)
        return waiter

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._next)

    def _next(self) -> None:
        """A new turn of the loop: a new slice; let the next batch of waiting answers go on."""
        now = self._loop.time()
        self._scheduled = False
        if self._released_at is not None:  # the last batch ran in the turn just ended: did it fit?
            took = now - self._released_at
            if took < PACE_SLICE_S:
                self._fit *= 2
            elif took > 2 * PACE_SLICE_S:
                self._fit = max(1, self._fit // 2)
            self._released_at = None
        self._began = None
        released = 0
        while self._waiting and released < self._fit:
            waiter = self._waiting.popleft()
            if not waiter.done():  # a cancelled call is gone from the line
                waiter.set_result(None)
                released += 1
        if self._waiting:
            self._began = now  # the released batch is this slice's work
            self._passed = released
            self._released_at = now
            self._schedule()


_pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pacer] = weakref.WeakKeyDictionary()


def _pacer() -> _Pacer:
    loop = asyncio.get_running_loop()
    pacer = _pacers.get(loop)
    if pacer is None:
        pacer = _pacers[loop] = _Pacer(loop)
    return pacer


async def fan_out(
    specs: Sequence[CallSpec | fanout.Record],
    endpoints: Mapping[str, Endpoint],
    done: Mapping[int, fanout.Record] | None = None,
    on_record: Callable[[int, fanout.Record], None] | None = None,
) -> list[fanout.Record]:
    """Call every item not in ``done`` concurrently; ``on_record`` hears of each new record as it lands.

    An item that could not become a request comes as its record already (see ``fanout.item_specs``).
    """
    freeze_heap()
    records: list[fanout.Record | None] = [None] * len(specs)
    for index, record in (done or {}).items():
        records[index] = record

    def land(index: int, record: fanout.Record) -> None:
        records[index] = record
        if on_record is not None:
            on_record(index, record)

    async def call(index: int, spec: CallSpec) -> None:
        land(index, fanout.to_record(await run(spec, endpoints, looked_up=index in looked_up)))

    # Every item's answer in the cache, in one lookup: the hits land at once, only the misses are sent.
    waiting = [spec if record is None else None for spec, record in zip(specs, records, strict=True)]
    hits, looked_up = await cache_store.lookup_many(waiting, endpoints)
    for index, outcome in hits.items():
        land(index, fanout.to_record(outcome))
    tasks = []
    try:
        for index, spec in enumerate(specs):
            if records[index] is not None:
                continue
            if not isinstance(spec, CallSpec):
                land(index, spec)
                continue
            tasks.append(asyncio.create_task(call(index, spec)))
            if len(tasks) % fanout.START_BATCH == 0:
                await asyncio.sleep(fanout.START_PAUSE_S)
        await asyncio.gather(*tasks)
    finally:
        # Cancelled (the triggerer stops the trigger) or a bug in one call: stop the others, and wait
        # until they have stopped, so that no request goes out after the trigger has ended.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [record for record in records if record is not None]
