"""The monitor's figures, as pure functions over rows read from the metadata DB (I/O-free).

The source of every per-call figure is the ``llm_meta`` XCom each LLM task pushes (README, "XCom"):
``model``, ``conn_id``, ``usage``, ``latency_s``, ``attempts``, ``error`` on failure and, in newer
versions, ``cost_usd``, ``started_at``/``finished_at`` (epoch seconds), ``host`` and ``pid``. Older or
unknown shapes are read as far as they go and skipped otherwise: a monitor never crashes on a value
it cannot read. The live per-triggerer figures come from the ``job`` and ``trigger`` tables.

An ``llm_meta`` is untrusted input: any DAG author, and any user allowed to write XComs through the
REST API, decides what it holds. :func:`calls_from_xcom` is the one place a stored value becomes
:class:`Call` records, for the monitor and the dashboard alike: every field is type- and
range-checked there, and every time is clamped to the window asked for, so that no value can make a
refresh slow or its answer large (one ``started_at`` two million days back once made every dashboard
refresh take 15 s and answer 57 MiB). The figures below rely on that, and the timeline bounds its
own size besides.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_llm_async.core import fanout

LLM_TRIGGERS_MODULE = "airflow_llm_async.triggers."  # ChatCompletionTrigger, FanOutTrigger, ...
COMPLETION_RATE_SPAN_S = 60.0  # "completions per minute" counts the calls that ended in the last minute
TIMELINE_MAX_BUCKETS = 60
TIMELINE_MAX_SERIES = 20  # processes drawn one by one in the in-flight chart; the others are summed
OTHER_PROCESSES = "other processes"
_BUCKET_WIDTHS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)
_MAX_NESTING = 3  # how deep a fan-out's list of call metas is looked for
_NUMBER_TYPES = (int, float)

# Bounds of the values read from an llm_meta: far above any real call, far below what slows a refresh.
MAX_CALLS_PER_XCOM = fanout.MAX_ITEMS  # a fan-out task holds at most this many calls
MAX_TEXT = 250  # characters of a model, conn_id or host (Airflow's own ids are at most 250)
MAX_LATENCY_S = 30 * 86400.0
MAX_TOKENS = 10**9  # per call
MAX_COST_USD = 1e6  # per call
MAX_PID = 2**31 - 1
MAX_ATTEMPTS = 100  # of one call, looked at for circuit-breaker skips (retries x models is far fewer)


@dataclass(frozen=True)
class Call:
    """One LLM call (its whole fallback chain), read from an ``llm_meta`` XCom."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    model: str
    conn_id: str | None
    ok: bool
    latency_s: float | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    started_at: float | None  # epoch seconds (finished_at - latency_s when the meta has none)
    finished_at: float  # epoch seconds (the XCom's timestamp when the meta has no finished_at)
    host: str | None
    pid: int | None
    # (conn_id, model) of each attempt the call skipped because that model's circuit breaker was open
    circuit_skips: tuple[tuple[str, str], ...] = ()

    @property
    def process(self) -> str:
        """The process that ran the call, as shown: ``host pid N``."""
        if self.host is None and self.pid is None:
            return "unknown"
        return f"{self.host or '?'} pid {self.pid if self.pid is not None else '?'}"

    @property
    def start(self) -> float:
        if self.started_at is not None:
            return self.started_at
        return self.finished_at - (self.latency_s or 0.0)


@dataclass(frozen=True)
class TriggererJob:
    """A ``TriggererJob`` row of the ``job`` table."""

    id: int
    hostname: str | None
    state: str | None
    latest_heartbeat: float | None  # epoch seconds


def is_llm_trigger(classpath: str | None) -> bool:
    """A trigger of ours (a ``trigger`` row's ``classpath``): an LLM call or a fan-out of calls."""
    return bool(classpath) and classpath.startswith(LLM_TRIGGERS_MODULE)


def trigger_counts(
    rows: Iterable[tuple[int | None, str | None, str | None, int]], dag_ids: Collection[str] | None
) -> tuple[dict[int | None, int], dict[int | None, int]]:
    """Triggers per triggerer id (None: not picked up yet), all of them and our LLM calls.

    ``rows``: ``(triggerer_id, classpath, dag_id, count)``, the dag_id of the trigger's task instance
    (None for a trigger of no task, such as an asset watcher). ``dag_ids``: count only the triggers of
    these DAGs (the ones a dashboard user may read: the counts of the others would tell them how busy
    DAGs they may not see are); None: every trigger.
    """
    running: dict[int | None, int] = {}
    llm_running: dict[int | None, int] = {}
    for triggerer_id, classpath, dag_id, count in rows:
        if dag_ids is not None and dag_id not in dag_ids:
            continue
        if triggerer_id is None and dag_id is None:
            # No triggerer runs it and no task waits on it: left behind (`airflow dags test` runs its
            # triggers in process), and deleted by the next triggerer. Nothing is waiting.
            continue
        running[triggerer_id] = running.get(triggerer_id, 0) + count
        if is_llm_trigger(classpath):
            llm_running[triggerer_id] = llm_running.get(triggerer_id, 0) + count
    return running, llm_running


# ---- reading llm_meta ---------------------------------------------------------------------------------


def call_metas(value: Any, _depth: int = 0) -> list[Mapping[str, Any]]:
    """The per-call metas inside an ``llm_meta`` value: itself, or a fan-out's list of items.

    A call's meta has ``attempts`` or ``usage``. A fan-out pushes a dict holding a list of such metas
    (and totals, which are not counted again); a list of metas is read item by item.
    """
    if _depth > _MAX_NESTING:
        return []
    if isinstance(value, list):
        return [meta for item in value for meta in call_metas(item, _depth + 1)]
    if not isinstance(value, Mapping):
        return []
    for key, item in value.items():
        if key != "attempts" and isinstance(item, list):
            nested = [meta for element in item for meta in call_metas(element, _depth + 1)]
            if nested:
                return nested
    if "attempts" in value or "usage" in value:
        return [value]
    return []


def calls_from_xcom(
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
    value: Any,
    timestamp: float,
    *,
    since: float,
    now: float,
) -> list[Call]:
    """Every call recorded by one ``llm_meta`` XCom, each field checked (see the module's docstring).

    ``timestamp``: when the XCom was written; ``since``..``now``: the window asked for (epoch seconds),
    which every time of a call is clamped to. At most ``MAX_CALLS_PER_XCOM`` calls.
    """
    metas = call_metas(value)[:MAX_CALLS_PER_XCOM]
    return [_call(dag_id, run_id, task_id, map_index, meta, timestamp, since, now) for meta in metas]


def _call(
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
    meta: Mapping[str, Any],
    timestamp: float,
    since: float,
    now: float,
) -> Call:
    # A call's meta lists its attempts; a fan-out item counts them and keeps a failure's in attempt_log.
    attempts = next((v for v in (meta.get("attempts"), meta.get("attempt_log")) if isinstance(v, list)), [])
    last_attempt = next((a for a in reversed(attempts) if isinstance(a, Mapping)), {})
    model = _text(meta.get("model")) or _text(meta.get("requested_model")) or _text(last_attempt.get("model"))
    conn_id = _text(meta.get("conn_id")) or _text(last_attempt.get("conn_id"))
    usage = meta.get("usage") if isinstance(meta.get("usage"), Mapping) else {}
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    latency = _bounded(meta.get("latency_s"), MAX_LATENCY_S)
    # Times are clamped into the window: a call outside it would stretch every figure over time.
    finished_at = _number(meta.get("finished_at"))
    finished_at = _clamp(timestamp if finished_at is None else finished_at, since, now)
    started_at = _number(meta.get("started_at"))
    if started_at is None and latency is not None:
        started_at = finished_at - latency
    pid = _bounded(meta.get("pid"), MAX_PID)
    skips = tuple(
        (_text(a.get("conn_id")) or "unknown", _text(a.get("model")) or "unknown")
        for a in attempts[:MAX_ATTEMPTS]
        if isinstance(a, Mapping)
        and isinstance(a.get("reason"), Mapping)
        and a["reason"].get("kind") == "circuit_open"
    )
    return Call(
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        model=model or "unknown",
        conn_id=conn_id,
        ok="error" not in meta and meta.get("status") != "error",
        latency_s=latency,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cost_usd=_bounded(meta.get("cost_usd"), MAX_COST_USD),
        started_at=None if started_at is None else _clamp(started_at, since, finished_at),
        finished_at=finished_at,
        host=_text(meta.get("host")),
        pid=None if pid is None else int(pid),
        circuit_skips=skips,
    )


def _text(value: Any) -> str | None:
    """A non-empty string, cut to ``MAX_TEXT`` characters."""
    return value[:MAX_TEXT] if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    """A finite int or float (not a bool, not a string of digits) as a float; None otherwise."""
    # type(), not isinstance(): a bool is not a number here, and this runs ~10 times per call.
    if type(value) not in _NUMBER_TYPES:
        return None
    try:
        number = float(value)  # an int beyond a float's range (JSON allows it) raises OverflowError
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _bounded(value: Any, high: float) -> float | None:
    """A number from 0 to ``high``; None (unknown) otherwise."""
    number = _number(value)
    return number if number is not None and 0 <= number <= high else None


def _count(value: Any) -> int:
    """Tokens: a number from 0 to ``MAX_TOKENS``; 0 otherwise."""
    number = _bounded(value, MAX_TOKENS)
    return 0 if number is None else int(number)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


# ---- aggregates -----------------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least q % of the values at or below it)."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def cost_sum(calls: Iterable[Call]) -> float | None:
    """Dollars of the calls whose cost is known; None when no call has one."""
    costs = [c.cost_usd for c in calls if c.cost_usd is not None]
    return round(sum(costs), 9) if costs else None


def _sums(calls: Sequence[Call]) -> dict[str, Any]:
    latencies = [c.latency_s for c in calls if c.latency_s is not None]
    return {
        "calls": len(calls),
        "failures": sum(not c.ok for c in calls),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "prompt_tokens": sum(c.prompt_tokens for c in calls),
        "completion_tokens": sum(c.completion_tokens for c in calls),
        "total_tokens": sum(c.total_tokens for c in calls),
        "cost_usd": cost_sum(calls),
    }


def model_figures(calls: Iterable[Call]) -> list[dict[str, Any]]:
    """Per DAG and model: calls, failures, p50/p95 latency, tokens, cost."""
    groups: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for call in calls:
        groups[(call.dag_id, call.model)].append(call)
    return [{"dag_id": d, "model": m, **_sums(group)} for (d, m), group in sorted(groups.items())]


def circuit_figures(calls: Iterable[Call], live: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Per connection and model: the attempts skipped because its circuit was open (from ``llm_meta``),
    and its live state where one is known (``live``: the breakers shared through Redis)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(conn_id: str, model: str) -> dict[str, Any]:
        if (conn_id, model) not in rows:
            rows[(conn_id, model)] = {
                "conn_id": conn_id,
                "model": model,
                "skipped": 0,
                "last_skipped_at": None,
                **dict.fromkeys(("status", "failures", "last_error", "probe_at")),
            }
        return rows[(conn_id, model)]

    for call in calls:
        for conn_id, model in call.circuit_skips:
            item = row(conn_id, model)
            item["skipped"] += 1
            item["last_skipped_at"] = max(item["last_skipped_at"] or call.finished_at, call.finished_at)
    for state in live:
        row(str(state["conn_id"]), str(state["model"])).update(
            {key: state.get(key) for key in ("status", "failures", "last_error", "probe_at")}
        )
    return [rows[key] for key in sorted(rows)]


def run_figures(calls: Iterable[Call]) -> list[dict[str, Any]]:
    """Per DAG run, in the order the runs made their first call: calls, failures, tokens, cost."""
    groups: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for call in calls:
        groups[(call.dag_id, call.run_id)].append(call)
    rows = []
    for (dag_id, run_id), group in groups.items():
        sums = _sums(group)
        rows.append(
            {
                "dag_id": dag_id,
                "run_id": run_id,
                "first_call_at": min(c.start for c in group),
                "calls": sums["calls"],
                "failures": sums["failures"],
                "total_tokens": sums["total_tokens"],
                "cost_usd": sums["cost_usd"],
            }
        )
    return sorted(rows, key=lambda r: (r["first_call_at"], r["dag_id"], r["run_id"]))


def completions_per_min(calls: Iterable[Call], now: float) -> int:
    """Calls that ended within the last minute."""
    return sum(now - COMPLETION_RATE_SPAN_S < c.finished_at <= now for c in calls)


def triggerer_figures(
    jobs: Iterable[TriggererJob],
    running: Mapping[int, int],
    llm_running: Mapping[int, int],
    capacity: int,
    calls: Sequence[Call],
    now: float,
    alive_within_s: float,
    all_triggers: bool = True,
) -> list[dict[str, Any]]:
    """Per running triggerer job: triggers it runs (all, and ours), capacity left, completions per minute.

    Completions come from the calls' ``host``: the DB does not say which of several triggerers on one host
    ran a call, so there ``completions_per_min`` is the host's (and ``host_shared`` is true); the
    ``processes`` figures have them per process. ``all_triggers=False``: ``running`` counts only some
    triggers (those of the DAGs a user may read), so the capacity left is not known (None).
    """
    jobs = sorted(jobs, key=lambda j: j.id)
    hosts = defaultdict(int)
    for job in jobs:
        hosts[job.hostname] += 1
    rows = []
    for job in jobs:
        heartbeat_age = None if job.latest_heartbeat is None else round(now - job.latest_heartbeat, 1)
        host_calls = [c for c in calls if c.host is not None and c.host == job.hostname]
        rows.append(
            {
                "id": job.id,
                "hostname": job.hostname,
                "state": job.state,
                "heartbeat_age_s": heartbeat_age,
                "alive": heartbeat_age is not None and heartbeat_age <= alive_within_s,
                "triggers_running": running.get(job.id, 0),
                "llm_triggers_running": llm_running.get(job.id, 0),
                "capacity": capacity,
                "capacity_left": capacity - running.get(job.id, 0) if all_triggers else None,
                "completions_per_min": completions_per_min(host_calls, now),
                "host_shared": hosts[job.hostname] > 1,
            }
        )
    return rows


def process_figures(calls: Iterable[Call], now: float) -> list[dict[str, Any]]:
    """Per process that ran calls (a triggerer's trigger runner, or a worker in sync mode)."""
    groups: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        groups[call.process].append(call)
    return [
        {
            "process": name,
            "host": group[0].host,
            "pid": group[0].pid,
            "calls": len(group),
            "completions_per_min": completions_per_min(group, now),
            "last_finished_at": max(c.finished_at for c in group),
        }
        for name, group in sorted(groups.items())
    ]


def timeline(
    calls: Sequence[Call],
    now: float,
    since: float | None = None,
    max_buckets: int = TIMELINE_MAX_BUCKETS,
) -> dict[str, Any]:
    """The figures over time, in equal buckets from the first call (``since`` at the earliest) to ``now``.

    ``in_flight[process]``: average calls in flight in each bucket (time-weighted, so a call in flight for
    half a bucket counts 0.5), for the ``TIMELINE_MAX_SERIES`` processes with the most calls, the others
    summed as ``OTHER_PROCESSES``; ``completions_per_min``: calls that ended in the bucket, as a rate;
    ``latency_p50_s``/``latency_p95_s``: of the calls that ended in the bucket (None when none did).
    At most ``max_buckets`` + 1 buckets, whatever the calls' times: a time outside is clamped.
    """
    if not calls:
        empty: dict[str, Any] = {"in_flight": {}, "completions_per_min": [], "latency_p50_s": []}
        return {"start": now, "bucket_s": 1, "buckets": 0, **empty, "latency_p95_s": []}
    earliest = now - max_buckets * _BUCKET_WIDTHS_S[-1]  # as far back as the widest buckets reach
    if since is not None:
        earliest = max(earliest, since)
    first = min(max(earliest, min(c.start for c in calls)), now)
    width = next((w for w in _BUCKET_WIDTHS_S if (now - first) / w <= max_buckets), _BUCKET_WIDTHS_S[-1])
    start = math.floor(first / width) * width
    count = max(1, math.ceil((now - start) / width))
    shown = _busiest_processes(calls, TIMELINE_MAX_SERIES)
    in_flight: dict[str, list[float]] = defaultdict(lambda: [0.0] * count)
    ended: list[list[Call]] = [[] for _ in range(count)]
    for call in calls:
        series = in_flight[call.process if call.process in shown else OTHER_PROCESSES]
        begin, finish = call.start, max(call.start, call.finished_at)
        for i in range(max(0, int((begin - start) // width)), min(count, int((finish - start) // width) + 1)):
            low, high = start + i * width, start + (i + 1) * width
            series[i] += max(0.0, min(finish, high) - max(begin, low)) / width
        ended[min(count - 1, max(0, int((call.finished_at - start) // width)))].append(call)
    return {
        "start": start,
        "bucket_s": width,
        "buckets": count,
        "in_flight": {
            name: [round(v, 3) for v in in_flight[name]]
            for name in sorted(in_flight, key=lambda name: (name == OTHER_PROCESSES, name))
        },
        "completions_per_min": [round(len(group) * 60 / width, 3) for group in ended],
        "latency_p50_s": [percentile([c.latency_s for c in g if c.latency_s is not None], 50) for g in ended],
        "latency_p95_s": [percentile([c.latency_s for c in g if c.latency_s is not None], 95) for g in ended],
    }


def _busiest_processes(calls: Iterable[Call], limit: int) -> set[str]:
    """The ``limit`` processes with the most calls (ties: by name)."""
    counts = Counter(call.process for call in calls)
    return set(sorted(counts, key=lambda name: (-counts[name], name))[:limit])


def snapshot(
    calls: Sequence[Call],
    jobs: Iterable[TriggererJob],
    running: Mapping[int, int],
    llm_running: Mapping[int, int],
    *,
    capacity: int,
    now: float,
    window_s: float,
    alive_within_s: float,
    with_timeline: bool = False,
    all_triggers: bool = True,
) -> dict[str, Any]:
    """Every figure, as the JSON that ``airflow-llm monitor --json`` prints and the dashboard draws.

    ``running``/``llm_running``: triggers per triggerer id (all, and ours); the key None counts the
    triggers no triggerer has picked up yet. ``all_triggers=False``: they count only the triggers of
    the DAGs a user may read (see :func:`trigger_counts`).
    """
    figures = {
        "generated_at": now,
        "window_s": window_s,
        "triggerers": triggerer_figures(
            jobs, running, llm_running, capacity, calls, now, alive_within_s, all_triggers
        ),
        "unassigned_triggers": running.get(None, 0),
        "all_triggers_counted": all_triggers,
        "processes": process_figures(calls, now),
        "models": model_figures(calls),
        "circuits": circuit_figures(calls),
        "runs": run_figures(calls),
        "totals": _sums(calls),
    }
    if with_timeline:
        figures["timeline"] = timeline(calls, now, since=now - window_s)
    return figures
