"""BatchTrigger: a fan-out answered by the Batch API at the batch price, waiting in the triggerer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from airflow_llm_async import batches, compat, driver, progress
from airflow_llm_async.core import batch, fanout
from airflow_llm_async.core.outcome import CallSpec, FanOutOutcome
from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.hooks.llm import LLMConfigError
from airflow_llm_async.triggers.fanout import FanOutTrigger, call_options

# The task's XCom that holds its batches' ids and states: how a restarted trigger finds them at once,
# and what the monitor shows while they wait.
STATE_KEY = "llm_batch"


class BatchTrigger(FanOutTrigger):
    """
    Send every item of ``prompts`` through the Batch API, wait for the batches, and end like a fan-out.

    Takes :class:`~airflow_llm_async.triggers.fanout.FanOutTrigger`'s kwargs and ``batch``, the
    :class:`~airflow_llm_async.core.batch.BatchOptions` as JSON. The XComs are the fan-out's; ``llm_meta``
    gains ``batch`` (each batch's id, state and counts, what the answers cost and would have cost in
    real time). The batches are found again, not sent again, after a restart or a new try
    (``batches.py``); killing the task cancels them (:meth:`on_kill`).
    """

    max_items = batch.MAX_ITEMS

    def __init__(self, *, batch: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch = batch or {}
        self._run: batches.BatchRun | None = None

    def kwargs(self) -> dict[str, Any]:
        return {**super().kwargs(), "batch": self.batch}

    def specs_of(self, items: list[Any], base: CallSpec) -> fanout.ItemSpecs:
        return fanout.ItemSpecs(items, base, self.system_prompt)  # made when needed: the batch waits hours

    async def _fan_out(self) -> FanOutOutcome:
        try:
            options = batch.BatchOptions.from_json(self.batch)
            specs = self.item_specs()
        except ValueError as exc:
            return FanOutOutcome.not_started(LLMCallError("config", str(exc)))
        first = next((spec for spec in specs if isinstance(spec, CallSpec)), None)  # not a list of all
        try:
            endpoints = await driver.resolve(first) if first is not None else {}
        except LLMConfigError as exc:
            return FanOutOutcome.not_started(LLMCallError("config", str(exc)))
        fingerprint = progress.fingerprint(
            specs, {**call_options(self.spec), "window": options.completion_window}
        )
        known = await self._load_state()
        try:
            run = self._run = batches.BatchRun(
                specs, endpoints, options, self._where(), fingerprint, self._save_state, known
            )
            records = await run.run()
        except LLMCallError as exc:
            outcome = FanOutOutcome.not_started(exc)
            return replace(outcome, message=f"LLM batch failed ({exc.kind}): {exc.message}")
        outcome = fanout.summarize(records, self.max_failures)
        summary = run.summary
        line = outcome.message
        if summary.get("cost_usd") is not None:
            line += (
                f"; batch price ${summary['cost_usd']:.4f} instead of ${summary['realtime_cost_usd']:.4f} in "
                f"real time, {summary['realtime_items']} item(s) asked again in real time"
            )
        return replace(outcome, meta={**outcome.meta, "batch": summary}, message=line)

    async def on_kill(self) -> None:
        """The task was killed (marked failed or success, cleared): cancel its batches.

        Not when the task is still deferred: Airflow calls on_kill for a trigger that moved to
        another triggerer too, which still waits for the batch (compat.py, entry 8).
        """
        if self._run is None:
            return
        if await compat.task_still_deferred(self.task_instance):
            self.log.warning(
                "LLM batch: on_kill, but the task is still deferred (its trigger moved): not cancelling"
            )
            return
        await self._run.cancel()

    def _where(self) -> dict[str, Any]:
        ti = self.task_instance
        if ti is None:  # dag.test(): no task instance
            return {}
        where = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index}
        return {**where, "try_number": ti.try_number}

    async def _load_state(self) -> dict[str, Any] | None:
        where = self._where()
        if not where:
            return None
        from airflow.sdk.execution_time.xcom import XCom

        try:
            state = await XCom.aget_one(key=STATE_KEY, **_ti_key(where))
        except Exception:  # the server's list still finds the batches
            self.log.warning("LLM batch: could not read the stored batch ids", exc_info=True)
            return None
        return state if isinstance(state, dict) else None

    async def _save_state(self, state: dict[str, Any]) -> None:
        where = self._where()
        if where:
            await compat.set_xcom(STATE_KEY, {**state, "try": where["try_number"]}, **_ti_key(where))


def _ti_key(where: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in where.items() if key != "try_number"}
