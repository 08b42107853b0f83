"""A server that is down when the calls start and then recovers, and one that stalls.

Every task must end as its rule says, none stuck in deferred: the calls that met the outage succeed
after retries (deferrable and worker-free alike); the calls to a stalled server fail with the reason
("no complete answer within ..."), in the task log and, worker-free, in ``llm_meta``.
"""

from __future__ import annotations

import pytest

from tests.e2e.faults._support import STALL_MODEL, expected_answer
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

DAG_ID = "faults_server"
# One model per recovering task (as in dags/faults_server.py): the server counts calls per model.
RECOVERING = {
    "recovers_0": "gpt-4o",
    "recovers_1": "gpt-3.5-turbo",
    "recovers_2": "fake-model",
    "recovers_worker_free": "gpt-4",
}
STALLING = ["stalls", "stalls_worker_free", "stalls_past_deadline"]


def test_calls_outlast_an_outage_and_a_stalled_server_fails_them_with_the_reason(
    fault_stack, fault_llm, figures
):
    stack, server = fault_stack, fault_llm
    stack.wait_for_dag(DAG_ID, timeout=240)
    stack.unpause(DAG_ID)
    server.reset()
    server.set_faults({**dict.fromkeys(RECOVERING.values(), "503"), STALL_MODEL: "stall"})
    down = set(RECOVERING.values())
    try:
        run_id = stack.trigger(DAG_ID)

        def recover_each_model_after_two_failed_calls() -> bool:
            calls = server.stats()["by_model"]
            back = {model for model in down if calls.get(model, 0) >= 2}
            if back:
                server.set_faults(dict.fromkeys(back))  # this task's server is back
                down.difference_update(back)
            return not down

        # Each task meets its own outage: two 503s, then the server recovers while it backs off.
        wait_for(
            recover_each_model_after_two_failed_calls,
            300,
            "two failed calls of every recovering task",
            lambda: f"{server.stats()}\n{stack.describe_run(DAG_ID, run_id)}",
        )
    finally:
        server.set_faults(dict.fromkeys(RECOVERING.values()))
    assert stack.wait_for_run(DAG_ID, run_id, timeout=300) == "failed"  # the stalling tasks fail
    states = stack.task_states(DAG_ID, run_id)
    assert states == {**dict.fromkeys(RECOVERING, "success"), **dict.fromkeys(STALLING, "failed")}, states
    tis = {ti["task_id"]: ti for ti in stack.task_instances(DAG_ID, run_id)}
    assert {ti["try_number"] for ti in tis.values()} == {1}  # the call retried, not the task

    failed_calls, per_task = 0, []
    for task, model in RECOVERING.items():
        answer = stack.xcom(DAG_ID, run_id, task)
        assert answer == expected_answer(f"Outage test: is the service behind {task} back?"), task
        meta = stack.xcom(DAG_ID, run_id, task, key="llm_meta")
        assert meta["model"] == model, meta
        statuses = [attempt["status"] for attempt in meta["attempts"]]
        assert len(statuses) >= 2 and set(statuses[:-1]) == {503} and statuses[-1] == 200, (task, statuses)
        failed_calls += len(statuses) - 1
        per_task.append(str(len(statuses) - 1))
    # Every 503 the server sent is in some llm_meta (more only if a trigger ran twice: see
    # test_triggerer_kill.py on false takeovers).
    assert server.stats()["by_status"]["503"] >= failed_calls

    stalled = "LLM call failed (timeout): no complete answer within 3.0 s"
    past_deadline = (
        "LLM call failed (deadline): the call's deadline passed; last error: no complete answer within"
    )
    wanted = {"stalls": stalled, "stalls_worker_free": stalled, "stalls_past_deadline": past_deadline}
    logs = {task: stack.task_log(DAG_ID, run_id, task, contains=(wanted[task],)) for task in STALLING}
    assert stalled in logs["stalls"], logs["stalls"][-3000:]
    assert stalled in logs["stalls_worker_free"], logs["stalls_worker_free"][-3000:]
    # The call's own 5 s limit ended it before its retries ran out.
    assert past_deadline in logs["stalls_past_deadline"], logs["stalls_past_deadline"][-3000:]
    meta = stack.xcom(DAG_ID, run_id, "stalls_worker_free", key="llm_meta")
    assert meta["error"]["kind"] == "timeout" and [a["result"] for a in meta["attempts"]] == ["error"] * 2
    durations = []
    for task in STALLING:
        ti = tis[task]
        # Ended by our own limits, well before Airflow's deferral timeout (ours + 60 s).
        assert ti["end_date"] is not None and (ti["duration"] or 0) < 60, ti
        durations.append(f"{ti['duration'] or 0:.0f}")

    figures(
        f"server faults: {len(RECOVERING)} tasks started during an outage (503 to every call) all "
        f"succeeded after {failed_calls} failed calls in all (per task: {', '.join(per_task)}); "
        f"{len(STALLING)} tasks calling a stalled server failed after {', '.join(durations)} s "
        f"with 'no complete answer within'"
    )
