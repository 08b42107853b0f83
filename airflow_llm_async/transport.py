"""HTTP for LLM calls: the only module that imports aiohttp. One shared session per process and loop.

Thousands of triggers in one triggerer share a single ``ClientSession`` (one connection
pool, one SSL context): creating a client per call costs tens of milliseconds of CPU and
close to a megabyte for the SSL context alone, which is what caps the official clients
when they run in a triggerer. Sessions are keyed by event loop because a session must
only be used on the loop that created it (sync mode runs each call in a fresh loop).

:func:`post_json` maps aiohttp's own errors to the engine's kinds (``timeout``, ``connection``),
so nothing else needs to know which HTTP library is underneath.

Pooled connections and servers that close them: uvicorn (LiteLLM, vLLM) gives an idle keep-alive
connection up after 5 s. The pool drops its own first (:data:`KEEPALIVE_S`), and a request that
still meets a closed one (a server with a shorter timeout, or the close crossing the request on the
wire) is sent again once, at once, on a new connection, and does not count as an attempt: it failed
before any answer byte, so it did not reach the model (unless the server died reading it: see
:func:`post_json`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import ssl
import time
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import aiohttp.payload

from airflow_llm_async.core.engine import Answer, NoAnswer

log = logging.getLogger(__name__)

# Idle seconds a pooled connection is kept: under the 5 s after which uvicorn (LiteLLM, vLLM) and
# the openai client's httpx give one up, so the pool lets go first instead of sending a request
# into a connection the server is closing.
KEEPALIVE_S = 4.0

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)
# Per loop, a session that never reuses a connection: where a request refused by a stale one goes.
_fresh_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)
# Whether the current task's last request went out on a pooled connection (set by _Connector).
_reused: contextvars.ContextVar[bool] = contextvars.ContextVar("llm_connection_reused", default=False)


class _Connector(aiohttp.TCPConnector):
    """A TCPConnector that tells its caller whether a request's connection served an earlier one.

    Cheaper than a TraceConfig, whose half-dozen events are awaited on every request: here one set
    lookup per request and one weak reference per new connection (about 1 µs per call in all).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._served: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        reused = protocol in self._served
        if not reused:
            self._served.add(protocol)
        # aiohttp awaits connect() in the requesting task, so post_json reads this back there. Set only
        # when true (_post cleared it before): each set copies the task's context.
        if reused:
            _reused.set(True)
        return connection


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes milliseconds and hundreds of KB: do it once per process.
    return ssl.create_default_context()


def shared_session() -> aiohttp.ClientSession:
    """The session of the running event loop, created on first use."""
    return _session_of(_sessions, keepalive_timeout=KEEPALIVE_S)


def _fresh_session() -> aiohttp.ClientSession:
    """The running loop's session that never reuses a connection."""
    return _session_of(_fresh_sessions, force_close=True)


def _session_of(
    sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession], **pooling: Any
) -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = sessions.get(loop)
    if session is None or session.closed:
        # No pool-wide cap here: the per-connection limiter decides how many calls go out.
        connector = _Connector(limit=0, ssl=_ssl_context(), ttl_dns_cache=300, **pooling)
        # Our own timeouts are set per attempt; the session default must not cut them short.
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        sessions[loop] = session
    return session


async def close_shared_session() -> None:
    """Close the running loop's sessions (sync mode calls this before its loop ends)."""
    loop = asyncio.get_running_loop()
    for sessions in (_sessions, _fresh_sessions):
        session = sessions.pop(loop, None)
        if session is not None and not session.closed:
            await session.close()


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    # Most calls share their connection's timeout: one immutable object instead of one per request.
    return aiohttp.ClientTimeout(total=seconds)


def post_json(
    url: str, headers: Mapping[str, str], body: bytes, time_limit: float, max_bytes: int
) -> Awaitable[Answer | NoAnswer]:
    """POST ``body``; the whole answer within ``time_limit`` seconds, or why there is none.

    An answer of more than ``max_bytes`` (decompressed) is not read: one endless or inflating body
    must not take the triggerer's memory, and every call in it, down.

    A request that meets a pooled connection the server had closed is sent again once, at once, on a
    new connection, and is not an attempt: the server had closed the pooled one, so the request did
    not reach the model. At least once, though: a server that read it and died before answering a
    byte looks the same, and then the model runs it twice.

    Not a coroutine itself: the awaitable is :func:`_post`'s, so a call in flight keeps one coroutine
    of ours here, not two.
    """
    return _post(shared_session(), url, headers, body, time_limit, max_bytes, time.monotonic())


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    time_limit: float,
    max_bytes: int,
    started: float | None = None,
) -> Answer | NoAnswer:
    """One POST; ``started`` (monotonic) on the pooled session's try: a stale connection is tried again."""
    answering = False
    if _reused.get():  # until connect() says otherwise: a request that fails before it was never sent
        _reused.set(False)
    try:
        # No redirects: following one would send the key, the headers and the prompt to another host.
        async with session.post(
            url, data=body, headers=headers, timeout=_timeout(time_limit), allow_redirects=False
        ) as response:
            answering = True
            length = response.content_length
            if length is not None and length > max_bytes:
                return NoAnswer("too_large", f"Content-Length {length}")
            data = await _read_at_most(response.content, max_bytes)
            if data is None:
                return NoAnswer("too_large", f"more than {max_bytes} bytes")
            return Answer(response.status, response.headers, data)
    except TimeoutError:
        return NoAnswer("timeout")
    except aiohttp.ClientError as exc:
        # The exception text names the host and the OS error, never the request headers.
        detail = f"{type(exc).__name__}: {exc}"
        # A connect error is a new connection's; a reset, a broken pipe or a hang-up on a pooled one
        # before the answer began is a connection the server had already given up.
        stale = isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(
            exc, aiohttp.ClientConnectorError
        )
        # (A fresh connection is never pooled: a stale one there only if aiohttp changes.)
        if not (stale and not answering and _reused.get() and started is not None):
            return NoAnswer("connection", detail)
        log.debug("a pooled connection to %s was closed (%s); sending again on a new one", url, detail)
    time_left = time_limit - (time.monotonic() - started)
    if time_left <= 0:
        return NoAnswer("timeout")
    return await _post(_fresh_session(), url, headers, body, time_left, max_bytes)


async def _read_at_most(stream: aiohttp.StreamReader, max_bytes: int) -> bytes | None:
    """The whole body (as aiohttp decompressed it), or None as soon as it passes ``max_bytes``."""
    chunks, size = [], 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# --- Files and Batches (LLMFanOutOperator(batch=True)): a few requests per batch, never on the hot path ---


async def request(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None, time_limit: float, max_bytes: int
) -> Answer | NoAnswer:
    """One request of the Files or Batches API; the whole answer, or why there is none."""

    async def read(response: aiohttp.ClientResponse) -> Answer | NoAnswer:
        data = await _read_at_most(response.content, max_bytes)
        if data is None:
            return NoAnswer("too_large", f"more than {max_bytes} bytes")
        return Answer(response.status, response.headers, data)

    return await _exchange(method, url, headers, body, time_limit, read)


async def upload(
    url: str,
    headers: Mapping[str, str],
    fields: Mapping[str, str],
    filename: str,
    chunks: AsyncIterable[bytes],
    time_limit: float,
) -> Answer | NoAnswer:
    """POST a multipart form whose file part is sent as ``chunks`` come (chunked): the file is never
    whole in memory."""
    with aiohttp.MultipartWriter("form-data") as form:
        for name, value in fields.items():
            form.append(value).set_content_disposition("form-data", name=name)
        part = form.append_payload(
            aiohttp.payload.AsyncIterablePayload(chunks, content_type="application/jsonl")
        )
        part.set_content_disposition("form-data", name="file", filename=filename)
    return await _exchange("POST", url, headers, form, time_limit, _whole_answer)


async def read_lines(
    url: str, headers: Mapping[str, str], time_limit: float, on_line: Callable[[bytes], None]
) -> Answer | NoAnswer:
    """GET a JSONL file and hand ``on_line`` each line as it arrives: the file is never whole in memory.

    A 2xx answer comes back with an empty body (its lines went to ``on_line``); any other, whole.
    """

    async def read(response: aiohttp.ClientResponse) -> Answer | NoAnswer:
        if not 200 <= response.status < 300:
            return await _whole_answer(response)
        rest = b""
        async for chunk in response.content.iter_chunked(1 << 16):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.strip():
                    on_line(line)
        if rest.strip():
            on_line(rest)
        return Answer(response.status, response.headers, b"")

    return await _exchange("GET", url, headers, None, time_limit, read)


async def _exchange(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: Any,
    time_limit: float,
    read: Callable[[aiohttp.ClientResponse], Awaitable[Answer | NoAnswer]],
) -> Answer | NoAnswer:
    """Send, then ``read`` the response; aiohttp's errors as the engine's kinds."""
    try:
        async with shared_session().request(
            method, url, data=body, headers=headers, timeout=_timeout(time_limit), allow_redirects=False
        ) as response:
            return await read(response)
    except TimeoutError:
        return NoAnswer("timeout")
    except aiohttp.ClientError as exc:
        return NoAnswer("connection", f"{type(exc).__name__}: {exc}")


async def _whole_answer(response: aiohttp.ClientResponse) -> Answer:
    """An answer of the API that is not a file: small (an error, a file object); 1 MiB at most is read."""
    data = await _read_at_most(response.content, 1 << 20)
    return Answer(response.status, response.headers, data or b"")
