"""kill -9 of the triggerer running a fan-out mid-way: the survivor calls only the unfinished items.

The fan-out pushes the records of finished items as XCom parts while it runs (every
``FLUSH_INTERVAL_S``). The killed triggerer's trigger moves to the other triggerer once the dead
job's heartbeat is older than ``[triggerer] triggerer_health_check_threshold`` (see ``_support.py``);
the survivor reads the parts back and calls only the items they do not hold. Replayed calls are the
ones the dead triggerer had in flight or had finished since its last part.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pytest

from airflow_llm_async.testing.fake_server import LATENCY_HEADER
from tests.e2e.faults._support import (
    API_KEY,
    chat_requests,
    connections_to,
    expected_answer,
    restart_triggerers,
)
from tests.e2e.faults.dags.faults_kill_fanout import ITEMS, PROMPTS
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

DAG_ID = "faults_kill_fanout"
TASK = "fan_out"
CONN_ID = "llm_fanout_kill"
CONCURRENCY = 20
LATENCY_S = 2
TRIGGERERS = ("triggerer-0", "triggerer-1")


def _create_connection(stack, base_url: str) -> None:
    extra = {
        "default_model": "gpt-4",
        "timeout": 60,
        "max_concurrency": CONCURRENCY,
        "headers": {LATENCY_HEADER: str(LATENCY_S)},
    }
    body = {"connection_id": CONN_ID, "conn_type": "llm", "host": base_url, "password": API_KEY}
    stack.api("POST", "connections", json={**body, "extra": json.dumps(extra)})


def _stored_records(stack, run_id: str) -> int:
    """Items whose records the fan-out has pushed as progress parts so far."""
    path = f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK}/xcomEntries"
    keys = [x["key"] for x in stack.api("GET", path, params={"limit": 100})["xcom_entries"]]
    parts = [stack.xcom(DAG_ID, run_id, TASK, key=key) for key in keys if key.startswith("llm_fanout_part_")]
    return len({index for part in parts for index in part["records"]})


def test_kill_9_mid_fan_out_replays_only_the_unfinished_items(fault_stack, fault_llm, figures):
    stack, server = fault_stack, fault_llm
    restart_triggerers(stack)  # an earlier test may have killed one
    _create_connection(stack, server.base_url)
    stack.wait_for_dag(DAG_ID, timeout=240)
    stack.unpause(DAG_ID)
    server.reset()
    run_id = stack.trigger(DAG_ID)
    # Mid-way: some waves answered and stored, others still to come.
    wait_for(
        lambda: _stored_records(stack, run_id) >= 60,
        300,
        "60 items stored as progress",
        lambda: f"{server.stats()}\n{stack.describe_run(DAG_ID, run_id)}",
    )
    port = urlsplit(server.base_url).port
    calls = {name: connections_to(stack.pid(name), port) for name in TRIGGERERS}
    victim = max(TRIGGERERS, key=lambda name: calls[name])  # the one whose calls are in flight
    stored = _stored_records(stack, run_id)
    stack.kill_process(victim)  # SIGKILL to the triggerer's whole process group
    killed_at = time.monotonic()
    sent_before = chat_requests(server.stats())
    assert stored < ITEMS and sent_before < ITEMS, (stored, sent_before)  # it was killed mid-way

    state = stack.wait_for_run(DAG_ID, run_id, timeout=300)
    report = stack.describe_run(DAG_ID, run_id)
    assert state == "success", f"{report}\n{stack.process_logs()}"
    (ti,) = stack.task_instances(DAG_ID, run_id)
    assert (ti["state"], ti["try_number"]) == ("success", 1), report  # finished by the survivor, same try
    answers = stack.xcom(DAG_ID, run_id, TASK)
    assert answers == [expected_answer(p) for p in PROMPTS]  # every item, its own answer, in order
    meta = stack.xcom(DAG_ID, run_id, TASK, key="llm_meta")
    resumed = meta["totals"]["resumed"]
    assert stored <= resumed < ITEMS, (stored, resumed)  # what was stored before the kill was not paid again
    total = chat_requests(server.stats())
    # The survivor called exactly the items no part held; the rest of the calls were the victim's.
    assert total - sent_before == ITEMS - resumed, (total, sent_before, resumed)
    replayed = total - ITEMS
    assert replayed == sent_before - resumed
    assert replayed < ITEMS - stored  # fewer than a restart from nothing would have paid
    keys = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{TASK}/xcomEntries")[
        "xcom_entries"
    ]
    assert sorted(x["key"] for x in keys) == ["llm_meta", "return_value"]  # parts deleted at the end
    figures(
        f"fan-out: {ITEMS} items ({CONCURRENCY} at a time, {LATENCY_S} s each), kill -9 {victim} with "
        f"{sent_before} calls sent and {stored} stored; the survivor resumed {resumed} and called "
        f"{ITEMS - resumed}; calls replayed: {replayed} (a restart without progress: {sent_before}); "
        f"run finished {time.monotonic() - killed_at:.0f} s after the kill; all {ITEMS} answers in order"
    )
