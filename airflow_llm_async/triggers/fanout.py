"""FanOutTrigger: many chat completions, all waiting together in one trigger."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_llm_async import compat, driver, progress
from airflow_llm_async.core import fanout
from airflow_llm_async.core.outcome import CallSpec, FanOutOutcome
from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.hooks.llm import LLMConfigError
from airflow_llm_async.triggers.base import LLMTrigger, check_end, legacy_end, legacy_spec


class FanOutTrigger(LLMTrigger):
    """
    Call the model once per item of ``prompts``, all concurrently, and fire one event at the end.

    Each item is one call of the engine (``driver.fan_out``), with its own retries,
    quality gate and fallback chain, under the connection's limiter. Finished items are pushed as
    progress parts (``progress.py``) while the others run, so a trigger restarted on another
    triggerer calls only the items that had not finished. With a task instance, the trigger pushes
    the task's XComs itself: ``return_value`` (and ``output_key``) the list of answers in input
    order, ``None`` for a failed item; ``llm_meta`` the per-item details and the totals.

    Kwargs are stored in plain text in the metadata DB: they hold conn_ids, never a key.

    :param spec: the call every item makes, as :meth:`CallSpec.to_json()
        <airflow_llm_async.core.outcome.CallSpec.to_json>`, its request without messages.
    :param items: the items as they are, a list of prompts or message lists: not rendered (the triggerer
        would compile every string of a ``prompts`` list as a Jinja template, ~2 ms each).
    :param prompts: the items as a template (worker-free mode): rendered by the triggerer, to a list of
        prompts or message lists or JSON text of one.
    :param system_prompt: a system message sent with every item.
    :param time_limit: worker-free mode: seconds from the start of ``run()``, instead of the spec's deadline.
    :param max_failures: failed items that still let the task succeed (a count or a fraction).
    :param output_key: another key that also holds the list (``return_value``: none).
    :param end: how the task ends (see :class:`~airflow_llm_async.triggers.chat.ChatCompletionTrigger`).
    :param mapped_output: a downstream task is mapped over the list (the trigger then records its length).

    Kwargs written by release 0.1 (``request``, ``options``, ``deadline``, ``end_from_trigger``,
    ``end_on_success``) are still read.
    """

    max_items = fanout.MAX_ITEMS  # the most items ``prompts`` may render to

    def __init__(
        self,
        *,
        spec: dict[str, Any] | None = None,
        items: list[Any] | None = None,
        prompts: list[Any] | str | None = None,
        system_prompt: str | None = None,
        time_limit: float | None = None,
        max_failures: int | float = 0,
        output_key: str = "return_value",
        end: str = "resume",
        mapped_output: bool = False,
        request: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        deadline: float | None = None,
        end_from_trigger: bool = False,
        end_on_success: bool = False,
    ) -> None:
        super().__init__()
        if spec is None:  # 0.1's kwargs
            if request is None:
                raise TypeError("FanOutTrigger needs spec= (CallSpec.to_json())")
            spec = legacy_spec(request, deadline=deadline, **(options or {}))
            end = legacy_end(end_from_trigger, end_on_success)
        self.spec = spec
        # Attribute names match LLMFanOutOperator.template_fields: the triggerer renders these in place.
        self.prompts = prompts
        self.items = items
        self.system_prompt = system_prompt
        self.time_limit = time_limit
        self.max_failures = max_failures
        self.output_key = output_key
        self.end = check_end(end)
        self.mapped_output = mapped_output
        self._progress: progress.XComProgress | None = None

    def kwargs(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "items": self.items,
            "prompts": self.prompts,
            "system_prompt": self.system_prompt,
            "time_limit": self.time_limit,
            "max_failures": self.max_failures,
            "output_key": self.output_key,
            "end": self.end,
            "mapped_output": self.mapped_output,
        }

    def item_specs(self) -> Sequence[CallSpec | fanout.Record]:
        """One CallSpec per item (or the record of an unusable item); ValueError for bad ``prompts``."""
        base = CallSpec.from_json(self.spec)
        if self.time_limit is not None:
            base = replace(base, deadline=time.time() + self.time_limit)
        items = self.items if self.items is not None else fanout.parse_items(self.prompts, self.max_items)
        return self.specs_of(items, base)

    def specs_of(self, items: list[Any], base: CallSpec) -> Sequence[CallSpec | fanout.Record]:
        return fanout.item_specs(items, base, self.system_prompt)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        outcome = await self._fan_out()
        if not compat.can_end_task_here(self):  # the task resumes and pushes its XComs
            yield TriggerEvent({**outcome.to_json(), "stored": False})
            return
        if self.ends_here(outcome.ok):
            if outcome.ok:
                self.log.info(outcome.message)
            event = await self.end_task(outcome, self.output_key, mapped_length=self._mapped_length(outcome))
        else:
            await self.push_task_xcoms(outcome, self.output_key, mapped_length=self._mapped_length(outcome))
            # The XComs are stored: the event carries only what the resumed task needs to end.
            event = TriggerEvent({**outcome.to_json(), "results": [], "meta": {}, "stored": True})
        if outcome.ok and self._progress is not None:
            await self._progress.delete_all()
        yield event

    async def _fan_out(self) -> FanOutOutcome:
        try:
            specs = self.item_specs()
        except ValueError as exc:  # prompts that are not a list, or a spec that cannot make a call
            return FanOutOutcome.not_started(LLMCallError("config", str(exc)))
        usable = [spec for spec in specs if isinstance(spec, CallSpec)]
        try:
            endpoints = await driver.resolve(usable[0]) if usable else {}
        except LLMConfigError as exc:
            return FanOutOutcome.not_started(LLMCallError("config", str(exc)))
        done = await self._load_progress(specs)
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
            records = await driver.fan_out(specs, endpoints, done, on_record if flusher else None)
        except BaseException:  # cancelled (the triggerer stops the trigger) or a bug
            if flusher is not None:
                flusher.cancel()
            raise
        if flusher is not None:  # let a part being stored finish: its records left ``pending``
            stop.set()
            wake.set()
            await flusher
        outcome = fanout.summarize(records, self.max_failures, resumed=len(done))
        if not outcome.ok:
            # Kept for the next try, which calls only the failures. A success pushes its list at once
            # and deletes the parts, so storing the last records first would only add a round trip.
            await self._flush(pending)
        return outcome

    async def _load_progress(self, specs: list[CallSpec | fanout.Record]) -> dict[int, fanout.Record]:
        """The records stored by an earlier run of this trigger that this one may keep (none: call all)."""
        ti = self.task_instance
        if ti is None:  # dag.test(): nowhere to store progress
            return {}
        self._progress = progress.XComProgress(ti, progress.fingerprint(specs, call_options(self.spec)))
        try:
            done = await self._progress.load(len(specs))
        except Exception:  # progress is an optimisation: without it every item is called
            self.log.warning("LLM fan-out: could not read stored progress; calling all", exc_info=True)
            return {}
        if done:
            self.log.info(
                "LLM fan-out: %d of %d items already finished; calling the rest", len(done), len(specs)
            )
        return done

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

    def _mapped_length(self, outcome: FanOutOutcome) -> int | None:
        return len(outcome.results) if self._maps_downstream() else None

    def _maps_downstream(self) -> bool:
        if self.mapped_output:
            return True
        task = self.task  # worker-free mode: the triggerer built the task from the serialized DAG
        return task is not None and next(task.iter_mapped_dependants(), None) is not None


def call_options(spec: dict[str, Any]) -> dict[str, Any]:
    """What, besides its request, decides an item's answer: the spec without request and deadline."""
    return {key: value for key, value in spec.items() if key not in ("request", "deadline")}
