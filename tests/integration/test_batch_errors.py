"""The batch failures of docs/errors.md that tests/integration/test_batch_trigger.py does not show.

BatchTrigger driven as the triggerer drives it, against the fake server's Batch API or, for answers
the fake server never gives (a Batches API that answers 503, or HTML), a small server on loopback.
Each test names the row of docs/errors.md it proves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
from aiohttp import web
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

from airflow_llm_async import batches
from airflow_llm_async.testing.fake_server import compose_answer
from tests.integration.conftest import point_connection, wait_until
from tests.integration.test_batch_trigger import _configure, batch_llm, batch_trigger, events_of, xcoms

__all__ = ["batch_llm", "xcoms"]  # fixtures

PROMPTS = [f"Describe the number {i} in one sentence, with a few words about its digits." for i in range(4)]


@contextlib.asynccontextmanager
async def batches_api(answer: web.Response):
    """A server whose every ``/v1`` request gets ``answer`` (a copy); yields (base URL, requests seen)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        return web.Response(status=answer.status, body=answer.body, content_type=answer.content_type)

    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the Files and Batches API refuses, fails or is not there -----------------------------------------


async def test_a_completion_window_the_server_does_not_offer_fails_the_task_with_its_400(
    batch_llm, xcoms, capsys
):
    events = await events_of(batch_trigger(PROMPTS[:2], batch_completion_window="12h"))
    assert isinstance(events[0], TaskFailedEvent)
    error = xcoms.values["llm_meta"]["error"]
    assert (error["kind"], error["status"]) == ("client", 400)
    assert error["message"].startswith(
        "POST /batches: HTTP 400: Invalid value: '12h'. Supported values are: '24h'."
    )
    assert (
        "LLM batch failed (client): POST /batches: HTTP 400: Invalid value: '12h'" in capsys.readouterr().out
    )
    assert batch_llm.stats()["batches"]["batches_created"] == 0
    assert xcoms.values["return_value"] == []  # nothing was asked: no list of answers


async def test_a_batches_api_answering_503_is_asked_six_times_then_fails_the_task(monkeypatch, xcoms):
    busy = web.json_response(
        {"error": {"message": "The server is overloaded.", "type": "server_error"}}, status=503
    )
    async with batches_api(busy) as (url, seen):
        point_connection(monkeypatch, "llm_busy", url, default_model="gpt-4")
        events = await events_of(batch_trigger(PROMPTS, llm_conn_id="llm_busy"))
    assert isinstance(events[0], TaskFailedEvent)
    assert seen == ["GET /v1/batches?limit=100"] * batches.API_TRIES  # looking for its batch first
    error = xcoms.values["llm_meta"]["error"]
    assert (error["kind"], error["status"]) == ("server", 503)
    assert error["message"].startswith("GET /batches?limit=100: HTTP 503: The server is overloaded.")


async def test_a_batches_api_that_cannot_be_reached_fails_the_task_with_a_connection_error(
    monkeypatch, xcoms
):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    point_connection(monkeypatch, "llm_down", url, default_model="gpt-4")
    events = await events_of(batch_trigger(PROMPTS, llm_conn_id="llm_down"))
    assert isinstance(events[0], TaskFailedEvent)
    error = xcoms.values["llm_meta"]["error"]
    assert error["kind"] == "connection"
    assert error["message"].startswith(f"GET /batches?limit=100 on {url}: ")


async def test_an_answer_that_is_not_json_fails_the_task_as_an_invalid_response(monkeypatch, xcoms):
    html = web.Response(text="<html>Bad gateway page</html>", content_type="text/html")
    async with batches_api(html) as (url, seen):
        point_connection(monkeypatch, "llm_html", url, default_model="gpt-4")
        events = await events_of(batch_trigger(PROMPTS, llm_conn_id="llm_html"))
    assert isinstance(events[0], TaskFailedEvent)
    assert seen == ["GET /v1/batches?limit=100"]  # a 200: not sent again
    error = xcoms.values["llm_meta"]["error"]
    assert error["kind"] == "invalid_response"
    assert error["message"] == f"GET /batches?limit=100: the answer is not a JSON object ({url})"


# ---- items the batch does not answer ------------------------------------------------------------------


@pytest.mark.parametrize(("retry", "realtime_requests"), [("realtime", 1), ("none", 0)])
async def test_a_line_too_large_for_one_batch_file_is_never_sent_and_asked_in_real_time_if_so_chosen(
    batch_llm, xcoms, retry, realtime_requests
):
    prompts = ["Short one.", "A long one: " + "word " * 200, "Short two."]
    events = await events_of(batch_trigger(prompts, batch_max_bytes=400, batch_retry=retry, max_failures=1))
    assert isinstance(events[0], TaskSuccessEvent)
    item = xcoms.values["llm_meta"]["items"][1]
    error = item["batch_error"] if retry == "realtime" else item["error"]
    assert error["kind"] == "client"
    assert error["message"].endswith(
        "bytes, more than one batch file may hold (batch_max_bytes=400); shorten it, or send it without "
        "batch=True"
    )
    assert item.get("realtime", False) is (retry == "realtime")
    results = xcoms.values["return_value"]
    assert results[1] == (compose_answer("", prompts[1]) if retry == "realtime" else None)
    assert batch_llm.stats()["batches"]["lines_answered"] == 2  # the other two, in the batch
    assert sum(batch_llm.stats()["by_model"].values()) == realtime_requests


async def test_past_the_timeout_the_cancelled_items_are_not_asked_again_in_real_time(batch_llm, xcoms):
    """The batch is cancelled at the deadline; asking its items again in real time would come too late."""
    await _configure(batch_llm, {"batch_processing_s": 5.0})  # in progress (0.5 s on) at the timeout
    events = await events_of(batch_trigger(PROMPTS, timeout=1.5, max_failures=1.0))
    assert isinstance(events[0], TaskSuccessEvent)  # max_failures=1.0: every item may fail
    meta = xcoms.values["llm_meta"]
    assert meta["batch"]["batches"][0]["status"] == "cancelled"
    unanswered = [item for item in meta["items"] if item["status"] != "success"]
    assert unanswered and meta["batch"]["realtime_items"] == 0
    for item in unanswered:
        assert (item["error"]["kind"], item["error"]["code"], item.get("realtime")) == (
            "batch",
            "batch_cancelled",
            None,
        )
    assert sum(batch_llm.stats()["by_model"].values()) == 0  # no real-time request went out


# ---- configuration ------------------------------------------------------------------------------------


async def test_no_model_anywhere_fails_the_task_before_anything_is_sent(
    monkeypatch, batch_llm, xcoms, capsys
):
    point_connection(monkeypatch, "llm_fake", batch_llm.base_url)  # no default_model, no model=
    events = await events_of(batch_trigger(PROMPTS[:1]))
    assert isinstance(events[0], TaskFailedEvent)
    error = xcoms.values["llm_meta"]["error"]
    assert error["kind"] == "config"
    assert error["message"].startswith("No model to call on connection 'llm_fake': pass `model=`")
    assert "LLM batch failed (config): No model to call on connection 'llm_fake'" in capsys.readouterr().out
    assert batch_llm.stats()["requests"] == 0


# ---- cancelling --------------------------------------------------------------------------------------


async def test_killing_a_task_whose_batch_already_finished_logs_that_it_could_not_cancel(
    batch_llm, xcoms, caplog
):
    await _configure(batch_llm, {"batch_processing_s": 1.0})
    trigger = batch_trigger(PROMPTS, batch_poll_interval=0.3, batch_poll_max_interval=0.3)
    running = asyncio.create_task(events_of(trigger))
    await wait_until(lambda: "in_progress" in json.dumps(xcoms.values.get("llm_batch")))
    running.cancel()  # the triggerer cancels the trigger, then calls on_kill
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(1.2)  # the batch completes on the server meanwhile
    with caplog.at_level("WARNING"):
        await trigger.on_kill()
    assert "LLM batch: could not cancel batch_" in caplog.text
    assert "Cannot cancel a batch with status 'completed'" in caplog.text
    assert batch_llm.stats()["batches"]["batches_cancelled"] == 0
