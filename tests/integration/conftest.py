"""A fake LLM server on loopback and an ``llm`` connection pointing at it."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from airflow_llm_async.testing.fake_server import FakeLLMServer

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
