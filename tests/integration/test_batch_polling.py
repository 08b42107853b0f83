"""A poll that fails costs a poll, not the task: BatchTrigger against the fake server's Batch API while
``GET /batches/{id}`` answers 500 more often than one request's tries (``batches.API_TRIES``).

Every other Files/Batches request that fails this way is sent again, ``API_TRIES`` times in all, and
then fails the task (docs/batch.md, "Failures and quality, per item"); a poll is the exception
(``BatchRun._wait``): it logs ``LLM batch: could not poll (...)`` and polls again at the next interval,
because the batch runs on at the server whether we look at it or not.
"""

from __future__ import annotations

import httpx
from airflow.triggers.base import TaskSuccessEvent

from airflow_llm_async.batches import API_TRIES
from airflow_llm_async.testing.fake_server import compose_answer
from tests.integration.test_batch_trigger import (  # noqa: F401 (fixtures)
    PROMPTS,
    _configure,
    batch_llm,
    batch_stats,
    batch_trigger,
    events_of,
    xcoms,
)

# More failed retrieves than one poll's tries: the first poll gives up, the second gets through.
RETRIEVE_FAILURES = API_TRIES + 4
# Long enough that every failed retrieve comes while the batch is in progress (in_progress until 90 %).
PROCESSING_S = 2.0


async def test_a_poll_that_fails_is_logged_and_the_next_poll_finds_the_batch(batch_llm, xcoms, caplog):  # noqa: F811
    await _configure(
        batch_llm, {"batch_processing_s": PROCESSING_S, "batch_retrieve_failures": RETRIEVE_FAILURES}
    )
    # Pauses between a failed request's tries: the poll interval (0.02 s), doubling. The failures take
    # about 1 s: 0.62 s for the first poll's 6 tries, 0.3 s for the next poll's 4.
    trigger = batch_trigger(batch_poll_interval=0.02, batch_poll_max_interval=0.05)

    events = await events_of(trigger)

    assert len(events) == 1 and isinstance(events[0], TaskSuccessEvent), events
    assert xcoms.values["return_value"] == [compose_answer("", p) for p in PROMPTS]
    stats = batch_stats(batch_llm)
    assert stats["retrieves_failed"] == RETRIEVE_FAILURES, stats
    assert (stats["batches_created"], stats["batches_cancelled"], stats["lines_answered_twice"]) == (1, 0, 0)
    assert stats["lines_answered"] == len(PROMPTS)
    async with httpx.AsyncClient() as client:  # every failure was used up
        settings = (await client.get(f"{batch_llm.url}/_fake/batches")).json()
    assert settings["batch_retrieve_failures"] == 0
    meta = xcoms.values["llm_meta"]
    assert [b["status"] for b in meta["batch"]["batches"]] == ["completed"]
    assert meta["totals"]["succeeded"] == len(PROMPTS) and meta["batch"]["realtime_items"] == 0

    log = caplog.text
    batch_id = meta["batch"]["batches"][0]["id"]
    # One poll gave up after its tries (API_TRIES failures); the next got through after the other four.
    assert log.count("LLM batch: could not poll (") == 1, log
    assert f"could not poll (GET /batches/{batch_id}: HTTP 500" in log, log
    assert log.count(f"GET /batches/{batch_id}: HTTP 500") == RETRIEVE_FAILURES, log
    # ... while the batch was still in progress: the first poll that got through saw it so.
    assert log.index("could not poll") < log.index(f"{batch_id}: in_progress"), log
