"""A fan-out through the Batch API: submit (or find again), poll, collect, and ask again in real time.

The decisions are ``core/batch.py``'s; this module does the I/O, with the trigger
(``triggers/batch.py``) as its only caller. Paid for once: each part's batch carries metadata naming
the task instance, the input's fingerprint and the part (:func:`core.batch.batch_metadata`). Before
it creates a batch, a run looks for that batch: first under the ids the trigger stored (the task's
``llm_batch`` XCom), then on the server (``GET /batches``, newest first). So a triggerer restarted
(kill -9 included) after ``POST /batches`` answered, a task retry, or a worker-free re-run finds the
batch it already paid for and creates none; ``batch_resubmit=True`` is the only way to send again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from airflow_llm_async import budget_store, driver, transport
from airflow_llm_async.core import batch, budget, fanout, pricing, protocol
from airflow_llm_async.core.batch import BatchOptions, LineResult
from airflow_llm_async.core.engine import NoAnswer
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.protocol import Endpoint, LLMCallError

log = logging.getLogger(__name__)

# A Files or Batches API request (not an answer of the model): a few seconds, whatever the model.
REQUEST_TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 1800.0  # 200 MB at ~1 Mbit/s
MAX_ANSWER_BYTES = 16 << 20
# How often a failed request of the API (5xx, 429, timeout, no connection) is sent again before the
# run gives up, and the longest pause between two.
API_TRIES = 6
API_MAX_PAUSE_S = 30.0
# Looking for a part's batch on the server: newest first, at most this many pages of 100, and no
# batch older than this (a task instance's batches are younger than its DAG run).
FIND_PAGES = 20
FIND_MAX_AGE_S = 30 * 86400
# After cancelling at the timeout, how long to wait for the batch to say it is cancelled: Airflow ends
# the trigger 60 s after the timeout (operators/llm.py), and the partial answers must be read before.
CANCEL_WAIT_S = 30.0
UPLOAD_CHUNK_BYTES = 256 << 10
PLAN_YIELD_ITEMS = 1000


class BatchAPI:
    """The Files and Batches API of one connection. Every failure is an :class:`LLMCallError`."""

    def __init__(self, endpoint: Endpoint, first_pause: float = 1.0) -> None:
        self.endpoint = endpoint
        self.base = endpoint.base_url.rstrip("/")
        self.first_pause = first_pause  # before a failed request is sent again; doubles each time

    def _headers(self, json_body: bool = True) -> dict[str, str]:
        headers = self.endpoint.request_headers()
        if not json_body:
            headers.pop("Content-Type", None)
        return headers

    async def _json(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, tries: int = API_TRIES
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        answer = await _patiently(
            lambda: transport.request(
                method, self.base + path, self._headers(), data, REQUEST_TIMEOUT_S, MAX_ANSWER_BYTES
            ),
            self,
            f"{method} {path}",
            tries,
        )
        return _document(answer.body, self.endpoint, f"{method} {path}")

    async def upload(self, lines: Callable[[], AsyncIterator[bytes]], filename: str) -> dict[str, Any]:
        answer = await _patiently(
            lambda: transport.upload(
                self.base + "/files",
                self._headers(False),
                {"purpose": "batch"},
                filename,
                lines(),
                UPLOAD_TIMEOUT_S,
            ),
            self,
            "POST /files",
        )
        return _document(answer.body, self.endpoint, "POST /files")

    async def create(self, file_id: str, window: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        """Sent once: a lost answer may hide a batch the server made (the caller looks before again)."""
        body = {"input_file_id": file_id, "endpoint": batch.ENDPOINT, "completion_window": window}
        return await self._json("POST", "/batches", {**body, "metadata": dict(metadata)}, tries=1)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/batches/{batch_id}/cancel")

    async def find(self, wanted: Mapping[int, Mapping[str, str]]) -> dict[int, dict[str, Any]]:
        """The batches on the server made for these parts (part -> metadata), newest first."""
        found: dict[int, dict[str, Any]] = {}
        oldest = time.time() - FIND_MAX_AGE_S
        after = None
        for _ in range(FIND_PAGES):
            page = await self._json("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            data = page.get("data") or []
            for item in data:
                for part, metadata in wanted.items():
                    if part not in found and batch.same_part(item, metadata):
                        found[part] = item
            if len(found) == len(wanted) or not page.get("has_more") or not data:
                return found
            if (data[-1].get("created_at") or 0) < oldest:
                return found
            after = data[-1].get("id")
        log.warning("LLM batch: looked through %d pages of batches without finding every part", FIND_PAGES)
        return found

    async def delete_file(self, file_id: str) -> None:
        await self._json("DELETE", f"/files/{file_id}", tries=1)

    async def lines(self, file_id: str, on_line: Callable[[bytes], None]) -> None:
        # A download cut short is read again from the start: lines already read are ignored then.
        await _patiently(
            lambda: transport.read_lines(
                f"{self.base}/files/{file_id}/content", self._headers(), UPLOAD_TIMEOUT_S, on_line
            ),
            self,
            f"GET /files/{file_id}/content",
        )


async def _patiently(
    send: Callable[[], Awaitable[transport.Answer | NoAnswer]],
    api: BatchAPI,
    what: str,
    tries: int = API_TRIES,
) -> transport.Answer:
    """Send until a 2xx answer; a 5xx, 429, timeout or lost connection is sent again (``tries`` in all)."""
    pause = api.first_pause
    for tried in range(1, tries + 1):
        answer = await send()
        if isinstance(answer, transport.Answer) and 200 <= answer.status < 300:
            return answer
        error = _error(answer, api.endpoint, what)
        if not error.retryable or tried == tries:
            raise error
        log.warning("LLM batch: %s; trying again in %.0f s", error.message, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, API_MAX_PAUSE_S)
    raise AssertionError("unreachable")


def _error(answer: transport.Answer | NoAnswer, endpoint: Endpoint, what: str) -> LLMCallError:
    if isinstance(answer, NoAnswer):
        kind = "timeout" if answer.kind == "timeout" else "connection"
        detail = protocol.redact(answer.detail, endpoint.secrets) or answer.kind
        return LLMCallError(kind, f"{what} on {endpoint.base_url}: {detail}")
    error = protocol.classify_status(answer.status, answer.body, endpoint.secrets)
    error.message = f"{what}: {error.message}"
    return error


def _document(body: bytes, endpoint: Endpoint, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise LLMCallError(
            "invalid_response", f"{what}: the answer is not a JSON object ({endpoint.base_url})"
        )
    return data


class BatchRun:
    """One fan-out's batches, from submission to records.

    :param save: stores the run's state (``{"fingerprint", "parts", "batches": {part: counts}[,
        "realtime": {item: record}]}``) where a later run finds it (the task's ``llm_batch`` XCom);
        called once each batch exists, when one changes, and after the real-time re-asks.
    :param known: that state as an earlier run stored it, or None.
    """

    def __init__(
        self,
        specs: Sequence[CallSpec | fanout.Record],
        endpoints: Mapping[str, Endpoint],
        options: BatchOptions,
        where: Mapping[str, Any],
        fingerprint: str,
        save: Callable[[dict[str, Any]], Awaitable[None]],
        known: Mapping[str, Any] | None = None,
    ) -> None:
        self.specs = specs
        self.endpoints = endpoints
        self.options = options
        self.where = where
        self.fingerprint = fingerprint
        self.save = save
        self.known = known if known and known.get("fingerprint") == fingerprint else None
        first = next((spec for spec in specs if isinstance(spec, CallSpec)), None)
        self.deadline = first.deadline if isinstance(first, CallSpec) else None
        self.endpoint, self.model = (
            batch.primary(first, endpoints) if isinstance(first, CallSpec) else (None, "")
        )
        # A failed API request is sent again after the poll interval or 1 s, whichever is shorter.
        pause = min(1.0, options.poll_interval)
        self.api = BatchAPI(self.endpoint, pause) if self.endpoint is not None else None
        self.parts: list[list[int]] = []
        self.oversized: dict[int, int] = {}  # item -> its line's bytes, too many for one batch file
        self.batches: dict[int, dict[str, Any]] = {}  # part -> the batch as last retrieved
        self.summary: dict[str, Any] = {}  # llm_meta["batch"], once collected
        self.realtime: dict[str, fanout.Record] = {}  # item -> its successful real-time re-ask's record
        # budget_usd: each part's worst case held before it is sent (a found batch holds nothing:
        # its cost is added once collected), and the parts the budget refused.
        self.held: dict[int, budget.Reservation] = {}
        self.refused: dict[int, LLMCallError] = {}

    # --- the whole run ---

    async def run(self) -> list[fanout.Record]:
        """Every item's record in input order (failed items too). LLMCallError when the API refuses."""
        if self.api is None:  # no usable item: every record is an input error
            return [spec for spec in self.specs if not isinstance(spec, CallSpec)]
        await self._plan()
        await self._submit()
        await self._wait()
        return await self._collect()

    async def _plan(self) -> None:
        sizes = []
        for index in range(len(self.specs)):
            spec = self.specs[index]
            if not isinstance(spec, CallSpec):
                continue
            length = len(batch.request_line(index, spec, self.model))
            sizes.append((index, length))
            if length > self.options.max_bytes:
                self.oversized[index] = length
            if index % PLAN_YIELD_ITEMS == PLAN_YIELD_ITEMS - 1:
                await asyncio.sleep(0)  # the other triggers run between slices of a large input
        self.parts = batch.plan_parts(sizes, self.options.max_requests, self.options.max_bytes)
        log.info(
            "LLM batch: %d items to %s on %r in %d batch(es)",
            sum(len(part) for part in self.parts),
            self.model,
            self.endpoint.conn_id,
            len(self.parts),
        )

    def _metadata(self, part: int) -> dict[str, str]:
        return batch.batch_metadata(self.where, self.fingerprint, part, len(self.parts))

    async def _submit(self) -> None:
        """Find each part's batch (stored ids, then the server's list), and create those not found.

        With ``resubmit``, only this try's batches count: a new try sends again, a restart does not.
        """
        this_try = self.known is not None and self.known.get("try") == self.where.get("try_number")
        stored = (self.known or {}).get("batches") or {} if this_try or not self.options.resubmit else {}
        for part in range(len(self.parts)):
            batch_id = (stored.get(str(part)) or {}).get("id")
            if not batch_id:
                continue
            try:
                found = await self.api.retrieve(batch_id)
            except LLMCallError as exc:
                if exc.status != 404:
                    raise
                continue  # gone from the server (deleted): looked for below, then made again
            if found.get("status") != "failed":
                self.batches[part] = found
        missing = {
            part: batch.wanted(self._metadata(part), self.options.resubmit)
            for part in range(len(self.parts))
            if part not in self.batches
        }
        if missing:
            self.batches.update(await self.api.find(missing))
        if self.batches:
            log.info(
                "LLM batch: found %d of %d batch(es) already submitted", len(self.batches), len(self.parts)
            )
            await self._save()
        for part in range(len(self.parts)):
            if part not in self.batches and await self._reserve(part):
                self.batches[part] = await self._create(part)
                await self._save()  # before the first poll: a restart finds it here
                log.info(batch.describe(part, len(self.parts), self.batches[part]))

    async def _reserve(self, part: int) -> bool:
        """With ``budget_usd``: hold the part's worst case at the batch price, or refuse to send it."""
        if self.endpoint.budget_usd is None:
            return True
        price = pricing.price_of(self.endpoint.prices, self.model)
        if price is None:
            self.refused[part] = batch.unpriced(self.endpoint, self.model)
        else:
            worst = sum(batch.worst_case(self.specs[index], price) for index in self.parts[part])
            held = await budget_store.reserve(self.endpoint, worst)
            if isinstance(held, str):
                self.refused[part] = LLMCallError("budget", held)
            else:
                self.held[part] = held
                return True
        log.warning("LLM batch: part %d not sent: %s", part + 1, self.refused[part].message)
        return False

    async def _settle(self, results: Mapping[int, LineResult]) -> None:
        """Replace each part's held worst case by what its lines cost (unknown: the worst case stays)."""
        if self.endpoint.budget_usd is None:
            return
        for part in self.batches:
            costs = [results[index].cost_usd for index in self.parts[part] if index in results]
            if any(cost is None for cost in costs):
                continue
            period, _ = self.endpoint.budget_usd.period(time.time())
            held = self.held.get(part) or budget.Reservation(self.endpoint.conn_id, period, 0)
            await budget_store.settle(self.endpoint, held, sum(costs))

    async def _create(self, part: int) -> dict[str, Any]:
        indices = self.parts[part]

        async def lines() -> AsyncIterator[bytes]:
            chunk: list[bytes] = []
            size = 0
            for index in indices:
                line = batch.request_line(index, self.specs[index], self.model)
                chunk.append(line)
                size += len(line)
                if size >= UPLOAD_CHUNK_BYTES:
                    yield b"".join(chunk)
                    chunk, size = [], 0
                    await asyncio.sleep(0)  # let the triggerer's other triggers run between chunks
            if chunk:
                yield b"".join(chunk)

        name = f"{self.where.get('dag_id')}.{self.where.get('task_id')}.part{part + 1}.jsonl"
        file = await self.api.upload(lines, name)
        metadata = self._metadata(part)
        pause = self.api.first_pause
        for tries in range(1, API_TRIES + 1):
            try:
                return await self.api.create(file["id"], self.options.completion_window, metadata)
            except LLMCallError as exc:
                if not exc.retryable or tries == API_TRIES:
                    raise
                # The server may have made it before its answer was lost: look before sending again,
                # or the batch would run (and be paid for) twice.
                found = await self.api.find({part: metadata})
                if part in found:
                    return found[part]
                log.warning("LLM batch: %s; trying again in %.0f s", exc.message, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, API_MAX_PAUSE_S)
        raise AssertionError("unreachable")

    async def _save(self) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "parts": len(self.parts),
            "batches": {str(part): batch.counts(found) for part, found in self.batches.items()},
        }
        if self.realtime:
            state["realtime"] = self.realtime
        try:
            await self.save(state)
        except Exception:  # the server's metadata still finds the batch: only the fast path is lost
            log.warning(
                "LLM batch: could not store the batch ids; a restart will look them up", exc_info=True
            )

    async def _wait(self) -> None:
        """Poll every part until each batch has ended; past the deadline, cancel them."""
        interval = self.options.poll_interval
        while True:
            active = [part for part, found in self.batches.items() if found.get("status") not in batch.ENDED]
            if not active:
                return
            if self.deadline is not None and time.time() >= self.deadline:
                log.warning("LLM batch: the task's timeout passed: cancelling %d batch(es)", len(active))
                await self.cancel()
                await self._wait_cancelled()
                return
            pause = (
                interval if self.deadline is None else min(interval, max(0.0, self.deadline - time.time()))
            )
            await asyncio.sleep(pause)
            interval = batch.next_poll(interval, self.options)
            changed = False
            for part in active:
                try:
                    found = await self.api.retrieve(self.batches[part]["id"])
                except LLMCallError as exc:
                    if not exc.retryable:
                        raise
                    # The batch runs on without us: an outage of the API costs a poll, not the task.
                    log.warning(
                        "LLM batch: could not poll (%s); polling again in %.0f s", exc.message, interval
                    )
                    continue
                if batch.counts(found) != batch.counts(self.batches[part]):
                    changed = True
                    line = batch.describe(part, len(self.parts), found)
                    ended = found.get("status") in batch.ENDED
                    log.info(line if ended else f"{line}; next poll in {interval:.0f} s")
                self.batches[part] = found
            if changed:
                await self._save()

    async def cancel(self) -> None:
        """Cancel every batch still running (the task was killed, or timed out)."""
        for part, found in self.batches.items():
            if found.get("status") in batch.ENDED or found.get("status") == "cancelling":
                continue
            try:
                self.batches[part] = await self.api.cancel(found["id"])
                log.warning("LLM batch: cancelled %s", found["id"])
            except LLMCallError as exc:
                log.warning("LLM batch: could not cancel %s: %s", found["id"], exc.message)

    async def _wait_cancelled(self) -> None:
        ends = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < ends:
            active = [part for part, found in self.batches.items() if found.get("status") not in batch.ENDED]
            if not active:
                return
            await asyncio.sleep(min(2.0, self.options.poll_interval))
            for part in active:
                self.batches[part] = await self.api.retrieve(self.batches[part]["id"])

    async def _collect(self) -> list[fanout.Record]:
        """Each item's record from its batch's output and error files; the misses asked again if so chosen."""
        await self._save()
        results: dict[int, LineResult] = {}
        for part, found in self.batches.items():
            expected = set(self.parts[part])

            def on_line(raw: bytes, found: Mapping[str, Any] = found, expected: set[int] = expected) -> None:
                try:
                    line = json.loads(raw)
                except ValueError:
                    log.warning("LLM batch: %s: a line of its files is not JSON; ignored", found.get("id"))
                    return
                index = batch.item_index(
                    line.get("custom_id") if isinstance(line, dict) else None, len(self.specs)
                )
                if index is None or index not in expected or index in results:
                    return
                results[index] = batch.line_record(
                    line, self.specs[index], self.endpoint, self.model, self.options, found["id"]
                )

            for file_id in (found.get("output_file_id"), found.get("error_file_id")):
                if file_id:
                    await self.api.lines(file_id, on_line)
            await self._delete_input(found)
            for index in expected - set(results):
                results[index] = batch.unanswered(found, self.options)
        await self._settle(results)
        for part, refusal in self.refused.items():  # never sent: asking in real time would be refused too
            for index in self.parts[part]:
                results[index] = LineResult(fanout.error_record(refusal), False, 0.0, 0.0)
        for index, length in self.oversized.items():  # never sent: asked in real time, if so chosen
            error = batch.too_large(length, self.options.max_bytes)
            results[index] = LineResult(
                fanout.error_record(error), self.options.retry == "realtime", 0.0, 0.0
            )
        records = [spec if not isinstance(spec, CallSpec) else None for spec in self.specs]
        for index, line in results.items():
            records[index] = line.record
        again = sorted(index for index, line in results.items() if line.again)
        if again and self.deadline is not None and time.time() >= self.deadline:
            log.warning(
                "LLM batch: the task's timeout passed: %d item(s) not asked again in real time", len(again)
            )
            again = []
        if again:
            # Real-time answers an earlier try stored (worker-free mode keeps them): not paid for twice.
            stored = (self.known or {}).get("realtime") or {}
            reused = {i: stored[str(i)] for i in again if _succeeded(stored.get(str(i)))}
            log.info(
                "LLM batch: asking %d item(s) again in real time (batch_retry=realtime); %d answered by "
                "an earlier try",
                len(again) - len(reused),
                len(reused),
            )
            done = {index: record for index, record in enumerate(records) if index not in again}
            realtime = await driver.fan_out(self.specs, self.endpoints, {**done, **reused})
            for index in again:
                if index not in reused:
                    records[index] = batch.merge_realtime(results[index], realtime[index])
                else:
                    records[index] = reused[index]
            self.realtime = {str(i): records[i] for i in again if _succeeded(records[i])}
            await self._save()
        self.summary = batch.summary(list(self.batches.values()), results.values(), len(again), self.options)
        return records

    async def _delete_input(self, found: Mapping[str, Any]) -> None:
        """An ended batch's input file is of no more use (a resubmit uploads its own): deleted, so batches
        do not fill the organization's file storage. The output files stay: a replay reads them again."""
        file_id = found.get("input_file_id")
        if not file_id:
            return
        try:
            await self.api.delete_file(file_id)
        except LLMCallError as exc:
            if exc.status != 404:  # 404: an earlier run of this task deleted it
                log.warning("LLM batch: could not delete the input file %s: %s", file_id, exc.message)


def _succeeded(record: Any) -> bool:
    return isinstance(record, dict) and (record.get("meta") or {}).get("status") == "success"
