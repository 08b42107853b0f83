"""Metrics reach a real StatsD socket through Airflow's own StatsD backend, tagged by connection and model."""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import time

import pytest
from airflow.sdk._shared.observability.metrics import statsd_logger
from airflow.sdk._shared.observability.metrics.base_stats_logger import NoStatsLogger
from airflow.sdk.observability import stats
from airflow.sdk.observability.metrics import stats_utils
from statsd import StatsClient

from airflow_llm_async import metrics
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator
from tests.doubles import RecordingTI
from tests.integration.conftest import chat_trigger, point_connection, wait_until

REQUEST = {"messages": [{"role": "user", "content": "Summarize: the triggerer waits for many calls."}]}
# name,tag=value,...:value|type  (StatsD with [metrics] statsd_influxdb_enabled)
LINE = re.compile(r"^(?P<name>[\w.]+)(?P<tags>(,[\w.-]+=[^,:]+)*):(?P<value>[\d.]+)\|(?P<type>c|ms|g)$")


class StatsdReceiver:
    """A UDP socket on loopback playing the StatsD daemon: every line received, parsed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.lines: list[dict] = []

    def drain(self) -> list[dict]:
        while True:
            try:
                datagram = self.sock.recv(65535)
            except BlockingIOError:
                return self.lines
            for text in datagram.decode().splitlines():
                match = LINE.match(text)
                assert match, f"not a StatsD line: {text!r}"
                tags = dict(pair.split("=", 1) for pair in match["tags"].split(",")[1:])
                self.lines.append({**match.groupdict(), "tags": tags, "value": float(match["value"])})

    def named(self, name: str, **tags: str) -> list[dict]:
        return [
            line
            for line in self.drain()
            if line["name"] == f"airflow.{name}" and all(line["tags"].get(k) == v for k, v in tags.items())
        ]

    def total(self, name: str, **tags: str) -> float:
        return sum(line["value"] for line in self.named(name, **tags))


@pytest.fixture
def statsd(monkeypatch):
    """Airflow's StatsD backend pointed at our socket, with InfluxDB-style tags (as docs/metrics.md says)."""
    receiver = StatsdReceiver()
    for option, value in {
        "statsd_on": "True",
        "statsd_host": "127.0.0.1",
        "statsd_port": str(receiver.port),
        "statsd_prefix": "airflow",
        "statsd_influxdb_enabled": "True",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__METRICS__{option.upper()}", value)
    # What every Airflow process does at start (the triggerer, before it forks its trigger runner).
    with statsd_backend(stats_utils.get_stats_factory()):
        yield receiver
    receiver.sock.close()


@contextlib.contextmanager
def statsd_backend(factory):
    """Airflow's Stats on ``factory``; afterwards back to no backend, with the client's socket closed."""
    made = []
    stats.initialize(factory=lambda: made.append(factory()) or made[-1], export_legacy_names=False)
    metrics.reset()
    try:
        yield
    finally:
        stats.initialize(factory=NoStatsLogger, export_legacy_names=True)
        metrics.reset()
        for backend in made:
            backend.statsd.close()


async def run(**kwargs) -> dict:
    events = [event async for event in chat_trigger(REQUEST, **kwargs).run()]
    return events[0].payload


async def test_calls_attempts_retries_fallbacks_and_tokens_arrive_tagged(statsd, fake_llm):
    fake_llm.set_fault("gpt-4", "429*1")
    first = await run(conn_id="llm_fake", models=["gpt-4"], max_retries=1)
    fake_llm.set_fault("gpt-4", "short")
    second = await run(
        conn_id="llm_fake", models=["gpt-4", "gpt-3.5-turbo"], quality={"min_chars": 50}, max_retries=0
    )
    assert (first["status"], second["status"]) == ("success", "success")
    gpt4 = {"conn_id": "llm_fake", "model": "gpt-4"}
    gpt35 = {"conn_id": "llm_fake", "model": "gpt-3.5-turbo"}
    await wait_until(lambda: statsd.named("llm.calls", **gpt35))

    assert statsd.total("llm.calls", **gpt4) == 1  # the first call; the second ended on gpt-3.5-turbo
    assert statsd.total("llm.calls", **gpt35) == 1
    assert statsd.named("llm.calls.failed") == []
    assert statsd.total("llm.attempts", **gpt4) == 3  # 429, retry, short answer
    assert statsd.total("llm.attempts", **gpt35) == 1
    assert statsd.total("llm.errors.rate_limit", **gpt4) == 1
    assert statsd.total("llm.retries", **gpt4) == 1
    assert statsd.total("llm.quality_failures", **gpt4) == 1
    assert statsd.total("llm.fallbacks", **gpt4) == 1
    usage_35 = second["meta"]["usage"]
    assert statsd.total("llm.prompt_tokens", **gpt35) == usage_35["prompt_tokens"] > 0
    assert statsd.total("llm.completion_tokens", **gpt35) == usage_35["completion_tokens"] > 0
    # gpt-4 answered twice with usage (the first call, and the short answer of the second).
    assert statsd.total("llm.cost_micro_usd") == pytest.approx(
        (first["meta"]["cost_usd"] + second["meta"]["cost_usd"]) * 1e6, abs=3
    )
    for timer in ("llm.attempt.duration", "llm.queued.duration", "llm.call.duration"):
        assert {line["type"] for line in statsd.named(timer)} == {"ms"}, timer
    assert len(statsd.named("llm.attempt.duration")) == 4
    assert len(statsd.named("llm.call.duration")) == 2


async def test_failures_count_by_kind_and_the_limiter_reports_waits_and_calls_in_flight(
    statsd, fake_llm, monkeypatch
):
    slow = {"x-fake-latency": "0.2"}
    point_connection(monkeypatch, "llm_one", fake_llm.base_url, timeout=2, max_concurrency=1, headers=slow)
    fake_llm.hold()
    calls = [asyncio.create_task(run(conn_id="llm_one", models=["gpt-4"])) for _ in range(3)]
    await wait_until(lambda: fake_llm.stats()["held"] == 1)  # max_concurrency=1: one sent, two queued
    metrics.flush()
    await wait_until(lambda: statsd.named("llm.in_flight", conn_id="llm_one"))
    assert [line["value"] for line in statsd.named("llm.in_flight", conn_id="llm_one")] == [1]
    fake_llm.release()
    results = await asyncio.gather(*calls)
    assert [r["status"] for r in results] == ["success"] * 3
    fake_llm.set_fault("gpt-4", "401")
    failed = await run(conn_id="llm_one", models=["gpt-4"])
    assert failed["error"]["kind"] == "client"
    tags = {"conn_id": "llm_one", "model": "gpt-4"}
    await wait_until(lambda: statsd.named("llm.calls.failed", **tags))

    assert statsd.total("llm.calls", **tags) == 4
    assert statsd.total("llm.calls.failed", **tags) == 1
    assert statsd.total("llm.errors.client", **tags) == 1
    assert statsd.total("llm.rate_limit_waits", **tags) == 2  # two of three waited
    queued = sorted(line["value"] for line in statsd.named("llm.queued.duration", **tags))
    assert queued[-1] >= 300  # the third waited for two 0.2 s answers
    gauge = statsd.named("llm.in_flight", conn_id="llm_one")
    assert all(line["type"] == "g" and line["value"] in (0, 1) for line in gauge)  # never above the cap
    assert gauge[-1]["value"] == 0  # the last value sent: nothing in flight
    assert gauge[0]["tags"]["hostname"] == metrics.hostname()


async def test_timers_send_a_bounded_sample_while_counters_count_everything(statsd, fake_llm):
    results = await asyncio.gather(*(run(conn_id="llm_fake", models=["gpt-4"]) for _ in range(50)))
    assert {r["status"] for r in results} == {"success"}
    metrics.flush()
    gpt4 = {"conn_id": "llm_fake", "model": "gpt-4"}
    await wait_until(lambda: statsd.total("llm.calls", **gpt4) == 50)
    assert len(statsd.named("llm.calls", **gpt4)) <= 2  # a total per flush (two if one fell mid-way)
    samples = len(statsd.named("llm.call.duration", **gpt4))
    assert metrics.TIMER_SAMPLES <= samples <= 2 * metrics.TIMER_SAMPLES < 50
    prompt_tokens = sum(r["meta"]["usage"]["prompt_tokens"] for r in results)
    assert statsd.total("llm.prompt_tokens", **gpt4) == prompt_tokens


async def test_a_budget_refusal_is_counted_as_an_error_of_kind_budget(statsd, fake_llm):
    outcome = await run(conn_id="llm_fake", models=["gpt-4", "gpt-4o-mini"], max_cost_usd=0.01)
    assert outcome["status"] == "success" and outcome["meta"]["model"] == "gpt-4o-mini"
    await wait_until(lambda: statsd.named("llm.calls"))
    assert statsd.total("llm.errors.budget", conn_id="llm_fake", model="gpt-4") == 1
    assert statsd.named("llm.attempts", model="gpt-4") == []  # nothing was sent to gpt-4
    assert statsd.total("llm.fallbacks", model="gpt-4") == 1


async def test_with_metrics_off_in_the_config_not_one_metric_is_sent(fake_llm, monkeypatch):
    """The hot path skips Stats entirely when [metrics] names no backend, even if one was set up."""
    receiver = StatsdReceiver()
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "False")

    def to_receiver():
        return statsd_logger.get_statsd_logger(
            stats_class=StatsClient, host="127.0.0.1", port=receiver.port, prefix="airflow"
        )

    try:
        with statsd_backend(to_receiver):
            outcome = await run(conn_id="llm_fake", models=["gpt-4"])
            assert outcome["status"] == "success"
            stats.incr("probe")  # the socket does receive what is sent
            await wait_until(lambda: receiver.named("probe"))
        assert [line["name"] for line in receiver.lines] == ["airflow.probe"]
    finally:
        receiver.sock.close()


@pytest.mark.parametrize("operator", ["llm", "fanout"])
def test_sync_mode_sends_its_metrics_before_its_private_loop_ends(statsd, threaded_fake_llm, operator):
    """Both operators go through the one sync bridge, which flushes: nothing is left behind in the loop."""
    if operator == "llm":
        op = LLMOperator(task_id="t", prompt="Summarize: x", llm_conn_id="llm_fake", deferrable=False)
    else:
        op = LLMFanOutOperator(task_id="t", prompts=["a", "b"], llm_conn_id="llm_fake", deferrable=False)
    op.execute({"ti": RecordingTI()})
    calls = 1 if operator == "llm" else 2
    deadline = time.monotonic() + 5  # UDP on loopback: delivered at once, if it was sent
    while statsd.total("llm.calls", conn_id="llm_fake") < calls and time.monotonic() < deadline:
        select.select([statsd.sock], [], [], deadline - time.monotonic())  # wait for the next datagram
    assert statsd.total("llm.calls", conn_id="llm_fake") == calls
