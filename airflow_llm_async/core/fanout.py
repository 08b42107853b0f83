"""Many chat completions in one task, without I/O: the items, their records, and the task's summary.

Each item is an ordinary call with its own retries, quality gate and fallback chain; the driver
(``driver.fan_out``) runs them all on one event loop under the connection's limiter, for the
trigger (``triggers/fanout.py``) and sync mode alike.

An item's outcome is kept as a small JSON *record*, ``{"text": str | None, "meta": {...}}``: what the
task's XComs need and what progress parts persist (``progress.py``), without the attempts of calls
that succeeded.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from airflow_llm_async.core.outcome import CallSpec, FanOutOutcome, Outcome
from airflow_llm_async.core.protocol import LLMCallError, build_messages

# One task cannot hold more: the records, the XComs and the trigger kwargs grow with the items.
MAX_ITEMS = 10_000
# Calls start in batches, a short pause apart (1,000 a second). Started together, 1,000 calls would
# also answer together, and handling 1,000 answers in one turn of the event loop stalls it for every
# other trigger; spread over a second, each turn handles a few.
START_BATCH = 20
START_PAUSE_S = 0.02
# Failures named in the task's error message; every failure is in ``llm_meta``.
FAILURES_SHOWN = 5

Record = dict[str, Any]


def parse_items(value: Any, max_items: int = MAX_ITEMS) -> list[Any]:
    """The rendered ``prompts``: a list, or JSON text of one (an XCom rendered without native objects)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = _python_literal(value)
        if isinstance(value, str):
            raise ValueError(
                f"prompts rendered to text that is not a JSON list: {value[:200]!r}. Pass a list, or a "
                "template that renders one, e.g. \"{{ ti.xcom_pull(task_ids='up', map_indexes=-1) }}\"."
            )
    if not isinstance(value, list | tuple):
        raise ValueError(f"prompts must be a list of prompts or message lists, got {type(value).__name__}.")
    if len(value) > max_items:
        raise ValueError(
            f"prompts has {len(value)} items; one task takes at most {max_items}: split the list"
            + (" (batch=True takes more)." if max_items == MAX_ITEMS else ".")
        )
    return list(value)


def _python_literal(text: str) -> Any:
    """A list rendered by Jinja without ``| tojson`` is its Python repr: read as a literal, never as code."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def item_messages(item: Any, system_prompt: str | None) -> list[dict[str, Any]]:
    """An item is a prompt (text) or a message list (``[{"role": ..., "content": ...}, ...]``)."""
    if isinstance(item, str):
        return build_messages(item, system_prompt)
    if isinstance(item, list | tuple):
        return build_messages(None, system_prompt, list(item))
    raise ValueError(f"an item must be a prompt (text) or a list of role/content dicts, got {item!r:.200}")


def item_specs(items: Sequence[Any], base: CallSpec, system_prompt: str | None) -> list[CallSpec | Record]:
    """One CallSpec per item, sharing ``base``'s chain and options; a record for an item that is unusable."""
    return list(ItemSpecs(items, base, system_prompt))


class ItemSpecs(Sequence):
    """:func:`item_specs` made one at a time, when asked for, instead of held: a batch of thousands of
    items waits for hours, and a spec per item (its request dict and message list) would take ~0.6 KB
    per item for that long (bench/batch)."""

    def __init__(self, items: Sequence[Any], base: CallSpec, system_prompt: str | None) -> None:
        self.items, self.base, self.system_prompt = items, base, system_prompt

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> CallSpec | Record:  # type: ignore[override]
        item = self.items[index]
        try:
            request = {**self.base.request, "messages": item_messages(item, self.system_prompt)}
        except ValueError as exc:
            return error_record(LLMCallError("config", f"item {index}: {exc}"))
        return replace(self.base, request=request)


def to_record(outcome: Outcome) -> Record:
    """The record of one call's outcome: the text and what ``llm_meta`` keeps about the item."""
    item: dict[str, Any] = {"status": outcome.status, "attempts": len(outcome.attempts)}
    if outcome.ok:
        item.update(
            model=outcome.model,
            usage=dict(outcome.usage),
            usage_details=dict(outcome.usage_details),  # cached and reasoning tokens, as llm_meta has
            quality={"passed": not outcome.quality_failures, "failures": list(outcome.quality_failures)},
            fallback_used=outcome.fallback_used,
            latency_s=outcome.latency_s,
        )
    else:  # a failure keeps its attempts: they say what each model answered
        item.update(
            error=outcome.error.to_dict() if outcome.error else None,
            attempt_log=[attempt.to_json() for attempt in outcome.attempts],
            latency_s=outcome.latency_s,
        )
    if outcome.cost_usd is not None:
        item["cost_usd"] = outcome.cost_usd
    if outcome.cache_hit:  # only then: the records of calls made without the cache stay as they were
        item["cache_hit"] = True
    return {"text": outcome.text, "meta": item}


def error_record(error: LLMCallError) -> Record:
    return {"text": None, "meta": {"status": "error", "attempts": 0, "error": error.to_dict()}}


def check_max_failures(value: Any) -> None:
    """``max_failures``: a count (int >= 0) or a fraction of the items (float from 0 to 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"max_failures must be a count (int >= 0) or a fraction (0.0-1.0), got {value!r}.")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"max_failures must be a count >= 0, got {value!r}.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"max_failures as a fraction must be from 0.0 to 1.0, got {value!r}.")


def allowed_failures(max_failures: int | float, items: int) -> int:
    """How many failed items still let the task succeed."""
    if isinstance(max_failures, float):
        return math.floor(max_failures * items + 1e-9)
    return max_failures


def summarize(records: Sequence[Record], max_failures: int | float, resumed: int = 0) -> FanOutOutcome:
    """The task's outcome: the results in input order, ``llm_meta`` with every item and the totals."""
    items = [record["meta"] for record in records]
    failed = [index for index, item in enumerate(items) if item["status"] != "success"]
    allowed = allowed_failures(max_failures, len(records))
    costs = [item["cost_usd"] for item in items if item.get("cost_usd") is not None]
    totals = {
        "items": len(records),
        "succeeded": len(records) - len(failed),
        "failed": len(failed),
        "prompt_tokens": _usage_sum(items, "prompt_tokens"),
        "completion_tokens": _usage_sum(items, "completion_tokens"),
        "total_tokens": _usage_sum(items, "total_tokens"),
        "cost_usd": round(sum(costs), 6) if costs else None,
        "attempts": sum(item["attempts"] for item in items),
        "fallback_used": sum(bool(item.get("fallback_used")) for item in items),
        "quality_failed": sum(
            item["status"] == "success" and not (item.get("quality") or {}).get("passed", True)
            for item in items
        ),
        "resumed": resumed,  # records read back from progress parts, not called again
    }
    meta = {
        "items": items,
        "totals": totals,
        "failed_items": failed,
        "max_failures": max_failures,
        "allowed_failures": allowed,
    }
    return FanOutOutcome(
        status="success" if len(failed) <= allowed else "error",
        results=[record["text"] for record in records],
        meta=meta,
        message=describe(totals, failed, items, allowed),
    )


def describe(totals: dict[str, Any], failed: list[int], items: list[dict], allowed: int) -> str:
    """One line for the log, or the task's error: counts, tokens, then the first failures."""
    line = (
        f"LLM fan-out: {totals['succeeded']} of {totals['items']} items succeeded, {totals['failed']} failed "
        f"(allowed: {allowed}); {totals['total_tokens']} tokens in {totals['attempts']} attempts"
    )
    if totals["cost_usd"] is not None:
        line += f", ${totals['cost_usd']:.4f}"
    if failed:
        shown = "; ".join(
            f"item {index}: ({(items[index].get('error') or {}).get('kind')}) "
            f"{(items[index].get('error') or {}).get('message')}"
            for index in failed[:FAILURES_SHOWN]
        )
        more = (
            f"; and {len(failed) - FAILURES_SHOWN} more in llm_meta" if len(failed) > FAILURES_SHOWN else ""
        )
        line += f". Failed: {shown}{more}"
    return line


def _usage_sum(items: list[dict], field: str) -> int:
    return sum((item.get("usage") or {}).get(field) or 0 for item in items)
