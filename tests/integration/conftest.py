"""A fake LLM server on loopback and an ``llm`` connection pointing at it."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.quality import QualitySpec
from airflow_llm_async.testing.fake_server import FakeLLMServer
from airflow_llm_async.triggers.chat import ChatCompletionTrigger

API_KEY = "sk-test-never-logged-4f1c"


def point_connection(monkeypatch, conn_id: str, base_url: str, *, api_key: str = API_KEY, **extra) -> None:
    conn = {"conn_type": "llm", "host": base_url, "password": api_key, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


async def wait_until(condition, timeout: float = 5.0) -> None:
    """Poll ``condition`` on the loop until it holds; fail the test if it does not within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def fake_llm(monkeypatch):
    """An in-loop fake server, and connection ``llm_fake`` to it (default model gpt-4, 2 s per attempt)."""
    async with FakeLLMServer(api_key=API_KEY) as server:
        point_connection(monkeypatch, "llm_fake", server.base_url, default_model="gpt-4", timeout=2)
        yield server


@pytest.fixture
def threaded_fake_llm(monkeypatch):
    """The fake server on its own loop in a thread, for sync code that runs its own event loop."""
    loop = asyncio.new_event_loop()
    server = FakeLLMServer(api_key=API_KEY)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
    point_connection(monkeypatch, "llm_fake", server.base_url, default_model="gpt-4", timeout=2)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def chat_trigger(
    request: dict,
    *,
    conn_id: str = "llm_fake",
    models: list[str | None] | None = None,
    fallback_conn_ids: list[str] | None = None,
    quality: dict | None = None,
    end: str = "resume",
    output_key: str = "llm_output",
    time_limit: float | None = None,
    prompt: str | None = None,
    system_prompt: str | None = None,
    messages: list | str | None = None,
    **options,
) -> ChatCompletionTrigger:
    """A trigger as LLMOperator builds one: the call as a CallSpec, then how the task ends."""
    conns = [conn_id, *(fallback_conn_ids or [])]
    spec = CallSpec.of(request, conns, models or [None], quality=QualitySpec.from_dict(quality), **options)
    return ChatCompletionTrigger(
        spec=spec.to_json(),
        end=end,
        output_key=output_key,
        time_limit=time_limit,
        prompt=prompt,
        system_prompt=system_prompt,
        messages=messages,
    )
