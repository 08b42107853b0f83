"""The fake server's Files and Batches APIs, driven by the official ``openai`` client (raw HTTP only for
what the client cannot send), on 127.0.0.1 only. Batches run in 0.2 s; waits poll with a bound."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from airflow_llm_async.testing.fake_batches import BatchSettings, BatchStore
from airflow_llm_async.testing.fake_server import FakeLLMServer, create_app, main

KEY = "sk-fake-batch-test-key-2c9e"
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
    "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
    "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata", "model",
    "usage",
}  # fmt: skip


@asynccontextmanager
async def serve(**kwargs: Any) -> AsyncIterator[tuple[FakeLLMServer, AsyncOpenAI]]:
    kwargs.setdefault("batch_processing_s", 0.2)
    async with (
        FakeLLMServer(api_key=KEY, **kwargs) as srv,
        AsyncOpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=10) as client,
    ):
        yield srv, client


def request(custom_id: str, text: str, model: str = "gpt-4", **body: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}


def items(n: int, model: str = "gpt-4") -> list[dict[str, Any]]:
    return [
        request(f"item-{i}", f"Summarize: report number {i} on the harbour works.", model) for i in range(n)
    ]


async def upload(client: AsyncOpenAI, lines: list[Any], name: str = "batch.jsonl") -> Any:
    data = "".join(
        (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines
    )
    return await client.files.create(file=(name, data.encode()), purpose="batch")


async def start(client: AsyncOpenAI, lines: list[Any], **kwargs: Any) -> Any:
    file = await upload(client, lines)
    return await client.batches.create(
        input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h", **kwargs
    )


async def poll(
    client: AsyncOpenAI, batch_id: str, until: Callable[[Any], bool], timeout: float = 3.0
) -> list[Any]:
    """Retrieve the batch until ``until(batch)`` holds: every batch retrieved, the last one the first
    that satisfied it. Fails rather than hangs."""
    history = []
    async with asyncio.timeout(timeout):
        while True:
            history.append(await client.batches.retrieve(batch_id))
            if until(history[-1]):
                return history
            await asyncio.sleep(0.005)


async def finished(client: AsyncOpenAI, batch_id: str) -> tuple[Any, list[str]]:
    """The batch once it is over, and the statuses it went through on the way."""
    history = await poll(client, batch_id, lambda batch: batch.status in TERMINAL)
    seen = [batch.status for batch in history]
    return history[-1], [status for i, status in enumerate(seen) if i == 0 or seen[i - 1] != status]


async def lines_of(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in (await client.files.content(file_id)).text.splitlines()]


# --- a batch's life ---------------------------------------------------------------------------


async def test_a_batch_answers_each_line_as_the_chat_endpoint_does() -> None:
    lines = [
        request("en", "Summarize: the quick brown fox jumps over the lazy dog."),
        request("zh", "请总结：今天的港口工程进展顺利。"),
        request("short", "Analyse the quarterly figures for the harbour.", max_tokens=5),
        request("json", "Give the answer as JSON.", response_format={"type": "json_object"}),
    ]
    async with serve() as (srv, client):
        created = await start(client, lines, metadata={"dag_id": "fanout", "run": "1"})
        assert created.status == "validating"
        assert created.request_counts.total == 0
        batch, seen = await finished(client, created.id)

        assert seen[-1] == "completed"  # polls see the stages in order (a busy machine may skip some)
        assert seen == sorted(seen, key=["validating", "in_progress", "finalizing", "completed"].index)
        raw = (await client.batches.with_raw_response.retrieve(batch.id)).http_response.json()
        assert set(raw) == BATCH_FIELDS
        assert raw["object"] == "batch" and raw["id"].startswith("batch_")
        assert (batch.endpoint, batch.completion_window, batch.model) == (ENDPOINT, "24h", "gpt-4")
        assert batch.metadata == {"dag_id": "fanout", "run": "1"}
        assert batch.errors is None and batch.error_file_id is None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
            4,
            4,
            0,
        )
        assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
        assert batch.expires_at == batch.created_at + 24 * 3600

        output = await lines_of(client, batch.output_file_id)
        assert [line["custom_id"] for line in output] == ["en", "zh", "short", "json"]
        usage = {"input_tokens": 0, "output_tokens": 0}
        for line, sent in zip(output, lines, strict=True):
            assert set(line) == {"id", "custom_id", "response", "error"}
            assert line["id"].startswith("batch_req_") and line["error"] is None
            assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
            body = line["response"]["body"]
            direct = await client.chat.completions.create(**sent["body"])
            assert body["object"] == "chat.completion" and body["model"] == direct.model
            assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
            assert body["choices"][0]["finish_reason"] == direct.choices[0].finish_reason
            assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens
            usage["input_tokens"] += body["usage"]["prompt_tokens"]
            usage["output_tokens"] += body["usage"]["completion_tokens"]
        assert re.search(
            r"[\u4e00-\u9fff]", output[1]["response"]["body"]["choices"][0]["message"]["content"]
        )
        assert output[2]["response"]["body"]["choices"][0]["finish_reason"] == "length"
        assert (batch.usage.input_tokens, batch.usage.output_tokens) == tuple(usage.values())

        output_file = await client.files.retrieve(batch.output_file_id)
        assert (output_file.purpose, output_file.filename) == ("batch_output", f"{batch.id}_output.jsonl")
        assert srv.stats()["batches"] == {
            "files_uploaded": 1,
            "batches_created": 1,
            "batches_cancelled": 0,
            "lines_answered": 4,
            "lines_failed": 0,
            "lines_answered_twice": 0,
            "downloads_failed": 0,
            "retrieves_failed": 0,
            "files_stored": 2,  # the input and the output; no line failed, so no error file
        }


async def test_request_counts_grow_while_the_batch_is_in_progress() -> None:
    async with serve(batch_processing_s=0.5) as (_, client):
        created = await start(client, items(40))
        history = await poll(client, created.id, lambda batch: batch.status in TERMINAL)

        counts = [batch.request_counts.completed for batch in history if batch.status == "in_progress"]
        assert counts == sorted(counts)
        assert any(0 < count < 40 for count in counts)
        assert history[-1].request_counts.completed == 40


# --- faults per line --------------------------------------------------------------------------


async def test_a_models_fault_rule_applies_per_line_and_errors_go_to_the_error_file() -> None:
    async with serve(faults={"gpt-4": "503%20"}) as (srv, client):
        batch, _ = await finished(client, (await start(client, items(100))).id)

        output = await lines_of(client, batch.output_file_id)
        errors = await lines_of(client, batch.error_file_id)
        failed = srv.stats()["faults_applied"]["503"]
        assert len(errors) == failed == batch.request_counts.failed and 5 <= failed <= 40
        assert len(output) == batch.request_counts.completed == 100 - failed
        for line in errors:
            assert line["error"] is None and line["response"]["status_code"] == 503
            assert line["response"]["body"]["error"]["type"] == "server_error"
        assert {line["custom_id"] for line in output + errors} == {f"item-{i}" for i in range(100)}
        assert srv.stats()["batches"]["lines_failed"] == failed


async def test_content_faults_answer_200_and_unwritable_ones_500() -> None:
    faults = {"gpt-4": "short", "gpt-4o": "refusal", "gpt-4o-mini": "stall", "gpt-3.5-turbo": "429*1"}
    async with serve(faults=faults) as (_, client):
        lines = [
            request(model, "Summarize: the harbour works report.", model)
            for model in ("gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "gpt-99")
        ]
        batches = [await start(client, [line]) for line in lines]  # a batch uses one model
        answers = {}
        for created in batches:
            batch, _ = await finished(client, created.id)
            [answer] = await lines_of(client, batch.output_file_id) + await lines_of(
                client, batch.error_file_id
            )
            answers[answer["custom_id"]] = answer["response"]

        assert answers["gpt-4"]["status_code"] == 200
        assert len(answers["gpt-4"]["body"]["choices"][0]["message"]["content"]) < 50
        assert answers["gpt-4o"]["body"]["choices"][0]["message"]["content"].startswith("Sorry")
        assert answers["gpt-4o-mini"]["status_code"] == 500  # a stall cannot be written to a file
        assert answers["gpt-3.5-turbo"]["status_code"] == 429
        assert answers["gpt-3.5-turbo"]["body"]["error"]["code"] == "rate_limit_exceeded"
        assert answers["gpt-99"]["status_code"] == 404
        assert answers["gpt-99"]["body"]["error"]["code"] == "model_not_found"


# --- expiry, validation, cancel ---------------------------------------------------------------


async def test_an_expired_batch_keeps_the_answered_lines_and_lists_the_rest_as_expired() -> None:
    async with serve(batch_expire_after=0.5) as (_, client):
        batch, seen = await finished(client, (await start(client, items(10))).id)

        assert seen[-1] == "expired" and batch.expired_at is not None
        assert (batch.request_counts.total, batch.request_counts.completed) == (10, 5)
        output = await lines_of(client, batch.output_file_id)
        expired = await lines_of(client, batch.error_file_id)
        assert [line["custom_id"] for line in output] == [f"item-{i}" for i in range(5)]
        assert [line["custom_id"] for line in expired] == [f"item-{i}" for i in range(5, 10)]
        for line in expired:
            assert line["response"] is None and line["error"]["code"] == "batch_expired"


async def test_forced_validation_failure_set_at_runtime() -> None:
    async with serve() as (srv, client), aiohttp.ClientSession(base_url=srv.url) as http:
        async with http.post("/_fake/batches", json={"batch_fail_validation": True}) as resp:
            assert resp.status == 200
            assert (await resp.json())["batch_fail_validation"] is True
        async with http.get("/_fake/batches") as resp:
            assert await resp.json() == {
                "batch_processing_s": 0.2,
                "batch_expire_after": None,
                "batch_fail_validation": True,
                "batch_max_requests": 50_000,
                "batch_max_file_bytes": 200 * 2**20,
                "batch_download_failures": 0,
                "batch_retrieve_failures": 0,
            }
        created = await start(client, items(3))
        batch, seen = await finished(client, created.id)

        assert created.status == "validating" and seen[-1] == "failed"
        assert batch.failed_at is not None and batch.in_progress_at is None
        [error] = batch.errors.data
        assert (error.code, error.line) == ("token_limit_exceeded", None)
        assert batch.output_file_id is None and batch.error_file_id is None
        assert srv.stats()["batches"]["lines_answered"] == 0


async def test_bad_lines_fail_validation_naming_each_line() -> None:
    lines = [
        request("ok", "Summarize: fine."),
        "{not json",
        {k: v for k, v in request("x", "no id").items() if k != "custom_id"},
        request("ok", "Summarize: same id again."),
        {**request("url", "Summarize: wrong url."), "url": "/v1/embeddings"},
        request("other-model", "Summarize: another model.", model="gpt-4o"),
    ]
    async with serve() as (_, client):
        batch, _ = await finished(client, (await start(client, lines)).id)

        assert batch.status == "failed" and batch.request_counts.total == 0
        found = [(e.line, e.code, e.param) for e in batch.errors.data]
        assert found == [
            (2, "invalid_json_line", None),
            (3, "missing_required_parameter", "custom_id"),
            (4, "duplicate_custom_id", "custom_id"),
            (5, "url_mismatch", "url"),
            (6, "model_mismatch", "body.model"),
        ]


async def test_create_refuses_what_openai_refuses() -> None:
    async with serve() as (_, client):
        good = await upload(client, items(1))
        other = await client.files.create(file=("notes.jsonl", b"{}\n"), purpose="user_data")
        create = client.batches.create
        for kwargs, param in [
            (
                {"input_file_id": good.id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
                "endpoint",
            ),
            (
                {"input_file_id": good.id, "endpoint": ENDPOINT, "completion_window": "48h"},
                "completion_window",
            ),
            (
                {"input_file_id": "file-missing", "endpoint": ENDPOINT, "completion_window": "24h"},
                "input_file_id",
            ),
            ({"input_file_id": other.id, "endpoint": ENDPOINT, "completion_window": "24h"}, "input_file_id"),
            (
                {
                    "input_file_id": good.id,
                    "endpoint": ENDPOINT,
                    "completion_window": "24h",
                    "metadata": {"k": "v" * 513},
                },
                "metadata",
            ),
        ]:
            with pytest.raises(openai.BadRequestError) as caught:
                await create(**kwargs)
            assert caught.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
            await upload(client, items(1), name="batch.txt")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await client.files.create(file=("a.jsonl", b"{}\n"), purpose="weights")  # type: ignore[arg-type]


async def test_cancel_keeps_the_answered_lines_and_lists_the_rest_as_cancelled() -> None:
    async with serve(batch_processing_s=1.0) as (srv, client):
        created = await start(client, items(20))
        await poll(client, created.id, lambda batch: batch.request_counts.completed >= 3)
        cancelling = await client.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        answered = cancelling.request_counts.completed
        assert 3 <= answered < 20
        batch, seen = await finished(client, created.id)

        assert seen[-1] == "cancelled" and batch.cancelled_at is not None
        assert batch.request_counts.completed == answered
        output = await lines_of(client, batch.output_file_id)
        cancelled = await lines_of(client, batch.error_file_id)
        assert len(output) == answered and len(output) + len(cancelled) == 20
        assert {line["error"]["code"] for line in cancelled} == {"batch_cancelled"}
        assert srv.stats()["batches"]["batches_cancelled"] == 1
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status 'cancelled'"):
            await client.batches.cancel(created.id)

        srv.configure_batches(batch_processing_s=0)  # for the batches created from now on
        done, _ = await finished(client, (await start(client, items(1))).id)
        with pytest.raises(openai.BadRequestError, match="status 'completed'"):
            await client.batches.cancel(done.id)
        with pytest.raises(openai.NotFoundError):
            await client.batches.cancel("batch_missing")


# --- listing, files, limits, stats ------------------------------------------------------------


async def test_batches_are_listed_newest_first_in_pages() -> None:
    async with serve() as (_, client):
        ids = [(await start(client, items(1), metadata={"n": str(i)})).id for i in range(5)]

        page = await client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[:2:-1][:2] == [ids[4], ids[3]]
        assert page.has_more is True and page.last_id == ids[3]
        raw = (await client.batches.with_raw_response.list(limit=2, after=ids[3])).http_response.json()
        assert set(raw) == {"object", "data", "first_id", "last_id", "has_more"}
        assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == (
            "list",
            ids[2],
            ids[1],
            True,
        )
        last = await client.batches.list(limit=2, after=ids[1])
        assert [b.id for b in last.data] == [ids[0]] and last.has_more is False
        every = [b async for b in client.batches.list(limit=2)]  # the client follows the cursor
        assert [b.id for b in every] == ids[::-1]
        assert [b.metadata for b in every] == [{"n": str(i)} for i in range(4, -1, -1)]
        with pytest.raises(openai.BadRequestError):
            await client.batches.list(limit=101)


async def test_files_can_be_retrieved_downloaded_and_deleted() -> None:
    async with serve() as (_, client):
        content = b'{"custom_id": "a"}\n'
        file = await client.files.create(file=("in.jsonl", content), purpose="batch")
        assert file.id.startswith("file-") and (file.bytes, file.filename, file.purpose) == (
            19,
            "in.jsonl",
            "batch",
        )
        assert file.status == "processed" and file.expires_at == file.created_at + 30 * 24 * 3600
        assert (await client.files.retrieve(file.id)).model_dump() == file.model_dump()
        assert (await client.files.content(file.id)).content == content

        deleted = await client.files.delete(file.id)
        assert (deleted.id, deleted.object, deleted.deleted) == (file.id, "file", True)
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(file.id)


async def test_download_failures_answer_500_counted_down_then_the_content() -> None:
    async with serve() as (srv, client), aiohttp.ClientSession(base_url=srv.url) as http:
        batch, _ = await finished(client, (await start(client, items(2))).id)
        async with http.post("/_fake/batches", json={"batch_download_failures": 2}) as resp:
            assert (await resp.json())["batch_download_failures"] == 2
        for left in (1, 0):
            with pytest.raises(openai.InternalServerError) as caught:
                await client.files.content(batch.output_file_id)
            assert caught.value.status_code == 500
            assert caught.value.body["type"] == "server_error"  # OpenAI's shape of a server error
            assert srv.stats()["batches"]["downloads_failed"] == 2 - left
            assert srv.configure_batches()["batch_download_failures"] == left
        assert [line["custom_id"] for line in await lines_of(client, batch.output_file_id)] == [
            "item-0",
            "item-1",
        ]
        assert srv.stats()["batches"]["downloads_failed"] == 2
        assert srv.stats()["batches"]["lines_answered"] == 2  # a failed download answers nothing again

    # At start-up (a create_app keyword, a CLI flag), and re-armed by a reset.
    async with serve(batch_download_failures=1) as (srv, client):
        file = await upload(client, items(1))
        with pytest.raises(openai.InternalServerError):
            await client.files.content(file.id)
        assert (await client.files.content(file.id)).content
        srv.reset()
        assert srv.configure_batches()["batch_download_failures"] == 1


async def test_retrieve_failures_answer_500_counted_down_then_the_batch() -> None:
    async with serve() as (srv, client), aiohttp.ClientSession(base_url=srv.url) as http:
        batch, _ = await finished(client, (await start(client, items(2))).id)
        async with http.post("/_fake/batches", json={"batch_retrieve_failures": 2}) as resp:
            assert (await resp.json())["batch_retrieve_failures"] == 2
        # Listing and downloading are not retrieves: they answer as ever and count nothing down.
        assert [b.id for b in (await client.batches.list()).data] == [batch.id]
        assert len(await lines_of(client, batch.output_file_id)) == 2
        assert srv.configure_batches()["batch_retrieve_failures"] == 2
        for left in (1, 0):
            with pytest.raises(openai.InternalServerError) as caught:
                await client.batches.retrieve(batch.id)
            assert caught.value.status_code == 500
            assert caught.value.body["type"] == "server_error"  # OpenAI's shape of a server error
            assert srv.stats()["batches"]["retrieves_failed"] == 2 - left
            assert srv.configure_batches()["batch_retrieve_failures"] == left
        retrieved = await client.batches.retrieve(batch.id)
        assert (retrieved.id, retrieved.status) == (batch.id, "completed")
        assert srv.stats()["batches"]["retrieves_failed"] == 2
        assert srv.stats()["batches"]["downloads_failed"] == 0

    # At start-up (a create_app keyword, a CLI flag), and re-armed by a reset.
    async with serve(batch_retrieve_failures=1) as (srv, client):
        created = await start(client, items(1))
        with pytest.raises(openai.InternalServerError):
            await client.batches.retrieve(created.id)
        assert (await client.batches.retrieve(created.id)).id == created.id
        srv.reset()
        assert srv.configure_batches()["batch_retrieve_failures"] == 1
        assert srv.stats()["batches"]["retrieves_failed"] == 0
    from airflow_llm_async.testing.fake_server import _batch_args, _parse_args

    assert _batch_args(_parse_args(["--batch-retrieve-failures", "3"]))["batch_retrieve_failures"] == 3


async def test_an_upload_is_read_as_a_stream_without_content_length() -> None:
    line = json.dumps(request("streamed", "Summarize: sent in chunks.")).encode() + b"\n"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield line

    async with serve() as (srv, client), aiohttp.ClientSession(base_url=srv.url) as http:
        with aiohttp.MultipartWriter("form-data") as form:
            form.append("batch").set_content_disposition("form-data", name="purpose")
            form.append(chunks()).set_content_disposition("form-data", name="file", filename="s.jsonl")
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.post("/v1/files", data=form, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert "Content-Length" not in resp.request_info.headers
            assert resp.request_info.headers["Transfer-Encoding"] == "chunked"
            file = await resp.json()
        assert file["bytes"] == 100 * len(line)
        assert (await client.files.content(file["id"])).content == 100 * line


async def test_over_the_limits_an_upload_is_refused_or_the_batch_fails() -> None:
    async with serve(batch_max_requests=3, batch_max_file_bytes=1000) as (_, client):
        batch, _ = await finished(client, (await start(client, items(4))).id)
        [error] = batch.errors.data
        assert batch.status == "failed" and error.code == "too_many_tasks"

        with pytest.raises(openai.BadRequestError, match="File is too large"):
            await upload(client, items(20))  # about 2,000 bytes
        other = await client.files.create(file=("big.jsonl", b"x" * 2000), purpose="user_data")
        assert other.bytes == 2000  # the limit is the Batch API's


async def test_stats_count_lines_answered_twice_and_reset_clears_everything() -> None:
    async with (
        serve(faults={"gpt-4": "503*1"}) as (srv, client),
        aiohttp.ClientSession(base_url=srv.url) as http,
    ):
        first, _ = await finished(client, (await start(client, items(3))).id)
        [failed] = await lines_of(client, first.error_file_id)
        assert failed["custom_id"] == "item-0"
        # Again: item-0 failed the first time (a retry), item-1 and item-2 were answered already.
        second, _ = await finished(client, (await start(client, [*items(3), *items(5)[3:]])).id)
        assert second.request_counts.completed == 5
        assert srv.stats()["batches"]["lines_answered"] == 8
        assert srv.stats()["batches"]["lines_answered_twice"] == 2

        async with http.post("/_fake/reset") as resp:
            assert (await resp.json())["batches"]["lines_answered"] == 0
        assert srv.stats()["batches"] == dict.fromkeys(srv.stats()["batches"], 0)
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(first.output_file_id)


async def test_every_batch_route_needs_the_key() -> None:
    async with (
        serve() as (srv, _),
        AsyncOpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0) as client,
    ):
        with pytest.raises(openai.AuthenticationError):
            await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        for call in (
            client.batches.list(),
            client.batches.retrieve("batch_x"),
            client.batches.cancel("batch_x"),
            client.files.retrieve("file-x"),
            client.files.content("file-x"),
            client.files.delete("file-x"),
            client.batches.create(input_file_id="file-x", endpoint=ENDPOINT, completion_window="24h"),
        ):
            with pytest.raises(openai.AuthenticationError):
                await call
        assert srv.stats()["by_status"] == {"401": 8}


async def test_settings_are_checked_everywhere_they_are_given(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (
        {"batch_processing_s": -1},
        {"batch_expire_after": 1.5},
        {"batch_max_requests": 0},
        {"batch_fail_validation": "yes"},
        {"batch_download_failures": -1},
        {"batch_retrieve_failures": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_app(**bad)
    with pytest.raises(SystemExit):
        main(["--batch-expire-after", "2"])
    assert "batch_expire_after" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batch-download-failures", "-1"])
    assert "batch_download_failures" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batch-retrieve-failures", "-1"])
    assert "batch_retrieve_failures" in capsys.readouterr().err
    async with serve() as (srv, _), aiohttp.ClientSession(base_url=srv.url) as http:
        for body in ({"batch_processing_s": -1}, {"no_such_setting": 1}, [1]):
            async with http.post("/_fake/batches", json=body) as resp:
                assert resp.status == 400
        assert srv.configure_batches(batch_expire_after=0.25)["batch_expire_after"] == 0.25
        srv.reset()  # back to the start-up settings
        async with http.get("/_fake/batches") as resp:
            assert (await resp.json())["batch_expire_after"] is None


# --- the rules, with no server ----------------------------------------------------------------


TIMELINES = [  # settings, then (seconds after creation, status, lines answered) of 10 lines
    ({}, [(0.0, "validating", 0), (0.1, "in_progress", 0), (0.5, "in_progress", 5)]),
    ({}, [(0.89, "in_progress", 9), (0.9, "finalizing", 10), (1.0, "completed", 10)]),
    ({"batch_expire_after": 0.3}, [(0.3, "in_progress", 2), (0.34, "expired", 3), (5.0, "expired", 3)]),
    ({"batch_fail_validation": True}, [(0.05, "validating", 0), (0.1, "failed", 0)]),
    ({"batch_processing_s": 0}, [(0.0, "completed", 10)]),
]


@pytest.mark.parametrize(("settings", "expected"), TIMELINES)
async def test_a_batchs_timeline(settings: dict[str, Any], expected: list[tuple[float, str, int]]) -> None:
    store = BatchStore(BatchSettings(**settings), answer=lambda body: (200, {}))
    data = "".join(json.dumps(line) + "\n" for line in items(10)).encode()
    file = store.upload("batch", "in.jsonl", bytearray(data), too_large=False)
    created = await store.create(
        {"input_file_id": file["id"], "endpoint": ENDPOINT, "completion_window": "24h"}
    )
    batch = store.batches[created["id"]]
    assert [(t, *batch.timeline(t)[:2]) for t, _, _ in expected] == expected
