"""ChatCompletionTrigger: waits for a chat completion in the triggerer's event loop."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_llm_async import driver
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.protocol import LLMCallError, build_messages
from airflow_llm_async.triggers.base import LLMTrigger, check_end, legacy_end, legacy_spec

_LEGACY_END = ("end_from_trigger", "end_on_success")


class ChatCompletionTrigger(LLMTrigger):
    """
    Run one chat completion, with retries, quality gates and model fallback, and fire one event.

    The event's payload is :meth:`Outcome.to_json() <airflow_llm_async.core.outcome.Outcome.to_json>`:
    ``{"status": "success", "text": ..., "meta": {...}}`` or ``{"status": "error", "error": {...},
    "meta": {...}}``. Every failure ends as an event, so the task never stays deferred.

    Kwargs are stored in plain text in the metadata DB: they hold conn_ids, never a key.

    :param spec: the call, as :meth:`CallSpec.to_json() <airflow_llm_async.core.outcome.CallSpec.to_json>`.
    :param end: how the task ends: ``resume`` it on a worker with the event, end it ``here`` (worker-free
        mode), or here only ``on_success`` (a failure resumes on a worker, which raises the right
        exception; see ``compat.py``, entry 2).
    :param output_key: the extra XCom key that also holds the answer, when the task ends here.
    :param time_limit: seconds from the start of ``run()``: the deadline, when none could be fixed in
        advance (worker-free mode: the kwargs are fixed when the DAG is parsed).
    :param prompt: worker-free mode: the operator's ``prompt`` template, rendered by the triggerer in
        place (these three attributes are named as ``LLMOperator.template_fields``), then sent as
        the messages of ``spec``'s request.
    :param system_prompt: worker-free mode: the ``system_prompt`` template.
    :param messages: worker-free mode: the ``messages`` template.

    Kwargs written by release 0.1 (``request``, ``conn_id``, ``models``, ...) are still read.
    """

    def __init__(
        self,
        *,
        spec: dict[str, Any] | None = None,
        end: str = "resume",
        output_key: str = "llm_output",
        time_limit: float | None = None,
        prompt: str | None = None,
        system_prompt: str | None = None,
        messages: list[dict[str, Any]] | str | None = None,
        **legacy: Any,
    ) -> None:
        super().__init__()
        if legacy:  # 0.1's kwargs: the call's options flat, and two flags for the end
            ends = {name: legacy.pop(name) for name in _LEGACY_END if name in legacy}
            spec = legacy_spec(**legacy)
            end = legacy_end(**ends) if ends else end
        if spec is None:
            raise TypeError("ChatCompletionTrigger needs spec= (CallSpec.to_json())")
        self.spec = spec
        self.end = check_end(end)
        self.output_key = output_key
        self.time_limit = time_limit
        # Attribute names match LLMOperator.template_fields: the triggerer renders these in place.
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.messages = messages

    def kwargs(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "end": self.end,
            "output_key": self.output_key,
            "time_limit": self.time_limit,
            "prompt": self.prompt,
            "system_prompt": self.system_prompt,
            "messages": self.messages,
        }

    def call_spec(self) -> CallSpec:
        """The call to make; ValueError for rendered templates that cannot be sent."""
        spec = CallSpec.from_json(self.spec)
        if self.time_limit is not None:
            spec = replace(spec, deadline=time.time() + self.time_limit)
        if self.prompt is not None or self.messages is not None:
            messages = self.messages
            if isinstance(messages, str):  # a template rendered to JSON text
                messages = json.loads(messages)
            request = {**spec.request, "messages": build_messages(self.prompt, self.system_prompt, messages)}
            spec = replace(spec, request=request)
        return spec

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            spec = self.call_spec()
        except ValueError as exc:
            outcome = driver.not_started(LLMCallError("config", str(exc)))
        else:
            await self.warm_up(spec)
            outcome = await driver.complete(spec)
        # One line per call: at thousands of calls a second, logging is a real share of the CPU.
        self.log.info(
            "LLM call %s: %s after %d attempt(s) in %.2f s",
            outcome.status,
            outcome.model or (outcome.error.kind if outcome.error else None),
            len(outcome.attempts),
            outcome.latency_s,
        )
        if self.ends_here(outcome.ok):
            yield await self.end_task(outcome, self.output_key)
        else:
            yield TriggerEvent(outcome.to_json())
