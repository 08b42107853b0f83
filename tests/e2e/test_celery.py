"""Past one machine: Airflow's CeleryExecutor with two Celery workers and two triggerers, each standing
for a host of its own, sharing the connections' budget ledger and circuit breakers through Redis
(docs/deployment.md).

The deployment (its own, in xdist group ``celery``): PostgreSQL (a copy of the run's migrated
template), Redis db 5 as the Celery broker, ``celery-worker-0`` and ``-1`` (task hostnames 127.0.1.1
and 127.0.1.2), two triggerers of capacity 3, so that four triggers in flight at once cannot all run on
one triggerer. Both connections keep their budget and breakers in the test Redis (db 0).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import redis

from airflow_llm_async.budget_store import KEY_PREFIX as BUDGET_PREFIX
from airflow_llm_async.core.breaker import DEFAULT as DEFAULT_BREAKER
from airflow_llm_async.limits_redis import BREAKER_PREFIX
from airflow_llm_async.testing.airflow_stack import AirflowStack
from airflow_llm_async.testing.fake_server_process import FakeServerProcess
from tests.e2e.conftest import API_KEY, ROOT, llm_connection, postgres_database
from tests.e2e.dags_celery.celery_fanout import GROUPS, ITEMS
from tests.e2e.polling import wait_for
from tests.e2e.server_calls import assert_requests_explained, llm_metas

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("celery")]

REDIS_URL = "redis://127.0.0.1:6379/0"
PIPELINE = "llm_content_pipeline"
FANOUT = "celery_fanout"
DEAD_MODEL = "gpt-4o"  # answers 503 in the fan-out test
WORKER_HOSTS = {"127.0.1.1", "127.0.1.2"}
CONN_IDS = ("llm_default", "llm_celery")
DAG_FILES = [ROOT / "example_dags/llm_content_pipeline.py", ROOT / "tests/e2e/dags_celery/celery_fanout.py"]


@pytest.fixture(scope="module")
def redis_client():
    # The connections' keys in Redis are the machine's, not the run's: a second run of this module at
    # the same time (another checkout's test run) would delete and add to them, so it waits its turn.
    lock = open(Path(tempfile.gettempdir()) / "airflow-llm-async-e2e-celery.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        # An earlier session's ledger and breakers of these connections would skew the sums and counts.
        stale = [key for conn_id in CONN_IDS for prefix in (BUDGET_PREFIX, BREAKER_PREFIX)
                 for key in client.scan_iter(f"{prefix}{conn_id}:*")]  # fmt: skip
        if stale:
            client.delete(*stale)
    except redis.RedisError as exc:
        pytest.fail(f"the connections keep their budget and breakers in Redis at 127.0.0.1:6379, down: {exc}")
    yield client
    client.close()
    lock.close()  # releases the lock


@pytest.fixture(scope="module")
def celery_llm(tmp_path_factory):
    log = tmp_path_factory.mktemp("celery-llm") / "fake-llm.log"
    with FakeServerProcess(latency=0.2, api_key=API_KEY, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, postgres_template, celery_llm, redis_client):
    dags = tmp_path_factory.mktemp("celery-dags")
    for source in DAG_FILES:
        shutil.copy(source, dags / source.name)
    shared = {"rate_limit_backend": REDIS_URL, "budget_usd": {"usd": 10, "per": "day"}, "timeout": 30}
    env = {
        "AIRFLOW_CONN_LLM_DEFAULT": llm_connection(celery_llm.base_url, default_model="gpt-4", **shared),
        # One request at a time per triggerer: two held requests are one on each triggerer, and the dead
        # model's requests come one by one, so a breaker per process would let it see `failures` each.
        "AIRFLOW_CONN_LLM_CELERY": llm_connection(celery_llm.base_url, max_concurrency=1, **shared),
    }
    with postgres_database(postgres_template, "airflow_llm_celery") as db_url:
        stack = AirflowStack(
            tmp_path_factory.mktemp("celery-airflow"),
            dags,
            db_url=db_url,
            triggerers=2,
            celery_workers=2,
            env=env,
            config={"triggerer": {"capacity": "3"}},
            migrate=False,
        )
        with stack:
            yield stack
    leftovers = stack.live_processes()
    assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"


def run_held(stack: AirflowStack, server: FakeServerProcess, dag_id: str, held: int) -> str:
    """Trigger ``dag_id`` with every LLM request held at the server until ``held`` wait there together."""
    stack.wait_for_dag(dag_id)
    stack.unpause(dag_id)
    server.hold()
    try:
        run_id = stack.trigger(dag_id)
        wait_for(
            lambda: server.stats()["held"] == held,
            240,
            f"{held} requests held",
            lambda: f"{stack.describe_run(dag_id, run_id)}\n{server.stats()}",
        )
    finally:
        server.release()
    assert stack.wait_for_run(dag_id, run_id, timeout=300) == "success", stack.describe_run(dag_id, run_id)
    return run_id


def budget_held(client: redis.Redis, conn_id: str) -> float:
    """The dollars the connection's ledger in Redis holds for today (the only period it has)."""
    [held] = [int(client.get(key)) for key in client.scan_iter(f"{BUDGET_PREFIX}{conn_id}:*")]
    return held / 1e9


def triggerer_pids(stack: AirflowStack) -> dict[int, str]:
    """``{pid: triggerer name}`` of each triggerer's processes (its trigger runner is a child)."""
    owners = {}
    for name in stack.process_names:
        if name.startswith("triggerer-"):
            main = psutil.Process(stack.pid(name))
            owners.update({proc.pid: name for proc in [main, *main.children(recursive=True)]})
    return owners


def test_the_pipeline_runs_on_both_workers_and_both_triggerers_within_one_budget(
    celery_stack, celery_llm, redis_client
):
    celery_llm.reset()
    # Five summaries in flight at once: at most three on a triggerer, so both run some.
    run_id = run_held(celery_stack, celery_llm, PIPELINE, held=5)
    tis = [
        ti for ti in celery_stack.task_instances(PIPELINE, run_id) if ti["task_id"] not in ("start", "end")
    ]
    assert {ti["state"] for ti in tis} == {"success"} and len(tis) == 9, celery_stack.describe_run(
        PIPELINE, run_id
    )
    # Tasks ran on both Celery workers: their own host names (the EmptyOperators never reach a worker).
    assert {ti["hostname"] for ti in tis} == WORKER_HOSTS, [(ti["task_id"], ti["hostname"]) for ti in tis]

    metas = llm_metas(celery_stack, PIPELINE, run_id)
    assert len(metas) == 6  # five summaries, one analysis
    owners = triggerer_pids(celery_stack)
    assert {owners.get(meta["pid"]) for meta in metas.values()} == {"triggerer-0", "triggerer-1"}, {
        label: meta["pid"] for label, meta in metas.items()
    }
    # One ledger for the deployment: it holds what the calls of both triggerers cost.
    spent = sum(meta["cost_usd"] for meta in metas.values())
    assert budget_held(redis_client, "llm_default") == pytest.approx(spent, abs=1e-9)
    stats = celery_llm.stats()
    assert stats["requests"] == 6
    assert_requests_explained(celery_stack, stats, [(PIPELINE, run_id)])


def test_a_dead_model_opens_one_breaker_for_every_host(celery_stack, celery_llm, redis_client):
    celery_llm.reset()
    celery_llm.set_faults({DEAD_MODEL: "503"})
    # Four fan-outs at once: at most three on a triggerer. Each triggerer sends one request at a time on
    # llm_celery (max_concurrency 1), so two held requests are one from each triggerer.
    run_id = run_held(celery_stack, celery_llm, FANOUT, held=2)
    stats = celery_llm.stats()
    failures = DEFAULT_BREAKER.failures
    # A breaker per process would let the dead model see `failures` requests from each triggerer; the
    # shared one opens once for both: `failures`, and at most one more in flight from each triggerer.
    assert failures <= stats["by_model"][DEAD_MODEL] <= failures + 2, stats
    state = json.loads(redis_client.get(f"{BREAKER_PREFIX}llm_celery:{DEAD_MODEL}"))
    assert state["opened"] == 1 and state["open_until"] > time.time(), state

    metas = llm_metas(celery_stack, FANOUT, run_id)
    assert sorted(metas) == [f"fan_out_{group}" for group in range(GROUPS)]
    items = [item for meta in metas.values() for item in meta["items"]]
    assert len(items) == GROUPS * ITEMS
    assert {(item["status"], item["model"], item["fallback_used"]) for item in items} == {
        ("success", "gpt-3.5-turbo", True)
    }
    # Each item's cost is rounded to 8 decimals; an attempt the breaker skipped after its budget
    # reservation would keep its worst case (about $0.04 here) unless it is settled to 0.
    spent = sum(item["cost_usd"] for item in items)
    assert budget_held(redis_client, "llm_celery") == pytest.approx(spent, abs=1e-7)
    # Exactly one fallback answer per item: no call ran twice. (A fan-out item's `attempts` counts the
    # attempts the breaker skipped unsent too, so server_calls.assert_requests_explained cannot count
    # these items: it would expect their skips at the server.)
    assert stats["by_model"]["gpt-3.5-turbo"] == GROUPS * ITEMS, stats
    assert stats["requests"] == sum(stats["by_model"].values()), stats
