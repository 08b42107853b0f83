"""ChatCompletionTrigger driven the way the triggerer drives it, against the fake server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from types import SimpleNamespace

import pytest
from aiohttp import web
from airflow.sdk.execution_time.comms import SetXCom
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_llm_async import limits
from airflow_llm_async.core.quality import ARTICLE_RULES
from airflow_llm_async.hooks.llm import shared_endpoint
from airflow_llm_async.triggers.chat import ChatCompletionTrigger
from tests.integration.conftest import API_KEY, chat_trigger, point_connection, wait_until

REQUEST = {
    "messages": [{"role": "user", "content": "总结以下文章:人工智能正在快速发展。"}],
    "max_tokens": 500,
}


async def run_events(trigger: ChatCompletionTrigger) -> list:
    return [event async for event in trigger.run()]


async def run(trigger: ChatCompletionTrigger) -> dict:
    events = [event async for event in trigger.run()]
    assert len(events) == 1, "a trigger must fire exactly one event"
    payload = events[0].payload
    json.dumps(payload)  # it travels through the DB and into XCom
    return payload


def trigger(request: dict = REQUEST, **kwargs) -> ChatCompletionTrigger:
    return chat_trigger(request, **kwargs)


def outcomes(payload: dict) -> list[tuple]:
    return [(a["model"], a["status"], a["result"]) for a in payload["meta"]["attempts"]]


async def test_a_call_yields_one_success_event_with_text_and_meta(fake_llm):
    payload = await run(trigger(models=["gpt-4"]))
    assert payload["status"] == "success"
    assert len(payload["text"]) >= 50 and "人工智能" in payload["text"]
    meta = payload["meta"]
    assert (meta["model"], meta["conn_id"], meta["finish_reason"]) == ("gpt-4", "llm_fake", "stop")
    assert (
        meta["usage"]["total_tokens"]
        == meta["usage"]["prompt_tokens"] + meta["usage"]["completion_tokens"]
        > 0
    )
    assert outcomes(payload) == [("gpt-4", 200, "ok")]
    assert meta["fallback_used"] is False
    assert meta["quality"] == {"passed": True, "failures": []}
    assert fake_llm.stats()["requests"] == 1


async def test_a_trigger_rebuilt_from_its_serialized_form_runs_the_same(fake_llm):
    original = trigger(models=[None], max_retries=0)
    _, kwargs = original.serialize()
    rebuilt = ChatCompletionTrigger(**json.loads(json.dumps(kwargs)))
    payload = await run(rebuilt)
    assert payload["meta"]["model"] == "gpt-4"  # None -> the connection's default_model
    assert payload["text"] == (await run(original))["text"]  # the fake server is deterministic


async def test_server_errors_are_retried_on_the_same_model(fake_llm):
    fake_llm.set_fault("gpt-4", "503*2")
    payload = await run(trigger(models=["gpt-4"], max_retries=2))
    assert payload["status"] == "success"
    assert outcomes(payload) == [("gpt-4", 503, "error"), ("gpt-4", 503, "error"), ("gpt-4", 200, "ok")]


async def test_a_rate_limit_is_retried_after_the_servers_retry_after(fake_llm):
    fake_llm.set_fault("gpt-4", "429*1")
    started = time.monotonic()
    payload = await run(trigger(models=["gpt-4"]))
    assert outcomes(payload) == [("gpt-4", 429, "error"), ("gpt-4", 200, "ok")]
    assert payload["meta"]["attempts"][0]["reason"]["kind"] == "rate_limit"
    assert time.monotonic() - started >= 0.2  # the fake server's retry-after-ms


async def test_after_its_retries_a_failing_model_falls_back_to_the_next(fake_llm):
    fake_llm.set_fault("gpt-4", "503")
    payload = await run(trigger(models=["gpt-4", "gpt-3.5-turbo"], max_retries=1))
    assert payload["status"] == "success"
    assert outcomes(payload) == [
        ("gpt-4", 503, "error"),
        ("gpt-4", 503, "error"),
        ("gpt-3.5-turbo", 200, "ok"),
    ]
    assert payload["meta"]["model"] == "gpt-3.5-turbo"
    assert payload["meta"]["fallback_used"] is True


async def test_an_unknown_model_is_not_retried_and_fails_with_the_api_message(fake_llm):
    payload = await run(trigger(models=["gpt-5x"], max_retries=3))
    assert payload["status"] == "error"
    assert outcomes(payload) == [("gpt-5x", 404, "error")]
    error = payload["error"]
    assert (error["kind"], error["status"], error["code"]) == ("client", 404, "model_not_found")
    assert "gpt-5x" in error["message"] and "does not exist" in error["message"]


async def test_an_unknown_model_moves_to_the_fallback_at_once(fake_llm):
    payload = await run(trigger(models=["gpt-5x", "gpt-3.5-turbo"]))
    assert outcomes(payload) == [("gpt-5x", 404, "error"), ("gpt-3.5-turbo", 200, "ok")]


async def test_a_bad_key_fails_at_once_and_the_key_is_nowhere_in_the_event(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_badkey", fake_llm.base_url, api_key="sk-wrong-key-77aa")
    payload = await run(trigger(conn_id="llm_badkey", models=["gpt-4"]))
    assert outcomes(payload) == [("gpt-4", 401, "error")]
    assert payload["error"]["kind"] == "client"
    assert "API key" in payload["error"]["message"]
    assert "sk-wrong-key-77aa" not in json.dumps(payload)
    assert API_KEY not in json.dumps(trigger(conn_id="llm_badkey").serialize())


@pytest.mark.parametrize(("fault", "fragment"), [("malformed", "not valid JSON"), ("empty", "no choices")])
async def test_unusable_answers_are_retried_then_reported(fake_llm, fault, fragment):
    fake_llm.set_fault("gpt-4", fault)
    payload = await run(trigger(models=["gpt-4"], max_retries=1))
    assert outcomes(payload) == [("gpt-4", 200, "error")] * 2
    assert payload["error"]["kind"] == "invalid_response"
    assert fragment in payload["error"]["message"]


async def test_a_stalled_server_times_out_per_attempt(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_fast", fake_llm.base_url, timeout=0.3)
    fake_llm.set_fault("gpt-4", "stall")
    payload = await run(trigger(conn_id="llm_fast", models=["gpt-4"], max_retries=1))
    assert outcomes(payload) == [("gpt-4", None, "error")] * 2
    assert payload["error"]["kind"] == "timeout"
    assert "within 0.3 s" in payload["error"]["message"]


async def test_the_deadline_ends_the_whole_chain(fake_llm):
    fake_llm.set_fault("*", "stall")
    payload = await run(trigger(models=["gpt-4", "gpt-3.5-turbo"], deadline=time.time() + 0.5, max_retries=5))
    assert payload["error"]["kind"] == "deadline"
    assert outcomes(payload) == [("gpt-4", None, "error")]


async def test_a_deadline_already_past_calls_nothing(fake_llm):
    payload = await run(trigger(models=["gpt-4"], deadline=time.time() - 1))
    assert payload["error"]["kind"] == "deadline"
    assert fake_llm.stats()["requests"] == 0


async def test_a_refusal_fails_the_quality_gate_and_falls_back(fake_llm):
    fake_llm.set_fault("gpt-4", "refusal")
    payload = await run(trigger(models=["gpt-4", "gpt-3.5-turbo"], quality=ARTICLE_RULES.to_dict()))
    assert outcomes(payload) == [("gpt-4", 200, "quality_failed"), ("gpt-3.5-turbo", 200, "ok")]
    assert payload["meta"]["attempts"][0]["reason"][0]["rule"] == "refusal_markers"
    assert payload["meta"]["quality"]["passed"] is True


async def test_quality_retries_ask_the_same_model_again(fake_llm):
    fake_llm.set_fault("gpt-4", "short*1")
    payload = await run(trigger(models=["gpt-4"], quality={"min_chars": 50}, quality_retries=1))
    assert outcomes(payload) == [("gpt-4", 200, "quality_failed"), ("gpt-4", 200, "ok")]


async def test_a_quality_failure_everywhere_fails_or_returns_the_verdict(fake_llm):
    fake_llm.set_fault("*", "short")
    failed = await run(trigger(models=["gpt-4", "gpt-3.5-turbo"], quality={"min_chars": 50}))
    assert failed["status"] == "error" and failed["error"]["kind"] == "quality"
    assert "min_chars" in failed["error"]["message"]
    returned = await run(
        trigger(models=["gpt-4", "gpt-3.5-turbo"], quality={"min_chars": 50}, on_quality_failure="return")
    )
    assert returned["status"] == "success" and len(returned["text"]) < 50
    assert returned["meta"]["quality"]["passed"] is False
    assert returned["meta"]["quality"]["failures"][0]["rule"] == "min_chars"


async def test_an_undefined_connection_ends_with_a_config_error_event():
    payload = await run(trigger(conn_id="llm_nowhere"))
    assert payload["status"] == "error" and payload["error"]["kind"] == "config"
    assert "airflow connections add llm_nowhere" in payload["error"]["message"]


async def test_no_model_anywhere_is_a_config_error(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_nomodel", fake_llm.base_url)
    payload = await run(trigger(conn_id="llm_nomodel"))
    assert payload["error"]["kind"] == "config" and "default_model" in payload["error"]["message"]
    assert fake_llm.stats()["requests"] == 0


async def test_a_server_that_is_down_is_a_connection_error(monkeypatch):
    point_connection(monkeypatch, "llm_down", "http://127.0.0.1:9/v1")
    payload = await run(trigger(conn_id="llm_down", models=["gpt-4"], max_retries=0))
    assert payload["error"]["kind"] == "connection"
    assert "cannot reach http://127.0.0.1:9/v1" in payload["error"]["message"]


async def test_cancelling_the_trigger_releases_the_request(fake_llm):
    fake_llm.set_fault("gpt-4", "stall")
    task = asyncio.ensure_future(run(trigger(models=["gpt-4"])))
    await wait_until(lambda: fake_llm.stats()["in_flight"] == 1)  # the request reached the server
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: fake_llm.stats()["in_flight"] == 0)  # and the server saw it go away


async def test_many_triggers_run_concurrently_with_the_connections_headers(fake_llm, monkeypatch):
    # The connection's extra headers reach the server: here they ask the fake server for latency.
    point_connection(monkeypatch, "llm_slow", fake_llm.base_url, headers={"x-fake-latency": "0.5"})
    payloads = await asyncio.gather(*(run(trigger(conn_id="llm_slow", models=["gpt-4"])) for _ in range(50)))
    assert all(p["status"] == "success" for p in payloads)
    stats = fake_llm.stats()
    assert stats["requests"] == 50
    assert stats["max_in_flight"] == 50  # all waited together, none queued behind another


class RecordingComms:
    """Stands in for the triggerer's channel to its supervisor: records what the trigger sends."""

    def __init__(self):
        self.sent = []

    async def asend(self, message):
        self.sent.append(message)


@pytest.fixture
def supervisor(monkeypatch):
    comms = RecordingComms()
    monkeypatch.setattr("airflow.sdk.execution_time.task_runner.SUPERVISOR_COMMS", comms, raising=False)
    return comms


def worker_free(**kwargs) -> ChatCompletionTrigger:
    """A worker-free trigger as the triggerer runs it: templates rendered, task instance attached."""
    made = trigger(end="here", **kwargs)
    made.task_instance = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1)
    return made


def pushed(comms: RecordingComms) -> dict:
    xcoms = [m for m in comms.sent if isinstance(m, SetXCom)]
    assert {(m.dag_id, m.task_id, m.run_id, m.map_index) for m in xcoms} == {("d", "t", "r", -1)}
    return {m.key: m.value for m in xcoms}


async def test_worker_free_success_pushes_the_xcoms_then_ends_the_task(fake_llm, supervisor):
    made = worker_free(
        request={"max_tokens": 300},
        prompt="分析以下内容的趋势: AI",
        system_prompt="简洁",
        models=["gpt-4"],
        output_key="analysis",
        time_limit=30,
    )
    events = await run_events(made)
    assert len(events) == 1 and isinstance(events[0], TaskSuccessEvent)
    assert events[0].xcoms is None  # pushed through the XCom backend instead, see _end_task
    xcoms = pushed(supervisor)
    assert set(xcoms) == {"return_value", "analysis", "llm_meta"}
    assert xcoms["return_value"] == xcoms["analysis"] and "AI" in xcoms["analysis"]
    assert xcoms["llm_meta"]["model"] == "gpt-4"


async def test_worker_free_failure_ends_the_task_failed_with_the_error_in_meta(fake_llm, supervisor):
    events = await run_events(worker_free(request={}, prompt="x", models=["gpt-5x"]))
    assert len(events) == 1 and isinstance(events[0], TaskFailedEvent)
    meta = pushed(supervisor)["llm_meta"]
    assert meta["error"]["code"] == "model_not_found"
    assert [a["status"] for a in meta["attempts"]] == [404]


async def test_worker_free_messages_that_render_to_nothing_fail_cleanly(fake_llm, supervisor):
    events = await run_events(worker_free(request={}, prompt=""))
    assert isinstance(events[0], TaskFailedEvent)
    assert "Nothing to send" in pushed(supervisor)["llm_meta"]["error"]["message"]
    assert fake_llm.stats()["requests"] == 0


async def test_after_every_model_fails_on_one_connection_the_next_connection_is_tried(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_primary", "http://127.0.0.1:9/v1")  # nothing listens there
    point_connection(monkeypatch, "llm_backup", fake_llm.base_url, default_model="gpt-3.5-turbo")
    payload = await run(
        trigger(conn_id="llm_primary", fallback_conn_ids=["llm_backup"], models=["gpt-4"], max_retries=0)
    )
    assert payload["status"] == "success"
    assert [(a["conn_id"], a["model"], a["result"]) for a in payload["meta"]["attempts"]] == [
        ("llm_primary", "gpt-4", "error"),
        ("llm_backup", "gpt-4", "ok"),
    ]
    assert payload["meta"]["conn_id"] == "llm_backup" and payload["meta"]["fallback_used"] is True


async def test_a_json_schema_gate_retries_until_the_answer_matches(fake_llm):
    fake_llm.set_fault("gpt-4", "short*1")
    schema = {"type": "object", "minProperties": 1}
    payload = await run(
        trigger(
            request={**REQUEST, "response_format": {"type": "json_object"}},
            models=["gpt-4"],
            quality={"json_schema": schema},
            quality_retries=1,
        )
    )
    assert payload["status"] == "success", payload
    assert [a["result"] for a in payload["meta"]["attempts"]] == ["quality_failed", "ok"]
    assert isinstance(json.loads(payload["text"]), dict)


async def test_a_rate_limit_that_never_ends_stops_after_the_retry_budget_with_patience_0(
    fake_llm, monkeypatch
):
    # With rate_limit_patience_s (default 120 s) 429s are waited out instead: test_storm_defaults.py.
    point_connection(
        monkeypatch, "llm_fake", fake_llm.base_url, default_model="gpt-4", rate_limit_patience_s=0
    )
    fake_llm.set_fault("gpt-4", "429")
    payload = await run(trigger(models=["gpt-4"], max_retries=2))
    assert outcomes(payload) == [("gpt-4", 429, "error")] * 3
    assert payload["error"]["kind"] == "rate_limit"


async def test_a_prompt_too_long_is_a_client_error_with_a_hint(fake_llm):
    fake_llm.set_fault("gpt-4", "400")
    payload = await run(trigger(models=["gpt-4"], max_retries=3))
    assert outcomes(payload) == [("gpt-4", 400, "error")]
    assert payload["error"]["code"] == "context_length_exceeded"
    assert "context window" in payload["error"]["message"]


async def test_the_connections_concurrency_cap_holds_across_triggers(fake_llm, monkeypatch):
    point_connection(
        monkeypatch, "llm_capped", fake_llm.base_url, max_concurrency=3, headers={"x-fake-latency": "0.2"}
    )
    payloads = await asyncio.gather(
        *(run(trigger(conn_id="llm_capped", models=["gpt-4"])) for _ in range(12))
    )
    assert all(p["status"] == "success" for p in payloads)
    assert fake_llm.stats()["max_in_flight"] == 3


async def test_triggers_in_one_loop_reuse_the_resolved_connection(fake_llm, monkeypatch):
    point_connection(monkeypatch, "llm_reused", fake_llm.base_url, default_model="gpt-4")
    assert (await run(trigger(conn_id="llm_reused")))["status"] == "success"
    # Within ENDPOINT_TTL the triggerer does not look the connection up again.
    point_connection(monkeypatch, "llm_reused", "http://127.0.0.1:9/v1", default_model="gpt-4")
    assert (await run(trigger(conn_id="llm_reused")))["status"] == "success"


async def test_default_mode_ends_a_success_in_the_triggerer_and_resumes_a_failure(fake_llm, supervisor):
    deferred = trigger(models=["gpt-4"], end="on_success", output_key="answer")
    deferred.task_instance = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=-1)
    events = await run_events(deferred)
    assert isinstance(events[0], TaskSuccessEvent)
    assert set(pushed(supervisor)) == {"return_value", "answer", "llm_meta"}
    failing = trigger(models=["gpt-5x"], end="on_success")
    failing.task_instance = deferred.task_instance
    events = await run_events(failing)
    # A failure goes back to the worker, whose execute_complete raises the right exception.
    assert type(events[0]) is TriggerEvent and events[0].payload["error"]["kind"] == "client"


async def test_without_a_task_instance_a_success_resumes_as_usual(fake_llm):
    """dag.test() runs triggers inline with no task instance: the event must resume the task."""
    payload = await run(trigger(models=["gpt-4"], end="on_success"))
    assert payload["status"] == "success"


async def test_a_429_storm_ends_with_every_call_answered_and_the_limiter_backed_off(fake_llm, monkeypatch):
    """50 calls at once; the server refuses the first 40 with 429 and retry-after 200 ms."""
    point_connection(
        monkeypatch,
        "llm_storm",
        fake_llm.base_url,
        requests_per_minute=6000,
        headers={"x-fake-latency": "0.1"},
    )
    fake_llm.set_fault("gpt-4", "429*40")
    calls = [run(trigger(conn_id="llm_storm", models=["gpt-4"], max_retries=2)) for _ in range(50)]
    limiter = limits.limiter_for(await shared_endpoint("llm_storm"))
    fractions = []

    async def watch():
        while True:
            # The back-off is gpt-4's own (issue 12, item 2): 1.0 once it has fully recovered.
            fractions.append(limiter.stats()["models"].get("gpt-4", {}).get("rate_fraction", 1.0))
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        payloads = await asyncio.gather(*calls)
    finally:
        watcher.cancel()
    assert [p["status"] for p in payloads] == ["success"] * 50  # nobody's retry budget ran out
    assert max(len(p["meta"]["attempts"]) for p in payloads) <= 3
    assert fake_llm.stats()["by_status"]["429"] == 40
    assert min(fractions) < 1.0  # the 429s cut the allowed rate...
    assert fractions[-1] > min(fractions)  # ...and the successes let it recover
    assert limiter.stats()["rate_fraction"] == 1.0  # the connection's configured rates: never cut


async def test_a_garbled_answer_is_retried_then_falls_back_with_one_event(fake_llm):
    fake_llm.set_fault("gpt-4", "garbled")
    payload = await run(trigger(models=["gpt-4", "gpt-3.5-turbo"], max_retries=1))
    assert payload["status"] == "success" and payload["meta"]["model"] == "gpt-3.5-turbo"
    assert outcomes(payload) == [
        ("gpt-4", 200, "error"),
        ("gpt-4", 200, "error"),
        ("gpt-3.5-turbo", 200, "ok"),
    ]
    assert payload["meta"]["attempts"][0]["reason"]["kind"] == "invalid_response"


async def test_a_redirect_is_not_followed_so_the_key_never_reaches_the_other_host(monkeypatch):
    """A 307 to another origin: following it would send the key, the headers and the prompt there."""
    seen: list[dict] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"choices": [{"message": {"content": "an answer from elsewhere"}}]})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{other_url}/chat/completions")

    async with _app_on_loopback(elsewhere) as other_url, _app_on_loopback(redirect) as url:
        point_connection(monkeypatch, "llm_redirect", url, headers={"api-key": "gateway-secret"}, timeout=5)
        payload = await run(trigger(conn_id="llm_redirect", models=["gpt-4"], max_retries=2))
    assert payload["status"] == "error" and payload["error"]["kind"] == "client"
    assert f"redirects to '{other_url}/chat/completions'" in payload["error"]["message"]
    assert outcomes(payload) == [("gpt-4", 307, "error")]  # a client error: not retried either
    assert seen == []


@contextlib.asynccontextmanager
async def _app_on_loopback(handler):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("body", ["announced", "endless", "gzip-bomb"])
async def test_an_answer_past_max_response_bytes_is_not_read(monkeypatch, body):
    """A 500 MB answer took the triggerer to 1 GB; a 398 KiB gzip body inflated to 400 MiB."""
    sent = 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        if body == "announced":
            return web.Response(body=b" " * 300_000, content_type="application/json")
        if body == "gzip-bomb":  # 50 MB of spaces, about 50 KB on the wire
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return web.Response(body=gzip.compress(b" " * 50_000_000), headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while sent < 50_000_000:  # endless, as far as the client can tell: bounded for the test
                await response.write(b" " * 65_536)
                sent += 65_536
        return response

    async with _app_on_loopback(huge) as url:
        point_connection(monkeypatch, "llm_huge", url, max_response_bytes=200_000, timeout=20)
        payload = await run(trigger(conn_id="llm_huge", models=["gpt-4"], max_retries=0))
    assert payload["status"] == "error" and payload["error"]["kind"] == "invalid_response"
    assert "larger than the connection allows" in payload["error"]["message"]
    assert sent < 5_000_000  # the endless body stopped being read long before its end


async def test_a_server_echoing_the_request_leaves_no_secret_in_the_event_or_the_logs(
    fake_llm, monkeypatch, caplog
):
    """A 500 whose body repeats the request headers: the event (llm_meta) and the logs get it redacted."""
    secrets = ("gateway-secret-1", "org-secret-2")
    point_connection(
        monkeypatch, "llm_echo", fake_llm.base_url, organization=secrets[1],
        headers={"api-key": secrets[0], "x-fake-fault": "echo"}, timeout=2,
    )  # fmt: skip
    with caplog.at_level("DEBUG"):
        payload = await run(trigger(conn_id="llm_echo", models=["gpt-4"], max_retries=1))
    assert payload["status"] == "error" and outcomes(payload) == [("gpt-4", 500, "error")] * 2
    assert "Authorization: Bearer ***" in payload["error"]["message"]  # the echo, redacted
    stored = json.dumps(payload) + caplog.text
    assert "retry 1 of 1" in caplog.text  # the retry line quotes the server's text
    assert [s for s in (API_KEY, *secrets) if s in stored] == []


# --- stale pooled connections (issue 12, item 1) ------------------------------------------------


async def test_calls_spaced_past_the_servers_idle_timeout_do_not_fail_on_a_closed_connection(monkeypatch):
    """uvicorn-style servers give idle connections up; a call on a pooled one is resent, not failed.

    The server resets a request on a connection idle past 0.3 s (its close is "in flight" for 1 s),
    and calls come 0.35 s apart. With max_retries=0 each must still succeed in one attempt: a
    request reset before any answer byte never reached the model.
    """
    from airflow_llm_async.testing.fake_server import FakeLLMServer

    async with FakeLLMServer(api_key=API_KEY, keepalive_timeout=0.3) as server:
        point_connection(monkeypatch, "llm_idle", server.base_url, timeout=5)
        payloads = []
        for _ in range(6):
            payloads.append(await run(trigger(conn_id="llm_idle", models=["gpt-4"], max_retries=0)))
            await asyncio.sleep(0.35)
        stats = server.stats()
    assert [p["status"] for p in payloads] == ["success"] * 6
    assert [outcomes(p) for p in payloads] == [[("gpt-4", 200, "ok")]] * 6
    # The scenario happened: calls 2, 4 and 6 met a closed pooled connection (3 and 5 found none
    # pooled: the resend's connection is not kept).
    assert stats["stale_resets"] == 3
    assert stats["by_status"] == {"200": 6}


async def test_the_pool_drops_an_idle_connection_before_a_uvicorn_like_server_does(fake_llm):
    """The fake server gives idle connections up after 5 s (uvicorn's default); ours go first."""
    first = await run(trigger(models=["gpt-4"], max_retries=0))
    await asyncio.sleep(4.3)  # past the pool's keep-alive, short of the server's
    second = await run(trigger(models=["gpt-4"], max_retries=0))
    assert (first["status"], second["status"]) == ("success", "success")
    stats = fake_llm.stats()
    assert (stats["connections"], stats["stale_resets"]) == (2, 0)  # a new connection, none reset


# --- a gateway's 400s, told apart by their type (issue 12, item 4) -------------------------------


@pytest.mark.parametrize(
    ("fault", "hint", "error_type"),
    [
        ("400auth", "the API key was rejected", "no_db_connection"),  # LiteLLM: a wrong key, no key DB
        ("400model", "its message says what to change", None),  # LiteLLM: an unknown model
    ],
)
async def test_a_gateways_400_gets_the_hint_its_type_names_and_llm_meta_keeps_the_type(
    fake_llm, supervisor, fault, hint, error_type
):
    fake_llm.set_fault("gpt-4", fault)
    events = await run_events(worker_free(request={}, prompt="x", models=["gpt-4"], max_retries=2))
    assert len(events) == 1 and isinstance(events[0], TaskFailedEvent)
    meta = pushed(supervisor)["llm_meta"]
    assert [(a["status"], a["result"]) for a in meta["attempts"]] == [(400, "error")]  # not retried
    error = meta["error"]
    # The code LiteLLM sends is only the status again: not kept. Its "None" type and param are no values.
    assert (error["kind"], error["status"], error["code"], error["type"], error["param"]) == (
        "client", 400, None, error_type, None
    )  # fmt: skip
    assert hint in error["message"] and "context window" not in error["message"]
    assert meta["attempts"][0]["reason"] == error  # each attempt's reason carries the fields too


async def test_only_a_pooled_connection_gets_the_resend_and_only_once(monkeypatch):
    """A server that hangs up on every request after the first: no loop of resends, no resend on a new
    connection, and the one resend is visible to the server (at least once, as documented)."""
    seen = 0

    async def hang_up_after_the_first(request: web.Request) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        if seen > 1:
            request.transport.abort()
            return web.Response()  # never sent
        answer = {"model": "gpt-4", "choices": [{"message": {"content": "ok " * 30}, "finish_reason": "x"}]}
        return web.json_response(answer)

    async with _app_on_loopback(hang_up_after_the_first) as url:
        point_connection(monkeypatch, "llm_hangup", url, timeout=5)
        calls = [await run(trigger(conn_id="llm_hangup", models=["gpt-4"], max_retries=0)) for _ in range(3)]
    assert [c["status"] for c in calls] == ["success", "error", "error"]
    assert [len(c["meta"]["attempts"]) for c in calls] == [1, 1, 1]
    assert calls[1]["error"]["kind"] == calls[2]["error"]["kind"] == "connection"
    # 1 answered; call 2 on the pooled connection, then once more on a new one; call 3 on a new one only
    assert seen == 4


async def test_a_long_prompt_sent_again_reports_its_cached_tokens_and_fingerprint_in_llm_meta(fake_llm):
    """Issue 12, item 5: usage details and system_fingerprint reach llm_meta through the trigger."""
    request = {
        "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 150}]
    }
    first, again = [await run(trigger(request, models=["gpt-4o"], max_retries=0)) for _ in range(2)]
    assert first["meta"]["usage_details"] == {"cached_tokens": 0, "reasoning_tokens": 0}
    prompt = again["meta"]["usage"]["prompt_tokens"]
    assert again["meta"]["usage_details"] == {"cached_tokens": prompt // 128 * 128, "reasoning_tokens": 0}
    assert prompt >= 1024 and again["meta"]["system_fingerprint"] == "fp_fake"


async def test_a_failed_attempt_on_an_unpriced_model_leaves_the_calls_cost_known(fake_llm):
    """Issue 12, item 5: fake-model has no price; its 503 reported no tokens, so the cost is gpt-4's."""
    fake_llm.set_fault("fake-model", "503")
    payload = await run(trigger(models=["fake-model", "gpt-4"], max_retries=0))
    assert outcomes(payload) == [("fake-model", 503, "error"), ("gpt-4", 200, "ok")]
    usage = payload["meta"]["usage"]
    expected = (usage["prompt_tokens"] * 30.0 + usage["completion_tokens"] * 60.0) / 1e6
    assert payload["meta"]["cost_usd"] == pytest.approx(expected)


async def test_an_answer_of_tool_calls_is_no_success_and_the_chain_moves_on(fake_llm):
    """Issue 12, item 5: tool calls with "" content were a success with text "" (the calls lost), with null
    content an error saying only that the answer had no content."""
    fake_llm.set_fault("gpt-4", "tool_calls")
    failed = await run(trigger(models=["gpt-4"], max_retries=0))
    assert failed["status"] == "error" and failed["error"]["kind"] == "invalid_response"
    assert (
        "the model answered with tool calls (get_weather), which this operator does not run"
        in failed["error"]["message"]
    )
    fallback = await run(trigger(models=["gpt-4", "gpt-3.5-turbo"], max_retries=1))
    assert outcomes(fallback) == [("gpt-4", 200, "error")] * 2 + [("gpt-3.5-turbo", 200, "ok")]
    assert fallback["status"] == "success" and fallback["text"]


async def test_cached_prompt_tokens_are_priced_at_the_models_cached_input_price(fake_llm):
    """Issue 12, item 5: a mostly cached prompt was priced as uncached."""
    request = {"messages": [{"role": "user", "content": "Summarize the minutes of the meeting. " * 160}]}
    first, again = [await run(trigger(request, models=["gpt-4o"], max_retries=0)) for _ in range(2)]
    usage, cached = again["meta"]["usage"], again["meta"]["usage_details"]["cached_tokens"]
    assert cached > 0.9 * usage["prompt_tokens"]  # gpt-4o: $2.50/M input, $1.25/M cached, $10/M output
    expected = (
        (usage["prompt_tokens"] - cached) * 2.5 + cached * 1.25 + usage["completion_tokens"] * 10.0
    ) / 1e6
    assert again["meta"]["cost_usd"] == pytest.approx(expected)
    assert again["meta"]["cost_usd"] < first["meta"]["cost_usd"]


async def test_the_cost_a_gateway_reports_in_its_header_is_the_calls_cost(monkeypatch):
    """Issue 12, item 5: LiteLLM's proxy reports each answer's cost in x-litellm-response-cost."""
    costs = iter(["None", "0.00472"])  # LiteLLM sends "None" for an answer it could not price

    async def gateway(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        answer = {
            "model": body["model"],
            "choices": [{"message": {"content": "ok " * 30}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2000, "completion_tokens": 100, "total_tokens": 2100},
        }
        return web.json_response(answer, headers={"x-litellm-response-cost": next(costs)})

    async with _app_on_loopback(gateway) as url:
        point_connection(monkeypatch, "llm_gateway", url, timeout=5)
        unpriced = await run(trigger(conn_id="llm_gateway", models=["llama-local"], max_retries=0))
        reported = await run(trigger(conn_id="llm_gateway", models=["llama-local"], max_retries=0))
    assert unpriced["meta"]["cost_usd"] is None  # tokens, no price, no usable header: unknown
    assert reported["meta"]["cost_usd"] == pytest.approx(0.00472)  # the gateway's figure, with no price
