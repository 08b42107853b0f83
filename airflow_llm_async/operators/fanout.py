"""LLMFanOutOperator: hundreds of prompts in one task, all waiting together in one trigger."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_llm_async import compat, driver
from airflow_llm_async.core import batch as batch_api
from airflow_llm_async.core import fanout
from airflow_llm_async.core.outcome import CallSpec, FanOutOutcome, task_xcoms
from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.hooks.llm import LLMConfigError
from airflow_llm_async.operators.llm import LLMOperator, fail_task, push_xcoms, read_event
from airflow_llm_async.triggers.batch import BatchTrigger
from airflow_llm_async.triggers.fanout import FanOutTrigger


class LLMFanOutOperator(LLMOperator):
    """
    Ask the model once per item of ``prompts``; every call waits in one trigger, concurrently.

    One task instead of one task per prompt: Airflow's per-task work (scheduling, state, logs,
    XCom) is paid once, however many prompts. Each item is an ordinary call with its own retries,
    quality gate and fallback chain, and every item shares the connection's limits
    (``max_concurrency``, ``requests_per_minute``, ``tokens_per_minute``).

    Pushes the answers as one list in input order (``return_value``, and ``output_key`` if it is
    another key), ``None`` for an item that failed, and ``llm_meta``:
    ``{"items": [{status, model, usage, attempts, quality, fallback_used, latency_s[, cost_usd]
    [, error, attempt_log]}, ...], "totals": {items, succeeded, failed, prompt_tokens,
    completion_tokens, total_tokens, cost_usd, attempts, fallback_used, quality_failed, resumed},
    "failed_items": [...], "max_failures": ..., "allowed_failures": ...}``.

    :param prompts: a list of items (templated): each a prompt (text) or a message list
        (``[{"role": ..., "content": ...}, ...]``). A template may render the list as JSON
        (``| tojson``) or as its Python repr; ``render_template_as_native_obj`` DAGs pass it as is.
    :param max_failures: failed items the task tolerates: a count (default 0), or a fraction of the
        items (e.g. ``0.05``). At most that many: the task succeeds with ``None`` for the failed items
        and their errors in ``llm_meta``; more: the task fails with a summary.
    :param system_prompt: a system message sent with every item (templated).
    :param output_key: another XCom key that also holds the list (default: none, only ``return_value``).
    :param start_from_trigger: worker-free mode (default ``True``): the task starts and ends in the
        triggerer. ``False`` with ``deferrable=True`` renders on a worker and defers; ``deferrable=False``
        runs every call on the worker.
    :param batch: send the items through the Batch API (``POST /files``, ``POST /batches``) at the batch
        price (half the list price at OpenAI), answered within ``batch_completion_window`` instead of
        seconds; the trigger polls until the batch ends. Same XComs; ``llm_meta["batch"]`` adds each
        batch's id and counts, its cost and the real-time cost. A restart or a task retry finds the
        batch it paid for instead of sending again; killing the task, or its ``timeout``, cancels the
        batch and keeps its partial answers. See docs/batch.md.
    :param batch_completion_window: the batch's completion window (``"24h"``, OpenAI's only one).
    :param batch_poll_interval: seconds before the first poll (default 30); each next poll waits 1.5
        times longer, up to ``batch_poll_max_interval`` (default 600).
    :param batch_retry: an item the batch did not answer well (an error line, a failed quality gate, an
        expired or cancelled batch) is asked again in real time, with its retries and fallbacks
        (``"realtime"``, the default), or counted as failed (``"none"``).
    :param batch_max_requests: requests per batch (OpenAI's limit, 50,000); more items go into several.
    :param batch_max_bytes: bytes per input file (OpenAI's limit, 200 MB); likewise.
    :param batch_resubmit: each try of the task sends a new batch, even if an earlier try made one for
        the same input (a restart within the try still finds its own); default: reuse it, so a retry
        never pays twice.

    Every other parameter is :class:`~airflow_llm_async.operators.llm.LLMOperator`'s (model,
    temperature, max_tokens, llm_conn_id, fallback_models, fallback_conn_ids, response_format,
    extra_body, max_retries, quality, quality_retries, on_quality_failure, cache_ttl, circuit_open,
    timeout); they apply to every item, and ``timeout`` limits the whole fan-out. With ``cache_ttl``
    each item is looked up first (one round trip to Redis for the whole list) and only the misses
    are sent. ``prompt`` and ``messages`` are not taken.
    """

    template_fields: Sequence[str] = ("prompts", "system_prompt")
    template_fields_renderers = {"prompts": "json", "system_prompt": "md"}
    trigger_class = FanOutTrigger

    def __init__(
        self,
        *,
        prompts: list[Any] | str,
        max_failures: int | float = 0,
        output_key: str = "return_value",
        start_from_trigger: bool | None = True,
        batch: bool = False,
        batch_completion_window: str = "24h",
        batch_poll_interval: float = 30.0,
        batch_poll_max_interval: float = 600.0,
        batch_retry: str = "realtime",
        batch_max_requests: int = batch_api.MAX_REQUESTS,
        batch_max_bytes: int = batch_api.MAX_BYTES,
        batch_resubmit: bool = False,
        **kwargs: Any,
    ) -> None:
        for name in ("prompt", "messages"):
            if name in kwargs:
                raise ValueError(
                    f"{type(self).__name__} {kwargs.get('task_id')!r}: pass the items as `prompts` (a list "
                    f"of prompts or message lists), not `{name}`."
                )
        self.prompts = prompts
        self.max_failures = max_failures
        self.batch = batch
        self.batch_options = dict(
            completion_window=batch_completion_window,
            poll_interval=batch_poll_interval,
            poll_max_interval=batch_poll_max_interval,
            retry=batch_retry,
            max_requests=batch_max_requests,
            max_bytes=batch_max_bytes,
            resubmit=batch_resubmit,
        )
        if batch:  # per instance: the trigger worker-free mode starts
            self.trigger_class = BatchTrigger
        super().__init__(output_key=output_key, start_from_trigger=start_from_trigger, **kwargs)

    def _validate_input(self, where: str) -> None:
        if isinstance(self.prompts, list | tuple):
            try:
                fanout.parse_items(self.prompts, self.trigger_class.max_items)
                for item in self.prompts:
                    if not _has_jinja(item):  # a templated item is checked once rendered
                        fanout.item_messages(item, None)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        elif not isinstance(self.prompts, str):
            raise ValueError(
                f"{where}: prompts must be a list of prompts or message lists, or a template that renders "
                f"one, got {type(self.prompts).__name__}."
            )
        try:
            fanout.check_max_failures(self.max_failures)
            if self.batch is not False:
                self._check_batch()
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def _check_batch(self) -> None:
        if self.batch is not True:
            raise ValueError(f"batch must be True or False, got {self.batch!r}.")
        batch_api.BatchOptions(**self.batch_options)
        if not self.deferrable:
            raise ValueError(
                "batch=True waits hours for the batch in the triggerer: pass deferrable=True (the default "
                "comes from [operators] default_deferrable, which a generated airflow.cfg sets to false)."
            )
        if self.cache_ttl is not None:
            raise ValueError("batch=True does not take cache_ttl: batch answers are not cached.")

    def _trigger_kwargs(self) -> dict[str, Any]:
        """What a BatchTrigger takes besides a FanOutTrigger's kwargs."""
        return {"batch": batch_api.BatchOptions(**self.batch_options).to_json()} if self.batch else {}

    def worker_free_trigger_kwargs(self) -> dict[str, Any]:
        """Kwargs fixed at parse time: the templates travel unrendered; the triggerer renders them."""
        # A list with no Jinja in it travels as ``items``, which the triggerer does not render.
        literal = isinstance(self.prompts, list | tuple) and not _has_jinja(self.prompts)
        return self.trigger_class(
            spec=self.call_spec(with_messages=False).to_json(),
            items=list(self.prompts) if literal else None,
            prompts=None if literal else self.prompts,
            system_prompt=self.system_prompt,
            time_limit=self._time_limit(),
            max_failures=self.max_failures,
            output_key=self.output_key,
            end="here",
            **self._trigger_kwargs(),
        ).kwargs()

    def build_trigger(self) -> FanOutTrigger:
        """The trigger ``execute`` defers to, from the rendered fields, with a wall-clock deadline."""
        try:
            items = fanout.parse_items(self.prompts, self.trigger_class.max_items)
        except ValueError as exc:
            raise AirflowFailException(f"{type(self).__name__} {self.task_id!r}: {exc}") from None
        return self.trigger_class(
            spec=self.call_spec(with_messages=False, deadline=self._deadline()).to_json(),
            items=items,
            system_prompt=self.system_prompt,
            max_failures=self.max_failures,
            output_key=self.output_key,
            end="on_success" if compat.ends_on_success(self, LLMFanOutOperator) else "resume",
            mapped_output=self.has_dag() and next(self.iter_mapped_dependants(), None) is not None,
            **self._trigger_kwargs(),
        )

    def execute(self, context: Context) -> list[str | None] | None:
        trigger = self.build_trigger()
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete", timeout=self._deferral_timeout())
        # Through execute_complete, as after a resume: a subclass's own sees the list in every mode.
        return self.execute_complete(context, {**run_fan_out_sync(trigger).to_json(), "stored": False})

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None
    ) -> list[str | None] | None:
        """Push the list (unless the trigger already did), or fail with the summary of the failures."""
        stored = isinstance(event, dict) and event.get("stored") is True
        return self.end_task(context, read_event(self, FanOutOutcome, event), stored=stored)

    def end_task(self, context: Context, outcome: FanOutOutcome, *, stored: bool) -> list[str | None] | None:
        ti = context["ti"]
        if not stored:
            xcoms = task_xcoms(outcome, self.output_key, self.answer_output())
            push_xcoms(context, xcoms)
            if not outcome.ok:  # a failed task returns nothing: its partial list is pushed here
                ti.xcom_push(key="return_value", value=xcoms["return_value"])
        if not outcome.ok:
            fail_task(outcome.message, outcome.error)
        self.log.info(outcome.message)
        if stored:  # returned again so a subclass (or a mapped downstream) sees the list
            return ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)
        return list(outcome.results)


def _has_jinja(value: Any) -> bool:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return any(marker in text for marker in ("{{", "{%", "{#"))


def run_fan_out_sync(trigger: FanOutTrigger) -> FanOutOutcome:
    """Sync mode: the trigger's fan-out, run to completion in a private event loop on this worker."""
    try:
        specs = trigger.item_specs()
        usable = [spec for spec in specs if isinstance(spec, CallSpec)]
        endpoints = driver.resolve_sync(usable[0]) if usable else {}
    except (ValueError, LLMConfigError) as exc:
        return FanOutOutcome.not_started(LLMCallError("config", str(exc)))
    records = driver.run_sync(driver.fan_out, specs, endpoints)
    return fanout.summarize(records, trigger.max_failures)
