"""A fan-out answered by the Batch API, without I/O: options, the JSONL, its parts, and each line's record.

``LLMFanOutOperator(batch=True)`` sends its items as one JSONL file per part (``POST /files``,
``POST /batches``) instead of one request each, and the trigger (``triggers/batch.py``, through
``batches.py``) polls until the batches end. This module decides everything that needs no network:

* the request line of each item (:func:`request_line`), and how the items split into parts that
  fit one batch (:func:`plan_parts`: ``max_requests`` lines and ``max_bytes`` per file);
* the metadata that names a part's batch on the server (:func:`batch_metadata`), which is how a
  restarted trigger or a new try of the task finds the batch it paid for (:func:`same_part`);
* the growing poll interval (:func:`next_poll`);
* the record of each output or error line (:func:`line_record`): the same parsing, quality gate and
  record as a real-time answer, priced at the batch price, and whether the item is asked again in
  real time (``retry="realtime"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from airflow_llm_async.core import engine, fanout, pricing, protocol, tokens
from airflow_llm_async.core.outcome import Attempt, CallSpec, Outcome
from airflow_llm_async.core.protocol import Endpoint, LLMCallError

ENDPOINT = "/v1/chat/completions"
RETRY = ("realtime", "none")
# OpenAI's limits of one batch: 50,000 requests, an input file of at most 200 MB.
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1_000_000
# A batch fan-out may hold more items than a real-time one (fanout.MAX_ITEMS): its lines are built and
# sent as a stream, and split over several batches.
MAX_ITEMS = 200_000
# A batch's states (OpenAI's), and those after which nothing changes.
ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
POLL_GROWTH = 1.5
# Metadata keys that name a part's batch; OpenAI takes up to 16 keys, values of up to 512 characters.
META_FIELDS = ("airflow_dag_id", "airflow_run_id", "airflow_task_id", "airflow_map_index")
META_INPUT = "llm_async_input"
META_PART = "llm_async_part"
META_TRY = "airflow_try_number"  # matched only with batch_resubmit: a new try sends again, a restart not
MAX_META_VALUE = 512


@dataclass(frozen=True)
class BatchOptions:
    """How a fan-out uses the Batch API (the operator's ``batch_*`` arguments)."""

    completion_window: str = "24h"
    poll_interval: float = 30.0  # seconds before the first poll; each next one waits POLL_GROWTH times longer
    poll_max_interval: float = 600.0
    retry: str = "realtime"  # what becomes of an item the batch did not answer well: RETRY
    max_requests: int = MAX_REQUESTS
    max_bytes: int = MAX_BYTES
    resubmit: bool = False  # True: each try of the task sends a new batch (a restart within a try does not)

    def __post_init__(self) -> None:
        """ValueError naming the argument to fix."""
        if not isinstance(self.completion_window, str) or not self.completion_window:
            raise ValueError(
                f'batch_completion_window must be text such as "24h", got {self.completion_window!r}.'
            )
        for name in ("poll_interval", "poll_max_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"batch_{name} must be a number of seconds > 0, got {value!r}.")
        if self.poll_max_interval < self.poll_interval:
            raise ValueError(
                f"batch_poll_max_interval ({self.poll_max_interval!r}) must be at least batch_poll_interval "
                f"({self.poll_interval!r})."
            )
        if self.retry not in RETRY:
            raise ValueError(f"batch_retry must be one of {list(RETRY)}, got {self.retry!r}.")
        for name in ("max_requests", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"batch_{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.resubmit, bool):
            raise ValueError(f"batch_resubmit must be True or False, got {self.resubmit!r}.")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> BatchOptions:
        known = {name: value for name, value in (data or {}).items() if name in cls.__dataclass_fields__}
        return cls(**known)


def custom_id(index: int) -> str:
    return f"item-{index}"


def item_index(value: Any, items: int) -> int | None:
    """The item a line's ``custom_id`` names, or None for one this fan-out did not send."""
    if not isinstance(value, str) or not value.startswith("item-"):
        return None
    number = value[5:]
    if not (number.isascii() and number.isdigit()) or (len(number) > 1 and number[0] == "0"):
        return None
    index = int(number)
    return index if index < items else None


def primary(spec: CallSpec, endpoints: Mapping[str, Endpoint]) -> tuple[Endpoint, str]:
    """The batch goes to the chain's first link; its fallbacks serve the real-time re-asks."""
    return engine.resolve_models(spec, endpoints)[0]


def request_line(index: int, spec: CallSpec, model: str) -> bytes:
    """One line of the input file: the item's request as the real-time call would send it."""
    body = protocol.build_payload(spec.request, model)
    head = json.dumps({"custom_id": custom_id(index), "method": "POST", "url": ENDPOINT})
    return b"".join((head[:-1].encode(), b', "body": ', body, b"}\n"))


def plan_parts(sizes: Iterable[tuple[int, int]], max_requests: int, max_bytes: int) -> list[list[int]]:
    """Split ``(index, line bytes)`` pairs, in order, into parts of at most ``max_requests`` lines and
    ``max_bytes`` bytes. A line larger than ``max_bytes`` alone is left out (:func:`too_large`)."""
    parts: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, length in sizes:
        if length > max_bytes:
            continue
        if current and (len(current) >= max_requests or size + length > max_bytes):
            parts.append(current)
            current, size = [], 0
        current.append(index)
        size += length
    if current:
        parts.append(current)
    return parts


def too_large(length: int, max_bytes: int) -> LLMCallError:
    return LLMCallError(
        "client",
        f"the item's request line is {length} bytes, more than one batch file may hold (batch_max_bytes="
        f"{max_bytes}); shorten it, or send it without batch=True",
    )


def worst_case(spec: CallSpec, price: pricing.Price) -> float:
    """What an item's batch line can cost at most: all its prompt and max_tokens, at the batch price."""
    return price.batch().cost(
        tokens.estimate_prompt_tokens(spec.request), tokens.completion_budget(spec.request)
    )


def unpriced(endpoint: Endpoint, model: str) -> LLMCallError:
    """A batch to a connection with ``budget_usd`` whose model has no price: its cost cannot be bounded."""
    return LLMCallError(
        "budget",
        f"the {endpoint.conn_id!r} connection has budget_usd of {endpoint.budget_usd.describe()} but no "
        f"price is known for model {model!r}, so the batch's cost cannot be bounded; add it to the "
        f'connection\'s extra, e.g. "prices": {{"{model}": {{"input": <USD per 1M prompt tokens>, '
        f'"output": <USD per 1M completion tokens>}}}} (or to the file named by [llm_async] prices_file)',
    )


def batch_metadata(where: Mapping[str, Any], fingerprint: str, part: int, parts: int) -> dict[str, str]:
    """What names a part's batch on the server: the task instance, the input, and the part."""
    meta = {name: str(where.get(name.removeprefix("airflow_"), ""))[:MAX_META_VALUE] for name in META_FIELDS}
    meta[META_INPUT] = fingerprint
    meta[META_PART] = f"{part + 1}/{parts}"
    if "try_number" in where:
        meta[META_TRY] = str(where["try_number"])
    return meta


def wanted(metadata: Mapping[str, str], resubmit: bool) -> dict[str, str]:
    """The metadata a part's batch must have to be used: of any try, or (``resubmit``) of this try."""
    return dict(metadata) if resubmit else {key: v for key, v in metadata.items() if key != META_TRY}


def same_part(batch: Mapping[str, Any], metadata: Mapping[str, str]) -> bool:
    """Whether ``batch`` (as the server lists it) was created for this part, and can still be used:
    a batch that failed validation answered nothing and cost nothing, so the part is sent again."""
    found = batch.get("metadata") or {}
    return all(found.get(key) == value for key, value in metadata.items()) and batch.get("status") != "failed"


def next_poll(interval: float, options: BatchOptions) -> float:
    return min(interval * POLL_GROWTH, options.poll_max_interval)


def counts(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A batch's state as the task's ``llm_batch`` XCom and the monitor show it."""
    request_counts = batch.get("request_counts") or {}
    return {
        "id": batch.get("id"),
        "status": batch.get("status"),
        "total": request_counts.get("total", 0),
        "completed": request_counts.get("completed", 0),
        "failed": request_counts.get("failed", 0),
        "created_at": batch.get("created_at"),
        "output_file_id": batch.get("output_file_id"),
        "error_file_id": batch.get("error_file_id"),
    }


def describe(part: int, parts: int, batch: Mapping[str, Any]) -> str:
    """The progress line of one part."""
    state = counts(batch)
    done = state["completed"] + state["failed"]
    return (
        f"LLM batch {part + 1}/{parts} {state['id']}: {state['status']}, {done} of {state['total']} requests "
        f"done ({state['failed']} failed)"
    )


def validation_error(batch: Mapping[str, Any]) -> LLMCallError:
    """Why the server refused a batch's input file, from its ``errors`` (the first few named)."""
    errors = ((batch.get("errors") or {}).get("data") or [])[:3]
    shown = "; ".join(
        f"{'line ' + str(e.get('line')) + ': ' if e.get('line') else ''}({e.get('code')}) {e.get('message')}"
        for e in errors
        if isinstance(e, Mapping)
    )
    return LLMCallError(
        "batch",
        f"batch {batch.get('id')} failed validation: {shown or 'no reason given'}; fix the items, or send "
        "them without batch=True",
        code=(errors[0].get("code") if errors and isinstance(errors[0], Mapping) else None),
    )


@dataclass(frozen=True)
class LineResult:
    """What one output or error line answered for its item."""

    record: fanout.Record
    again: bool  # ask the item again in real time (retry="realtime" and the line did not pass)
    cost_usd: float | None  # what the line cost at the batch price (None: the model has no known price)
    realtime_cost_usd: float | None  # what the same answer would have cost in real time


def line_record(
    line: Mapping[str, Any],
    spec: CallSpec,
    endpoint: Endpoint,
    model: str,
    options: BatchOptions,
    batch_id: str,
) -> LineResult:
    """The record of an item from its output or error line: parsed, gated and priced as a real-time
    answer would be, at the batch price."""
    attempt = Attempt(endpoint.conn_id, model, latency_s=0.0)
    response = line.get("response")
    if not isinstance(response, Mapping):  # never answered: the batch expired or was cancelled first
        error = line.get("error") if isinstance(line.get("error"), Mapping) else {}
        code = (
            protocol.redact(error["code"], endpoint.secrets)[:100]
            if isinstance(error.get("code"), str)
            else None
        )
        text = protocol.redact(str(error.get("message") or "no answer"), endpoint.secrets)[:500]
        error = LLMCallError("batch", f"batch {batch_id}: {text}", code=code)
        return _failed(attempt, error, options, 0.0, 0.0, batch_id)
    status = response.get("status_code")
    body = json.dumps(response.get("body")).encode()
    attempt.status = status if isinstance(status, int) else None
    try:
        completion = protocol.parse_completion(
            status if isinstance(status, int) else 500, body, None, endpoint.secrets
        )
    except LLMCallError as exc:
        billed = exc.billed
        cost, realtime = _costs(billed, endpoint, model) if billed is not None else (0.0, 0.0)
        return _failed(attempt, exc, options, cost, realtime, batch_id)
    cost, realtime = _costs(completion, endpoint, model)
    attempt.result, attempt.tokens, attempt.cost_usd = "ok", completion.usage.get("total_tokens"), cost
    failures = spec.quality.check(completion.text, completion.finish_reason)
    if failures:
        attempt.result, attempt.reason = "quality_failed", failures
        if options.retry == "realtime" or spec.on_quality_failure != "return":
            error = LLMCallError("quality", f"the batch answer failed the quality checks: {failures}")
            return _failed(attempt, error, options, cost, realtime, batch_id)
    outcome = Outcome(
        status="success",
        text=completion.text,
        attempts=[attempt],
        cost_usd=cost,
        model=completion.model or model,
        requested_model=model,
        conn_id=endpoint.conn_id,
        usage=completion.usage,
        usage_details=completion.usage_details,
        finish_reason=completion.finish_reason,
        quality_failures=list(failures),
    )
    return LineResult(_with_batch(fanout.to_record(outcome), batch_id), False, cost, realtime)


def _failed(
    attempt: Attempt,
    error: LLMCallError,
    options: BatchOptions,
    cost: float | None,
    realtime: float | None,
    batch_id: str,
) -> LineResult:
    if attempt.result != "quality_failed":
        attempt.result, attempt.reason = "error", error.to_dict()
    attempt.cost_usd = cost
    record = fanout.to_record(Outcome(status="error", error=error, attempts=[attempt], cost_usd=cost))
    return LineResult(_with_batch(record, batch_id), options.retry == "realtime", cost, realtime)


def unanswered(batch: Mapping[str, Any], options: BatchOptions) -> LineResult:
    """An item that its batch's files do not mention (the batch failed validation, or lost the line)."""
    if batch.get("status") == "failed":
        error = validation_error(batch)
        return LineResult(
            fanout.error_record(error), False, 0.0, 0.0
        )  # nothing ran: asking again fails again
    error = LLMCallError(
        "batch",
        f"batch {batch.get('id')} ended {batch.get('status')} without an answer or an error for the item",
    )
    return LineResult(fanout.error_record(error), options.retry == "realtime", 0.0, 0.0)


def _costs(
    completion: protocol.Completion, endpoint: Endpoint, model: str
) -> tuple[float | None, float | None]:
    """The answer's cost at the batch price, and at the real-time price (None: no known price)."""
    price = pricing.price_of(endpoint.prices, model) or pricing.price_of(endpoint.prices, completion.model)
    usage = completion.usage
    if price is None:
        free = not (usage["prompt_tokens"] or usage["completion_tokens"])
        return (0.0, 0.0) if free else (None, None)
    cached = completion.usage_details.get("cached_tokens", 0)
    tokens = (usage["prompt_tokens"], usage["completion_tokens"], cached)
    return round(price.batch().cost(*tokens), 10), round(price.cost(*tokens), 10)


def _with_batch(record: fanout.Record, batch_id: str) -> fanout.Record:
    record["meta"]["batch_id"] = batch_id
    return record


def merge_realtime(batch_line: LineResult, realtime: fanout.Record) -> fanout.Record:
    """An item asked again in real time: the real-time record, with the batch answer's cost and attempt
    counted in."""
    meta = dict(realtime["meta"])
    meta["attempts"] = meta.get("attempts", 0) + batch_line.record["meta"].get("attempts", 0)
    if batch_line.cost_usd is None:  # the batch answer's tokens were billed at a price nobody knows
        meta["cost_usd"] = None
    elif batch_line.cost_usd:
        meta["cost_usd"] = (
            None if meta.get("cost_usd") is None else round(meta["cost_usd"] + batch_line.cost_usd, 10)
        )
    meta["batch_error"] = batch_line.record["meta"].get("error")
    meta["realtime"] = True
    return {"text": realtime["text"], "meta": meta}


def summary(
    batches: list[Mapping[str, Any]], lines: Iterable[LineResult], realtime_items: int, options: BatchOptions
) -> dict[str, Any]:
    """``llm_meta["batch"]``: each part's batch, what the answers cost, and what they would have cost."""
    cost = realtime_cost = 0.0
    known = True
    for line in lines:
        if line.cost_usd is None or line.realtime_cost_usd is None:
            known = False
            continue
        cost += line.cost_usd
        realtime_cost += line.realtime_cost_usd
    return {
        "batches": [counts(batch) for batch in batches],
        "cost_usd": round(cost, 8) if known else None,
        "realtime_cost_usd": round(realtime_cost, 8) if known else None,
        "saved_usd": round(realtime_cost - cost, 8) if known else None,
        "realtime_items": realtime_items,
        "retry": options.retry,
        "completion_window": options.completion_window,
    }
