"""Every workaround for Airflow 3.3.2, in one place: what it works around, and how to tell it can go.

Each entry names the upstream behaviour (and issue, where one is known), what we do instead, and the
check that tells when a later Airflow makes it unnecessary. Nothing else in the package works around
Airflow; code that needs one of these calls it from here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

# --- 1. XComs sent with TaskSuccessEvent(xcoms=...) are stored JSON-encoded twice -----------------
# Upstream: no issue filed that we found (closest: apache/airflow#45231). airflow/models/trigger.py
# handle_event_submit (the BaseTaskEndEvent overload) pushes through TaskInstance.xcom_push ->
# XComModel.set with its default serialize=True, so the value is JSON-encoded before it goes into a
# JSON column: a downstream task reads a dict as text and an answer with quotes. Instead: a trigger
# that ends its task pushes through the XCom backend as a worker would (below) and fires an empty
# TaskSuccessEvent / TaskFailedEvent. It can go when that path passes serialize=False (as the
# execution API's XCom route does) and a dict sent in TaskSuccessEvent(xcoms=...) reads back as a
# dict downstream (tests/e2e: worker-free XComs).


async def push_xcoms(ti: Any, xcoms: Mapping[str, Any], *, mapped_length: int | None = None) -> None:
    """Store a task's XComs from a trigger, through the configured XCom backend, all at once.

    Serialized in a thread, off the triggerer's event loop: a fan-out's ``llm_meta`` (1,000 items) takes
    0.1 s of pure Python on an idle machine, and a custom backend may write to object storage there.
    ``mapped_length`` is recorded with ``return_value``, for a downstream task mapped over it.
    """
    where = {"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "map_index": ti.map_index}
    # Sent together: the supervisor answers them one by one, without a round trip's wait between.
    await asyncio.gather(
        *(
            set_xcom(key, value, mapped_length=mapped_length if key == "return_value" else None, **where)
            for key, value in xcoms.items()
        )
    )


async def set_xcom(key: str, value: Any, *, mapped_length: int | None = None, **where: Any) -> None:
    """``XCom.aset`` with the backend's serialization in a thread (see :func:`push_xcoms`)."""
    from airflow.sdk.execution_time.comms import SetXCom
    from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS
    from airflow.sdk.execution_time.xcom import XCom

    stored = await asyncio.to_thread(XCom.serialize_value, value, key=key, **where)
    await SUPERVISOR_COMMS.asend(SetXCom(key=key, value=stored, mapped_length=mapped_length, **where))


def decode_double_encoded(value: Any) -> Any:
    """A value stored JSON-encoded once more (by 3.3.2's TaskSuccessEvent xcoms) is decoded again.

    The monitor reads XComs that earlier releases of this provider may have stored that way.
    """
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


# --- 2. The deferral race: a resumed task failed by its own worker's late report ------------------
# Upstream: apache/airflow#67287, fixed on main by apache/airflow#68741 (not in 3.3.2; the running-
# state variant is still open: #71580, #72716). When a trigger fires before the worker has reported
# that its try deferred (up to [workers] min_heartbeat_interval, 5 s, later), the resumed try can be
# failed with "finished with state success, but the task instance's state attribute is queued";
# 9 % of 150 short deferred calls failed so here (docs/fault-survival.md). Instead: a successful call
# ends its task in the triggerer (no resume, so no race); a failure still resumes on a worker, which
# raises the right exception for retries and callbacks. It can go when the resume-after-defer branch
# of SchedulerJobRunner.process_executor_events accepts a QUEUED task instance, and
# tests/e2e/faults/race_study.py, run with end="resume", shows no such failure.


def ends_on_success(operator: Any, base: type) -> bool:
    """End the task in the triggerer when its call succeeds: unless a subclass wants its own
    ``execute_complete`` to see the answer (then it must resume, race and all)."""
    return type(operator).execute_complete is base.execute_complete


# --- 3. Worker-free templates can pull only one map index ----------------------------------------
# Upstream: no issue filed that we found (the same gap in the dag-processor was apache/airflow#55464,
# fixed by #55542). In the triggerer, ``ti.xcom_pull(task_ids=...)`` without ``map_indexes`` sends
# GetXComSequenceSlice, which is not in jobs/triggerer_job_runner.py's ToTriggerSupervisor union:
# the supervisor cannot decode it, never answers, and rendering waits forever. Instead: such
# templates are refused when the DAG is parsed, with the fix (``map_indexes=-1``). It can go when
# GetXComSequenceSlice is in that union and a worker-free task rendering
# ``ti.xcom_pull(task_ids='up')`` ends.

_PULL_ALL_MAP_INDEXES = re.compile(r"xcom_pull\((?![^)]*map_indexes)[^)]*\)")


def check_worker_free_templates(op: Any) -> None:
    """ValueError naming the field and the fix, for a template the triggerer could not render."""
    for field in op.template_fields:
        value = getattr(op, field, None)
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if _PULL_ALL_MAP_INDEXES.search(text):
            raise ValueError(
                f"{type(op).__name__} {op.task_id!r}: with start_from_trigger=True the triggerer renders "
                f"`{field}`, and Airflow 3.3.2's triggerer can only pull one map index: add "
                f"map_indexes=-1 to the xcom_pull, e.g. ti.xcom_pull(task_ids='up', map_indexes=-1)."
            )


# --- 4. dag.test() runs triggers inline, without a task instance ---------------------------------
# Upstream: no issue filed that we found. ``dag.test()`` / ``airflow dags test`` run a deferred
# task's trigger in-process (airflow/sdk/definitions/dag.py _run_task) with ``trigger.task_instance``
# None, and always resume the task with the event. Instead: without a task instance the trigger fires
# a plain TriggerEvent with the outcome, and ``execute_complete`` ends the task as after any resume.
# It can go when _run_task gives triggers their task instance and handles a BaseTaskEndEvent.
# Connections stored in the metadata DB are not found there either: the inline trigger's lookup goes
# through ExecutionAPISecretsBackend.aget_connection, which awaits ``SUPERVISOR_COMMS.asend``, and
# InProcessSupervisorComms has only a sync ``send``. Instead: when the async lookup finds nothing and
# the comms cannot answer it, the sync lookup runs in a thread (:func:`get_connection_in_dags_test`).
# It can go when InProcessSupervisorComms has ``asend`` and the dags-test e2e test's ``llm_db`` task
# passes without it.


def can_end_task_here(trigger: Any) -> bool:
    """Whether the trigger can push XComs and end the task itself (False under dag.test())."""
    return trigger.task_instance is not None


async def get_connection_in_dags_test(conn_id: str) -> Any:
    """Under ``dags test``, the connection its sync lookup finds (or None); None anywhere else."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.execution_time import task_runner

    comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    if comms is None or hasattr(comms, "asend"):  # a real triggerer or worker: the async lookup said
        return None
    try:
        return await asyncio.to_thread(BaseHook.get_connection, conn_id)
    except AirflowNotFoundException:
        return None


# --- 5. Mapped tasks keep only the class-level start_trigger_args --------------------------------
# Upstream: apache/airflow#48009 (open; disabled on purpose by #48006 and #53744): a mapped task
# never starts in the triggerer (SerializedMappedOperator.expand_start_from_trigger returns False);
# it runs in the default deferrable mode (docs/worker-free.md). Nothing to do in code; it can go
# when #48009 is closed and a mapped LLMOperator(start_from_trigger=True) takes no worker slot.


# --- 6. Every connection lookup in the triggerer rebuilds the secrets backends --------------------
# Upstream: no issue for this case (apache/airflow#71756 made lookups cache custom backends only).
# With the default chain, airflow/sdk/configuration.py ensure_secrets_loaded builds the backends on
# every lookup, so ``BaseHook.aget_connection`` costs about 0.5 ms of CPU and a hop to a thread, a
# third of a trigger's CPU at thousands of calls (docs/performance.md).
# Instead: ``hooks/llm.shared_endpoint`` resolves each connection once per event loop and
# ``ENDPOINT_TTL`` (60 s), concurrent callers sharing the lookup. The cache also spares any secrets
# backend the load, so it stays when this goes; ``bench/overhead.py`` shows what a lookup costs.


# --- 7. A triggerer builds its in-process Execution API on the first request that needs it -------
# Upstream: no issue filed that we found. jobs/triggerer_job_runner.py TriggerRunnerSupervisor.client
# (a cached_property) builds InProcessExecutionAPI (FastAPI + Cadwyn: 5 s of CPU idle, 16 s at load
# 5) on the supervisor's one thread, inside the first request that needs it: in our default modes the
# first answer's XCom push, so the first tasks after a triggerer (re)start ended 5-16 s after their
# answer (docs/performance.md, "Cold triggerer"). Instead: the first trigger of ours in a process
# looks its connections up (that lookup waits for the same thread: secrets are masked through it),
# then sends one cheap read that needs the API (a dag-run count) without waiting for it, so the build
# overlaps the LLM call. And (prebuild_execution_api, from the provider's listener plugin) a triggerer
# builds it at start-up in a background thread, once its runner subprocess is forked (a fork while a
# thread imports would leave the child holding import locks no thread will release), and its
# supervisor is handed that instance instead of building its own. It can go when the triggerer builds
# its client at start-up (or off its main thread) and bench/cold_start.py shows no cold penalty with
# both a no-op.

_warm_up: tuple[int, asyncio.Task[None]] | None = None  # (pid, task): once per process, even after fork


def execution_api_cold() -> bool:
    """Whether no trigger of this process has asked for the warm-up yet."""
    return _warm_up is None or _warm_up[0] != os.getpid()


def warm_up_execution_api(ti: Any) -> None:
    """Have the triggerer build its Execution API now, once per process; never waits, never raises."""
    global _warm_up
    if not execution_api_cold():
        return
    from airflow.sdk.execution_time import task_runner

    comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    if ti is None or comms is None or not hasattr(comms, "asend"):  # dags test, or no supervisor
        return
    _warm_up = (os.getpid(), asyncio.get_running_loop().create_task(_send_warm_up(comms, ti.dag_id)))


async def _send_warm_up(comms: Any, dag_id: str) -> None:
    from airflow.sdk.execution_time.comms import GetDRCount

    started = time.monotonic()
    log.info("Warming up the triggerer's in-process Execution API (pid %d)", os.getpid())
    try:
        # A read-only count: the cheapest request that goes through the in-process API.
        await comms.asend(GetDRCount(dag_id=dag_id, states=["running"]))
    except Exception:  # a failed warm-up only costs the cold start it tried to spare
        log.debug("Execution API warm-up failed", exc_info=True)
        return
    log.info("Triggerer's in-process Execution API ready after %.2f s", time.monotonic() - started)


def prebuild_execution_api(job: Any) -> None:
    """Called as each Airflow job starts: in a triggerer, build its Execution API in the background."""
    if not hasattr(job, "job_type"):  # a task runner, not a job
        return
    from airflow.configuration import conf

    if conf.getboolean("llm_async", "prebuild_execution_api", fallback=True):
        threading.Thread(target=_prebuild, args=(job,), name="llm-async-prebuild-api", daemon=True).start()


def _prebuild(job: Any) -> None:
    try:
        import psutil

        me = psutil.Process()
        children = {child.pid for child in me.children()}  # the log server, already started
        # The runner's constructor names the job right after Job() (and this hook) returned.
        if not _wait_until(lambda: job.job_type is not None, 30) or job.job_type != "TriggererJob":
            return
        if not _wait_until(lambda: any(c.pid not in children for c in me.children()), 120):
            return  # no runner subprocess: the triggerer failed to start, or Airflow changed
        from airflow.jobs import triggerer_job_runner

        if not hasattr(triggerer_job_runner, "in_process_api_server"):
            return
        original = triggerer_job_runner.in_process_api_server
        built: Future[Any] = Future()

        def prebuilt() -> Any:
            # The supervisor asks for it once (TriggerRunnerSupervisor.client); it waits here instead of
            # building a second one.
            try:
                api = built.result(timeout=300)
            except Exception:
                return original()
            log.info("The triggerer uses the Execution API built at its start")
            return api

        triggerer_job_runner.in_process_api_server = prebuilt
        started = time.monotonic()
        try:
            api = original()
            # The transport starts the app; the first request builds the rest (as long again, measured).
            import httpx

            httpx.Client(transport=api.transport, base_url="http://in-process.invalid./").get("/health")
        except BaseException as exc:
            built.set_exception(exc)
            raise
        built.set_result(api)
        log.info(
            "Built the triggerer's in-process Execution API at its start in %.2f s",
            time.monotonic() - started,
        )
    except Exception:  # only the cold start it tried to spare is lost
        log.warning("Could not build the triggerer's Execution API in the background", exc_info=True)


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# --- 8. on_kill() also runs for a trigger moved to another triggerer ----------------------------------
# Upstream: apache/airflow#73454 ("Skip on_kill() for triggers reassigned to another triggerer", open).
# A triggerer whose heartbeat stalled past [triggerer] triggerer_health_check_threshold (compat entry 7:
# 5-26 s building its Execution API) loses its triggers to another triggerer; when it comes back, it
# cancels them with the same "user action" message a killed task gets, so on_kill() runs there while
# the other triggerer carries on with the task. A batch's on_kill would cancel the batch that the task
# still waits for. So on_kill asks first: a task still deferred was not killed. Can go when on_kill
# runs only for a user's action (the upstream PR merged): then the check always says "not deferred".


async def task_still_deferred(ti: Any) -> bool:
    """Whether ``ti`` is still deferred (its trigger moved, not killed); False when unknown or no TI."""
    if ti is None:
        return False
    from airflow.sdk.execution_time.comms import GetTaskStates
    from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

    try:
        answer = await SUPERVISOR_COMMS.asend(
            GetTaskStates(
                dag_id=ti.dag_id, run_ids=[ti.run_id], task_ids=[ti.task_id], map_index=ti.map_index
            )
        )
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"
        state = (answer.task_states.get(ti.run_id) or {}).get(key)
    except Exception:  # unknown: do what Airflow asked
        log.warning("could not read the task's state before on_kill; going on", exc_info=True)
        return False
    return state == "deferred"
