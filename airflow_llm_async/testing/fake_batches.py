"""OpenAI's Files and Batches APIs for the fake server (:func:`fake_server.create_app` wires them in).

A client uploads a JSONL file of chat requests (``POST /v1/files``, multipart, purpose ``batch``),
creates a batch over it (``POST /v1/batches``), polls it (``GET /v1/batches/{id}``, ``GET
/v1/batches``), may cancel it (``POST /v1/batches/{id}/cancel``) and downloads the output and error
files (``GET /v1/files/{id}/content``), all in OpenAI's shapes. Each line is answered by the code
the chat endpoint answers with (the ``answer`` given to :class:`BatchStore`), once.

A batch's life is computed from the clock when it is looked at (no background task): for
``batch_processing_s`` it is ``validating`` for the first 10 %, ``in_progress`` until 90 % (the
lines are answered in proportion to the time passed), ``finalizing``, then ``completed``. The
settings a batch runs with are those of the moment it was created.

The rules live here, free of HTTP: :class:`BatchStore` takes what a request carried and returns
OpenAI's JSON, or raises :class:`ApiError` for the error OpenAI would answer. The fake server's
aiohttp handlers read the requests (an upload as a stream), authenticate them and write the
answers; the server gives the store its chat answer and its change notification. Nothing here
imports ``fake_server``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import secrets
import string
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BATCH_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
# OpenAI's limits: 50,000 requests per batch, 200 MB per batch input file, 512 MB per file.
DEFAULT_BATCH_MAX_REQUESTS = 50_000
DEFAULT_BATCH_MAX_FILE_BYTES = 200 * 2**20
FILE_MAX_BYTES = 512 * 2**20
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
# Shares of batch_processing_s: validation ends, answering ends (then finalizing); a cancel takes
# the validation share to go from cancelling to cancelled.
_VALIDATED, _ANSWERED = 0.1, 0.9
_WINDOW_S = 24 * 3600
_BATCH_FILE_TTL_S = 30 * 24 * 3600  # files with purpose batch expire after 30 days
_MAX_ERRORS = 100  # a failed batch lists at most this many line errors
_YIELD_EVERY = 256  # lines answered or validated between two yields to the event loop
_METADATA_KEYS, _METADATA_KEY_CHARS, _METADATA_VALUE_CHARS = 16, 64, 512
_ALNUM = string.ascii_letters + string.digits
_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSettings:
    """How batches behave; the field names are :func:`create_app`'s keyword arguments and the keys of
    ``GET/POST /_fake/batches``."""

    batch_processing_s: float = 1.0
    batch_expire_after: float | None = None  # share of the lines answered before the batch expires
    batch_fail_validation: bool = False  # every new batch fails validation
    batch_max_requests: int = DEFAULT_BATCH_MAX_REQUESTS
    batch_max_file_bytes: int = DEFAULT_BATCH_MAX_FILE_BYTES
    # The next N downloads (GET /v1/files/{id}/content) answer 500, whatever the batch: counted down.
    batch_download_failures: int = 0
    # The next N retrieves (GET /v1/batches/{id}) answer 500, whatever the batch: counted down.
    batch_retrieve_failures: int = 0

    def __post_init__(self) -> None:
        seconds = self.batch_processing_s
        if not (_is_number(seconds) and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"batch_processing_s must be seconds >= 0, got {seconds!r}")
        share = self.batch_expire_after
        if share is not None and not (_is_number(share) and 0 <= share <= 1):
            raise ValueError(f"batch_expire_after must be a share between 0 and 1 or None, got {share!r}")
        if not isinstance(self.batch_fail_validation, bool):
            raise ValueError(
                f"batch_fail_validation must be true or false, got {self.batch_fail_validation!r}"
            )
        for name in ("batch_max_requests", "batch_max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("batch_download_failures", "batch_retrieve_failures"):
            failures = getattr(self, name)
            if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {failures!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, changes: Any) -> BatchSettings:
        """These settings with ``changes`` (a JSON object of some fields); ValueError if it is not one."""
        names = {f.name for f in dataclasses.fields(self)}
        if not isinstance(changes, dict) or not set(changes) <= names:
            raise ValueError(f"expected a JSON object with some of {sorted(names)}")
        return dataclasses.replace(self, **changes)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- files and batches ------------------------------------------------------------------------


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    created_at: int
    data: bytearray  # the one copy of the content: batches share it, nothing copies it

    def to_json(self) -> dict[str, Any]:
        expires_at = self.created_at + _BATCH_FILE_TTL_S if self.purpose.startswith("batch") else None
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": expires_at,
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    settings: BatchSettings
    started: float  # monotonic clock at creation
    created: float  # wall clock at creation
    data: bytearray  # the input file's content
    starts: array[int]  # where each valid line begins and ends in data
    ends: array[int]
    model: str | None
    errors: list[dict[str, Any]] | None  # validation errors: the batch fails
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answered: int = 0  # lines answered, in input order
    completed: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("input", "cached", "output"), 0))
    output: bytearray = field(default_factory=bytearray)
    error_lines: bytearray = field(default_factory=bytearray)
    cancelled_at: float | None = None  # seconds after creation
    cancel_target: int = 0  # lines answered when cancelled
    finished: bool = False  # output and error files written
    output_file_id: str | None = None
    error_file_id: str | None = None

    def timeline(self, elapsed: float) -> tuple[str, int, dict[str, float]]:
        """The status ``elapsed`` seconds after creation, how many lines are answered by then, and
        when (seconds after creation) each stage reached began."""
        total = self.settings.batch_processing_s
        validated, answered = _VALIDATED * total, _ANSWERED * total
        lines = len(self.starts)
        stages: dict[str, float] = {}
        if self.cancelled_at is not None:
            if self.cancelled_at >= validated and not self.errors:
                stages["in_progress_at"] = validated
            stages["cancelling_at"] = self.cancelled_at
            if elapsed < self.cancelled_at + validated:
                return "cancelling", self.cancel_target, stages
            stages["cancelled_at"] = self.cancelled_at + validated
            return "cancelled", self.cancel_target, stages
        if elapsed < validated:
            return "validating", 0, stages
        if self.errors:
            return "failed", 0, {"failed_at": validated}
        stages["in_progress_at"] = validated
        share = self.settings.batch_expire_after
        if share is not None and elapsed >= (expiry := validated + share * (answered - validated)):
            stages["expired_at"] = expiry
            return "expired", math.floor(share * lines), stages
        if elapsed < answered:
            return "in_progress", math.floor(lines * (elapsed - validated) / (answered - validated)), stages
        stages["finalizing_at"] = answered
        if elapsed < total:
            return "finalizing", lines, stages
        stages["completed_at"] = total
        return "completed", lines, stages

    def to_json(self, status: str, stages: dict[str, float]) -> dict[str, Any]:
        def stamp(name: str) -> int | None:
            return int(self.created + stages[name]) if name in stages else None

        share, total = self.settings.batch_expire_after, self.settings.batch_processing_s
        if share is None:
            expires_at = int(self.created) + _WINDOW_S
        else:  # the window this batch runs out of, in fast motion
            expires_at = int(self.created + total * (_VALIDATED + share * (_ANSWERED - _VALIDATED)))
        validated = "in_progress_at" in stages  # the lines are counted once validation is over
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "in_progress_at": stamp("in_progress_at"),
            "expires_at": expires_at,
            "finalizing_at": stamp("finalizing_at"),
            "completed_at": stamp("completed_at"),
            "failed_at": stamp("failed_at"),
            "expired_at": stamp("expired_at"),
            "cancelling_at": stamp("cancelling_at"),
            "cancelled_at": stamp("cancelled_at"),
            "request_counts": {
                "total": len(self.starts) if validated else 0,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
            "model": self.model,
            "usage": {
                "input_tokens": self.usage["input"],
                "input_tokens_details": {"cached_tokens": self.usage["cached"]},
                "output_tokens": self.usage["output"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage["input"] + self.usage["output"],
            },
        }


class ApiError(Exception):
    """The error OpenAI would answer: the fake server turns it into its error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


class BatchStore:
    """Files, batches and their counters; ``answer(body) -> (status, JSON body)`` answers one line,
    ``notify()`` is called when a counter moves."""

    def __init__(
        self,
        settings: BatchSettings,
        *,
        answer: Callable[[Any], tuple[int, Any]],
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.initial_settings = self.settings = settings
        self.answer, self.notify = answer, notify
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}  # in creation order
        # Digests of (custom_id, body) answered 200, to tell a line answered a second time.
        self.answered_ok: set[bytes] = set()
        self.reset()

    def reset(self) -> None:
        self.settings = self.initial_settings
        self.files.clear()
        self.batches.clear()
        self.answered_ok.clear()
        self.files_uploaded = self.batches_created = self.batches_cancelled = 0
        self.lines_answered = self.lines_failed = self.lines_answered_twice = 0
        self.downloads_failed = self.retrieves_failed = 0

    def snapshot(self) -> dict[str, int]:
        return {
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "batches_cancelled": self.batches_cancelled,
            "lines_answered": self.lines_answered,
            "lines_failed": self.lines_failed,
            "lines_answered_twice": self.lines_answered_twice,
            "downloads_failed": self.downloads_failed,
            "retrieves_failed": self.retrieves_failed,
            "files_stored": len(self.files),
        }

    def configure(self, changes: Any) -> dict[str, Any]:
        """Change settings for the batches created from now on (a JSON object of some of them)."""
        try:
            self.settings = self.settings.updated(changes)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"Invalid batch settings: {exc}") from None
        return self.settings.to_json()

    # --- files ---

    def upload_limit(self, purpose: str | None) -> int:
        """Most bytes to take for a file of ``purpose`` (None: not sent yet, so the most of either)."""
        batch_limit = self.settings.batch_max_file_bytes
        return batch_limit if purpose == "batch" else max(FILE_MAX_BYTES, batch_limit)

    def upload(self, purpose: str | None, filename: str, data: bytearray | None, *, too_large: bool) -> dict:
        """Keep an uploaded file (``data``: its content, None if none came or ``too_large``)."""
        if data is None and not too_large:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if purpose is None:
            raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in FILE_PURPOSES:
            supported = ", ".join(f"'{p}'" for p in FILE_PURPOSES)
            message = f"Invalid value for 'purpose': '{purpose}'. Supported values are: {supported}."
            raise ApiError(400, message, param="purpose", code="invalid_value")
        if data is None or (purpose == "batch" and len(data) > self.settings.batch_max_file_bytes):
            raise ApiError(400, "File is too large.")
        if purpose == "batch" and not filename.endswith(".jsonl"):
            raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl")
        self.files_uploaded += 1
        self.notify()
        return self.add_file(data, filename, purpose).to_json()

    def add_file(self, data: bytearray, filename: str, purpose: str) -> _File:
        file = _File(f"file-{_alnum(22)}", filename, purpose, int(time.time()), data)
        self.files[file.id] = file
        return file

    def file(self, file_id: str) -> _File:
        file = self.files.get(file_id)
        if file is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return file

    def content(self, file_id: str) -> bytearray:
        """A file's content (``GET /v1/files/{id}/content``); while ``batch_download_failures`` is above
        0, a 500 instead, and one failure fewer to come."""
        if self.settings.batch_download_failures > 0:
            left = self.settings.batch_download_failures - 1
            self.settings = dataclasses.replace(self.settings, batch_download_failures=left)
            self.downloads_failed += 1
            self.notify()
            raise _server_error()
        return self.file(file_id).data

    def delete_file(self, file_id: str) -> dict[str, Any]:
        file = self.file(file_id)
        del self.files[file.id]  # a batch reading it keeps its content
        return {"id": file.id, "object": "file", "deleted": True}

    # --- batches ---

    async def create(self, body: Any) -> dict[str, Any]:
        """A new batch from ``POST /v1/batches``'s JSON body (None if it was not JSON)."""
        if not isinstance(body, dict):
            raise ApiError(400, "We could not parse the JSON body of your request. Send a valid JSON object.")
        file_id = _required(body, "input_file_id")
        endpoint = _required(body, "endpoint", BATCH_ENDPOINT)
        _required(body, "completion_window", COMPLETION_WINDOW)
        metadata = _metadata(body.get("metadata"))
        file = self.files.get(file_id)
        if file is None:
            message = f"Cannot find file {file_id}, or project proj_fake does not have access to it."
            raise ApiError(400, message, param="input_file_id")
        if file.purpose != "batch":
            message = (
                f"The input file {file_id} has purpose '{file.purpose}': a batch needs one uploaded with "
                "purpose 'batch'."
            )
            raise ApiError(400, message, param="input_file_id")
        settings = self.settings
        starts, ends, model, errors = await _validate(file.data, endpoint, settings.batch_max_requests)
        if settings.batch_fail_validation:
            errors = [_forced_failure(model)]
        batch = _Batch(
            id=f"batch_{secrets.token_hex(16)}",
            input_file_id=file.id,
            endpoint=endpoint,
            metadata=metadata,
            settings=settings,
            started=time.monotonic(),
            created=time.time(),
            data=file.data,
            starts=starts,
            ends=ends,
            model=model,
            errors=errors or None,
        )
        self.batches[batch.id] = batch
        self.batches_created += 1
        self.notify()
        return batch.to_json("validating", {})

    def batch(self, batch_id: str) -> _Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """A batch as it is now (``GET /v1/batches/{id}``); while ``batch_retrieve_failures`` is above 0,
        a 500 instead, and one failure fewer to come."""
        if self.settings.batch_retrieve_failures > 0:
            left = self.settings.batch_retrieve_failures - 1
            self.settings = dataclasses.replace(self.settings, batch_retrieve_failures=left)
            self.retrieves_failed += 1
            self.notify()
            raise _server_error()
        return await self._look(self.batch(batch_id))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._look(self.batch(batch_id), cancel=True)

    async def list_batches(self, limit: str | None, after: str | None) -> dict[str, Any]:
        """A page of batches, newest first, after the batch ``after`` (OpenAI's cursor pagination)."""
        try:
            count = int(limit or 20)
        except ValueError:
            count = 0
        if not 1 <= count <= 100:
            message = f"Invalid 'limit': expected an integer between 1 and 100, got '{limit}'."
            raise ApiError(400, message, param="limit", code="invalid_value")
        newest_first = list(reversed(self.batches.values()))
        if after is not None:  # a cursor that names no batch has nothing after it
            ids = [batch.id for batch in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = [await self._look(batch) for batch in newest_first[:count]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest_first) > count,
        }

    async def _look(self, batch: _Batch, *, cancel: bool = False) -> dict[str, Any]:
        """The batch now: the lines due by now answered, its files written once it is over; with
        ``cancel``, cancelled (ApiError 400 if it is past cancelling)."""
        async with batch.lock:
            elapsed = time.monotonic() - batch.started
            status, due, stages = batch.timeline(elapsed)
            await self._answer(batch, due)
            if cancel and status != "cancelling":
                if status not in ("validating", "in_progress"):
                    raise ApiError(400, f"Cannot cancel a batch with status '{status}'.")
                batch.cancelled_at, batch.cancel_target = elapsed, due
                self.batches_cancelled += 1
                self.notify()
                status, due, stages = batch.timeline(elapsed)
            if status in TERMINAL and not batch.finished:
                self._finish(batch, status, ran="in_progress_at" in stages)
            return batch.to_json(status, stages)

    async def _answer(self, batch: _Batch, due: int) -> None:
        if batch.answered >= due:
            return
        while batch.answered < due:
            index = batch.answered
            request = json.loads(batch.data[batch.starts[index] : batch.ends[index]])
            custom_id, body = request["custom_id"], request["body"]
            status, response = self.answer(body)
            line = {
                "id": f"batch_req_{secrets.token_hex(12)}",
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": secrets.token_hex(16), "body": response},
                "error": None,
            }
            digest = hashlib.blake2b(
                _dumps([custom_id, body], sort_keys=True).encode(), digest_size=16
            ).digest()
            self.lines_answered_twice += digest in self.answered_ok
            self.lines_answered += 1
            if status == 200:
                batch.output.extend(_dumps(line).encode() + b"\n")
                batch.completed += 1
                self.answered_ok.add(digest)
                _add_usage(batch.usage, response)
            else:
                batch.error_lines.extend(_dumps(line).encode() + b"\n")
                batch.failed += 1
                self.lines_failed += 1
            batch.answered += 1
            if batch.answered % _YIELD_EVERY == 0:
                self.notify()
                await asyncio.sleep(0)  # a large batch must not stall the other requests
        self.notify()

    def _finish(self, batch: _Batch, status: str, *, ran: bool) -> None:
        """Write the batch's files: the lines never answered (expired, or cancelled once it ran) go to
        the error file. A batch that failed validation, or was cancelled before it ran, has none."""
        batch.finished = True
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        if code is not None and ran:
            message = {
                "batch_expired": "This request could not be executed before the completion window expired.",
                "batch_cancelled": "This request was not executed because the batch was cancelled.",
            }[code]
            for index in range(batch.answered, len(batch.starts)):
                request = json.loads(batch.data[batch.starts[index] : batch.ends[index]])
                line = {
                    "id": f"batch_req_{secrets.token_hex(12)}",
                    "custom_id": request["custom_id"],
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                batch.error_lines.extend(_dumps(line).encode() + b"\n")
        if batch.output:
            batch.output_file_id = self.add_file(batch.output, f"{batch.id}_output.jsonl", "batch_output").id
        if batch.error_lines:
            name = f"{batch.id}_error.jsonl"
            batch.error_file_id = self.add_file(batch.error_lines, name, "batch_output").id


def _server_error() -> ApiError:
    """OpenAI's answer to a request it failed on its side: 500, type ``server_error``."""
    return ApiError(500, "The server had an error while processing your request.", type_="server_error")


def _alnum(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def _add_usage(usage: dict[str, int], response: Any) -> None:
    counts = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(counts, dict):
        return
    details = counts.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    for key, value in (("input", counts.get("prompt_tokens")), ("output", counts.get("completion_tokens")),
                       ("cached", cached)):  # fmt: skip
        if isinstance(value, int) and not isinstance(value, bool):  # a garbled answer has "n/a"
            usage[key] += value


def _line_error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _forced_failure(model: str | None) -> dict[str, Any]:
    # What OpenAI answers most often when a batch fails although its file is fine.
    message = (
        f"Enqueued token limit reached for {model or 'the model'} in organization org-fake. Limit: 90,000 "
        "enqueued tokens. Please try again once some in_progress batches have been completed."
    )
    return _line_error("token_limit_exceeded", message, None)


async def _validate(
    data: bytearray, endpoint: str, max_requests: int
) -> tuple[array[int], array[int], str | None, list[dict[str, Any]]]:
    """Check every line as OpenAI does before a batch runs: where the valid lines are, the batch's
    model, and the errors (line numbers from 1). Reads the lines in place, one at a time."""
    starts, ends = array("q"), array("q")
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    requests = 0
    position, number = 0, 0
    while position < len(data) and len(errors) < _MAX_ERRORS:
        end = data.find(b"\n", position)
        end = len(data) if end < 0 else end
        start, position, number = position, end + 1, number + 1
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if not data[start:end].strip():
            continue
        requests += 1
        if requests > max_requests:  # only count the rest
            continue
        try:
            request = json.loads(data[start:end])
        except ValueError:
            errors.append(
                _line_error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            )
            continue
        if not isinstance(request, dict):
            errors.append(_line_error("invalid_json_line", "This line is not a JSON object.", number))
            continue
        problems = _line_problems(request, endpoint, seen, model)
        if problems:
            errors.extend(_line_error(code, message, number, param) for code, message, param in problems)
            continue
        seen.add(request["custom_id"])
        if model is None and isinstance(request["body"].get("model"), str):
            model = request["body"]["model"]
        starts.append(start)
        ends.append(end)
    if errors:
        return starts, ends, model, errors[:_MAX_ERRORS]
    if requests > max_requests:
        message = f"The batch input file has {requests} requests, more than the maximum of {max_requests}."
        return starts, ends, model, [_line_error("too_many_tasks", message, None)]
    if not requests:
        return starts, ends, model, [_line_error("empty_file", "The batch input file is empty.", None)]
    return starts, ends, model, []


def _line_problems(
    request: dict[str, Any], endpoint: str, seen: set[str], model: str | None
) -> list[tuple[str, str, str | None]]:
    """(code, message, param) for each thing wrong with one parsed line."""
    missing = [key for key in ("custom_id", "method", "url", "body") if key not in request]
    if missing:
        return [
            ("missing_required_parameter", f"Missing required parameter: '{key}'.", key) for key in missing
        ]
    custom_id, method, url, body = (request[key] for key in ("custom_id", "method", "url", "body"))
    problems: list[tuple[str, str, str | None]] = []
    for key, value, kind in (("custom_id", custom_id, str), ("url", url, str), ("body", body, dict)):
        if not isinstance(value, kind):
            expected = "an object" if kind is dict else "a string"
            problems.append(("invalid_type", f"Invalid type for '{key}': expected {expected}.", key))
    if problems:
        return problems
    if method != "POST":
        problems.append(
            ("invalid_value", f"Invalid value for 'method': '{method}'. Only 'POST' is supported.", "method")
        )
    if url != endpoint:
        message = (
            f"The URL provided for this request ('{url}') does not match the batch endpoint ('{endpoint}')."
        )
        problems.append(("url_mismatch", message, "url"))
    if custom_id in seen:
        message = (
            f"The custom_id '{custom_id}' for this request is a duplicate of another request. The custom_id "
            "parameter must be unique for each request in a batch."
        )
        problems.append(("duplicate_custom_id", message, "custom_id"))
    line_model = body.get("model")
    if model is not None and isinstance(line_model, str) and line_model != model:
        message = f"The model '{line_model}' of this request differs from the batch's model '{model}'."
        problems.append(("model_mismatch", message, "body.model"))
    return problems


def _required(body: dict[str, Any], name: str, allowed: str | None = None) -> str:
    value = body.get(name)
    if value is None:
        raise ApiError(400, f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(value, str) or (allowed is not None and value != allowed):
        if allowed is None:
            raise ApiError(
                400, f"Invalid type for '{name}': expected a string.", param=name, code="invalid_type"
            )
        message = f"Invalid value: '{value}'. Supported values are: '{allowed}'."
        raise ApiError(400, message, param=name, code="invalid_value")
    return value


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > _METADATA_KEYS
        or not all(isinstance(k, str) and len(k) <= _METADATA_KEY_CHARS for k in value)
        or not all(isinstance(v, str) and len(v) <= _METADATA_VALUE_CHARS for v in value.values())
    ):
        message = (
            f"Invalid 'metadata': expected an object of at most {_METADATA_KEYS} string values, keys of at "
            f"most {_METADATA_KEY_CHARS} characters, values of at most {_METADATA_VALUE_CHARS}."
        )
        raise ApiError(400, message, param="metadata", code="invalid_value")
    return value
