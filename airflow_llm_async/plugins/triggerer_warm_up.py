"""A listener plugin: a triggerer builds its in-process Execution API as it starts (compat.py, entry 7).

Without it, a fresh triggerer builds that API (5-16 s of CPU) on its one main thread inside the first
request of a trigger that needs it, and the first tasks after every deploy or restart end that much
later. Every Airflow job calls ``on_starting``; only a triggerer's starts the background build. Off
with ``[llm_async] prebuild_execution_api = False``.
"""

from __future__ import annotations

from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin


class _TriggererStart:
    @hookimpl
    def on_starting(self, component: Any) -> None:
        from airflow_llm_async import compat

        compat.prebuild_execution_api(component)


class TriggererWarmUpPlugin(AirflowPlugin):
    """Registered by the ``airflow.plugins`` entry point, as the dashboard is."""

    name = "llm_async_triggerer_warm_up"
    listeners = [_TriggererStart()]
