"""BatchTrigger driven as the triggerer drives it, against the fake server's Batch API, with an XCom store."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from airflow.sdk.execution_time.comms import GetTaskStates, GetXCom, SetXCom, TaskStatesResult, XComResult
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.testing.fake_server import FakeLLMServer, compose_answer
from airflow_llm_async.triggers.batch import STATE_KEY, BatchTrigger
from tests.integration.conftest import API_KEY, point_connection, wait_until

PROMPTS = [f"Describe the number {i} in one sentence, with a few words about its digits." for i in range(12)]
TI = SimpleNamespace(dag_id="d", task_id="fan", run_id="r", map_index=-1, try_number=1)


@pytest.fixture
async def batch_llm(monkeypatch):
    """The fake server with a quick Batch API (0.3 s per batch), and connection ``llm_fake`` to it."""
    async with FakeLLMServer(api_key=API_KEY, batch_processing_s=0.3) as server:
        point_connection(monkeypatch, "llm_fake", server.base_url, default_model="gpt-4", timeout=5)
        yield server


class XComStore:
    """The triggerer's channel to its supervisor, as an XCom table; ``values``: the task ``fan``'s
    (map index -1) XComs."""

    def __init__(self):
        self.tables: dict[tuple, dict[str, object]] = {}
        self.task_state = "failed"  # of task fan, as GetTaskStates answers it

    @property
    def values(self) -> dict[str, object]:
        return self.tables.setdefault(("d", "fan", "r", -1), {})

    async def asend(self, message):
        if isinstance(message, GetTaskStates):  # what the API answers: {run_id: {task_id: state}}
            return TaskStatesResult(task_states={run: {"fan": self.task_state} for run in message.run_ids})
        table = self.tables.setdefault(
            (message.dag_id, message.task_id, message.run_id, message.map_index), {}
        )
        if isinstance(message, SetXCom):
            json.dumps(message.value)  # what reaches the API must be JSON
            table[message.key] = message.value
            return None
        if isinstance(message, GetXCom):
            return XComResult(key=message.key, value=table.get(message.key))
        raise AssertionError(f"unexpected message {message!r}")


@pytest.fixture
def xcoms(monkeypatch):
    store = XComStore()
    monkeypatch.setattr("airflow.sdk.execution_time.task_runner.SUPERVISOR_COMMS", store, raising=False)
    return store


def batch_trigger(prompts=PROMPTS, *, ti=TI, **kw) -> BatchTrigger:
    """A trigger as LLMFanOutOperator(batch=True) builds it, serialized and rebuilt as the triggerer does."""
    kw.setdefault("llm_conn_id", "llm_fake")
    kw.setdefault("batch_poll_interval", 0.05)
    kw.setdefault("batch_poll_max_interval", 0.1)
    op = LLMFanOutOperator(task_id="fan", prompts=prompts, max_tokens=64, batch=True, **kw)
    assert op.trigger_class.classpath() == "airflow_llm_async.triggers.batch.BatchTrigger"
    made = BatchTrigger(**json.loads(json.dumps(op.start_trigger_args.trigger_kwargs)))
    made.task_instance = ti
    return made


async def events_of(trigger: BatchTrigger) -> list:
    return [event async for event in trigger.run()]


def batch_stats(server: FakeLLMServer) -> dict:
    return server.stats()["batches"]


async def stop_once_its_batch_waits(trigger: BatchTrigger, server: FakeLLMServer, xcoms: XComStore) -> None:
    """Run ``trigger`` until its batch exists and its id is stored, then cancel it, as the triggerer
    stops a trigger (on_kill is the caller's to call, or not)."""
    running = asyncio.create_task(events_of(trigger))
    await wait_until(lambda: batch_stats(server)["batches_created"] == 1 and STATE_KEY in xcoms.values)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_every_item_is_answered_through_one_batch_at_half_the_price(batch_llm, xcoms):
    events = await events_of(batch_trigger(system_prompt="Be brief."))
    assert len(events) == 1 and isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == [compose_answer("Be brief.", p) for p in PROMPTS]
    assert batch_llm.stats()["requests"] - _batch_api_requests(batch_llm) == 0  # no real-time chat request
    stats = batch_stats(batch_llm)
    assert (stats["batches_created"], stats["lines_answered"], stats["lines_answered_twice"]) == (1, 12, 0)
    meta = xcoms.values["llm_meta"]
    assert {(i["status"], i["model"], i["attempts"]) for i in meta["items"]} == {("success", "gpt-4", 1)}
    summary = meta["batch"]
    assert [b["status"] for b in summary["batches"]] == ["completed"]
    assert summary["batches"][0]["id"].startswith("batch_")
    gpt4 = DEFAULT_PRICES["gpt-4"]
    prompt, completion = meta["totals"]["prompt_tokens"], meta["totals"]["completion_tokens"]
    realtime = gpt4.cost(prompt, completion)
    assert summary["realtime_cost_usd"] == pytest.approx(realtime, rel=1e-6)
    assert summary["cost_usd"] == pytest.approx(realtime / 2, rel=1e-6)
    assert meta["totals"]["cost_usd"] == pytest.approx(realtime / 2, rel=1e-4)
    assert summary["realtime_items"] == 0
    # The batch's id is stored for a restart, with its final state.
    assert xcoms.values[STATE_KEY]["batches"]["0"]["id"] == summary["batches"][0]["id"]
    # Its input file is deleted once read back; the output file stays for a replay.
    assert stats["files_stored"] == 1


async def test_a_replay_after_the_input_file_was_deleted_reads_the_answers_again(batch_llm, xcoms, caplog):
    await events_of(batch_trigger())
    first = dict(xcoms.values)
    assert batch_stats(batch_llm)["files_stored"] == 1  # the input file is gone
    events = await events_of(batch_trigger())  # the triggerer restarted after the trigger ended
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == first["return_value"]
    stats = batch_stats(batch_llm)
    assert (stats["batches_created"], stats["lines_answered_twice"], stats["files_stored"]) == (1, 0, 1)
    assert "could not delete" not in caplog.text  # the input file already gone is no warning


def _batch_api_requests(server: FakeLLMServer) -> int:
    """The /v1 requests that were not chat completions: the Files and Batches API's."""
    stats = server.stats()
    return stats["requests"] - sum(stats["by_model"].values())


async def test_a_restarted_trigger_finds_its_batch_and_creates_none(batch_llm, xcoms):
    batch_llm_config = {"batch_processing_s": 1.0}
    await _configure(batch_llm, batch_llm_config)
    # The triggerer stops it (a restart): no on_kill, the batch keeps running.
    await stop_once_its_batch_waits(batch_trigger(), batch_llm, xcoms)
    events = await events_of(batch_trigger())
    assert isinstance(events[0], TaskSuccessEvent)
    stats = batch_stats(batch_llm)
    assert (stats["batches_created"], stats["batches_cancelled"], stats["lines_answered_twice"]) == (1, 0, 0)
    assert xcoms.values["return_value"] == [compose_answer("", p) for p in PROMPTS]


async def test_a_new_try_without_the_stored_ids_finds_the_batch_by_its_metadata(batch_llm, xcoms):
    await events_of(batch_trigger())
    answers = xcoms.values["return_value"]
    xcoms.values.clear()  # Airflow clears a task instance's XComs when a deferrable try starts on a worker
    retry = SimpleNamespace(**{**vars(TI), "try_number": 2})
    events = await events_of(batch_trigger(ti=retry))
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == answers
    stats = batch_stats(batch_llm)
    assert (stats["batches_created"], stats["lines_answered"], stats["lines_answered_twice"]) == (1, 12, 0)

    # Another task, or other input, is another batch; batch_resubmit=True sends again on purpose.
    await events_of(batch_trigger(ti=SimpleNamespace(**{**vars(TI), "map_index": 0}), max_failures=0))
    assert batch_stats(batch_llm)["batches_created"] == 2
    third = SimpleNamespace(**{**vars(TI), "try_number": 3})
    await events_of(batch_trigger(ti=third, batch_resubmit=True))
    assert batch_stats(batch_llm)["batches_created"] == 3
    # ... once per try: a restart within the try finds the batch that try sent.
    await events_of(batch_trigger(ti=third, batch_resubmit=True))
    assert batch_stats(batch_llm)["batches_created"] == 3


async def test_error_lines_are_asked_again_in_real_time_or_counted_as_failed(batch_llm, xcoms):
    batch_llm.set_fault("gpt-4", "500*3")  # the first three lines answered get a server error
    events = await events_of(batch_trigger())
    assert isinstance(events[0], TaskSuccessEvent)
    meta = xcoms.values["llm_meta"]
    again = [item for item in meta["items"] if item.get("realtime")]
    assert len(again) == 3 and all(item["batch_error"]["kind"] == "server" for item in again)
    assert all(item["attempts"] == 2 for item in again)  # the batch line, then one real-time answer
    assert meta["batch"]["realtime_items"] == 3
    assert None not in xcoms.values["return_value"]
    assert sum(batch_llm.stats()["by_model"].values()) == 3  # three real-time chat requests

    batch_llm.set_fault("gpt-4", "500*2")
    events = await events_of(batch_trigger(PROMPTS[:5], batch_retry="none", max_failures=2))
    assert isinstance(events[0], TaskSuccessEvent)
    results = xcoms.values["return_value"]
    assert results.count(None) == 2
    failed = [item for item in xcoms.values["llm_meta"]["items"] if item["status"] != "success"]
    assert {item["error"]["kind"] for item in failed} == {"server"}


async def test_a_split_input_goes_into_several_batches_in_order(batch_llm, xcoms):
    events = await events_of(batch_trigger(batch_max_requests=5))
    assert isinstance(events[0], TaskSuccessEvent)
    assert len(xcoms.values["llm_meta"]["batch"]["batches"]) == 3  # 5 + 5 + 2
    assert xcoms.values["return_value"] == [compose_answer("", p) for p in PROMPTS]
    assert batch_stats(batch_llm)["batches_created"] == 3


async def test_killing_the_task_cancels_the_batch(batch_llm, xcoms):
    await _configure(batch_llm, {"batch_processing_s": 30.0})
    trigger = batch_trigger()
    await stop_once_its_batch_waits(trigger, batch_llm, xcoms)
    await trigger.on_kill()  # what the triggerer calls when a user kills the task
    assert batch_stats(batch_llm)["batches_cancelled"] == 1


async def test_on_kill_of_a_trigger_that_moved_to_another_triggerer_cancels_nothing(batch_llm, xcoms):
    # Airflow 3.3.2 calls on_kill on a triggerer that lost the trigger while its heartbeat stalled;
    # the task is still deferred there, waiting for the batch on the other triggerer.
    await _configure(batch_llm, {"batch_processing_s": 30.0})
    trigger = batch_trigger()
    await stop_once_its_batch_waits(trigger, batch_llm, xcoms)
    xcoms.task_state = "deferred"
    await trigger.on_kill()
    assert batch_stats(batch_llm)["batches_cancelled"] == 0


async def test_the_timeout_cancels_the_batch_and_keeps_its_partial_answers(batch_llm, xcoms):
    await _configure(batch_llm, {"batch_processing_s": 4.0})
    events = await events_of(batch_trigger(timeout=1.5, batch_retry="none", max_failures=1.0))
    assert isinstance(events[0], TaskSuccessEvent)
    summary = xcoms.values["llm_meta"]["batch"]
    assert summary["batches"][0]["status"] == "cancelled"
    results = xcoms.values["return_value"]
    answered = [r for r in results if r is not None]
    assert 0 < len(answered) < len(PROMPTS)  # what the batch had done before it was cancelled
    failed = [i for i in xcoms.values["llm_meta"]["items"] if i["status"] != "success"]
    assert {i["error"]["code"] for i in failed} == {"batch_cancelled"}
    assert batch_stats(batch_llm)["batches_cancelled"] == 1


async def test_an_expired_batch_yields_its_partial_answers_and_asks_the_rest_in_real_time(batch_llm, xcoms):
    await _configure(batch_llm, {"batch_expire_after": 0.5})
    events = await events_of(batch_trigger())
    assert isinstance(events[0], TaskSuccessEvent)
    meta = xcoms.values["llm_meta"]
    assert meta["batch"]["batches"][0]["status"] == "expired"
    again = [item for item in meta["items"] if item.get("realtime")]
    assert 0 < len(again) < len(PROMPTS)
    assert {item["batch_error"]["code"] for item in again} == {"batch_expired"}
    assert None not in xcoms.values["return_value"]


async def test_a_batch_that_fails_validation_fails_the_task_with_the_reason(batch_llm, xcoms, capsys):
    await _configure(batch_llm, {"batch_fail_validation": True})
    events = await events_of(batch_trigger(PROMPTS[:3]))
    assert isinstance(events[0], TaskFailedEvent)
    items = xcoms.values["llm_meta"]["items"]
    assert {i["error"]["kind"] for i in items} == {"batch"}
    assert "failed validation" in items[0]["error"]["message"]
    assert sum(batch_llm.stats()["by_model"].values()) == 0  # not asked again: it would fail again
    assert "failed validation" in capsys.readouterr().out


async def test_a_wrong_key_fails_the_task_at_once_with_the_server_error(batch_llm, xcoms, monkeypatch):
    point_connection(
        monkeypatch, "llm_fake", batch_llm.base_url, api_key="sk-wrong-key-0000", default_model="gpt-4"
    )
    events = await events_of(batch_trigger(PROMPTS[:2]))
    assert isinstance(events[0], TaskFailedEvent)
    error = xcoms.values["llm_meta"]["error"]
    assert error["status"] == 401 and "GET /batches" in error["message"]  # looking for its batch first
    assert "sk-wrong-key-0000" not in json.dumps(xcoms.values)


async def _configure(server: FakeLLMServer, settings: dict) -> None:
    """POST /_fake/batches: the fake Batch API's settings, at runtime."""
    import httpx

    async with httpx.AsyncClient() as client:
        response = await client.post(f"{server.url}/_fake/batches", json=settings)
        response.raise_for_status()


async def test_a_stored_id_the_server_no_longer_knows_is_looked_up_by_metadata(batch_llm, xcoms):
    await events_of(batch_trigger())
    answers = xcoms.values["return_value"]
    xcoms.values[STATE_KEY]["batches"]["0"]["id"] = "batch_deleted"  # the server answers 404 for it
    events = await events_of(batch_trigger())
    assert isinstance(events[0], TaskSuccessEvent)
    assert xcoms.values["return_value"] == answers
    assert batch_stats(batch_llm)["batches_created"] == 1


async def test_a_new_try_reuses_the_real_time_answers_an_earlier_try_stored(batch_llm, xcoms):
    # Half the batch lines fail, and half their real-time re-asks (no retries): try 1 fails.
    batch_llm.set_fault("gpt-4", "500%50")
    events = await events_of(batch_trigger(max_retries=0))
    assert isinstance(events[0], TaskFailedEvent)
    asked = sum(batch_llm.stats()["by_model"].values())  # the failed lines, asked in real time
    answered = len(xcoms.values[STATE_KEY]["realtime"])
    assert 0 < answered < asked
    # Try 2 (worker-free mode keeps the XComs): only the re-asks that failed are asked again.
    batch_llm.set_fault("gpt-4", None)
    retry = SimpleNamespace(**{**vars(TI), "try_number": 2})
    events = await events_of(batch_trigger(ti=retry, max_retries=0))
    assert isinstance(events[0], TaskSuccessEvent)
    assert sum(batch_llm.stats()["by_model"].values()) == asked + (asked - answered)
    assert None not in xcoms.values["return_value"]
    assert batch_stats(batch_llm)["batches_created"] == 1
