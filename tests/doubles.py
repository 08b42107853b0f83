"""Stand-ins for Airflow runtime objects (never for our own code)."""

from __future__ import annotations


class RecordingTI:
    """Stands in for Airflow's task instance: records XCom pushes, serves XCom pulls."""

    def __init__(self, pulls: dict | None = None):
        self.pushed: dict = {}
        self.pulls = pulls or {}

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids=None, key="return_value"):
        return self.pulls.get((task_ids, key))
