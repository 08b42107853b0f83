"""Waiting on real processes: poll a condition, bounded, with a useful message on timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], timeout: float, what: str, on_timeout=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{on_timeout()}")
        time.sleep(0.2)


def run_dag(airflow, dag_id: str, conf: dict | None = None) -> tuple[str, str]:
    """Trigger a run of ``dag_id`` once it is parsed and unpaused; its id and final state (300 s at most)."""
    airflow.wait_for_dag(dag_id)
    airflow.unpause(dag_id)
    run_id = airflow.trigger(dag_id, conf)
    return run_id, airflow.wait_for_run(dag_id, run_id, timeout=300)
