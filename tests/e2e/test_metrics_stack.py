"""Metrics from real Airflow processes: the triggerer's trigger runner and a worker send them to StatsD.

Airflow configures its Stats client from ``[metrics]`` when each process starts; this checks that our
metrics, sent from inside the trigger-runner subprocess and from a task, reach a StatsD socket with their
tags, next to Airflow's own metrics, and that llm_meta in XCom carries the cost, times, host and pid.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.testing.airflow_stack import AirflowStack
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "dags_metrics"
API_KEY = "sk-e2e-metrics-5e1a"


class Receiver:
    """A StatsD daemon's socket, read all the time: Airflow's own metrics would soon fill its buffer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.lines.extend(self.sock.recv(65535).decode().splitlines())
            except TimeoutError:
                continue

    def received(self) -> list[str]:
        return list(self.lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def statsd():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, statsd):
    log = tmp_path_factory.mktemp("fake-llm") / "fake-llm.log"
    with FakeServerProcess(latency=0.5, api_key=API_KEY, log_path=log) as server:
        conn = {"conn_type": "llm", "host": server.base_url, "password": API_KEY, "extra": {"timeout": 30}}
        metrics = {
            "statsd_on": "True",
            "statsd_host": "127.0.0.1",
            "statsd_port": str(statsd.port),
            "statsd_prefix": "airflow",
            "statsd_influxdb_enabled": "True",
        }
        stack = AirflowStack(
            tmp_path_factory.mktemp("airflow"),
            DAGS,
            env={"AIRFLOW_CONN_LLM_DEFAULT": json.dumps(conn)},
            config={"metrics": metrics},
        )
        with stack:
            yield stack


def test_the_triggerer_and_a_worker_send_llm_metrics_tagged_by_connection_and_model(airflow, statsd):
    airflow.wait_for_dag("metrics_smoke")
    airflow.unpause("metrics_smoke")
    run_id = airflow.trigger("metrics_smoke")
    state = airflow.wait_for_run("metrics_smoke", run_id, timeout=300)
    assert state == "success", airflow.describe_run("metrics_smoke", run_id)

    triggerer_call = "airflow.llm.calls,conn_id=llm_default,model=gpt-4:1|c"
    worker_call = "airflow.llm.calls,conn_id=llm_default,model=gpt-3.5-turbo:1|c"
    wait_for(
        lambda: {triggerer_call, worker_call} <= set(statsd.received()),
        60,
        "llm.calls from the triggerer and the worker",
        lambda: "\n".join(sorted({line.split(":")[0] for line in statsd.lines})),
    )
    lines = statsd.received()
    assert any(line.startswith("airflow.triggerer_heartbeat") for line in lines)  # Airflow's own, same socket
    for name in ("attempts", "prompt_tokens", "completion_tokens", "cost_micro_usd"):
        assert any(line.startswith(f"airflow.llm.{name},conn_id=llm_default,model=gpt-4:") for line in lines)
    assert any(
        line.startswith("airflow.llm.attempt.duration,conn_id=llm_default,model=gpt-4:") for line in lines
    )
    # The triggerer's hostname, from [core] hostname_callable (the stack's: 127.0.0.1).
    assert "airflow.llm.in_flight,conn_id=llm_default,hostname=127.0.0.1:0|g" in lines

    for task_id, model in (("in_triggerer", "gpt-4"), ("on_worker", "gpt-3.5-turbo")):
        meta = airflow.xcom("metrics_smoke", run_id, task_id, key="llm_meta")
        price = DEFAULT_PRICES[model]
        usage = meta["usage"]
        expected = (usage["prompt_tokens"] * price.input + usage["completion_tokens"] * price.output) / 1e6
        assert meta["cost_usd"] == pytest.approx(expected) and meta["cost_usd"] > 0
        assert meta["started_at"] <= meta["finished_at"]
        assert meta["host"] == "127.0.0.1" and meta["pid"] > 0
    triggerer = airflow.xcom("metrics_smoke", run_id, "in_triggerer", key="llm_meta")
    assert triggerer["pid"] != airflow.pid("triggerer-0")  # the trigger-runner subprocess, not its parent
