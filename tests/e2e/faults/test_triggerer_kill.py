"""kill -9 of a triggerer while 50 LLM calls are in flight: every task still ends with its own answer.

Two triggerers share the triggers. When one dies, its triggers keep pointing at its job until that
job's heartbeat is older than ``[triggerer] triggerer_health_check_threshold``; then the live
triggerer takes them over (``Trigger.assign_unassigned``) and runs them again from the start, so the
calls the dead one had in flight are sent a second time: those are the "replayed" calls.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from tests.e2e.faults._support import (
    KILL_MODEL,
    chat_requests,
    connections_to,
    expected_answer,
    restart_triggerers,
    ti_label,
    trigger_starts,
)
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

TASKS = 50
TRIGGERERS = ("triggerer-0", "triggerer-1")
KILL_PROMPTS = [f"Kill test {i}: describe the number {i} in one sentence." for i in range(TASKS)]
WORKER_FREE_PROMPTS = [
    f"Worker-free kill test {i}: describe the number {i} in one sentence." for i in range(TASKS)
]


def _trigger_owners(stack, dag_id: str, run_id: str) -> dict[str, int | None]:
    """``{task: triggerer job id}`` for the task instances that wait on a trigger."""
    return {
        ti_label(ti): (ti.get("trigger") or {}).get("triggerer_id")
        for ti in stack.task_instances(dag_id, run_id)
    }


def _dead_job(stack, candidates: set[int], timeout: float = 90) -> int:
    """The one of ``candidates`` (the jobs that ran the triggers) whose heartbeat has stopped.

    A live triggerer job beats every second ([triggerer] job_heartbeat_sec) unless its loop stalls,
    so wait until exactly one candidate has stayed silent while the others beat.
    """

    def heartbeats() -> dict[int, str]:
        return {j["id"]: j["latest_heartbeat"] for j in stack.jobs("TriggererJob") if j["id"] in candidates}

    at_kill = heartbeats()
    started = time.monotonic()
    while True:
        time.sleep(1)
        now = heartbeats()
        silent = [job for job in candidates if now.get(job) == at_kill.get(job)]
        if len(silent) == 1 and (len(candidates) > 1 or time.monotonic() - started > 5):
            return silent[0]  # with one candidate: silent for 5 s while job_heartbeat_sec is 1
        assert silent, f"every job that ran the triggers is still beating: {at_kill} -> {now}"
        assert time.monotonic() - started < timeout, f"no single stopped triggerer job: {at_kill} -> {now}"


def _kill_triggerer_mid_flight(stack, server, dag_id: str, prompt_of, figures, label: str) -> None:
    restart_triggerers(stack)  # an earlier test may have killed one
    stack.wait_for_dag(dag_id, timeout=240)
    stack.unpause(dag_id)
    server.reset()
    server.hold()  # calls wait at the server until all of them have been sent
    held = True
    try:
        run_id = stack.trigger(dag_id)
        wait_for(
            lambda: server.stats()["held"] == TASKS,
            600,
            f"all {TASKS} calls held at the fake server",
            lambda: f"{server.stats()}\n{stack.describe_run(dag_id, run_id)}",
        )
        owners = _trigger_owners(stack, dag_id, run_id)
        assert len(owners) == TASKS and None not in owners.values(), owners
        server.release()  # every call is now inside its 8 s answer time
        held = False
        assert server.stats()["in_flight"] >= TASKS
        port = urlsplit(server.base_url).port
        calls = {name: connections_to(stack.pid(name), port) for name in TRIGGERERS}
        # The one holding most of the calls: idle keep-alive connections left by an earlier test
        # must not make the other triggerer the victim.
        victim = max(TRIGGERERS, key=lambda name: calls[name])
        killed_at = time.monotonic()
        stack.kill_process(victim)  # SIGKILL to the triggerer's whole process group
    finally:
        if held:
            server.release()
    survivor = next(name for name in TRIGGERERS if name != victim)
    dead_job = _dead_job(stack, set(owners.values()))
    orphans = sorted(task for task, job in owners.items() if job == dead_job)
    assert orphans, f"{victim} ran none of the {TASKS} triggers: {owners}"

    wait_for(
        lambda: chat_requests(server.stats()) > TASKS,
        120,
        "a replayed call from the surviving triggerer",
        lambda: f"{server.stats()}\n{stack.process_logs()}",
    )
    takeover_s = time.monotonic() - killed_at
    # While the orphans' calls run again, their triggers belong to the survivor's job.
    moved = _trigger_owners(stack, dag_id, run_id)
    new_owners = {moved[task] for task in orphans}
    assert len(new_owners) == 1 and None not in new_owners and dead_job not in new_owners, new_owners
    survivor_job = new_owners.pop()

    state = stack.wait_for_run(dag_id, run_id, timeout=300)
    tis = stack.task_instances(dag_id, run_id)
    report = stack.describe_run(dag_id, run_id)
    assert state == "success", report
    assert len(tis) == TASKS and {ti["state"] for ti in tis} == {"success"}, report  # none lost or deferred
    assert {ti["try_number"] for ti in tis} == {1}, report  # no task was retried
    for ti in tis:
        index = ti["map_index"] if ti["map_index"] >= 0 else int(ti["task_id"].rsplit("_", 1)[1])
        answer = stack.xcom(dag_id, run_id, ti["task_id"], map_index=ti["map_index"])
        assert answer == expected_answer(prompt_of[index]), ti_label(ti)
        meta = stack.xcom(dag_id, run_id, ti["task_id"], key="llm_meta", map_index=ti["map_index"])
        assert (meta["model"], [a["status"] for a in meta["attempts"]]) == (KILL_MODEL, [200]), meta

    replayed = chat_requests(server.stats()) - TASKS
    starts = trigger_starts(stack, dag_id, run_id)
    restarted = {task: jobs for task, jobs in starts.items() if len(jobs) > 1}
    # Every orphan ran again, on the survivor; every extra call is one of those restarts.
    assert all(starts[task][-1] == survivor_job for task in orphans), {t: starts[t] for t in orphans}
    assert replayed == sum(len(jobs) - 1 for jobs in restarted.values()), (replayed, restarted)
    # A trigger of the survivor run twice means a live triggerer was taken for dead (its heartbeat
    # stalled past the threshold): reported, as it costs calls, but not what this test is about.
    false_takeovers = sorted(set(restarted) - set(orphans))
    figures(
        f"{label}: {TASKS} tasks, kill -9 {victim} (job {dead_job}) with {len(orphans)} of the "
        f"{TASKS} calls in flight on it ({calls[victim]} TCP connections); {survivor} (job "
        f"{survivor_job}) took them over; first replayed call {takeover_s:.1f} s "
        f"after the kill; calls replayed: {replayed}; tasks lost: 0; all {TASKS} success with "
        f"their own answer; triggers of a live triggerer restarted too: {len(false_takeovers)}"
    )


def test_kill_9_of_a_triggerer_loses_no_deferrable_task(fault_stack, fault_llm, figures):
    _kill_triggerer_mid_flight(
        fault_stack, fault_llm, "faults_kill_deferrable", KILL_PROMPTS, figures, "deferrable"
    )


def test_kill_9_of_a_triggerer_loses_no_worker_free_task(fault_stack, fault_llm, figures):
    _kill_triggerer_mid_flight(
        fault_stack, fault_llm, "faults_kill_worker_free", WORKER_FREE_PROMPTS, figures, "worker-free"
    )
