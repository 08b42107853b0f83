"""Read the monitor's rows from Airflow's metadata DB (any backend Airflow supports) and build a snapshot.

Through Airflow's own ORM models and session, so the connection, the JSON column types and the XCom
encoding are exactly the deployment's. Every query is one indexed SELECT; nothing is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from airflow_llm_async import compat
from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.core.outcome import META_KEY
from airflow_llm_async.monitor import batches, budgets, figures
from airflow_llm_async.monitor.figures import Call, TriggererJob

log = logging.getLogger(__name__)


def read_calls(
    session: Session, since: float, now: float, dag_ids: Collection[str] | None = None
) -> list[Call]:
    """Every call recorded by an ``llm_meta`` XCom written since ``since`` (epoch seconds).

    The values are untrusted (any DAG author or XCom API user writes them): a value that does not
    decode is skipped, and :func:`figures.calls_from_xcom` checks the rest and clamps their times to
    ``since``..``now``. ``dag_ids``: only these DAGs (the dashboard passes the ones its user may read);
    None: all.
    """
    return read_calls_and_batch_uses(session, since, now, dag_ids)[0]


def read_calls_and_batch_uses(
    session: Session, since: float, now: float, dag_ids: Collection[str] | None = None
) -> tuple[list[Call], list[batches.BatchUse]]:
    """:func:`read_calls`, and what the batch tasks among them cost (``llm_meta["batch"]``, read by
    :func:`batches.batch_use_from_meta`), from one read of the XComs."""
    from airflow.models.xcom import XComModel

    query = select(
        XComModel.dag_id,
        XComModel.run_id,
        XComModel.task_id,
        XComModel.map_index,
        XComModel.value,
        XComModel.timestamp,
    ).where(XComModel.key == META_KEY, XComModel.timestamp >= datetime.fromtimestamp(since, UTC))
    if dag_ids is not None:
        query = query.where(XComModel.dag_id.in_(list(dag_ids)))
    calls: list[Call] = []
    uses: list[batches.BatchUse] = []
    for row in session.execute(query):
        value = decode_value(row)
        calls += figures.calls_from_xcom(
            row.dag_id, row.run_id, row.task_id, row.map_index, value, row.timestamp.timestamp(),
            since=since, now=now,
        )  # fmt: skip
        use = batches.batch_use_from_meta(row.dag_id, row.run_id, row.task_id, row.map_index, value)
        if use is not None:
            uses.append(use)
    return calls, uses


def read_waiting_batches(
    session: Session,
    now: float,
    dag_ids: Collection[str] | None = None,
    limit: int = batches.MAX_WAITING_ROWS,
) -> list[dict[str, Any]]:
    """The batches still waiting: one row per task instance not finished whose ``llm_batch`` XCom holds a
    batch not ended (or whose task is deferred), the most recently updated first, at most ``limit``.

    The values are untrusted, read by :func:`batches.waiting_from_xcom`. A finished task's state is not
    read at all: its batches ended, or were cancelled with it. ``dag_ids``: only these DAGs; None: all.
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.state import State

    query = (
        select(
            XComModel.dag_id,
            XComModel.run_id,
            XComModel.task_id,
            XComModel.map_index,
            XComModel.value,
            XComModel.timestamp,
            TaskInstance.state,
        )
        .join(
            TaskInstance,
            and_(
                TaskInstance.dag_id == XComModel.dag_id,
                TaskInstance.run_id == XComModel.run_id,
                TaskInstance.task_id == XComModel.task_id,
                TaskInstance.map_index == XComModel.map_index,
            ),
        )
        .where(
            XComModel.key == batches.STATE_KEY,
            TaskInstance.state.in_(sorted(state.value for state in State.unfinished if state is not None)),
        )
        .order_by(XComModel.timestamp.desc())
        .limit(limit)
    )
    if dag_ids is not None:
        query = query.where(XComModel.dag_id.in_(list(dag_ids)))
    rows = (
        batches.waiting_from_xcom(
            row.dag_id,
            row.run_id,
            row.task_id,
            row.map_index,
            decode_value(row),
            row.timestamp.timestamp(),
            None if row.state is None else str(row.state),
            now,
        )
        for row in session.execute(query)
    )
    return batches.waiting_rows(rows, limit)


def decode_value(row: Any) -> Any:
    """An XCom row's value as JSON data, or None when it does not decode."""
    from airflow.models.xcom import XComModel

    try:
        return compat.decode_double_encoded(XComModel.deserialize_value(row))
    except Exception:
        # Anything may be stored: a serde class outside the allow list raises ImportError, a deeply
        # nested JSON string RecursionError. One such row must not fail every refresh.
        return None


def read_triggerers(session: Session) -> list[TriggererJob]:
    """Triggerer jobs in state running (one killed with -9 stays "running", with an old heartbeat)."""
    from airflow.jobs.job import Job

    rows = session.execute(
        select(Job.id, Job.hostname, Job.state, Job.latest_heartbeat).where(
            Job.job_type == "TriggererJob", Job.state == "running"
        )
    )
    return [
        TriggererJob(r.id, r.hostname, r.state, r.latest_heartbeat and r.latest_heartbeat.timestamp())
        for r in rows
    ]


def read_trigger_counts(
    session: Session, dag_ids: Collection[str] | None = None
) -> tuple[dict[int | None, int], dict[int | None, int]]:
    """Triggers per triggerer id (None: not picked up yet), all of them and our LLM calls.

    ``dag_ids``: only the triggers of these DAGs' task instances (see :func:`figures.trigger_counts`).
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger

    rows = session.execute(
        select(Trigger.triggerer_id, Trigger.classpath, TaskInstance.dag_id, func.count())
        .select_from(Trigger)
        .outerjoin(TaskInstance, TaskInstance.trigger_id == Trigger.id)
        .group_by(Trigger.triggerer_id, Trigger.classpath, TaskInstance.dag_id)
    )
    return figures.trigger_counts(rows, dag_ids)


def read_budgets(session: Session, now: float, conn_ids: Collection[str] = ()) -> list[dict[str, Any]]:
    """Spent and left of every LLM connection with ``budget_usd`` (see ``monitor/budgets.py``).

    The connections are the metadata DB's of type ``llm`` and ``conn_ids`` (those seen in calls, which
    may live in environment variables or a secrets backend).
    """
    from airflow.models.connection import Connection

    known = set(session.scalars(select(Connection.conn_id).where(Connection.conn_type == "llm")))
    configs: dict[str, tuple[BudgetConfig, str | None]] = {}
    for conn_id in sorted(known | set(conn_ids)):
        try:
            extra = Connection.get_connection_from_secrets(conn_id).extra_dejson
            if extra.get("budget_usd") is not None:
                configs[conn_id] = (BudgetConfig.parse(extra["budget_usd"]), extra.get("rate_limit_backend"))
        except Exception:  # a connection gone or malformed: its calls report that; the monitor goes on
            continue
    spent: dict[str, tuple[float | None, str]] = {}
    period_calls: dict[float, list[Call]] = {}  # the XComs since each period start, read once
    for conn_id, (config, backend) in configs.items():
        if backend:
            spent[conn_id] = (budgets.spent_in_redis(backend, conn_id, config, now), "redis")
            continue
        start = config.start(now)
        if start not in period_calls:
            period_calls[start] = read_calls(session, start, now)
        spent[conn_id] = (budgets.spent_in_xcoms(period_calls[start], conn_id, start), "xcom")
    return budgets.budget_figures({c: config for c, (config, _) in configs.items()}, spent, now)


def read_circuits(session: Session, conn_ids: Collection[str] = ()) -> list[dict[str, Any]]:
    """The live state of the circuit breakers shared through Redis (connections with ``rate_limit_backend``).

    A breaker kept in a triggerer's own memory cannot be read from here: its skips show in ``llm_meta``.
    """
    from airflow.models.connection import Connection
    from redis.exceptions import RedisError

    from airflow_llm_async.limits_redis import read_breakers, redacted

    known = set(session.scalars(select(Connection.conn_id).where(Connection.conn_type == "llm")))
    by_backend: dict[str, set[str]] = {}
    for conn_id in sorted(known | set(conn_ids)):
        try:
            extra = Connection.get_connection_from_secrets(conn_id).extra_dejson
        except Exception:  # a connection gone or malformed: its calls report that; the monitor goes on
            continue
        if extra.get("rate_limit_backend") and extra.get("circuit_breaker", True) not in (False, "false"):
            by_backend.setdefault(extra["rate_limit_backend"], set()).add(conn_id)
    rows = []
    for url, ids in by_backend.items():
        try:
            rows += [row for row in read_breakers(url) if row["conn_id"] in ids]
        except (RedisError, OSError) as exc:
            log.warning("circuit breakers: cannot read %s (%s)", redacted(url), type(exc).__name__)
    return rows


def reads_every_dag(session: Session, dag_ids: Collection[str]) -> bool:
    """Whether ``dag_ids`` holds every DAG of the deployment (an admin's readable DAGs do)."""
    from airflow.models.dag import DagModel

    return set(session.scalars(select(DagModel.dag_id))) <= set(dag_ids)


def load_snapshot(
    session: Session,
    *,
    window_s: float,
    capacity: int | None = None,
    dag_ids: Collection[str] | None = None,
    with_triggerers: bool = True,
    with_timeline: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """Every figure of the last ``window_s`` seconds (see :func:`figures.snapshot`).

    ``capacity``: of each triggerer; None reads ``[triggerer] capacity`` (a triggerer started with
    ``--capacity`` overrides it, and the DB does not record that). ``with_triggerers=False`` leaves the
    job and trigger tables out (for a user who may not see jobs). ``dag_ids``: only the calls of these
    DAGs and, unless they are every DAG, only the triggers of these DAGs, without the capacity left
    (it would tell how many triggers the other DAGs run).

    Besides: ``batches_waiting`` (:func:`read_waiting_batches`: now, whatever the window) and, of the
    batch tasks that ended in the window, ``batch_costs`` per DAG and model and ``batch_cost_totals``
    (see ``monitor/batches.py``).
    """
    from airflow.configuration import conf

    now = time.time() if now is None else now
    if capacity is None:
        capacity = conf.getint("triggerer", "capacity")
    calls, batch_uses = read_calls_and_batch_uses(session, now - window_s, now, dag_ids)
    jobs: list[TriggererJob] = []
    running: dict[int | None, int] = {}
    llm_running: dict[int | None, int] = {}
    all_triggers = False
    if with_triggerers:
        jobs = read_triggerers(session)
        all_triggers = dag_ids is None or reads_every_dag(session, dag_ids)
        running, llm_running = read_trigger_counts(session, None if all_triggers else dag_ids)
    snapshot = figures.snapshot(
        calls,
        jobs,
        running,
        llm_running,
        capacity=capacity,
        now=now,
        window_s=window_s,
        alive_within_s=conf.getfloat("triggerer", "triggerer_health_check_threshold"),
        with_timeline=with_timeline,
        all_triggers=all_triggers,
    )
    snapshot["batches_waiting"] = read_waiting_batches(session, now, dag_ids)
    snapshot["batch_costs"] = batches.batch_cost_figures(batch_uses)
    snapshot["batch_cost_totals"] = batches.batch_cost_totals(batch_uses)
    # A connection's spending covers every DAG that uses it: shown only to whom may read them all.
    seen = {call.conn_id for call in calls if call.conn_id}
    snapshot["budgets"] = read_budgets(session, now, seen) if all_triggers else []
    if all_triggers:  # a shared breaker's state, like a budget, belongs to every DAG using the connection
        snapshot["circuits"] = figures.circuit_figures(calls, read_circuits(session, seen))
    return snapshot
