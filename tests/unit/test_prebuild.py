"""Which Airflow processes build the Execution API at start (compat.prebuild_execution_api).

Every job and task runner calls the listener; only a triggerer may start the build. The build itself
runs in a real triggerer: tests/e2e/test_cold_start.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from airflow.jobs import triggerer_job_runner

from airflow_llm_async import compat
from airflow_llm_async.plugins.triggerer_warm_up import TriggererWarmUpPlugin

THREAD = "llm-async-prebuild-api"


def builders() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD]


def test_the_plugin_registers_the_listener():
    (listener,) = TriggererWarmUpPlugin.listeners
    assert callable(listener.on_starting)


def test_a_task_runner_starts_nothing():
    compat.prebuild_execution_api(object())  # the task runner's marker has no job_type
    assert builders() == []


def test_the_setting_turns_it_off(monkeypatch):
    monkeypatch.setenv("AIRFLOW__LLM_ASYNC__PREBUILD_EXECUTION_API", "False")
    compat.prebuild_execution_api(SimpleNamespace(job_type=None))
    assert builders() == []


def test_a_job_other_than_a_triggerer_leaves_the_triggerer_module_alone():
    original = triggerer_job_runner.in_process_api_server
    compat.prebuild_execution_api(SimpleNamespace(job_type="SchedulerJob"))
    for thread in builders():
        thread.join(timeout=10)
    assert builders() == []
    assert triggerer_job_runner.in_process_api_server is original
