"""A batch fan-out is paid for once: a task retry after failed downloads, and kill -9 of its triggerer.

The batch's id is stored (XCom ``llm_batch``) before its first poll, and the batch carries metadata
naming the task instance and its input. A new try finds it again (deferrable: Airflow cleared the try's
XComs, so by the metadata, ``GET /batches``; worker-free: by the stored id), and so does the triggerer
that takes over a killed one's trigger. The fake server counts what matters: batches created and
lines answered twice (tests/e2e/faults/dags/faults_batch.py).
"""

from __future__ import annotations

import json
import time

import pytest

from airflow_llm_async.batches import API_TRIES
from airflow_llm_async.testing.airflow_stack import AirflowApiError
from tests.e2e.faults._support import (
    API_KEY,
    KILL_MODEL,
    chat_requests,
    expected_answer,
    restart_triggerers,
    trigger_starts,
)
from tests.e2e.faults.dags.faults_batch import CONN_ID, KILL_PROMPTS, RETRY_PROMPTS
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

TRIGGERERS = ("triggerer-0", "triggerer-1")
KILL_DAG = "faults_batch_kill"
# Long enough that the batch still waits when the survivor takes the trigger over (about 30 s after
# the kill: [triggerer] triggerer_health_check_threshold, see _support.py).
KILL_BATCH_S = 36.0
RETRY_BATCH_S = 1.0
# Every download of try 1 fails (API_TRIES tries), and the first of try 2 too: try 2 tries again.
DOWNLOAD_FAILURES = API_TRIES + 1


def _prepare(stack, server, **batch_settings) -> None:
    """The connection (once), and the fake server back to its start with these batch settings."""
    body = {
        "connection_id": CONN_ID,
        "conn_type": "llm",
        "host": server.base_url,
        "password": API_KEY,
        "extra": json.dumps({"default_model": KILL_MODEL, "timeout": 30}),
    }
    try:
        stack.api("POST", "connections", json=body)
    except AirflowApiError as err:
        if err.status_code != 409:  # made by an earlier test
            raise
    server.reset()
    server.configure_batches(**batch_settings)


def _check_answers(stack, dag_id: str, run_id: str, task_id: str, prompts: list[str]) -> dict:
    """The task's answers are the fake's, in input order, all from one completed batch; its llm_meta."""
    assert stack.xcom(dag_id, run_id, task_id) == [expected_answer(p) for p in prompts]
    meta = stack.xcom(dag_id, run_id, task_id, key="llm_meta")
    [found] = meta["batch"]["batches"]
    assert (found["status"], found["total"]) == ("completed", len(prompts))
    assert meta["batch"]["realtime_items"] == 0
    assert stack.xcom(dag_id, run_id, task_id, key="llm_batch")["batches"]["0"]["id"] == found["id"]
    return meta


def _batch_stats(server) -> dict:
    stats = server.stats()
    assert chat_requests(stats) == 0, stats  # every answer came from the batch
    return stats["batches"]


@pytest.mark.parametrize("mode", ["deferrable", "worker_free"])
def test_a_task_retry_after_failed_downloads_finds_its_batch(fault_stack, fault_llm, figures, mode):
    stack, server = fault_stack, fault_llm
    dag_id = f"faults_batch_retry_{mode}"
    _prepare(stack, server, batch_processing_s=RETRY_BATCH_S, batch_download_failures=DOWNLOAD_FAILURES)
    stack.wait_for_dag(dag_id, timeout=240)
    stack.unpause(dag_id)
    started = time.monotonic()
    run_id = stack.trigger(dag_id)
    state = stack.wait_for_run(dag_id, run_id, timeout=300)
    took = time.monotonic() - started
    report = stack.describe_run(dag_id, run_id)
    assert state == "success", f"{report}\n{server.stats()}"
    (ti,) = stack.task_instances(dag_id, run_id)
    assert (ti["state"], ti["try_number"]) == ("success", 2), report  # try 1 failed, try 2 succeeded
    if mode == "worker_free":
        assert ti["queued_when"] is None, report  # neither try reached a worker
    first_try = stack.task_log(dag_id, run_id, "retried", try_number=1, contains=("/content: HTTP 500",))
    assert "/content: HTTP 500" in first_try, first_try[-3000:]  # it failed downloading

    _check_answers(stack, dag_id, run_id, "retried", RETRY_PROMPTS[mode])
    stats = _batch_stats(server)
    assert stats["downloads_failed"] == DOWNLOAD_FAILURES, stats
    # Paid for once: one file, one batch, each line answered once.
    assert (stats["files_uploaded"], stats["batches_created"], stats["batches_cancelled"]) == (1, 1, 0), stats
    assert (stats["lines_answered"], stats["lines_answered_twice"]) == (len(RETRY_PROMPTS[mode]), 0), stats
    # Try 2 looked for the stored ids: deferrable, Airflow had cleared the try's XComs (found by the
    # batch's metadata); worker-free, they were there. Seen in the triggerer's log: each 404 of the XCom.
    missing = _stored_ids_missing(stack, dag_id, run_id)
    assert missing == (2 if mode == "deferrable" else 1), (
        f"the triggerers logged {missing} 'XCom not found' for llm_batch (Airflow's client logs each 404)"
    )
    how = "by its metadata (the try's XComs cleared)" if mode == "deferrable" else "by its stored id"
    figures(
        f"batch ({mode.replace('_', '-')}): try 1 failed after {API_TRIES} failed downloads, try 2 found "
        f"the batch {how}; new batches: 0, lines answered twice: 0; run took {took:.0f} s"
    )


def _stored_ids_missing(stack, dag_id: str, run_id: str) -> int:
    """How often a trigger of the run looked for its stored batch ids and found none (the triggerer's
    supervisor logs each 404 of XCom ``llm_batch``)."""
    line = f"key='llm_batch' map_index=-1 not found for task 'retried' in DAG run '{run_id}' of '{dag_id}'"
    return sum(stack.log_path(name).read_text(errors="replace").count(line) for name in TRIGGERERS)


def _holder(stack, task_id: str) -> str:
    """The triggerer process that started the worker-free trigger of ``task_id`` (its log says so)."""
    line = f"Start from trigger enabled for task {task_id}"
    holders = [name for name in TRIGGERERS if line in stack.log_path(name).read_text(errors="replace")]
    assert len(holders) == 1, f"{line!r} in the logs of {holders}"
    return holders[0]


def _owner(stack, dag_id: str, run_id: str) -> int | None:
    (ti,) = stack.task_instances(dag_id, run_id)
    return (ti.get("trigger") or {}).get("triggerer_id")


def test_kill_9_of_the_triggerer_while_a_batch_waits_creates_no_new_batch(fault_stack, fault_llm, figures):
    stack, server = fault_stack, fault_llm
    restart_triggerers(stack)  # an earlier test may have killed one
    _prepare(stack, server, batch_processing_s=KILL_BATCH_S)
    stack.wait_for_dag(KILL_DAG, timeout=240)
    stack.unpause(KILL_DAG)
    run_id = stack.trigger(KILL_DAG)

    def stored() -> bool:
        try:
            return bool(stack.xcom(KILL_DAG, run_id, "waits", key="llm_batch")["batches"])
        except AirflowApiError as err:
            if err.status_code != 404:
                raise
            return False

    # The batch exists and its id is stored: the moment a restart must not pay for it again.
    wait_for(
        lambda: server.stats()["batches"]["batches_created"] == 1 and stored(),
        240,
        "the batch created and its id stored",
        lambda: f"{server.stats()}\n{stack.describe_run(KILL_DAG, run_id)}",
    )
    dead_job = _owner(stack, KILL_DAG, run_id)
    victim = _holder(stack, "waits")
    assert dead_job is not None
    stack.kill_process(victim)  # SIGKILL to the triggerer's whole process group
    killed_at = time.monotonic()
    waited = stack.xcom(KILL_DAG, run_id, "waits", key="llm_batch")["batches"]["0"]

    # The survivor takes the trigger over once the dead job's heartbeat is old enough.
    survivor_job = wait_for(
        lambda: (job := _owner(stack, KILL_DAG, run_id)) not in (None, dead_job) and job,
        120,
        f"the trigger moved off job {dead_job} (killed {victim})",
        lambda: f"{server.stats()}\n{stack.describe_run(KILL_DAG, run_id)}\n{stack.process_logs()}",
    )
    takeover_s = time.monotonic() - killed_at
    # Still waiting then? The batch ends KILL_BATCH_S after it was created (the server's clock is ours).
    waiting_at_takeover = time.time() < waited["created_at"] + KILL_BATCH_S

    state = stack.wait_for_run(KILL_DAG, run_id, timeout=300)
    finished_s = time.monotonic() - killed_at
    report = stack.describe_run(KILL_DAG, run_id)
    assert state == "success", f"{report}\n{server.stats()}\n{stack.process_logs()}"
    (ti,) = stack.task_instances(KILL_DAG, run_id)
    assert (ti["state"], ti["try_number"]) == ("success", 1), report  # finished by the survivor, same try
    assert trigger_starts(stack, KILL_DAG, run_id)["waits"] == [dead_job, survivor_job]

    meta = _check_answers(stack, KILL_DAG, run_id, "waits", KILL_PROMPTS)
    assert meta["batch"]["batches"][0]["id"] == waited["id"]  # the batch the dead triggerer created
    stats = _batch_stats(server)
    # kill -9 runs no on_kill: the batch was not cancelled, and nothing was sent again.
    assert (stats["files_uploaded"], stats["batches_created"], stats["batches_cancelled"]) == (1, 1, 0), stats
    assert (stats["lines_answered"], stats["lines_answered_twice"]) == (len(KILL_PROMPTS), 0), stats
    figures(
        f"batch: kill -9 {victim} (job {dead_job}) while a {KILL_BATCH_S:.0f} s batch of {len(KILL_PROMPTS)} "
        f"items waited; job {survivor_job} took the trigger over {takeover_s:.0f} s after the kill (the "
        f"batch {'still waiting' if waiting_at_takeover else 'already done'}) and re-attached: new batches "
        f"0, lines answered twice 0; run finished {finished_s:.0f} s after the kill, try 1"
    )
