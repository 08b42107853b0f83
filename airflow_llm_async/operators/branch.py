"""LLMQualityBranchOperator: the article's quality check, routing to retry, fallback or continue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseBranchOperator, Context

from airflow_llm_async.core.quality import ARTICLE_MIN_CHARS, ARTICLE_REFUSAL_MARKERS, QualitySpec


class LLMQualityBranchOperator(BaseBranchOperator):
    """
    Read an upstream LLM answer from XCom and pick the next task by the article's rules.

    Shorter than ``min_chars`` -> ``retry_task``; contains any of ``refusal_markers`` ->
    ``fallback_task``; otherwise ``continue_task``.

    :param source_task_id: the task whose answer is checked.
    :param source_key: the XCom key of the answer (default ``return_value``).
    :param min_chars: answers shorter than this (after stripping whitespace) are retried.
    :param refusal_markers: answers containing any of these go to the fallback.
    """

    template_fields: Sequence[str] = ("source_task_id", "source_key")
    ui_color = "#fdf3e8"

    def __init__(
        self,
        *,
        source_task_id: str,
        source_key: str = "return_value",
        min_chars: int = ARTICLE_MIN_CHARS,
        refusal_markers: Sequence[str] = ARTICLE_REFUSAL_MARKERS,
        retry_task: str = "retry_task",
        fallback_task: str = "fallback_task",
        continue_task: str = "continue_task",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_task_id = source_task_id
        self.source_key = source_key
        try:
            self.rules = QualitySpec(min_chars=min_chars, refusal_markers=tuple(refusal_markers))
        except ValueError as exc:
            raise ValueError(f"LLMQualityBranchOperator {self.task_id!r}: {exc}") from None
        self.retry_task = retry_task
        self.fallback_task = fallback_task
        self.continue_task = continue_task

    def choose_branch(self, context: Context) -> str:
        answer = context["ti"].xcom_pull(task_ids=self.source_task_id, key=self.source_key)
        if answer is None:
            self.log.warning("No answer in XCom %s/%s: retrying", self.source_task_id, self.source_key)
            return self.retry_task
        failures = {f["rule"]: f["detail"] for f in self.rules.check(str(answer))}
        if "min_chars" in failures:
            branch = self.retry_task
        elif "refusal_markers" in failures:
            branch = self.fallback_task
        else:
            branch = self.continue_task
        self.log.info(
            "Answer of %r (%d chars) -> %s %s", self.source_task_id, len(str(answer)), branch, failures
        )
        return branch
