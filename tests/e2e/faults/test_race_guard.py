"""Guard: in the mode we recommend for many short calls, no LLM task fails by the deferral race.

The race (apache/airflow#72716, #71580; measured and explained by ``python -m
tests.e2e.faults.race_study``, see docs/fault-survival.md): a deferred task whose trigger fires
quickly is re-queued before the executor has heard that the try's worker process exited; when that
stale "success" arrives, the scheduler fails the queued task ("state mismatch"). In the default
deferrable mode it failed 14 of 150 tasks with 1 s answers at Airflow's default
``[workers] min_heartbeat_interval`` (5), and still 3 of 150 with 0.2 s answers at 1.

Worker-free mode (``start_from_trigger=True``) never runs the task on a worker, so no stale report
exists: this test runs 100 worker-free tasks with 0.2 s answers and wants 0 race failures, every
task never queued for an executor, and exactly one call per task: no trigger started twice (a live
triggerer taken for dead: docs/fault-survival.md, "Calls run twice without a fault").
"""

from __future__ import annotations

import pytest

from tests.e2e.faults._support import (
    chat_requests,
    expected_answer,
    state_mismatches,
    ti_label,
    trigger_starts,
)
from tests.e2e.server_calls import assert_requests_explained

pytestmark = pytest.mark.e2e

DAG_ID = "faults_race_guard"
TASKS = 100
PROMPTS = [f"Race guard {i}: what is {i} plus {i}?" for i in range(TASKS)]


def test_worker_free_tasks_lose_nothing_to_the_deferral_race(fault_stack, fault_llm, figures):
    stack, server = fault_stack, fault_llm
    stack.wait_for_dag(DAG_ID, timeout=240)
    stack.unpause(DAG_ID)
    server.reset()
    run_id = stack.trigger(DAG_ID)
    state = stack.wait_for_run(DAG_ID, run_id, timeout=600, poll_interval=2)

    tis = stack.task_instances(DAG_ID, run_id)
    mismatches = state_mismatches(stack, DAG_ID, run_id)
    failed = sorted(ti_label(ti) for ti in tis if ti["state"] != "success")
    # A trigger started twice means a live triggerer was taken for dead (see _support.TRIGGERER_CONFIG).
    restarts = sum(len(jobs) - 1 for jobs in trigger_starts(stack, DAG_ID, run_id).values())
    stats = server.stats()
    calls = chat_requests(stats)
    figures(
        f"race guard: {len(tis)} worker-free tasks, 0.2 s answers: state-mismatch failures "
        f"{len(mismatches)}, other failures {len(failed) - len(mismatches)}; calls {calls}; triggers "
        f"run twice after a false takeover: {restarts}"
    )
    assert not mismatches, [m["extra"] for m in mismatches]
    assert state == "success" and not failed, stack.describe_run(DAG_ID, run_id)
    assert len(tis) == TASKS and {ti["try_number"] for ti in tis} == {1}
    assert all(ti["queued_when"] is None for ti in tis)  # never handed to an executor
    for ti in tis:
        answer = stack.xcom(DAG_ID, run_id, ti["task_id"])
        assert answer == expected_answer(PROMPTS[int(ti["task_id"].rsplit("_", 1)[1])]), ti_label(ti)
    # No fault injected: one call per task, each recorded in its task's llm_meta.
    assert restarts == 0, trigger_starts(stack, DAG_ID, run_id)
    assert_requests_explained(stack, stats, [(DAG_ID, run_id)])
    assert calls == TASKS
