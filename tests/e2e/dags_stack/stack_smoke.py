"""Tiny DAG for the AirflowStack self-test.

produce (python, returns a dict) -> two deferrable waits of ~3 s in parallel -> consume (pulls the dict).
``wait`` is the provider's WaitSensor: its trigger ends the task in the triggerer (end_from_trigger).
``defer_resume`` defers and then resumes on a worker, whose return value becomes an XCom: the path
our LLM operators take.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.sensors.time_delta import WaitSensor
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import DAG, BaseOperator, task

WAIT = timedelta(seconds=3)


class DeferThenResume(BaseOperator):
    """Defer for WAIT, then resume on a worker and return a dict."""

    def execute(self, context):
        self.defer(trigger=TimeDeltaTrigger(WAIT), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return {"resumed": True}


with DAG(dag_id="stack_smoke", schedule=None, catchup=False, tags=["e2e"]):

    @task
    def produce() -> dict:
        return {"label": "smoke", "numbers": [1, 2, 3]}

    @task
    def consume(payload: dict, resumed: dict) -> dict:
        return {"label": payload["label"].upper(), "total": sum(payload["numbers"]), **resumed}

    payload = produce()
    wait = WaitSensor(task_id="wait", time_to_wait=WAIT, deferrable=True)
    resume = DeferThenResume(task_id="defer_resume")
    payload >> [wait, resume]
    wait >> consume(payload, resume.output)
