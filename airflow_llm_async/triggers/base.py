"""What the provider's triggers share: their classpath, how they end a task, and their older kwargs."""

from __future__ import annotations

from typing import Any

from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent

from airflow_llm_async import compat, driver
from airflow_llm_async.core.outcome import CallSpec, FanOutOutcome, Outcome, task_xcoms
from airflow_llm_async.core.quality import QualitySpec
from airflow_llm_async.hooks.llm import LLMConfigError

# How a trigger ends its task: "resume" it on a worker with the event (execute_complete), end it
# "here" in the triggerer (worker-free mode), or end it here only "on_success" (see compat, entry 2).
ENDS = ("resume", "here", "on_success")


class LLMTrigger(BaseTrigger):
    """A trigger whose kwargs are JSON and never hold a secret (they are stored in plain text)."""

    end: str  # one of ENDS, set by each trigger's __init__
    spec: dict[str, Any]  # the call (CallSpec.to_json()), set by each trigger's __init__

    @classmethod
    def classpath(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return self.classpath(), self.kwargs()

    def kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def ends_here(self, ok: bool) -> bool:
        """Whether to end the task in the triggerer rather than resume it on a worker."""
        return compat.can_end_task_here(self) and (self.end == "here" or (self.end == "on_success" and ok))

    async def warm_up(self, spec: CallSpec) -> None:
        """In a triggerer that has not built its Execution API yet, have it built during the call.

        The connections are looked up first: their lookup waits for the triggerer's main thread too
        (secrets are masked through it), which the build would hold for seconds (compat.py, entry 7).
        """
        if not compat.execution_api_cold():
            return
        try:
            await driver.resolve(spec)  # kept per event loop: the call finds them there
        except LLMConfigError:
            return  # the call reports it
        compat.warm_up_execution_api(self.task_instance)

    async def push_task_xcoms(
        self, outcome: Outcome | FanOutOutcome, output_key: str, *, mapped_length: int | None = None
    ) -> None:
        """Push the XComs a worker would have pushed."""
        xcoms = task_xcoms(outcome, output_key, self.spec.get("output", "text"))
        await compat.push_xcoms(self.task_instance, xcoms, mapped_length=mapped_length)

    async def end_task(
        self, outcome: Outcome | FanOutOutcome, output_key: str, *, mapped_length: int | None = None
    ) -> TaskSuccessEvent | TaskFailedEvent:
        """Push the task's XComs, then end the task here."""
        await self.push_task_xcoms(outcome, output_key, mapped_length=mapped_length)
        if outcome.ok:
            return TaskSuccessEvent()
        # No worker will resume to raise this: the task log (triggerer part) is where it shows.
        self.log.error(outcome.describe())
        return TaskFailedEvent()


def check_end(end: str) -> str:
    if end not in ENDS:
        raise ValueError(f"end must be one of {list(ENDS)}, got {end!r}")
    return end


# --- kwargs written by releases before 0.2 (triggers deferred before an upgrade must still load) ---


def legacy_spec(
    request: dict[str, Any],
    conn_id: str = "llm_default",
    models: list[str | None] | None = None,
    fallback_conn_ids: list[str] | None = None,
    deadline: float | None = None,
    max_retries: int | None = None,
    quality: dict[str, Any] | None = None,
    quality_retries: int = 0,
    on_quality_failure: str = "fail",
    max_cost_usd: float | None = None,
) -> dict[str, Any]:
    """The call spec that 0.1's ChatCompletionTrigger kwargs (FanOutTrigger's ``options``) described."""
    return CallSpec.of(
        request,
        [conn_id, *(fallback_conn_ids or [])],
        list(models or [None]),
        deadline=deadline,
        max_retries=max_retries,
        quality=QualitySpec.from_dict(quality),
        quality_retries=quality_retries,
        on_quality_failure=on_quality_failure,
        max_cost_usd=max_cost_usd,
    ).to_json()


def legacy_end(end_from_trigger: bool = False, end_on_success: bool = False) -> str:
    return "here" if end_from_trigger else "on_success" if end_on_success else "resume"
