"""The e2e check that, without an injected fault, each call reached the server exactly as often as its
attempts explain (issue 14, item 4).

A call's ``llm_meta`` lists the requests it sent (``attempts``, retries and fallbacks included); a
fan-out's items count theirs. A call whose trigger was started twice (a live triggerer taken for dead:
docs/fault-survival.md, "Calls run twice without a fault") reaches the server more often than the
``llm_meta`` that its task kept says, and so does any other repeat: this check catches them all.
"""

from __future__ import annotations

from typing import Any

from airflow_llm_async.testing.airflow_stack import AirflowApiError, AirflowStack


def sent_requests(meta: dict[str, Any]) -> int:
    """The requests one task's ``llm_meta`` says it sent: attempts answered with an HTTP status."""
    if "items" in meta:  # a fan-out: each item counts its attempts
        return sum(item["attempts"] for item in meta["items"])
    return sum(1 for attempt in meta["attempts"] if attempt["status"] is not None)


def llm_metas(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    """``{task label: llm_meta}`` of every task instance of the run that pushed one."""
    metas = {}
    for ti in stack.task_instances(dag_id, run_id):
        label = ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"
        try:
            metas[label] = stack.xcom(
                dag_id, run_id, ti["task_id"], key="llm_meta", map_index=ti["map_index"]
            )
        except AirflowApiError as err:
            if err.status_code != 404:
                raise
    return metas


def assert_requests_explained(
    stack: AirflowStack, stats: dict[str, Any], runs: list[tuple[str, str]]
) -> None:
    """The fake server's chat requests (``stats``: its stats since a reset) are exactly the attempts
    that the ``llm_meta`` of the runs' tasks record (``runs``: ``(dag_id, run_id)`` pairs)."""
    requests = sum(stats["by_model"].values())
    sent = {
        f"{dag_id}/{label}": sent_requests(meta)
        for dag_id, run_id in runs
        for label, meta in llm_metas(stack, dag_id, run_id).items()
    }
    assert requests == sum(sent.values()), (
        f"the server saw {requests} chat requests, the tasks' llm_meta explain {sum(sent.values())}: "
        f"a call ran more often than its attempts say (or a task kept no llm_meta); per task: {sent}"
    )
