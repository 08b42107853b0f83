"""The clients under test: one chat completion each, against the fake server.

* ``trigger`` - ours: a ``ChatCompletionTrigger`` built as ``LLMOperator.execute`` builds it,
  re-created from its ``serialize()`` output as the triggerer does, and driven with ``async for``.
* ``aiohttp`` - the floor: one shared ``aiohttp.ClientSession`` posting the same body with the
  same headers and parsing the JSON answer (the least any client must do).
* ``openai`` - one shared ``openai.AsyncOpenAI`` with its default (httpx) HTTP client.
* ``openai-aiohttp`` - the same with ``http_client=openai.DefaultAioHttpClient()``.
* ``trigger-cache-miss`` / ``trigger-cache-hit`` - ours with ``cache_ttl`` (docs/cache.md), in the
  process's own store: every call asks a new question (a lookup that misses, then the answer kept),
  or the question the warm-up answered (a hit: nothing sent). ``-redis-`` variants keep the answers
  in the Redis at 127.0.0.1:6379/0 (connection extra ``cache_backend``).

Every module is imported in every mode, so all workers carry the same heap (the garbage
collector's full passes cost in proportion to it) and differ only in the call path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
from _harness import API_KEY, CONN_ID, MODEL, REDIS_CONN_ID, REDIS_WARMUP_CONN_ID, WARMUP_CONN_ID

from airflow_llm_async import limits, transport
from airflow_llm_async.core.protocol import Endpoint, build_payload
from airflow_llm_async.hooks.llm import LLMHook
from airflow_llm_async.operators.llm import LLMOperator
from airflow_llm_async.triggers.chat import ChatCompletionTrigger

# A typical summarisation prompt (~600 characters), the same for every client.
PROMPT = (
    "Summarize the following in at most 100 words:\n"
    + (
        "The triggerer runs deferred tasks' waits as asyncio coroutines in one process. A task that "
        "defers frees its worker slot; the trigger fires an event when the wait is over, and the task "
        "resumes on a worker with the event's payload. Thousands of waits can share one event loop, as "
        "long as no trigger blocks the loop or burns CPU while it waits. "
    )
    * 2
)
FAKE_LATENCY_HEADER = "x-fake-latency"

Call = Callable[[], Awaitable[bool]]
CACHE_MODES = (
    "trigger-cache-miss",
    "trigger-cache-hit",
    "trigger-cache-redis-miss",
    "trigger-cache-redis-hit",
)
MODES = ("trigger", "aiohttp", "openai", "openai-aiohttp", *CACHE_MODES)


class Client:
    """``call()`` makes one completion and says whether it succeeded; ``warmup()`` answers at once."""

    async def setup(self) -> None:
        """Create what a long-running process creates once (sessions, clients)."""

    async def call(self) -> bool:
        raise NotImplementedError

    async def warmup(self) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        """Release sessions; outside the measured window."""


class TriggerClient(Client):
    def __init__(self, base_url: str) -> None:
        self._kwargs = self._serialized_kwargs(CONN_ID)
        self._warmup_kwargs = self._serialized_kwargs(WARMUP_CONN_ID)

    @staticmethod
    def _serialized_kwargs(conn_id: str) -> str:
        # Exactly what LLMOperator.execute hands to self.defer(); the triggerer stores its kwargs.
        operator = LLMOperator(task_id="bench", prompt=PROMPT, llm_conn_id=conn_id)
        _classpath, kwargs = operator.build_trigger().serialize()
        return json.dumps(kwargs)

    async def setup(self) -> None:
        # The first connection lookup imports Airflow's secrets backends: a one-off, not per call.
        await LLMHook(CONN_ID).aget_endpoint()

    async def _run(self, kwargs: str) -> bool:
        trigger = ChatCompletionTrigger(**json.loads(kwargs))  # as the triggerer inflates it
        status = None
        async for event in trigger.run():
            status = event.payload["status"]
        return status == "success"

    async def call(self) -> bool:
        return await self._run(self._kwargs)

    async def warmup(self) -> bool:
        return await self._run(self._warmup_kwargs)

    async def close(self) -> None:
        await transport.close_shared_session()


class CachedTriggerClient(TriggerClient):
    """Ours with ``cache_ttl``: each call a new question (``hit=False``) or the warm-up's question."""

    def __init__(self, base_url: str, *, hit: bool, redis: bool) -> None:
        conn_id, warmup_conn_id = (
            (REDIS_CONN_ID, REDIS_WARMUP_CONN_ID) if redis else (CONN_ID, WARMUP_CONN_ID)
        )
        self._kwargs = self._cached_kwargs(conn_id)
        self._warmup_kwargs = self._cached_kwargs(warmup_conn_id)
        self._hit = hit
        self._run_id = os.urandom(4).hex()  # Redis outlives the run: another run asks other questions
        self._calls = 0

    @staticmethod
    def _cached_kwargs(conn_id: str) -> str:
        operator = LLMOperator(task_id="bench", prompt=PROMPT, llm_conn_id=conn_id, cache_ttl=600)
        return json.dumps(operator.build_trigger().serialize()[1])

    async def _run(self, kwargs: str) -> bool:
        trigger = ChatCompletionTrigger(**json.loads(kwargs))
        if not self._hit:  # a question never asked before; the warm-up's (and a hit's) stays the same
            self._calls += 1
            trigger.spec["request"]["messages"][-1]["content"] += f" ({self._run_id} {self._calls})"
        status = None
        async for event in trigger.run():
            status = event.payload["status"]
        return status == "success"

    async def close(self) -> None:
        await super().close()
        await limits.close_loop_limiters()  # and the Redis clients


class AiohttpClient(Client):
    def __init__(self, base_url: str) -> None:
        self._url = f"{base_url}/chat/completions"
        request = json.loads(TriggerClient._serialized_kwargs(CONN_ID))["spec"]["request"]
        self._payload: dict[str, Any] = {**request, "model": MODEL}
        # The headers our transport sends, so both clients put the same bytes on the wire.
        self._headers = Endpoint(conn_id=CONN_ID, api_key=API_KEY).request_headers()
        assert build_payload(request, MODEL) == json.dumps(self._payload, ensure_ascii=False).encode()
        self._session: aiohttp.ClientSession | None = None

    async def setup(self) -> None:
        # limit=0: no pool cap, like our transport; otherwise aiohttp queues calls beyond 100.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def _post(self, headers: dict[str, str]) -> bool:
        body = json.dumps(self._payload, ensure_ascii=False).encode()
        async with self._session.post(self._url, data=body, headers=headers) as response:
            data = json.loads(await response.read())
        return response.status == 200 and bool(data["choices"][0]["message"]["content"])

    async def call(self) -> bool:
        return await self._post(self._headers)

    async def warmup(self) -> bool:
        return await self._post({**self._headers, FAKE_LATENCY_HEADER: "0"})

    async def close(self) -> None:
        await self._session.close()


class OpenAIClient(Client):
    def __init__(self, base_url: str, *, use_aiohttp: bool = False) -> None:
        self._base_url = base_url
        self._use_aiohttp = use_aiohttp
        self._request = json.loads(TriggerClient._serialized_kwargs(CONN_ID))["spec"]["request"]
        self._client: openai.AsyncOpenAI | None = None

    async def setup(self) -> None:
        http_client = openai.DefaultAioHttpClient() if self._use_aiohttp else None
        self._client = openai.AsyncOpenAI(base_url=self._base_url, api_key=API_KEY, http_client=http_client)

    async def _create(self, **extra: Any) -> bool:
        completion = await self._client.chat.completions.create(model=MODEL, **self._request, **extra)
        return bool(completion.choices[0].message.content)

    async def call(self) -> bool:
        return await self._create()

    async def warmup(self) -> bool:
        return await self._create(extra_headers={FAKE_LATENCY_HEADER: "0"})

    async def close(self) -> None:
        await self._client.close()


def make_client(mode: str, base_url: str) -> Client:
    if mode == "trigger":
        return TriggerClient(base_url)
    if mode == "aiohttp":
        return AiohttpClient(base_url)
    if mode in CACHE_MODES:
        return CachedTriggerClient(base_url, hit=mode.endswith("-hit"), redis="-redis-" in mode)
    if mode in ("openai", "openai-aiohttp"):
        return OpenAIClient(base_url, use_aiohttp=mode == "openai-aiohttp")
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
