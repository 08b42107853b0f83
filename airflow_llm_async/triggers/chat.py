"""ChatCompletionTrigger: waits for a chat completion in the triggerer's event loop."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk.execution_time.xcom import XCom
from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_llm_async.completion import CallSpec, complete, describe_failure, not_started
from airflow_llm_async.hooks.llm import LLMConfigError, LLMHook, shared_endpoint
from airflow_llm_async.protocol import Endpoint, LLMCallError, build_messages
from airflow_llm_async.quality import QualitySpec


class ChatCompletionTrigger(BaseTrigger):
    """
    Run one chat completion, with retries, quality gates and model fallback, and fire one event.

    The event's payload is the JSON outcome of :func:`airflow_llm_async.completion.complete`:
    ``{"status": "success", "text": ..., "meta": {...}}`` or ``{"status": "error", "error": {...},
    "meta": {...}}``. Every failure ends as an event, so the task never stays deferred.

    Kwargs are stored in plain text in the metadata DB: they hold the conn_id, never a key.

    :param request: the model-independent request body (messages, temperature, max_tokens, ...).
    :param conn_id: the ``llm`` connection to call.
    :param models: the model, then its fallbacks, in order; ``None`` means the connection's default.
    :param fallback_conn_ids: connections to try, in order, when every model failed on ``conn_id``;
        each gets the same ``models`` (``None`` is then that connection's default model).
    :param deadline: wall-clock epoch seconds after which no attempt starts or continues.
    :param max_retries: retries per model (None: the connection's ``max_retries``, else 2).
    :param quality: a :class:`~airflow_llm_async.quality.QualitySpec` as a dict.
    :param quality_retries: how often to ask the same model again after a failed quality check.
    :param on_quality_failure: ``fail`` or ``return`` (succeed and record the verdict).
    :param max_cost_usd: refuse any attempt whose worst case (estimated prompt + ``max_tokens``)
        would take the call's spending past this many US dollars; the chain then moves on.

    Worker-free mode (``LLMOperator(start_from_trigger=True)``): the scheduler creates this trigger
    from kwargs fixed when the DAG was parsed, so the messages come as the operator's raw
    ``prompt`` / ``system_prompt`` / ``messages`` templates, which the triggerer renders in place
    before ``run()``; ``time_limit`` (seconds) then starts counting when the call starts, and
    ``end_from_trigger`` ends the task here with its XComs (``output_key`` names the extra key).

    ``end_on_success`` (the default mode) ends the task here only when the call succeeded; a
    failure resumes the task on a worker, which raises the right exception. Not resuming on
    success avoids Airflow 3.3.2's deferral race (see docs/fault-survival.md): a worker's late
    report of the deferred try can fail a task that the trigger had already re-queued.
    """

    def __init__(
        self,
        *,
        request: dict[str, Any],
        conn_id: str = LLMHook.default_conn_name,
        models: list[str | None] | None = None,
        deadline: float | None = None,
        max_retries: int | None = None,
        quality: dict[str, Any] | None = None,
        quality_retries: int = 0,
        on_quality_failure: str = "fail",
        prompt: str | None = None,
        system_prompt: str | None = None,
        messages: list[dict[str, Any]] | str | None = None,
        time_limit: float | None = None,
        end_from_trigger: bool = False,
        output_key: str = "llm_output",
        fallback_conn_ids: list[str] | None = None,
        end_on_success: bool = False,
        max_cost_usd: float | None = None,
    ) -> None:
        super().__init__()
        self.max_cost_usd = max_cost_usd
        self.end_on_success = end_on_success
        self.fallback_conn_ids = list(fallback_conn_ids or [])
        # Attribute names match LLMOperator.template_fields: the triggerer renders these in place.
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.messages = messages
        self.time_limit = time_limit
        self.end_from_trigger = end_from_trigger
        self.output_key = output_key
        self.request = request
        self.conn_id = conn_id
        self.models = list(models) if models else [None]
        self.deadline = deadline
        self.max_retries = max_retries
        self.quality = quality
        self.quality_retries = quality_retries
        self.on_quality_failure = on_quality_failure

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_llm_async.triggers.chat.ChatCompletionTrigger",
            {
                "request": self.request,
                "conn_id": self.conn_id,
                "models": self.models,
                "deadline": self.deadline,
                "max_retries": self.max_retries,
                "quality": self.quality,
                "quality_retries": self.quality_retries,
                "on_quality_failure": self.on_quality_failure,
                "prompt": self.prompt,
                "system_prompt": self.system_prompt,
                "messages": self.messages,
                "time_limit": self.time_limit,
                "end_from_trigger": self.end_from_trigger,
                "output_key": self.output_key,
                "fallback_conn_ids": self.fallback_conn_ids,
                "end_on_success": self.end_on_success,
                "max_cost_usd": self.max_cost_usd,
            },
        )

    def call_spec(self) -> CallSpec:
        return CallSpec(
            request=self._full_request(),
            chain=[
                (conn_id, model)
                for conn_id in (self.conn_id, *self.fallback_conn_ids)
                for model in self.models
            ],
            deadline=self.deadline if self.time_limit is None else time.time() + self.time_limit,
            max_retries=self.max_retries,
            quality=QualitySpec.from_dict(self.quality),
            quality_retries=self.quality_retries,
            on_quality_failure=self.on_quality_failure,
            max_cost_usd=self.max_cost_usd,
        )

    def _full_request(self) -> dict[str, Any]:
        """The request, with messages built from the rendered templates in worker-free mode."""
        if self.prompt is None and self.messages is None:
            return self.request
        messages = self.messages
        if isinstance(messages, str):  # a template rendered to JSON text
            messages = json.loads(messages)
        return {**self.request, "messages": build_messages(self.prompt, self.system_prompt, messages)}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        outcome = await self._call()
        ends_here = self.end_from_trigger or (self.end_on_success and outcome["status"] == "success")
        # Without a task instance (dag.test() runs triggers inline) the task resumes as usual.
        if ends_here and self.task_instance is not None:
            yield await self._end_task(outcome)
        else:
            yield TriggerEvent(outcome)

    async def _end_task(self, outcome: dict[str, Any]) -> TaskSuccessEvent | TaskFailedEvent:
        """Push the XComs a worker would have pushed, then end the task here."""
        if outcome["status"] == "success":
            text = outcome["text"]
            xcoms = {"return_value": text, self.output_key: text, "llm_meta": outcome["meta"]}
            event: TaskSuccessEvent | TaskFailedEvent = TaskSuccessEvent()
        else:
            # No worker will resume to raise this: the task log (triggerer part) is where it shows.
            self.log.error(describe_failure(outcome))
            xcoms = {"llm_meta": {**outcome["meta"], "error": outcome["error"]}}
            event = TaskFailedEvent()
        # Pushed through the configured XCom backend as a worker would, not as the event's `xcoms`: 3.3.2
        # stores those JSON-encoded twice (models/trigger.py handle_event_submit -> XComModel.set),
        # so downstream tasks would read the meta dict as text and the answer with quotes.
        ti = self.task_instance
        for key, value in xcoms.items():
            await XCom.aset(
                key, value, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, map_index=ti.map_index
            )
        return event

    async def _call(self) -> dict[str, Any]:
        try:
            spec = self.call_spec()
        except ValueError as exc:  # rendered messages that cannot be sent
            return error_outcome(LLMCallError("config", str(exc)))
        try:
            endpoints = await resolve_endpoints_async(spec)
        except LLMConfigError as exc:
            return error_outcome(LLMCallError("config", str(exc)))
        outcome = await complete(spec, endpoints)
        # One line per call: at thousands of calls a second, logging is a real share of the CPU.
        meta = outcome["meta"]
        self.log.info(
            "LLM call %s: %s after %d attempt(s) in %.2f s",
            outcome["status"],
            meta.get("model") or (outcome.get("error") or {}).get("kind"),
            len(meta["attempts"]),
            meta["latency_s"],
        )
        return outcome


async def resolve_endpoints_async(spec: CallSpec) -> dict[str, Endpoint]:
    return {conn_id: await shared_endpoint(conn_id) for conn_id in dict.fromkeys(c for c, _ in spec.chain)}


def resolve_endpoints(spec: CallSpec) -> dict[str, Endpoint]:
    return {conn_id: LLMHook(conn_id).get_endpoint() for conn_id in dict.fromkeys(c for c, _ in spec.chain)}


def error_outcome(error: LLMCallError) -> dict[str, Any]:
    """The outcome of a call that could not start: nothing was sent."""
    return not_started(error)
