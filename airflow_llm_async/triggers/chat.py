"""ChatCompletionTrigger: waits for a chat completion in the triggerer's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_llm_async.completion import CallSpec, complete
from airflow_llm_async.hooks.llm import LLMConfigError, LLMHook
from airflow_llm_async.protocol import Endpoint, LLMCallError
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
    :param deadline: wall-clock epoch seconds after which no attempt starts or continues.
    :param max_retries: retries per model (None: the connection's ``max_retries``, else 2).
    :param quality: a :class:`~airflow_llm_async.quality.QualitySpec` as a dict.
    :param quality_retries: how often to ask the same model again after a failed quality check.
    :param on_quality_failure: ``fail`` or ``return`` (succeed and record the verdict).
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
    ) -> None:
        super().__init__()
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
            },
        )

    def call_spec(self) -> CallSpec:
        return CallSpec(
            request=self.request,
            chain=[(self.conn_id, model) for model in self.models],
            deadline=self.deadline,
            max_retries=self.max_retries,
            quality=QualitySpec.from_dict(self.quality),
            quality_retries=self.quality_retries,
            on_quality_failure=self.on_quality_failure,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        spec = self.call_spec()
        try:
            endpoints = await resolve_endpoints_async(spec)
        except LLMConfigError as exc:
            yield TriggerEvent(config_error(exc))
            return
        models = " -> ".join(model or "(connection default)" for model in self.models)
        self.log.info("Calling %s on connection %r", models, self.conn_id)
        outcome = await complete(spec, endpoints)
        self.log.info("LLM call ended: %s", outcome["status"])
        yield TriggerEvent(outcome)


async def resolve_endpoints_async(spec: CallSpec) -> dict[str, Endpoint]:
    return {conn_id: await LLMHook(conn_id).aget_endpoint() for conn_id, _ in spec.chain}


def resolve_endpoints(spec: CallSpec) -> dict[str, Endpoint]:
    return {conn_id: LLMHook(conn_id).get_endpoint() for conn_id, _ in spec.chain}


def config_error(exc: LLMConfigError) -> dict[str, Any]:
    """The outcome for a connection that cannot be used: nothing was called."""
    return {"status": "error", "error": LLMCallError("config", str(exc)).to_dict(), "meta": {"attempts": []}}
