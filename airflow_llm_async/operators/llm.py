"""LLMOperator and TextProcessingOperator: a chat completion whose wait happens in the triggerer."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from configparser import ConfigParser
from dataclasses import replace
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.triggers.base import StartTriggerArgs

from airflow_llm_async import compat, driver
from airflow_llm_async.core import cache, structured
from airflow_llm_async.core.outcome import (
    CIRCUIT_OPEN,
    ON_QUALITY_FAILURE,
    RETURN_KEY,
    CallSpec,
    Outcome,
    task_xcoms,
)
from airflow_llm_async.core.protocol import LLMCallError, build_messages
from airflow_llm_async.core.quality import ARTICLE_RULES, QualitySpec
from airflow_llm_async.hooks.llm import LLMHook
from airflow_llm_async.triggers.chat import ChatCompletionTrigger

# Failures that another task try cannot fix: the request or the configuration is wrong.
# A budget refusal is not retried either: each task try would spend the budget again.
NOT_RETRYABLE_KINDS = frozenset({"client", "config", "budget"})
# Airflow's own deferral timeout fires this long after our deadline, so our clearer error wins.
_DEFERRAL_GRACE = timedelta(seconds=60)


class LLMOperator(BaseOperator):
    """
    Ask an OpenAI-compatible chat model; the call waits in the triggerer, not on a worker slot.

    Pushes the answer text (with ``output_type``: the parsed JSON document) as ``return_value``
    and under ``output_key``, and call details (model, usage, finish_reason, latency_s, attempts,
    quality, fallback_used) under ``llm_meta``.

    :param prompt: the user message (Jinja-templated).
    :param model: the model; default: the connection's ``default_model`` extra.
    :param temperature: sampling temperature, 0 to 2.
    :param max_tokens: the most tokens the answer may have.
    :param output_key: an extra XCom key that also holds the answer text.
    :param system_prompt: an optional system message (templated).
    :param messages: earlier turns, a list of ``{"role", "content"}`` dicts (templated); ``prompt``,
        if given, is appended as the last user message.
    :param llm_conn_id: the ``llm`` connection.
    :param fallback_models: models to try in order when the model fails after its retries.
    :param fallback_conn_ids: connections (other providers or regions) to try in order when every
        model failed on ``llm_conn_id``; each is tried with ``model`` and ``fallback_models``.
    :param output_type: a typed answer: a pydantic model class or a JSON Schema dict. The request asks
        for that schema (``response_format`` ``json_schema``, strict when the schema allows it), the
        answer must match it (else it is asked again per ``quality_retries``, then the fallback chain
        moves on), and the task returns the parsed document (a dict). For a server without
        ``json_schema`` support, also pass ``response_format={"type": "json_object"}``.
    :param response_format: passed through, e.g. ``{"type": "json_object"}``.
    :param extra_body: more request fields passed through as they are (e.g. ``seed``, ``top_p``).
    :param max_retries: retries per model on 408/409/429/5xx/timeouts (default: the connection's, else 2);
        429s on the chain's last model are retried within the connection's ``rate_limit_patience_s`` instead.
    :param quality: rules checked in the trigger (``core.quality.QualitySpec`` fields).
    :param quality_retries: how often to ask the same model again when an answer fails the rules.
    :param on_quality_failure: ``fail`` the task, or ``return`` the answer with the verdict in ``llm_meta``.
    :param max_cost_usd: the most this call may cost, in US dollars, retries and fallbacks included:
        an attempt whose worst case (estimated prompt tokens and ``max_tokens`` at the model's price)
        would exceed it is not sent, and the next fallback is tried. Prices: docs/cost.md.
    :param cache_ttl: seconds (or a timedelta) to keep this call's answer and reuse it for the same
        request (base URL and the whole body: model, messages, temperature, every extra) instead of
        calling again; default: off. Kept in the connection's ``cache_backend`` (Redis) or in this
        process. A reused answer costs nothing (``llm_meta.cache_hit``). See docs/cache.md.
    :param circuit_open: what the call does when the circuit breaker of its last model (the
        connection extra ``circuit_breaker``: on by default) is open after repeated server errors:
        ``fail`` at once with an error naming the model and when it is probed again (default), or
        ``wait`` for the probe (within ``timeout``). Earlier models with an open circuit are always
        skipped for the next. See docs/circuit-breaker.md.
    :param timeout: overall time limit of the call, retries and fallbacks included (default:
        ``execution_timeout``); carried as a wall-clock deadline, so it holds while deferred.
    :param deferrable: wait in the triggerer (default); ``False`` runs the same code on the worker.
    :param start_from_trigger: worker-free mode: the task starts in the triggerer and ends there,
        never taking a worker slot (default: ``[llm_async] start_from_trigger``, else False).
        ``dag.test()`` and ``airflow tasks test`` run it in the default deferrable mode. The
        ``timeout`` then counts from the start of the call (a triggerer restart starts it again).
    """

    template_fields: Sequence[str] = ("prompt", "system_prompt", "messages")
    template_fields_renderers = {"prompt": "md", "system_prompt": "md", "messages": "json"}
    ui_color = "#e8f4fd"
    # The trigger worker-free mode starts (a subclass with its own trigger sets its own).
    trigger_class: type = ChatCompletionTrigger

    def __init__(
        self,
        *,
        prompt: str | None = None,
        model: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 1000,
        output_key: str = "llm_output",
        system_prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        llm_conn_id: str = LLMHook.default_conn_name,
        fallback_models: Sequence[str] | None = None,
        fallback_conn_ids: Sequence[str] | None = None,
        output_type: type | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        extra_body: dict[str, Any] | None = None,
        max_retries: int | None = None,
        quality: dict[str, Any] | None = None,
        quality_retries: int = 0,
        on_quality_failure: str = "fail",
        max_cost_usd: float | None = None,
        cache_ttl: timedelta | float | None = None,
        circuit_open: str = "fail",
        timeout: timedelta | float | None = None,
        deferrable: bool | None = None,
        start_from_trigger: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("fallback_models", fallback_models), ("fallback_conn_ids", fallback_conn_ids)):
            if isinstance(value, str):
                raise ValueError(
                    f"{type(self).__name__} {self.task_id!r}: {name} must be a list, e.g. [{value!r}]."
                )
        self.prompt = prompt
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.output_key = output_key
        self.system_prompt = system_prompt
        self.messages = messages
        self.llm_conn_id = llm_conn_id
        self.fallback_models = list(fallback_models or [])
        self.fallback_conn_ids = list(fallback_conn_ids or [])
        self.output_type = output_type
        self.response_format = response_format
        self.extra_body = dict(extra_body or {})
        self.max_retries = max_retries
        self.quality = quality
        self.quality_retries = quality_retries
        self.on_quality_failure = on_quality_failure
        self.max_cost_usd = max_cost_usd
        self.cache_ttl = cache_ttl
        self.circuit_open = circuit_open
        self.timeout = timeout
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self._validate()
        if start_from_trigger is None:
            start_from_trigger = conf.getboolean("llm_async", "start_from_trigger", fallback=False)
        if start_from_trigger and self.deferrable:
            compat.check_worker_free_templates(self)
            self.start_from_trigger = True
            # Per instance: the class attribute is shared by every LLMOperator.
            self.start_trigger_args = StartTriggerArgs(
                trigger_cls=self.trigger_class.classpath(),
                next_method="execute_complete",
                trigger_kwargs=self.worker_free_trigger_kwargs(),
                timeout=self._deferral_timeout(),
            )

    def _validate(self) -> None:
        """Catch bad arguments when the DAG is parsed, with a message naming the fix."""
        where = f"{type(self).__name__} {self.task_id!r}"
        self._validate_input(where)
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature <= 2:
            raise ValueError(f"{where}: temperature must be a number from 0 to 2, got {self.temperature!r}.")
        if not _is_count(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be a positive integer, got {self.max_tokens!r}.")
        if not isinstance(self.output_key, str) or not self.output_key:
            raise ValueError(f"{where}: output_key must be a non-empty string, got {self.output_key!r}.")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"{where}: model must be a non-empty string, got {self.model!r}.")
        if not all(isinstance(m, str) and m for m in self.fallback_models):
            raise ValueError(
                f"{where}: fallback_models must be a list of model names, got {self.fallback_models!r}."
            )
        if not all(isinstance(c, str) and c for c in self.fallback_conn_ids):
            raise ValueError(
                f"{where}: fallback_conn_ids must be a list of connection ids, got {self.fallback_conn_ids!r}"
            )
        if self.response_format is not None and not isinstance(self.response_format, dict):
            raise ValueError(f"{where}: response_format must be a dict such as {{'type': 'json_object'}}.")
        self.output_schema = self._output_schema(where)
        reserved = sorted({"model", "messages"} & set(self.extra_body))
        if reserved:
            raise ValueError(f"{where}: extra_body must not set {reserved}; use the operator's parameters.")
        if self.extra_body.get("stream"):
            # A streamed answer is not one JSON document: each attempt would fail and be paid for.
            raise ValueError(f"{where}: extra_body must not set stream: the call reads one whole answer.")
        if self.max_retries is not None and not _is_count(self.max_retries):
            raise ValueError(f"{where}: max_retries must be an integer >= 0, got {self.max_retries!r}.")
        if self.on_quality_failure not in ON_QUALITY_FAILURE:
            raise ValueError(f"{where}: on_quality_failure must be one of {list(ON_QUALITY_FAILURE)}.")
        if self.circuit_open not in CIRCUIT_OPEN:
            raise ValueError(
                f"{where}: circuit_open must be one of {list(CIRCUIT_OPEN)}, got {self.circuit_open!r}."
            )
        if not _is_count(self.quality_retries):
            raise ValueError(
                f"{where}: quality_retries must be an integer >= 0, got {self.quality_retries!r}."
            )
        try:
            QualitySpec.from_dict(self.quality)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad `quality` spec: {exc}") from None
        if self.max_cost_usd is not None and (
            not isinstance(self.max_cost_usd, int | float)
            or isinstance(self.max_cost_usd, bool)
            or not 0 < self.max_cost_usd < float("inf")
        ):
            raise ValueError(
                f"{where}: max_cost_usd must be a positive number of US dollars, got {self.max_cost_usd!r}."
            )
        if self.cache_ttl is not None:
            try:
                cache.check_ttl(self.cache_ttl)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}.") from None
        if self.timeout is not None and (
            not isinstance(self.timeout, timedelta | int | float)
            or isinstance(self.timeout, bool)
            or _seconds(self.timeout) <= 0
        ):
            raise ValueError(
                f"{where}: timeout must be positive seconds or a timedelta, got {self.timeout!r}."
            )

    def _output_schema(self, where: str) -> dict[str, Any] | None:
        """``output_type`` as a JSON Schema (plain JSON: it travels in trigger kwargs)."""
        if self.output_type is None:
            return None
        try:
            schema = structured.schema_of(self.output_type)
            QualitySpec(json_schema=schema)  # a valid JSON Schema
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad output_type: {exc}") from None
        if isinstance(self.quality, dict) and self.quality.get("json_schema") is not None:
            raise ValueError(f"{where}: give the schema once: as output_type, or as quality's json_schema.")
        return schema

    def _validate_input(self, where: str) -> None:
        if self.prompt is None and self.messages is None:
            raise ValueError(
                f"{where}: pass `prompt` (a string) or `messages` (a list of role/content dicts)."
            )

    def build_request(self, *, with_messages: bool = True) -> dict[str, Any]:
        """The model-independent request body, from the rendered fields."""
        request: dict[str, Any] = {**self.extra_body}
        if with_messages:
            request["messages"] = self._rendered_messages()
        request["temperature"] = self.temperature
        request["max_tokens"] = self.max_tokens
        if self.response_format is not None:
            request["response_format"] = self.response_format
        elif self.output_schema is not None:
            request["response_format"] = structured.response_format(self.output_schema)
        return request

    def _rendered_messages(self) -> list[dict[str, Any]]:
        messages = self.messages
        try:
            if isinstance(messages, str):
                # "{{ ti.xcom_pull(...) }}" renders to text unless the DAG renders native objects.
                try:
                    messages = json.loads(messages)
                except ValueError:
                    raise ValueError(
                        f"messages rendered to text that is not a JSON list: {messages[:200]!r}"
                    ) from None
            return build_messages(_as_text(self.prompt), self.system_prompt, messages)
        except ValueError as exc:
            raise AirflowFailException(f"{type(self).__name__} {self.task_id!r}: {exc}") from None

    def _time_limit(self) -> float | None:
        limit = self.timeout if self.timeout is not None else self.execution_timeout
        return None if limit is None else _seconds(limit)

    def _deferral_timeout(self) -> timedelta | None:
        limit = self._time_limit()
        return None if limit is None else timedelta(seconds=limit) + _DEFERRAL_GRACE

    def call_spec(self, *, with_messages: bool = True, deadline: float | None = None) -> CallSpec:
        """The call, from the rendered fields (at parse time, ``with_messages=False``: they are templates)."""
        return CallSpec.of(
            self.build_request(with_messages=with_messages),
            [self.llm_conn_id, *self.fallback_conn_ids],
            [self.model, *self.fallback_models],
            deadline=deadline,
            max_retries=self.max_retries,
            quality=self._quality_spec(),
            quality_retries=self.quality_retries,
            on_quality_failure=self.on_quality_failure,
            max_cost_usd=self.max_cost_usd,
            output=self.answer_output(),
            cache_ttl=None if self.cache_ttl is None else cache.check_ttl(self.cache_ttl),
            circuit_open=self.circuit_open,
        )

    def answer_output(self) -> str:
        """What the task returns of the answer (``core.outcome.OUTPUTS``): its text, or its JSON."""
        return "text" if self.output_schema is None else "json"

    def _quality_spec(self) -> QualitySpec:
        quality = QualitySpec.from_dict(self.quality)
        if self.output_schema is None:
            return quality
        return replace(quality, json_schema=self.output_schema)

    def _deadline(self) -> float | None:
        """A wall-clock deadline from now: it holds while the task is deferred."""
        limit = self._time_limit()
        return None if limit is None else time.time() + limit

    def _end(self) -> str:
        return "on_success" if compat.ends_on_success(self, LLMOperator) else "resume"

    def build_trigger(self) -> ChatCompletionTrigger:
        """The trigger ``execute`` defers to, from the rendered fields, with a wall-clock deadline."""
        return ChatCompletionTrigger(
            spec=self.call_spec(deadline=self._deadline()).to_json(),
            end=self._end(),
            output_key=self.output_key,
        )

    def worker_free_trigger_kwargs(self) -> dict[str, Any]:
        """Kwargs fixed at parse time: the templates travel unrendered; the triggerer renders them."""
        return ChatCompletionTrigger(
            spec=self.call_spec(with_messages=False).to_json(),
            end="here",
            output_key=self.output_key,
            time_limit=self._time_limit(),
            prompt=self.prompt,
            system_prompt=self.system_prompt,
            messages=self.messages,
        ).kwargs()

    def execute(self, context: Context) -> Any:
        if self.deferrable:
            self.defer(
                trigger=self.build_trigger(), method_name="execute_complete", timeout=self._deferral_timeout()
            )
        # Through execute_complete, as after a resume: a subclass's own sees the answer in every mode.
        outcome = driver.complete_sync(self.call_spec(deadline=self._deadline()))
        return self.execute_complete(context, outcome.to_json())

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """Resume after the trigger fired: push the answer, or fail with the API's own message."""
        return self.end_task(context, read_event(self, Outcome, event))

    def end_task(self, context: Context, outcome: Outcome) -> Any:
        """Push the task's XComs (the answer as the return value), or fail with what went wrong."""
        xcoms = task_xcoms(outcome, self.output_key, self.answer_output())
        push_xcoms(context, xcoms)
        if not outcome.ok:
            fail_task(outcome.describe(), outcome.error)
        self.log.info(
            "%s answered (%s tokens, %.2f s, %d attempt(s)%s): %.100s",
            outcome.model,
            outcome.usage.get("total_tokens"),
            outcome.latency_s,
            len(outcome.attempts),
            ", fallback" if outcome.fallback_used else "",
            outcome.text,
        )
        return xcoms[RETURN_KEY]


def default_deferrable() -> bool:
    """``[operators] default_deferrable`` when the deployment sets it, as upstream operators read it.

    Unset, it is True, not Airflow's False: waiting in the triggerer is the point of this provider.
    A deployment that sets it False (e.g. one without a triggerer) gets the calls run on its workers.
    """
    env = "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"
    explicit = any(env + suffix in os.environ for suffix in ("", "_CMD", "_SECRET"))
    # The stdlib method sees only what airflow.cfg sets, not Airflow's built-in default.
    if explicit or ConfigParser.has_option(conf, "operators", "default_deferrable"):
        return conf.getboolean("operators", "default_deferrable")
    return True


def read_event(op: BaseOperator, kind: type, event: Any) -> Any:
    """The outcome an event carries; a clear error for a missing or unreadable one."""
    where = f"{type(op).__name__} {op.task_id!r}"
    if event is None:
        raise AirflowException(
            f"{where} resumed without the trigger's event: clear the task to run it again."
        )
    try:
        return kind.from_json(event)
    except ValueError as exc:
        raise AirflowException(
            f"{where} resumed with an event it cannot read ({exc}); was it deferred by another "
            f"release of airflow-llm-async? Clear the task to run it again."
        ) from None


def push_xcoms(context: Context, xcoms: dict[str, Any]) -> None:
    """Push every XCom but ``return_value``, which the task returns."""
    ti = context["ti"]
    for key, value in xcoms.items():
        if key != RETURN_KEY:
            ti.xcom_push(key=key, value=value)


def fail_task(message: str, error: LLMCallError | None) -> None:
    """Raise for a failed call: not retried by Airflow when another try cannot fix it."""
    if error is not None and error.kind in NOT_RETRYABLE_KINDS:
        raise AirflowFailException(message)
    raise AirflowException(message)


# The article's prompts, in its own (Chinese) wording, and in English.
TEXT_PROMPTS: dict[str, dict[str, str]] = {
    "zh": {
        "summarize": "请用100字以内总结以下内容:\n{text}",
        "translate": "将以下内容翻译成{target_language}:\n{text}",
        "analyze": "分析以下内容的关键要点:\n{text}",
    },
    "en": {
        "summarize": "Summarize the following in at most 100 words:\n{text}",
        "translate": "Translate the following into {target_language}:\n{text}",
        "analyze": "Analyze the key points of the following:\n{text}",
    },
}
_DEFAULT_TARGET_LANGUAGE = {"zh": "英文", "en": "English"}


class TextProcessingOperator(LLMOperator):
    """
    The article's text operations (``summarize``, ``translate``, ``analyze``) as an LLMOperator.

    :param operation: ``summarize``, ``translate`` or ``analyze``.
    :param text: the input (templated; typically ``"{{ ti.xcom_pull(task_ids='...') }}"``).
    :param language: the prompt set: ``zh`` (the article's wording) or ``en``.
    :param target_language: for ``translate`` (default 英文 / English).
    :param quality: defaults to the article's rules (at least 50 characters, no 错误 or 抱歉),
        recorded in ``llm_meta.quality`` without failing the task; pass ``{}`` to check nothing.
    """

    template_fields: Sequence[str] = (*LLMOperator.template_fields, "text", "target_language")

    def __init__(
        self,
        *,
        operation: str,
        text: Any,
        language: str = "zh",
        target_language: str | None = None,
        output_key: str = "processed_text",
        quality: dict[str, Any] | None = None,
        on_quality_failure: str = "return",
        **kwargs: Any,
    ) -> None:
        if language not in TEXT_PROMPTS:
            raise ValueError(f"language must be one of {sorted(TEXT_PROMPTS)}, got {language!r}.")
        if operation not in TEXT_PROMPTS[language]:
            raise ValueError(
                f"Unknown operation {operation!r} for task {kwargs.get('task_id')!r}; "
                f"valid operations are {sorted(TEXT_PROMPTS[language])}."
            )
        self.operation = operation
        self.text = text
        self.language = language
        self.target_language = target_language or _DEFAULT_TARGET_LANGUAGE[language]
        super().__init__(
            prompt=TEXT_PROMPTS[language][operation],
            output_key=output_key,
            quality=ARTICLE_RULES.to_dict() if quality is None else quality,
            on_quality_failure=on_quality_failure,
            **kwargs,
        )

    def _rendered_messages(self) -> list[dict[str, Any]]:
        # The prompt is a str.format template filled with the already rendered text: braces in
        # the text are data, and Jinja syntax in the text is never evaluated.
        self.prompt = self._prompt_template().format(
            text=_as_text(self.text), target_language=self.target_language
        )
        return super()._rendered_messages()

    def worker_free_trigger_kwargs(self) -> dict[str, Any]:
        # Parse time: ``text`` and ``target_language`` are still templates (or literals); placed in
        # the prompt template, the triggerer renders them as part of ``prompt``, as a worker would.
        kwargs = super().worker_free_trigger_kwargs()
        kwargs["prompt"] = self._prompt_template().format(
            text=_as_text(self.text), target_language=self.target_language
        )
        return kwargs

    def _prompt_template(self) -> str:
        return TEXT_PROMPTS[self.language][self.operation]


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _is_count(value: Any) -> bool:
    """An integer >= 0 (bool is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
