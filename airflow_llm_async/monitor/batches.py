"""The Batch API's figures for the monitor (I/O-free): batches still waiting, and what batch answers cost.

Two sources, both XComs of ``LLMFanOutOperator(batch=True)`` tasks:

* ``llm_batch`` (:data:`STATE_KEY`), written while the task's batches wait and whenever one's status or
  counts change: ``{"fingerprint", "parts", "batches": {"0": {id, status, total, completed, failed,
  created_at, output_file_id, error_file_id}, ...}}``. :func:`waiting_from_xcom` makes one row of a
  task's batches;
* ``llm_meta["batch"]`` of a task that ended: what the batch answers cost at the batch price
  (``cost_usd``), what the same answers would have cost in real time (``realtime_cost_usd``), and how
  many items were asked again in real time. :func:`batch_use_from_meta` reads it,
  :func:`batch_cost_figures` sums it per DAG and model.

Both values are untrusted input, read as :func:`figures.calls_from_xcom` reads ``llm_meta``: every field
type- and range-checked, a value of the wrong shape skipped or read as unknown, and how much of a value
is looked at bounded, so that no stored value crashes a refresh or makes it slow or its answer large.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_llm_async.core import batch
from airflow_llm_async.monitor.figures import MAX_COST_USD, _bounded, _number, _text

# The XCom key of a task's batch state (triggers/batch.py's STATE_KEY; not imported from there, which
# would load the trigger's HTTP client into every process that reads the figures).
STATE_KEY = "llm_batch"
MAX_WAITING_ROWS = 100  # tasks with waiting batches shown, the most recently updated first
MAX_BATCHES_PER_TASK = 1_000  # batches of one task counted (OpenAI's limits make 4 of 200,000 items)
SHOWN_IDS = 3  # batch ids of one task shown; the others are counted
MAX_STATUS = 40  # characters of a status a server names (OpenAI's longest is 11)
MAX_COUNT = 10**9  # requests of one batch
MAX_TASK_COST_USD = MAX_COST_USD * batch.MAX_ITEMS  # of one task: at most MAX_ITEMS calls of MAX_COST_USD
MAX_ITEMS_READ = batch.MAX_ITEMS  # items of one llm_meta looked at for their model and batch id
UNKNOWN = "unknown"


def _count(value: Any, high: int = MAX_COUNT) -> int:
    """A count from 0 to ``high``; 0 otherwise."""
    number = _bounded(value, high)
    return 0 if number is None else int(number)


# ---- batches waiting ----------------------------------------------------------------------------------


def waiting_from_xcom(
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
    value: Any,
    timestamp: float,
    task_state: str | None,
    now: float,
) -> dict[str, Any] | None:
    """One row of a task's batches, from its ``llm_batch`` XCom; None when nothing waits.

    Something waits while a batch has not ended (its status is none of ``core.batch.ENDED``; a status
    the monitor does not know counts as not ended), or while the task is ``deferred`` (all its batches
    ended: the trigger downloads the answers, or asks failed items again in real time). ``timestamp``:
    when the XCom was last written; ``task_state``: the task instance's state.
    """
    if not isinstance(value, Mapping):
        return None
    found = value.get("batches")
    if isinstance(found, Mapping):
        found = found.values()
    elif not isinstance(found, list):
        return None
    parts = [part for part in itertools.islice(found, MAX_BATCHES_PER_TASK) if isinstance(part, Mapping)]
    if not parts:
        return None
    statuses: Counter[str] = Counter()
    ids, created = [], []
    total = completed = failed = 0
    for part in parts:
        status = part.get("status")
        statuses[status[:MAX_STATUS] if isinstance(status, str) and status else UNKNOWN] += 1
        batch_id = _text(part.get("id"))
        if batch_id is not None:
            ids.append(batch_id)
        # A count beyond what one batch holds reads as unknown (0), as a call's tokens do.
        part_total = _count(part.get("total"))
        total += part_total
        completed += _count(part.get("completed"))
        failed += _count(part.get("failed"))
        created_at = _number(part.get("created_at"))
        if created_at is not None and 0 < created_at:
            created.append(min(created_at, now))  # a server's clock ahead of ours: created just now
    active = sum(count for status, count in statuses.items() if status not in batch.ENDED)
    if not active and task_state != "deferred":
        return None
    oldest = min(created, default=None)
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "map_index": map_index,
        "task_state": task_state,
        "batches": len(parts),
        "active": active,
        "parts": _count(value.get("parts"), batch.MAX_ITEMS) or len(parts),
        "batch_ids": ids[:SHOWN_IDS],
        # Most batches first, then by name: "in_progress", or "in_progress 2, finalizing 1".
        "statuses": dict(sorted(statuses.items(), key=lambda item: (-item[1], item[0]))),
        "total": total,
        "completed": completed,
        "failed": failed,
        "created_at": oldest,
        "age_s": None if oldest is None else round(now - oldest, 1),
        "updated_at": timestamp,
    }


def waiting_rows(
    rows: Iterable[dict[str, Any] | None], limit: int = MAX_WAITING_ROWS
) -> list[dict[str, Any]]:
    """The rows of :func:`waiting_from_xcom` that wait, most recently updated first, at most ``limit``."""
    shown = [row for row in rows if row is not None]
    shown.sort(
        key=lambda row: (-row["updated_at"], row["dag_id"], row["run_id"], row["task_id"], row["map_index"])
    )
    return shown[:limit]


def status_text(statuses: Mapping[str, int]) -> str:
    """``in_progress`` (one status), or ``in_progress 2, finalizing 1``."""
    if len(statuses) == 1 and sum(statuses.values()) == 1:
        return next(iter(statuses))
    return ", ".join(f"{status} {count}" for status, count in statuses.items())


def ids_text(row: Mapping[str, Any]) -> str:
    """The first batch ids of a row, and how many others there are."""
    ids = ", ".join(row["batch_ids"]) or "-"
    others = row["batches"] - len(row["batch_ids"])
    return f"{ids} (+{others})" if others > 0 else ids


# ---- batch cost ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchUse:
    """What one task's batches answered and cost, from ``llm_meta["batch"]``."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    model: str
    batches: int
    batch_items: int  # items answered by a batch (and kept: not asked again in real time)
    realtime_items: int  # items asked again in real time
    cost_usd: float | None  # the batch answers at the batch price (None: a price unknown)
    realtime_cost_usd: float | None  # the same answers at the real-time price

    @property
    def priced(self) -> bool:
        return self.cost_usd is not None and self.realtime_cost_usd is not None


def batch_use_from_meta(
    dag_id: str, run_id: str, task_id: str, map_index: int, value: Any
) -> BatchUse | None:
    """A batch task's use of the Batch API, from its ``llm_meta``; None when it has no ``batch`` part."""
    if not isinstance(value, Mapping) or not isinstance(value.get("batch"), Mapping):
        return None
    summary = value["batch"]
    items = value.get("items") if isinstance(value.get("items"), list) else []
    models: Counter[str] = Counter()
    answered = 0
    for item in itertools.islice(items, MAX_ITEMS_READ):
        if (
            not isinstance(item, Mapping)
            or _text(item.get("batch_id")) is None
            or item.get("realtime") is True
        ):
            continue
        model = _text(item.get("model"))
        if model is None:  # a failed line names its model in its attempt
            log = item.get("attempt_log")
            last = log[-1] if isinstance(log, list) and log else None
            model = _text(last.get("model")) if isinstance(last, Mapping) else None
        models[model or UNKNOWN] += 1
        answered += item.get("status") == "success"
    found = summary.get("batches")
    cost = _bounded(summary.get("cost_usd"), MAX_TASK_COST_USD)
    realtime = _bounded(summary.get("realtime_cost_usd"), MAX_TASK_COST_USD)
    return BatchUse(
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        # The model most of its batch lines went to (ties: by name).
        model=min(models, key=lambda name: (-models[name], name)) if models else UNKNOWN,
        batches=min(len(found), MAX_BATCHES_PER_TASK) if isinstance(found, list | Mapping) else 0,
        batch_items=answered,
        realtime_items=_count(summary.get("realtime_items"), batch.MAX_ITEMS),
        cost_usd=None if cost is None or realtime is None else cost,
        realtime_cost_usd=None if cost is None or realtime is None else realtime,
    )


def batch_cost_figures(uses: Iterable[BatchUse]) -> list[dict[str, Any]]:
    """Per DAG and model: tasks, batches, items answered by a batch and asked again in real time, what the
    batch answers cost, what they would have cost in real time, and the saving.

    The sums are of the priced tasks (both costs known; None when none is); ``unpriced_tasks`` counts the
    others, whose model has no known price.
    """
    groups: dict[tuple[str, str], list[BatchUse]] = defaultdict(list)
    for use in uses:
        groups[(use.dag_id, use.model)].append(use)
    return [
        {"dag_id": dag_id, "model": model, **_cost_sums(group)}
        for (dag_id, model), group in sorted(groups.items())
    ]


def batch_cost_totals(uses: Iterable[BatchUse]) -> dict[str, Any]:
    """The sums of :func:`batch_cost_figures` over every task."""
    return _cost_sums(list(uses))


def _cost_sums(uses: list[BatchUse]) -> dict[str, Any]:
    priced = [use for use in uses if use.priced]
    cost = sum(use.cost_usd or 0.0 for use in priced)
    realtime = sum(use.realtime_cost_usd or 0.0 for use in priced)
    return {
        "tasks": len(uses),
        "batches": sum(use.batches for use in uses),
        "batch_items": sum(use.batch_items for use in uses),
        "realtime_items": sum(use.realtime_items for use in uses),
        "cost_usd": round(cost, 9) if priced else None,
        "realtime_cost_usd": round(realtime, 9) if priced else None,
        "saved_usd": round(realtime - cost, 9) if priced else None,
        "unpriced_tasks": len(uses) - len(priced),
    }


def task_label(task_id: str, map_index: int) -> str:
    """``task``, or ``task[3]`` for a mapped task's instance."""
    return f"{task_id}[{map_index}]" if map_index >= 0 else task_id


def age_text(seconds: float | None) -> str:
    """``42 s``, ``5 min``, ``3 h 20 min``, ``2 d 4 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(max(0.0, seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
