"""HTTP for LLM calls: the only module that imports aiohttp. One shared session per process and loop.

Thousands of triggers in one triggerer share a single ``ClientSession`` (one connection
pool, one SSL context): creating a client per call costs tens of milliseconds of CPU and
close to a megabyte for the SSL context alone, which is what caps the official clients
when they run in a triggerer. Sessions are keyed by event loop because a session must
only be used on the loop that created it (sync mode runs each call in a fresh loop).

:func:`post_json` maps aiohttp's own errors to the engine's kinds (``timeout``, ``connection``),
so nothing else needs to know which HTTP library is underneath.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import weakref
from collections.abc import Mapping

import aiohttp

from airflow_llm_async.core.engine import Answer, NoAnswer

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes milliseconds and hundreds of KB: do it once per process.
    return ssl.create_default_context()


def shared_session() -> aiohttp.ClientSession:
    """The session of the running event loop, created on first use."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(
            # No pool-wide cap here: the per-connection limiter decides how many calls go out.
            limit=0,
            ssl=_ssl_context(),
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        # Our own timeouts are set per attempt; the session default must not cut them short.
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        _sessions[loop] = session
    return session


async def close_shared_session() -> None:
    """Close the running loop's session (sync mode calls this before its loop ends)."""
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None and not session.closed:
        await session.close()


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    # Most calls share their connection's timeout: one immutable object instead of one per request.
    return aiohttp.ClientTimeout(total=seconds)


async def post_json(
    url: str, headers: Mapping[str, str], body: bytes, time_limit: float, max_bytes: int
) -> Answer | NoAnswer:
    """POST ``body``; the whole answer within ``time_limit`` seconds, or why there is none.

    An answer of more than ``max_bytes`` (decompressed) is not read: one endless or inflating body
    must not take the triggerer's memory, and every call in it, down.
    """
    try:
        # No redirects: following one would send the key, the headers and the prompt to another host.
        async with shared_session().post(
            url, data=body, headers=headers, timeout=_timeout(time_limit), allow_redirects=False
        ) as response:
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
        return NoAnswer("connection", f"{type(exc).__name__}: {exc}")


async def _read_at_most(stream: aiohttp.StreamReader, max_bytes: int) -> bytes | None:
    """The whole body (as aiohttp decompressed it), or None as soon as it passes ``max_bytes``."""
    chunks, size = [], 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
