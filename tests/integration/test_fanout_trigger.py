"""FanOutTrigger driven the way the triggerer drives it, against the fake server, with an XCom store."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from airflow.sdk.execution_time.comms import DeleteXCom, GetXCom, SetXCom, XComResult
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_llm_async import limits, progress
from airflow_llm_async.core.protocol import DEFAULT_MAX_CONCURRENCY
from airflow_llm_async.hooks.llm import shared_endpoint
from airflow_llm_async.operators.fanout import LLMFanOutOperator, run_fan_out_sync
from airflow_llm_async.testing.fake_server import LATENCY_HEADER, compose_answer
from airflow_llm_async.triggers.fanout import FanOutTrigger
from tests.integration.conftest import API_KEY, point_connection, wait_until

PROMPTS = [f"Describe the number {i} in one sentence." for i in range(40)]
TI = SimpleNamespace(dag_id="d", task_id="fan", run_id="r", map_index=-1, try_number=1)


class XComStore:
    """Stands in for the triggerer's channel to its supervisor: an in-memory XCom table."""

    def __init__(self):
        self.values: dict[str, object] = {}

    async def asend(self, message):
        assert (message.dag_id, message.task_id, message.run_id, message.map_index) == ("d", "fan", "r", -1)
        if isinstance(message, SetXCom):
            json.dumps(message.value)  # what reaches the API must be JSON
            self.values[message.key] = message.value
            return None
        if isinstance(message, GetXCom):
            return XComResult(key=message.key, value=self.values.get(message.key))
        if isinstance(message, DeleteXCom):
            self.values.pop(message.key, None)
            return None
        raise AssertionError(f"unexpected message {message!r}")

    def parts(self) -> list[str]:
        return sorted(k for k in self.values if k.startswith("llm_fanout_part_"))


@pytest.fixture
def xcoms(monkeypatch):
    store = XComStore()
    monkeypatch.setattr("airflow.sdk.execution_time.task_runner.SUPERVISOR_COMMS", store, raising=False)
    return store


def fan_out(prompts=PROMPTS, *, ti=TI, **kw) -> FanOutTrigger:
    """A trigger as LLMFanOutOperator builds it, serialized and rebuilt as the triggerer does."""
    kw.setdefault("llm_conn_id", "llm_fake")
    op = LLMFanOutOperator(
        task_id="fan",
        prompts=prompts,
        max_tokens=64,
        start_from_trigger=True,
        **kw,
    )
    classpath, trigger_kwargs = op.trigger_class.classpath(), op.start_trigger_args.trigger_kwargs
    assert classpath == "airflow_llm_async.triggers.fanout.FanOutTrigger"
    made = FanOutTrigger(**json.loads(json.dumps(trigger_kwargs)))
    made.task_instance = ti
    return made


async def events_of(trigger: FanOutTrigger) -> list:
    return [event async for event in trigger.run()]


async def test_every_prompt_is_answered_in_input_order_and_the_task_ends_here(fake_llm, xcoms):
    fake_llm.hold()
    running = asyncio.create_task(events_of(fan_out(system_prompt="Be brief.")))
    await wait_until(lambda: fake_llm.stats()["held"] == 40)  # all in flight at once, in one trigger
    fake_llm.release()
    events = await running
    assert len(events) == 1 and isinstance(events[0], TaskSuccessEvent)
    results = xcoms.values["return_value"]
    assert results == [compose_answer("Be brief.", p) for p in PROMPTS]
    meta = xcoms.values["llm_meta"]
    assert len(meta["items"]) == len(PROMPTS)
    assert {(i["status"], i["model"], i["attempts"]) for i in meta["items"]} == {("success", "gpt-4", 1)}
    totals = meta["totals"]
    assert (totals["items"], totals["succeeded"], totals["failed"], totals["resumed"]) == (40, 40, 0, 0)
    assert totals["total_tokens"] == sum(i["usage"]["total_tokens"] for i in meta["items"]) > 0
    assert totals["cost_usd"] is None or totals["cost_usd"] >= 0
    assert fake_llm.stats()["requests"] == 40
    assert xcoms.parts() == []  # no progress parts are left once the list is pushed


async def test_message_lists_and_prompts_mix_and_a_rendered_json_list_is_read(fake_llm, xcoms):
    items = ["Describe the number 1.", [{"role": "user", "content": "Describe the number 2."}]]
    made = fan_out(prompts="{{ prompts }}")
    made.prompts = json.dumps(items)  # what the triggerer's rendering of an XCom template gives
    await events_of(made)
    assert xcoms.values["return_value"] == [
        compose_answer("", items[0]),
        compose_answer("", items[1][0]["content"]),
    ]
    made = fan_out(prompts="{{ prompts }}")
    made.prompts = str(items)  # rendered without | tojson: the list's Python repr
    await events_of(made)
    assert len(xcoms.values["return_value"]) == 2


async def test_failures_within_max_failures_are_none_with_their_error(fake_llm, xcoms):
    fake_llm.set_fault("gpt-4", "400")  # every gpt-4 call fails: a client error, never retried
    made = fan_out(PROMPTS[:4], model="gpt-4", fallback_models=["gpt-3.5-turbo"], max_failures=0)
    await events_of(made)
    assert len(xcoms.values["return_value"]) == 4
    assert {i["model"] for i in xcoms.values["llm_meta"]["items"]} == {"gpt-3.5-turbo"}  # fallback per item
    assert xcoms.values["llm_meta"]["totals"]["fallback_used"] == 4

    fake_llm.set_fault("gpt-3.5-turbo", "400")
    events = await events_of(fan_out(PROMPTS[:4], model="gpt-3.5-turbo", max_failures=4))
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == [None] * 4
    items = xcoms.values["llm_meta"]["items"]
    assert {i["error"]["kind"] for i in items} == {"client"} and items[0]["attempt_log"][0]["status"] == 400


async def test_more_failures_than_allowed_fail_the_task_with_a_summary(fake_llm, xcoms, capsys):
    fake_llm.set_fault("gpt-4o", "400")
    events = await events_of(fan_out(PROMPTS[:6], model="gpt-4o", max_failures=0.5))
    assert isinstance(events[0], TaskFailedEvent)
    assert xcoms.values["return_value"] == [None] * 6
    meta = xcoms.values["llm_meta"]
    assert (meta["totals"]["failed"], meta["allowed_failures"], meta["failed_items"]) == (
        6,
        3,
        list(range(6)),
    )
    log = capsys.readouterr().out  # the trigger's log: the task log's triggerer part
    assert "0 of 6 items succeeded, 6 failed (allowed: 3)" in log
    assert "item 0: (client) HTTP 400" in log and "and 1 more in llm_meta" in log
    assert xcoms.parts() != []  # a failed fan-out keeps its progress for the next try


async def test_a_restarted_trigger_calls_only_the_items_that_had_not_finished(fake_llm, xcoms, monkeypatch):
    monkeypatch.setattr(progress, "FLUSH_INTERVAL_S", 0.05)
    # Ten at a time, 0.2 s each: the 40 answers arrive in four waves, stored as they come.
    point_connection(
        monkeypatch,
        "llm_waves",
        fake_llm.base_url,
        default_model="gpt-4",
        timeout=5,
        max_concurrency=10,
        headers={LATENCY_HEADER: "0.2"},
    )
    first = asyncio.create_task(events_of(fan_out(llm_conn_id="llm_waves")))
    await wait_until(lambda: _stored(xcoms) >= 10, timeout=10)
    first.cancel()  # what the triggerer does to a trigger it stops; a kill -9 is tested end to end
    with pytest.raises(asyncio.CancelledError):
        await first
    stored = _stored(xcoms)
    assert 10 <= stored < 40
    before = fake_llm.stats()["requests"]
    events = await events_of(fan_out(llm_conn_id="llm_waves"))
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == [compose_answer("", p) for p in PROMPTS]
    assert fake_llm.stats()["requests"] - before == 40 - stored  # exactly the items no part held
    assert xcoms.values["llm_meta"]["totals"]["resumed"] == stored
    assert xcoms.parts() == []  # read back, then deleted once the list is pushed


async def test_parts_of_another_input_or_failures_of_an_earlier_try_are_called_again(fake_llm, xcoms):
    fake_llm.set_fault("gpt-4", "400*2")  # the first two calls fail
    await events_of(fan_out(PROMPTS[:4], max_failures=0, max_retries=0))
    assert xcoms.values["llm_meta"]["totals"]["failed"] == 2
    requests = fake_llm.stats()["requests"]
    # The same try again (a triggerer restart): every record is reused, failures included.
    await events_of(fan_out(PROMPTS[:4], max_failures=0, max_retries=0))
    assert fake_llm.stats()["requests"] == requests
    # The next try: only the two failures are called again, and now succeed.
    next_try = SimpleNamespace(**{**vars(TI), "try_number": 2})
    events = await events_of(fan_out(PROMPTS[:4], ti=next_try, max_failures=0, max_retries=0))
    assert isinstance(events[0], TaskSuccessEvent)
    assert fake_llm.stats()["requests"] == requests + 2
    assert xcoms.values["llm_meta"]["totals"]["resumed"] == 2
    # Another input (a different temperature): nothing is reused.
    await events_of(fan_out(PROMPTS[:4], ti=next_try, max_retries=0, temperature=0.1))
    assert fake_llm.stats()["requests"] == requests + 6


async def test_progress_that_cannot_be_read_back_costs_calls_not_the_task(fake_llm, xcoms, monkeypatch):
    async def unreadable(message):
        if isinstance(message, GetXCom):
            raise ConnectionResetError("supervisor gone")
        return await XComStore.asend(xcoms, message)

    monkeypatch.setattr(xcoms, "asend", unreadable)
    events = await events_of(fan_out(PROMPTS[:3]))
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == [compose_answer("", p) for p in PROMPTS[:3]]


async def test_a_fan_out_shares_the_connections_concurrency_limit(fake_llm, xcoms, monkeypatch):
    point_connection(
        monkeypatch,
        "llm_capped",
        fake_llm.base_url,
        default_model="gpt-4",
        timeout=5,
        max_concurrency=5,
        headers={LATENCY_HEADER: "0.1"},
    )
    fake_llm.reset()
    await events_of(fan_out(PROMPTS[:30], llm_conn_id="llm_capped"))
    assert fake_llm.stats()["max_in_flight"] == 5


async def test_bad_input_or_connection_fails_the_task_before_any_call(fake_llm, xcoms, capsys):
    made = fan_out(prompts="{{ prompts }}")
    made.prompts = "not a list"
    events = await events_of(made)
    assert isinstance(events[0], TaskFailedEvent)
    assert "prompts rendered to text that is not a JSON list" in capsys.readouterr().out
    assert xcoms.values["llm_meta"]["error"]["kind"] == "config"
    events = await events_of(fan_out(llm_conn_id="llm_nowhere"))
    assert isinstance(events[0], TaskFailedEvent) and "llm_nowhere" in capsys.readouterr().out
    made = fan_out(prompts="{{ prompts }}", max_failures=1)
    made.prompts = json.dumps(["Describe 1.", {"not": "a prompt"}])
    events = await events_of(made)
    assert isinstance(events[0], TaskSuccessEvent)  # one bad item, one allowed failure
    assert xcoms.values["return_value"][1] is None
    assert "item 1:" in xcoms.values["llm_meta"]["items"][1]["error"]["message"]
    assert fake_llm.stats()["requests"] == 1


async def test_without_a_task_instance_the_event_carries_the_results(fake_llm):
    """dag.test() runs triggers inline with no task instance: the task resumes and pushes."""
    made = fan_out(PROMPTS[:3], ti=None)
    (event,) = await events_of(made)
    assert type(event) is TriggerEvent and event.payload["stored"] is False
    assert event.payload["results"] == [compose_answer("", p) for p in PROMPTS[:3]]
    json.dumps(event.payload)


async def test_default_deferrable_mode_resumes_only_a_failure(fake_llm, xcoms):
    made = fan_out(PROMPTS[:3])
    made.end = "on_success"
    (event,) = await events_of(made)
    assert isinstance(event, TaskSuccessEvent) and len(xcoms.values["return_value"]) == 3
    fake_llm.set_fault("gpt-4", "400")
    made = fan_out(PROMPTS[:3])
    made.end = "on_success"
    (event,) = await events_of(made)
    assert type(event) is TriggerEvent
    assert event.payload["status"] == "error" and event.payload["stored"] is True
    assert "3 failed" in event.payload["message"]


def test_sync_mode_runs_the_same_fan_out_on_the_worker(threaded_fake_llm):
    op = LLMFanOutOperator(task_id="fan", prompts=PROMPTS[:5], llm_conn_id="llm_fake", deferrable=False)
    outcome = run_fan_out_sync(op.build_trigger())
    assert outcome.status == "success"
    assert outcome.results == [compose_answer("", p) for p in PROMPTS[:5]]


def _stored(store: XComStore) -> int:
    return sum(len(store.values[k]["records"]) for k in store.parts())


async def test_a_garbled_answer_fails_its_item_alone_and_the_others_finish(fake_llm, xcoms):
    """Valid JSON in the wrong shape is a failed attempt of one item, never a crash of the trigger."""
    fake_llm.set_fault("gpt-4", "garbled*1")
    events = await events_of(fan_out(PROMPTS[:5], model="gpt-4", max_retries=0, max_failures=1))
    assert isinstance(events[0], TaskSuccessEvent)
    results, items = xcoms.values["return_value"], xcoms.values["llm_meta"]["items"]
    assert results.count(None) == 1 and len(results) == 5
    failed = items[results.index(None)]
    assert failed["error"]["kind"] == "invalid_response"
    assert "shape of a chat completion" in failed["error"]["message"]


async def test_an_item_whose_server_echoes_the_request_is_stored_redacted(fake_llm, xcoms, monkeypatch):
    point_connection(
        monkeypatch, "llm_echo", fake_llm.base_url, default_model="gpt-4", timeout=2,
        headers={"api-key": "gateway-secret-1"},
    )  # fmt: skip
    fake_llm.set_fault("gpt-4", "echo*1")
    events = await events_of(fan_out(PROMPTS[:3], llm_conn_id="llm_echo", max_retries=0, max_failures=1))
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"].count(None) == 1
    stored = json.dumps(xcoms.values)
    assert "Authorization: Bearer ***" in stored and "api-key: ***" in stored
    assert API_KEY not in stored and "gateway-secret-1" not in stored


async def test_a_fan_out_past_the_default_concurrency_cap_waits_instead_of_opening_more_sockets(
    fake_llm, xcoms, monkeypatch
):
    """A connection without max_concurrency still caps calls in flight (one socket each) at 1,000."""
    assert DEFAULT_MAX_CONCURRENCY == 1000
    # The held calls wait at the server while the rest line up: give them time on a loaded machine.
    point_connection(monkeypatch, "llm_patient", fake_llm.base_url, default_model="gpt-4", timeout=120)
    prompts = [f"item {i}" for i in range(DEFAULT_MAX_CONCURRENCY + 20)]
    fake_llm.hold()
    running = asyncio.create_task(events_of(fan_out(prompts, llm_conn_id="llm_patient", max_retries=0)))
    limiter = limits.limiter_for(await shared_endpoint("llm_patient"))
    await wait_until(lambda: limiter.stats()["waiting"] > 0, timeout=30)
    await wait_until(lambda: fake_llm.stats()["held"] == DEFAULT_MAX_CONCURRENCY, timeout=30)
    assert limiter.stats()["in_flight"] == DEFAULT_MAX_CONCURRENCY
    fake_llm.release()
    events = await running
    assert isinstance(events[0], TaskSuccessEvent) and None not in xcoms.values["return_value"]
    assert fake_llm.stats()["requests"] == len(prompts)
