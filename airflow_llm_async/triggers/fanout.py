"""FanOutTrigger: many chat completions, all waiting together in one trigger."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk.execution_time.xcom import XCom
from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_llm_async import fanout, progress
from airflow_llm_async.hooks.llm import LLMConfigError
from airflow_llm_async.protocol import LLMCallError
from airflow_llm_async.triggers.chat import ChatCompletionTrigger, resolve_endpoints_async

META_KEY = "llm_meta"


class FanOutTrigger(BaseTrigger):
    """
    Call the model once per item of ``prompts``, all concurrently, and fire one event at the end.

    Each item is one :func:`~airflow_llm_async.completion.complete` call with its own retries,
    quality gate and fallback chain, under the connection's limiter. Finished items are pushed as
    progress parts (``progress.py``) while the others run, so a trigger restarted on another
    triggerer calls only the items that had not finished. With a task instance, the trigger pushes
    the task's XComs itself: ``return_value`` (and ``output_key``) the list of answers in input
    order, ``None`` for a failed item; ``llm_meta`` the per-item details and the totals.

    Kwargs are stored in plain text in the metadata DB: they hold the conn_id, never a key.

    :param prompts: the items as a template (worker-free mode): rendered by the triggerer, to a list of
        prompts or message lists or JSON text of one.
    :param items: the items as they are, a list of prompts or message lists: not rendered (the triggerer
        would compile every string of a ``prompts`` list as a Jinja template, ~2 ms each).
    :param request: the model-independent request body without messages (temperature, max_tokens, ...).
    :param options: the call options of ``LLMOperator`` (conn_id, models, fallbacks, retries, quality),
        as ``ChatCompletionTrigger`` takes them.
    :param system_prompt: a system message sent with every item.
    :param deadline: wall-clock epoch seconds after which no attempt starts or continues.
    :param time_limit: worker-free mode: seconds from the start of ``run()`` instead of ``deadline``.
    :param max_failures: failed items that still let the task succeed (a count or a fraction).
    :param output_key: another key that also holds the list (``return_value``: none).
    :param end_from_trigger: end the task here (worker-free mode).
    :param end_on_success: end the task here when it succeeded; a failure resumes it on a worker.
    :param mapped_output: a downstream task is mapped over the list (the trigger then records its length).
    """

    def __init__(
        self,
        *,
        request: dict[str, Any],
        options: dict[str, Any],
        system_prompt: str | None = None,
        deadline: float | None = None,
        time_limit: float | None = None,
        max_failures: int | float = 0,
        output_key: str = "return_value",
        end_from_trigger: bool = False,
        end_on_success: bool = False,
        mapped_output: bool = False,
        prompts: list[Any] | str | None = None,
        items: list[Any] | None = None,
    ) -> None:
        super().__init__()
        # Attribute names match LLMFanOutOperator.template_fields: the triggerer renders these in place.
        self.prompts = prompts
        self.items = items
        self.system_prompt = system_prompt
        self.request = request
        self.options = options
        self.deadline = deadline
        self.time_limit = time_limit
        self.max_failures = max_failures
        self.output_key = output_key
        self.end_from_trigger = end_from_trigger
        self.end_on_success = end_on_success
        self.mapped_output = mapped_output
        self._progress: progress.XComProgress | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_llm_async.triggers.fanout.FanOutTrigger",
            {
                "prompts": self.prompts,
                "items": self.items,
                "request": self.request,
                "options": self.options,
                "system_prompt": self.system_prompt,
                "deadline": self.deadline,
                "time_limit": self.time_limit,
                "max_failures": self.max_failures,
                "output_key": self.output_key,
                "end_from_trigger": self.end_from_trigger,
                "end_on_success": self.end_on_success,
                "mapped_output": self.mapped_output,
            },
        )

    def item_specs(self) -> list:
        """One CallSpec per item (or the record of an unusable item); ValueError for bad ``prompts``."""
        deadline = self.deadline if self.time_limit is None else time.time() + self.time_limit
        base = ChatCompletionTrigger(request=self.request, deadline=deadline, **self.options).call_spec()
        items = self.items if self.items is not None else fanout.parse_items(self.prompts)
        return fanout.item_specs(items, base, self.system_prompt)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        outcome = await self._fan_out()
        ok = outcome["status"] == "success"
        if self.task_instance is None:  # dag.test() runs triggers inline: the task resumes and pushes
            yield TriggerEvent({**outcome, "stored": False})
            return
        await self._push(outcome)
        if ok and self._progress is not None:
            await self._progress.delete_all()
        if self.end_from_trigger or (self.end_on_success and ok):
            if ok:
                self.log.info(outcome["message"])
                yield TaskSuccessEvent()
            else:
                # No worker will resume to raise this: the task log (triggerer part) is where it shows.
                self.log.error(outcome["message"])
                yield TaskFailedEvent()
            return
        # The XComs are stored: the event carries only what the resumed task needs to end.
        yield TriggerEvent({"status": outcome["status"], "message": outcome["message"], "stored": True})

    async def _fan_out(self) -> dict[str, Any]:
        try:
            specs = self.item_specs()
        except ValueError as exc:  # prompts that are not a list, or options that cannot make a call
            return task_error(LLMCallError("config", str(exc)))
        if not specs:
            return fanout.summarize([], self.max_failures)
        try:
            endpoints = await resolve_endpoints_async(next(s for s in specs if not isinstance(s, dict)))
        except StopIteration:  # every item is unusable: nothing to call
            endpoints = {}
        except LLMConfigError as exc:
            return task_error(LLMCallError("config", str(exc)))
        done: dict[int, fanout.Record] = {}
        ti = self.task_instance
        if ti is not None:
            self._progress = progress.XComProgress(ti, progress.fingerprint(specs, self.options))
            try:
                done = await self._progress.load(len(specs))
            except Exception:  # progress is an optimisation: without it every item is called
                self.log.warning("LLM fan-out: could not read stored progress; calling all", exc_info=True)
            if done:
                self.log.info(
                    "LLM fan-out: %d of %d items already finished; calling the rest", len(done), len(specs)
                )
        pending: dict[int, fanout.Record] = {}
        wake = asyncio.Event()

        def on_record(index: int, record: fanout.Record) -> None:
            pending[index] = record
            if len(pending) >= progress.FLUSH_ITEMS:
                wake.set()

        # Without a task instance (dag.test()) there is nowhere to store progress.
        flusher, stop = None, asyncio.Event()
        if self._progress is not None:
            flusher = asyncio.create_task(self._flush_loop(pending, wake, stop, len(specs)))
        try:
            records = await fanout.run_items(specs, endpoints, done, on_record if flusher else None)
        except BaseException:  # cancelled (the triggerer stops the trigger) or a bug
            if flusher is not None:
                flusher.cancel()
            raise
        if flusher is not None:  # let a part being stored finish: its records left ``pending``
            stop.set()
            wake.set()
            await flusher
        outcome = fanout.summarize(records, self.max_failures, resumed=len(done))
        if outcome["status"] != "success":
            # Kept for the next try, which calls only the failures. A success pushes its list at once
            # and deletes the parts, so storing the last records first would only add a round trip.
            await self._flush(pending)
        return outcome

    async def _flush_loop(self, pending: dict, wake: asyncio.Event, stop: asyncio.Event, items: int) -> None:
        assert self._progress is not None
        finished = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self._progress.flush_interval())
            wake.clear()
            if stop.is_set():
                return
            finished += len(pending)
            if pending:
                self.log.info(
                    "LLM fan-out: %d more items finished (%d this run, of %d)", len(pending), finished, items
                )
            await self._flush(pending)

    async def _flush(self, pending: dict) -> None:
        if self._progress is None or not pending:
            pending.clear()
            return
        batch = dict(pending)
        pending.clear()
        try:
            await self._progress.save(batch)
        except Exception:  # progress is an optimisation: losing a part costs calls, not results
            self.log.warning("LLM fan-out: could not store progress; will try again", exc_info=True)
            pending.update({i: r for i, r in batch.items() if i not in pending})

    async def _push(self, outcome: dict[str, Any]) -> None:
        """Push the XComs a worker would have pushed, through the configured XCom backend.

        Not as the event's ``xcoms``: 3.3.2 stores those JSON-encoded twice (see ChatCompletionTrigger).
        """
        ti = self.task_instance
        where = {"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "map_index": ti.map_index}
        results = outcome["results"]
        mapped_length = len(results) if self._maps_downstream() else None
        pushes = [
            progress.aset(XCom.XCOM_RETURN_KEY, results, mapped_length=mapped_length, **where),
            progress.aset(META_KEY, outcome["meta"], **where),
        ]
        if self.output_key != XCom.XCOM_RETURN_KEY:
            pushes.append(progress.aset(self.output_key, results, **where))
        await asyncio.gather(*pushes)  # sent together: no round trip's wait between them

    def _maps_downstream(self) -> bool:
        if self.mapped_output:
            return True
        task = self.task  # worker-free mode: the triggerer built the task from the serialized DAG
        return task is not None and next(task.iter_mapped_dependants(), None) is not None


def task_error(error: LLMCallError) -> dict[str, Any]:
    """A fan-out that could not start: no item was called."""
    return {
        "status": "error",
        "results": [],
        "meta": {"error": error.to_dict(), "items": [], "totals": None},
        "message": f"LLM fan-out failed before any call ({error.kind}): {error.message}",
        "error": error.to_dict(),
    }
