"""Metrics from real Airflow processes: the triggerer's trigger runner and a worker send them to StatsD.

Airflow configures its Stats client from ``[metrics]`` when each process starts; this checks that our
metrics, sent from inside the trigger-runner subprocess and from a task, reach a StatsD socket with their
tags, next to Airflow's own metrics, and that llm_meta in XCom carries the cost, times, host and pid.
"""

from __future__ import annotations

import pytest

from airflow_llm_async.core.pricing import DEFAULT_PRICES
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

# The shared deployment (tests/e2e/conftest.py) sends its metrics to the ``statsd`` receiver.


def test_the_triggerer_and_a_worker_send_llm_metrics_tagged_by_connection_and_model(
    airflow, fake_llm, statsd
):
    fake_llm.reset()  # no fault another test set on the shared server
    airflow.wait_for_dag("metrics_smoke")
    airflow.unpause("metrics_smoke")
    since = statsd.mark()  # other tests' calls on the deployment sent the same metrics before
    run_id = airflow.trigger("metrics_smoke")
    state = airflow.wait_for_run("metrics_smoke", run_id, timeout=300)
    assert state == "success", airflow.describe_run("metrics_smoke", run_id)

    triggerer_call = "airflow.llm.calls,conn_id=llm_default,model=gpt-4o:1|c"
    worker_call = "airflow.llm.calls,conn_id=llm_default,model=gpt-4o-mini:1|c"
    wait_for(
        lambda: {triggerer_call, worker_call} <= set(statsd.received(since)),
        60,
        "llm.calls from the triggerer and the worker",
        lambda: "\n".join(sorted({line.split(":")[0] for line in statsd.lines})),
    )
    # Airflow's own, on the same socket.
    assert any(line.startswith("airflow.triggerer_heartbeat") for line in statsd.received())
    lines = statsd.received(since)
    for name in ("attempts", "prompt_tokens", "completion_tokens", "cost_micro_usd"):
        assert any(line.startswith(f"airflow.llm.{name},conn_id=llm_default,model=gpt-4o:") for line in lines)
    assert any(
        line.startswith("airflow.llm.attempt.duration,conn_id=llm_default,model=gpt-4o:") for line in lines
    )
    # The triggerer's hostname, from [core] hostname_callable (the stack's: 127.0.0.1).
    assert "airflow.llm.in_flight,conn_id=llm_default,hostname=127.0.0.1:0|g" in lines

    for task_id, model in (("in_triggerer", "gpt-4o"), ("on_worker", "gpt-4o-mini")):
        meta = airflow.xcom("metrics_smoke", run_id, task_id, key="llm_meta")
        price = DEFAULT_PRICES[model]
        usage = meta["usage"]
        expected = (usage["prompt_tokens"] * price.input + usage["completion_tokens"] * price.output) / 1e6
        assert meta["cost_usd"] == pytest.approx(expected) and meta["cost_usd"] > 0
        assert meta["started_at"] <= meta["finished_at"]
        assert meta["host"] == "127.0.0.1" and meta["pid"] > 0
    triggerer = airflow.xcom("metrics_smoke", run_id, "in_triggerer", key="llm_meta")
    # The trigger-runner subprocess, not its parent.
    triggerers = [name for name in airflow.process_names if name.startswith("triggerer-")]
    assert triggerer["pid"] not in {airflow.pid(name) for name in triggerers}
