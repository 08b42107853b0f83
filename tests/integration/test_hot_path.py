"""The triggerer's loop must never block: run many triggers in asyncio debug mode and watch for slow steps."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from airflow_llm_async.triggers.chat import ChatCompletionTrigger
from tests.integration.conftest import chat_trigger, point_connection

REQUEST = {"messages": [{"role": "user", "content": "Summarize: the triggerer holds thousands of calls."}]}


async def one_call() -> dict:
    _, kwargs = chat_trigger(REQUEST, conn_id="llm_hot", models=["gpt-4"]).serialize()
    events = [event async for event in ChatCompletionTrigger(**kwargs).run()]
    return events[0].payload


@pytest.fixture
def server_process():
    # In its own process, so that only our code runs on the loop under watch.
    with FakeServerProcess(latency=0.2) as server:
        yield server


async def test_no_step_of_a_call_blocks_the_event_loop(server_process, monkeypatch, caplog):
    point_connection(monkeypatch, "llm_hot", server_process.base_url)
    assert (await one_call())["status"] == "success"  # warm-up: first imports, SSL context
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    # asyncio logs every callback that holds the loop longer than this (its default is 100 ms).
    loop.slow_callback_duration = 0.1
    # Debug mode keeps a traceback per handle: the collector's full passes over those take longer
    # than the threshold and are not a blocking call of ours, so they are kept out of the window.
    gc.collect()
    gc.disable()
    try:
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            payloads = await asyncio.gather(*(one_call() for _ in range(300)))
    finally:
        gc.enable()
        loop.set_debug(False)
    assert all(p["status"] == "success" for p in payloads)
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert slow == []
