"""The monitor's Batch API figures (monitor/batches.py): batches waiting and what batch answers cost, how the
text view shows them, and how db.py reads them from a metadata DB (SQLite in memory, Airflow's own tables).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest

from airflow_llm_async.core import batch
from airflow_llm_async.monitor import batches, text
from tests.unit.test_monitor import meta

NOW = 1_800_000_000.0
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m"


def openai_batch(
    batch_id="batch_1", status="in_progress", total=100, completed=40, failed=2, created=NOW - 600
):
    """A batch object as GET /batches/{id} answers it."""
    return {
        "id": batch_id,
        "object": "batch",
        "status": status,
        "created_at": created,
        "output_file_id": None,
        "error_file_id": None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
    }


def state(*found, parts=None) -> dict:
    """The task's llm_batch XCom, as batches.py writes it (core.batch.counts of each part's batch)."""
    return {
        "fingerprint": "f" * 64,
        "parts": len(found) if parts is None else parts,
        "batches": {str(part): batch.counts(b) for part, b in enumerate(found)},
    }


def waiting(value, task_state="deferred", timestamp=NOW - 5, map_index=-1):
    return batches.waiting_from_xcom("d", "r", "t", map_index, value, timestamp, task_state, NOW)


# ---- batches waiting ----------------------------------------------------------------------------------


def test_the_state_key_is_the_triggers():
    from airflow_llm_async.triggers.batch import STATE_KEY

    assert batches.STATE_KEY == STATE_KEY


def test_a_task_with_two_batches_waiting_is_one_row_with_their_sums():
    value = state(
        openai_batch("batch_a", "in_progress", 100, 40, 2, created=NOW - 3700),
        openai_batch("batch_b", "finalizing", 50, 50, 0, created=NOW - 600),
    )
    assert waiting(value, map_index=3) == {
        "dag_id": "d", "run_id": "r", "task_id": "t", "map_index": 3, "task_state": "deferred",
        "batches": 2, "active": 2, "parts": 2, "batch_ids": ["batch_a", "batch_b"],
        "statuses": {"finalizing": 1, "in_progress": 1}, "total": 150, "completed": 90, "failed": 2,
        "created_at": NOW - 3700, "age_s": 3700.0, "updated_at": NOW - 5,
    }  # fmt: skip


def test_statuses_are_counted_most_first():
    found = [openai_batch(f"b{i}", s) for i, s in enumerate(["validating", "in_progress", "in_progress"])]
    row = waiting(state(*found))
    assert row["statuses"] == {"in_progress": 2, "validating": 1}
    assert batches.status_text(row["statuses"]) == "in_progress 2, validating 1"
    assert batches.status_text({"in_progress": 1}) == "in_progress"


@pytest.mark.parametrize("task_state", ["deferred", "up_for_retry", "running", None])
def test_a_batch_not_ended_waits_whatever_the_task_state(task_state):
    assert waiting(state(openai_batch(status="validating")), task_state)["active"] == 1


def test_ended_batches_wait_only_while_the_task_is_deferred():
    ended = state(openai_batch("a", "completed"), openai_batch("b", "expired"))
    assert waiting(ended, "up_for_retry") is None
    row = waiting(ended, "deferred")  # collecting the answers, or asking failed items again in real time
    assert (row["active"], row["statuses"]) == (0, {"completed": 1, "expired": 1})


def test_a_status_the_monitor_does_not_know_counts_as_waiting():
    assert waiting(state(openai_batch(status="queued")), "up_for_retry")["statuses"] == {"queued": 1}
    value = state(openai_batch())
    value["batches"]["0"]["status"] = ["not", "text"]
    assert waiting(value, "up_for_retry")["statuses"] == {"unknown": 1}


def test_a_list_of_batches_is_read_too():
    assert waiting({"batches": [batch.counts(openai_batch())]})["batch_ids"] == ["batch_1"]


@pytest.mark.parametrize(
    "value",
    [None, "text", 3, True, [], {}, {"batches": "x"}, {"batches": 7}, {"batches": {}}, {"batches": []},
     {"batches": {"0": "x", "1": [1]}}, {"batches": [None, 1.5]}, '{"batches": {}}'],
)  # fmt: skip
def test_values_that_are_not_a_batch_state_are_skipped(value):
    assert waiting(value) is None


def test_fields_of_the_wrong_type_or_range_read_as_unknown_instead_of_crashing():
    value = {
        "parts": "many",
        "batches": {
            "0": {"id": 12, "status": "in_progress", "total": "100", "completed": -4, "failed": float("nan"),
                  "created_at": True},
            "1": {"id": "", "status": None, "total": 10**400, "completed": 1e300, "failed": [1],
                  "created_at": -5},
            "2": {"id": "x" * 10_000, "status": "s" * 10_000, "total": 3, "completed": 2.9, "failed": None,
                  "created_at": NOW + 86400},  # a server's clock ahead: created now
        },
    }  # fmt: skip
    row = waiting(value)
    assert row["batch_ids"] == ["x" * 250]
    assert row["statuses"] == {"in_progress": 1, "unknown": 1, "s" * batches.MAX_STATUS: 1}
    assert (row["total"], row["completed"], row["failed"]) == (3, 2, 0)
    assert (row["parts"], row["created_at"], row["age_s"]) == (3, NOW, 0.0)
    assert json.loads(json.dumps(row)) == row


def test_a_state_without_any_creation_time_has_no_age():
    value = state(openai_batch())
    del value["batches"]["0"]["created_at"]
    assert (waiting(value)["created_at"], waiting(value)["age_s"]) == (None, None)


def test_a_task_with_very_many_batches_is_read_only_so_far():
    many = {"parts": 10**12, "batches": {str(i): batch.counts(openai_batch(f"b{i}")) for i in range(50_000)}}
    started = time.perf_counter()
    row = waiting(many)
    assert time.perf_counter() - started < 1
    assert row["batches"] == batches.MAX_BATCHES_PER_TASK
    assert row["total"] == 100 * batches.MAX_BATCHES_PER_TASK
    assert row["parts"] == batches.MAX_BATCHES_PER_TASK  # 10**12 parts is beyond any task: unknown
    assert batches.ids_text(row) == f"b0, b1, b2 (+{batches.MAX_BATCHES_PER_TASK - 3})"
    assert len(json.dumps(row)) < 1_000


def test_waiting_rows_are_the_most_recently_updated_first_and_bounded():
    rows = [waiting(state(openai_batch(f"b{i}")), timestamp=NOW - i) for i in (5, 1, 3)]
    shown = batches.waiting_rows([*rows, None], limit=2)
    assert [r["batch_ids"] for r in shown] == [["b1"], ["b3"]]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (-3, "0 s"), (42.9, "42 s"), (300, "5 min"), (12_000, "3 h 20 min"), (187_200, "2 d 4 h")],
)
def test_ages_read_as_a_person_says_them(seconds, shown):
    assert batches.age_text(seconds) == shown


# ---- batch cost ---------------------------------------------------------------------------------------


def item(model="gpt-4o-mini", batch_id="batch_1", status="success", **extra) -> dict:
    """A fan-out item's meta: answered by a batch (batch_id), or asked again in real time (realtime)."""
    answer = {
        "status": status,
        "attempts": 1,
        "model": model,
        "usage": {"total_tokens": 30},
        "cost_usd": 0.001,
    }
    if batch_id is not None:
        answer["batch_id"] = batch_id
    return {**answer, **extra}


def batch_meta(items, cost=0.5, realtime=1.0, realtime_items=0, parts=1) -> dict:
    """A batch task's llm_meta: the fan-out's, and ``batch`` as core.batch.summary writes it."""
    lines = [batch.LineResult({"text": "x", "meta": {}}, False, cost, realtime)]
    options = batch.BatchOptions()
    found = [openai_batch(f"batch_{i}", "completed", 100, 100, 0) for i in range(parts)]
    return {
        "items": items,
        "totals": {"items": len(items)},
        "failed_items": [],
        "batch": batch.summary(found, lines, realtime_items, options),
    }


def use(value, dag="d", task="t"):
    return batches.batch_use_from_meta(dag, "r", task, -1, value)


def test_a_batch_tasks_meta_says_what_its_answers_cost_and_would_have_cost():
    value = batch_meta(
        [item(), item(), item(model="gpt-4o"), item(batch_id=None, realtime=True)], 0.5, 1.0, 1
    )
    assert use(value) == batches.BatchUse("d", "r", "t", -1, "gpt-4o-mini", 1, 3, 1, 0.5, 1.0)


def test_a_failed_line_names_its_model_in_its_attempt_and_is_not_an_answer():
    failed = {"status": "error", "attempts": 1, "batch_id": "b", "error": {"kind": "batch"},
              "attempt_log": [{"model": "o3", "conn_id": "c"}]}  # fmt: skip
    assert (use(batch_meta([failed])).model, use(batch_meta([failed])).batch_items) == ("o3", 0)


@pytest.mark.parametrize(
    "value",
    [None, "x", [], {}, meta(), {"items": [item()]}, {"batch": "x"}, {"batch": [1]}, {"batch": None}],
)
def test_a_meta_without_a_batch_part_is_no_batch_use(value):
    assert use(value) is None


def test_fields_of_the_wrong_type_or_range_read_as_unknown():
    value = {
        "items": "not a list",
        "batch": {"batches": "x", "cost_usd": "$1", "realtime_cost_usd": 1e300, "realtime_items": -1},
    }
    assert use(value) == batches.BatchUse("d", "r", "t", -1, "unknown", 0, 0, 0, None, None)
    value = {
        "items": [1, None, {"batch_id": 5}, {"batch_id": "b", "model": ["x"]}],
        "batch": {"cost_usd": True},
    }
    assert use(value) == batches.BatchUse("d", "r", "t", -1, "unknown", 0, 0, 0, None, None)


def test_a_cost_known_without_its_real_time_cost_is_unpriced():
    value = batch_meta([item()], cost=0.5, realtime=None)
    assert value["batch"]["cost_usd"] is None  # core.batch.summary: unknown when any line's is
    value["batch"]["cost_usd"] = 0.5
    got = use(value)
    assert (got.cost_usd, got.realtime_cost_usd, got.priced) == (None, None, False)


def test_batch_costs_per_dag_and_model_sum_the_priced_tasks_and_count_the_others():
    uses = [
        use(batch_meta([item()], 0.25, 0.5), dag="nightly"),
        use(batch_meta([item()] * 3, 0.75, 1.5, realtime_items=2, parts=2), dag="nightly"),
        use(batch_meta([item(model="unpriced-model")], None, None), dag="nightly"),
        use(batch_meta([item(model="gpt-4o")], 1.0, 2.0), dag="adhoc"),
    ]
    assert batches.batch_cost_figures(uses) == [
        {"dag_id": "adhoc", "model": "gpt-4o", "tasks": 1, "batches": 1, "batch_items": 1,
         "realtime_items": 0, "cost_usd": 1.0, "realtime_cost_usd": 2.0, "saved_usd": 1.0,
         "unpriced_tasks": 0},
        {"dag_id": "nightly", "model": "gpt-4o-mini", "tasks": 2, "batches": 3, "batch_items": 4,
         "realtime_items": 2, "cost_usd": 1.0, "realtime_cost_usd": 2.0, "saved_usd": 1.0,
         "unpriced_tasks": 0},
        {"dag_id": "nightly", "model": "unpriced-model", "tasks": 1, "batches": 1, "batch_items": 1,
         "realtime_items": 0, "cost_usd": None, "realtime_cost_usd": None, "saved_usd": None,
         "unpriced_tasks": 1},
    ]  # fmt: skip
    totals = batches.batch_cost_totals(uses)
    assert (totals["tasks"], totals["cost_usd"], totals["realtime_cost_usd"]) == (4, 2.0, 4.0)
    assert (totals["saved_usd"], totals["unpriced_tasks"]) == (2.0, 1)
    assert batches.batch_cost_totals([]) == {
        "tasks": 0, "batches": 0, "batch_items": 0, "realtime_items": 0, "cost_usd": None,
        "realtime_cost_usd": None, "saved_usd": None, "unpriced_tasks": 0,
    }  # fmt: skip


# ---- text ---------------------------------------------------------------------------------------------


def snapshot(**extra) -> dict:
    return {
        "generated_at": NOW, "window_s": 3600, "triggerers": [], "unassigned_triggers": 0, "processes": [],
        "models": [], "totals": {"calls": 0, "failures": 0, "total_tokens": 0, "cost_usd": None}, **extra,
    }  # fmt: skip


def test_the_text_view_shows_batches_waiting_and_their_cost_only_when_there_are_some():
    out = text.render(
        snapshot(batches_waiting=[], batch_costs=[], batch_cost_totals=batches.batch_cost_totals([]))
    )
    assert "Batch" not in out
    assert "Batch" not in text.render(snapshot())  # a snapshot of an older monitor
    rows = [
        waiting(
            state(openai_batch("b_a", created=NOW - 3900), openai_batch("b_b", "finalizing")),
            map_index=2,
        ),
        waiting(state(openai_batch("b_c", "validating", 0, 0, 0, created=NOW - 30))),
    ]
    uses = [
        use(batch_meta([item()] * 200, 0.5, 1.0, realtime_items=3)),
        use(batch_meta([item("x")], None, None)),
    ]
    out = text.render(
        snapshot(
            batches_waiting=rows,
            batch_costs=batches.batch_cost_figures(uses),
            batch_cost_totals=batches.batch_cost_totals(uses),
        )
    )
    assert "Batches waiting (Batch API)" in out
    lines = out.splitlines()
    at = lines.index("Batches waiting (Batch API)")
    assert lines[at + 1 : at + 4] == [
        "  dag  run  task  batches   status                       completed/failed of total  age",
        "  d    r    t[2]  b_a, b_b  finalizing 1, in_progress 1  80/4 of 200                1 h 5 min",
        "  d    r    t     b_c       validating                   0/0 of 0                   30 s",
    ]
    at = lines.index("Batch API cost (batch tasks that ended in the window)")
    assert lines[at + 1 : at + 4] == [
        "  dag  model        tasks  batch answers  real-time re-asks  batch $   real time $  saved $",
        "  d    gpt-4o-mini  1      200            3                  0.500000  1.000000     0.500000",
        "  d    x            1      1              0                  -         -            -",
    ]
    assert "batch answers: $0.500000 at the batch price, $1.000000 in real time: saved $0.500000" in out
    assert "tasks whose model has no known price (not summed): 1" in out


def test_the_text_view_escapes_what_servers_and_dag_authors_wrote():
    value = state(openai_batch(HOSTILE, HOSTILE))
    row = batches.waiting_from_xcom(HOSTILE, HOSTILE, HOSTILE, -1, value, NOW, "deferred", NOW)
    cost = batches.batch_use_from_meta(HOSTILE, "r", "t", -1, batch_meta([item(model=HOSTILE)]))
    out = text.render(
        snapshot(
            batches_waiting=[row],
            batch_costs=batches.batch_cost_figures([cost]),
            batch_cost_totals=batches.batch_cost_totals([cost]),
        )
    )
    assert [ch for ch in out if ch != "\n" and (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F)] == []
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m" in out


# ---- reading the metadata DB --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    """Airflow's own tables in an in-memory SQLite DB (what `airflow db migrate` makes, without the
    migrations), shared by this module's tests: each writes its rows in a transaction it rolls back."""
    from airflow.models import import_all_models
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    import_all_models()
    from airflow.models.base import Base

    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    from sqlalchemy.orm import Session

    with engine.connect() as connection:
        transaction = connection.begin()
        with Session(bind=connection) as session:
            yield session
        transaction.rollback()


class AsObject(dict):
    """An XCom value stored as a JSON object, as the Task Execution API stores it (not as JSON text)."""


def add(session, dag_id, run_id, task_id, task_state, xcoms, map_index=-1):
    """A task instance, and its XComs: {key: (value, written at)}. A value is stored as a task's XCom.set
    stores it (its JSON text, which the JSON column encodes again); bytes: that text as given (not
    JSON, maybe); an :class:`AsObject`: as the object itself."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel

    session.execute(
        TaskInstance.__table__.insert().values(
            id=uuid.uuid4(), dag_id=dag_id, run_id=run_id,
            task_id=task_id, map_index=map_index, state=task_state, pool="default_pool",
        )
    )  # fmt: skip
    for key, (value, at) in xcoms.items():
        session.execute(
            XComModel.__table__.insert().values(
                dag_run_id=abs(hash((dag_id, run_id))) % 10**9, task_id=task_id, map_index=map_index, key=key,
                dag_id=dag_id, run_id=run_id, timestamp=datetime.fromtimestamp(at, UTC),
                value=stored(value),
            )
        )  # fmt: skip


def stored(value):
    from airflow.models.xcom import XComModel

    if isinstance(value, AsObject):
        return dict(value)
    return value.decode() if isinstance(value, bytes) else XComModel.serialize_value(value)


def test_the_snapshot_shows_the_batches_of_unfinished_tasks_and_the_cost_of_those_that_ended(session):
    from airflow_llm_async.monitor import db

    waits = state(openai_batch("batch_w", created=NOW - 120))
    done = batch_meta([item()] * 4 + [item(batch_id=None, realtime=True)], 0.25, 0.5, realtime_items=1)
    old = batch_meta([item()], 100.0, 200.0)  # written before the window
    rows = [  # dag, run, task, map index, task state, XComs
        ("nightly", "run_1", "ask", -1, "deferred", {"llm_batch": (AsObject(waits), NOW - 10)}),
        ("nightly", "run_1", "ask_retry", 4, "up_for_retry", {"llm_batch": (waits, NOW - 20)}),
        # A finished or cleared task's last state may still say in_progress (killed before its cancel was
        # seen): not shown.
        ("nightly", "run_0", "ask", -1, "failed", {"llm_batch": (waits, NOW - 30)}),
        ("nightly", "run_0", "cleared", -1, None, {"llm_batch": (waits, NOW - 30)}),
        ("nightly", "run_0", "summarize", -1, "success",
         {"llm_batch": (waits, NOW - 60), "llm_meta": (done, NOW - 60)}),
        ("nightly", "run_old", "summarize", -1, "success", {"llm_meta": (old, NOW - 7200)}),
        ("other", "run_1", "ask", -1, "success", {"llm_meta": (meta(cost_usd=0.01), NOW - 60)}),
        # Untrusted values: they must not fail the refresh.
        ("junk", "run_1", "a", -1, "deferred", {"llm_batch": (b"not json", NOW), "llm_meta": (b"[[[", NOW)}),
        ("junk", "run_1", "b", -1, "deferred",
         {"llm_batch": ({"batches": "x"}, NOW), "llm_meta": ({"batch": 1}, NOW)}),
    ]  # fmt: skip
    for dag_id, run_id, task_id, map_index, task_state, xcoms in rows:
        add(session, dag_id, run_id, task_id, task_state, xcoms, map_index)

    snap = db.load_snapshot(session, window_s=3600, capacity=10, with_triggerers=False, now=NOW)
    assert [(r["dag_id"], r["run_id"], r["task_id"], r["map_index"], r["task_state"], r["age_s"])
            for r in snap["batches_waiting"]] == [
        ("nightly", "run_1", "ask", -1, "deferred", 120.0),
        ("nightly", "run_1", "ask_retry", 4, "up_for_retry", 120.0),
    ]  # fmt: skip
    assert snap["batch_costs"] == [
        {"dag_id": "nightly", "model": "gpt-4o-mini", "tasks": 1, "batches": 1, "batch_items": 4,
         "realtime_items": 1, "cost_usd": 0.25, "realtime_cost_usd": 0.5, "saved_usd": 0.25,
         "unpriced_tasks": 0},
    ]  # fmt: skip
    assert snap["batch_cost_totals"]["saved_usd"] == 0.25
    # The calls are read as before, from the same XComs: the batch task's five items and the other's call.
    assert snap["totals"]["calls"] == 6
    assert json.loads(json.dumps(snap)) == snap

    readable = db.load_snapshot(
        session, window_s=3600, capacity=10, with_triggerers=False, now=NOW, dag_ids={"other"}
    )
    assert (readable["batches_waiting"], readable["batch_costs"], readable["totals"]["calls"]) == ([], [], 1)


def test_waiting_batches_are_the_most_recently_updated_first_and_bounded(session):
    from airflow_llm_async.monitor import db

    for i in range(5):
        add(session, "d", "r", f"t{i}", "deferred", {"llm_batch": (state(openai_batch()), NOW - 100 + i)})
    rows = db.read_waiting_batches(session, NOW, limit=3)
    assert [r["task_id"] for r in rows] == ["t4", "t3", "t2"]
    assert [r["task_id"] for r in db.read_waiting_batches(session, NOW, dag_ids=["nothing"])] == []
