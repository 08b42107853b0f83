"""The monitor's figures (airflow_llm_async.monitor.figures / text): pure functions over DB rows."""

from __future__ import annotations

import dataclasses
import json

import pytest

from airflow_llm_async.monitor import cli, figures, text
from airflow_llm_async.monitor.figures import Call, TriggererJob

NOW = 1_800_000_000.0
WINDOW = {"since": NOW - 3600, "now": NOW}  # the window asked for: the last hour


def meta(model="gpt-4", prompt=10, completion=20, latency=1.5, **extra) -> dict:
    """An llm_meta as the engine writes it (core/outcome.py), with the newer fields given in ``extra``."""
    return {
        "model": model,
        "requested_model": model,
        "conn_id": "llm_default",
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "finish_reason": "stop",
        "latency_s": latency,
        "attempts": [{"conn_id": "llm_default", "model": model, "status": 200, "latency_s": latency}],
        "quality": {"passed": True, "failures": []},
        "fallback_used": False,
        **extra,
    }


def call(dag="d", run="r1", model="gpt-4", ok=True, latency=1.0, tokens=30, cost=None, start=None, end=NOW,
         host="h1", pid=7) -> Call:  # fmt: skip
    return Call(
        dag_id=dag,
        run_id=run,
        task_id="t",
        map_index=-1,
        model=model,
        conn_id="llm_default",
        ok=ok,
        latency_s=latency,
        prompt_tokens=tokens // 3,
        completion_tokens=tokens - tokens // 3,
        total_tokens=tokens,
        cost_usd=cost,
        started_at=start,
        finished_at=end,
        host=host,
        pid=pid,
    )


# ---- reading llm_meta -----------------------------------------------------------------------------------


def test_a_call_meta_with_every_field_becomes_one_call():
    value = meta(cost_usd=0.0015, started_at=NOW - 2, finished_at=NOW - 0.5, host="worker-1", pid=42)
    [c] = figures.calls_from_xcom("dag", "run", "task", 3, value, timestamp=NOW, **WINDOW)
    assert c == Call("dag", "run", "task", 3, "gpt-4", "llm_default", True, 1.5, 10, 20, 30, 0.0015,
                     NOW - 2, NOW - 0.5, "worker-1", 42)  # fmt: skip
    assert c.process == "worker-1 pid 42"
    assert c.start == NOW - 2


def test_an_older_meta_without_cost_times_or_host_uses_the_xcom_timestamp():
    [c] = figures.calls_from_xcom("dag", "run", "task", -1, meta(latency=2.0), timestamp=NOW, **WINDOW)
    assert (c.cost_usd, c.started_at, c.finished_at, c.host, c.pid) == (None, NOW - 2.0, NOW, None, None)
    assert c.start == NOW - 2.0
    assert c.process == "unknown"


def test_a_failed_call_is_a_failure_of_the_model_it_last_tried():
    value = {
        "latency_s": 0.2,
        "attempts": [
            {"conn_id": "a", "model": "gpt-4", "status": 503},
            {"conn_id": "b", "model": "gpt-3.5-turbo", "status": 404},
        ],
        "error": {"kind": "client", "status": 404, "code": "model_not_found", "message": "no"},
    }
    [c] = figures.calls_from_xcom("dag", "run", "task", -1, value, timestamp=NOW, **WINDOW)
    assert (c.model, c.conn_id, c.ok, c.total_tokens, c.latency_s) == ("gpt-3.5-turbo", "b", False, 0, 0.2)


def test_a_fan_out_meta_counts_each_item_and_not_its_totals():
    value = {
        "items": [
            {"status": "success", "attempts": 1, "model": "gpt-4", "usage": {"total_tokens": 7},
             "latency_s": 1},
            {"status": "error", "attempts": 2, "error": {"kind": "server"}, "latency_s": 3,
             "attempt_log": [{"model": "gpt-3.5-turbo", "conn_id": "c", "status": 500}]},
            {"status": "error", "attempts": 0, "error": {"kind": "config"}},
        ],
        "totals": {"items": 3, "total_tokens": 7, "cost_usd": None},
        "failed_items": [1, 2],
    }  # fmt: skip
    calls = figures.calls_from_xcom("dag", "run", "fan", -1, value, timestamp=NOW, **WINDOW)
    assert [(c.model, c.ok, c.total_tokens) for c in calls] == [
        ("gpt-4", True, 7),
        ("gpt-3.5-turbo", False, 0),
        ("unknown", False, 0),
    ]


def test_a_list_of_metas_is_read_item_by_item():
    calls = figures.calls_from_xcom(
        "d", "r", "t", -1, [meta(), "junk", meta(model="o3")], timestamp=NOW, **WINDOW
    )
    assert [c.model for c in calls] == ["gpt-4", "o3"]


@pytest.mark.parametrize(
    "value",
    [None, "text", 3, 2.5, True, [], {}, {"model": "gpt-4"}, {"totals": {"calls": 3}}, [[[[[meta()]]]]],
     {"items": "not a list"}, {"items": [1, 2, "x"]}],
)  # fmt: skip
def test_values_that_are_not_call_metas_are_skipped(value):
    assert figures.calls_from_xcom("d", "r", "t", -1, value, timestamp=NOW, **WINDOW) == []


def test_fields_of_the_wrong_type_read_as_unknown_instead_of_crashing():
    value = {
        "model": 4,
        "usage": {"prompt_tokens": "many", "completion_tokens": -3, "total_tokens": float("nan")},
        "latency_s": "slow",
        "attempts": "three",
        "cost_usd": "$1",
        "started_at": True,
        "finished_at": None,
        "host": ["h"],
        "pid": "12",
    }
    [c] = figures.calls_from_xcom("d", "r", "t", -1, value, timestamp=NOW, **WINDOW)
    assert (c.model, c.total_tokens, c.latency_s, c.cost_usd, c.started_at, c.finished_at) == (
        "unknown", 0, None, None, None, NOW
    )  # fmt: skip
    assert (c.host, c.pid) == (None, None)


def test_total_tokens_missing_from_usage_is_prompt_plus_completion():
    value = meta()
    del value["usage"]["total_tokens"]
    [c] = figures.calls_from_xcom("d", "r", "t", -1, value, timestamp=NOW, **WINDOW)
    assert c.total_tokens == 30


# ---- a hostile llm_meta: any DAG author or XCom API user writes one ----------------------------------------

FAR_PAST = NOW - 2_000_000 * 86400  # what made every dashboard refresh take 15 s and answer 57 MiB
HOSTILE_NUMBERS = [float("nan"), float("inf"), -float("inf"), -1, -1e308, 1e308, 10**400, -(10**400),
                   "12", "NaN", True, None, [1], {"n": 1}]  # fmt: skip


def read(value, timestamp=NOW) -> list[Call]:
    return figures.calls_from_xcom("d", "r", "t", -1, value, timestamp=timestamp, **WINDOW)


def dashboard_json(calls) -> str:
    """What the dashboard answers for these calls (strict JSON: a NaN or an infinity would raise)."""
    snap = figures.snapshot(calls, [], {}, {}, capacity=10, now=NOW, window_s=3600, alive_within_s=30,
                            with_timeline=True)  # fmt: skip
    assert snap["timeline"]["buckets"] <= figures.TIMELINE_MAX_BUCKETS + 1
    return json.dumps(snap, allow_nan=False)


def assert_sane(c: Call) -> None:
    assert WINDOW["since"] <= c.finished_at <= NOW
    assert c.started_at is None or WINDOW["since"] <= c.started_at <= c.finished_at
    assert WINDOW["since"] - figures.MAX_LATENCY_S <= c.start <= NOW
    assert c.latency_s is None or 0 <= c.latency_s <= figures.MAX_LATENCY_S
    for tokens in (c.prompt_tokens, c.completion_tokens):
        assert type(tokens) is int and 0 <= tokens <= figures.MAX_TOKENS
    assert type(c.total_tokens) is int and 0 <= c.total_tokens <= 2 * figures.MAX_TOKENS
    assert c.cost_usd is None or 0 <= c.cost_usd <= figures.MAX_COST_USD
    assert c.pid is None or 0 <= c.pid <= figures.MAX_PID
    for string in (c.model, c.conn_id, c.host):
        assert string is None or len(string) <= figures.MAX_TEXT


@pytest.mark.parametrize("when", [FAR_PAST, NOW + 2_000_000 * 86400, 1e308, -1e308, 10**400, 0, -1])
@pytest.mark.parametrize("field", ["started_at", "finished_at"])
def test_a_time_outside_the_window_is_clamped_to_it(field, when):
    [c] = read(meta(**{field: when}))
    assert_sane(c)
    assert len(dashboard_json([c])) < 10_000


def test_a_call_started_two_million_days_ago_leaves_the_dashboard_small():
    calls = read([meta(started_at=FAR_PAST, finished_at=NOW - 1, host="h", pid=1), meta(host="h", pid=2)])
    assert [c.started_at for c in calls] == [WINDOW["since"], NOW - 1.5]
    out = dashboard_json(calls)
    assert len(out) < 10_000  # 44 MB and 2,000,001 buckets before the clamp
    assert json.loads(out)["timeline"]["bucket_s"] == 60  # the hour asked for, in 60 buckets


@pytest.mark.parametrize("value", HOSTILE_NUMBERS)
@pytest.mark.parametrize(
    "field",
    ["latency_s", "cost_usd", "pid", "started_at", "finished_at", "prompt_tokens", "completion_tokens",
     "total_tokens"],
)  # fmt: skip
def test_a_number_that_is_not_finite_sane_and_in_range_reads_as_unknown(field, value):
    record = meta()
    (record["usage"] if field.endswith("_tokens") else record)[field] = value
    [c] = read(record)
    assert_sane(c)
    dashboard_json([c])


def test_numbers_in_range_are_kept():
    record = meta(
        prompt=7, completion=9, latency=0.0, cost_usd=0, pid=0, started_at=NOW - 10, finished_at=NOW
    )
    [c] = read(record)
    assert (c.prompt_tokens, c.total_tokens, c.latency_s, c.cost_usd, c.pid) == (7, 16, 0.0, 0.0, 0)


def test_huge_strings_are_cut_and_the_answer_stays_small():
    huge = "\x1b]0;title\x07" + "m" * 1_000_000
    [c] = read(meta(model=huge, conn_id=huge, host=huge, pid=1))
    assert_sane(c)
    assert c.model == huge[: figures.MAX_TEXT]
    assert len(dashboard_json([c])) < 10_000


@pytest.mark.parametrize(
    "value",
    [
        {
            "model": ["m"],
            "usage": {"prompt_tokens": {"nested": [1, 2, {"deeper": "x"}]}},
            "attempts": {"a": 1},
        },
        {"usage": [], "attempts": [[], None, 3, "x"], "error": None},
        {"usage": None, "attempt_log": [{"model": ["x"]}, {"model": {"y": 1}}]},
        {"attempts": [], "model": b"bytes", "conn_id": 5, "host": {"h": 1}},
    ],
)
def test_nested_junk_reads_as_unknown(value):
    [c] = read(value)
    assert_sane(c)
    assert c.model == "unknown" and c.total_tokens == 0
    dashboard_json([c])


def test_a_deeply_nested_value_is_not_walked_to_the_bottom():
    value: list = [meta()]
    for _ in range(10_000):
        value = [value]
    assert read(value) == []


def test_one_xcom_holds_at_most_as_many_calls_as_a_fan_out_task():
    value = {"items": [meta(pid=1)] * (figures.MAX_CALLS_PER_XCOM + 5_000)}
    assert len(read(value)) == figures.MAX_CALLS_PER_XCOM


def test_the_in_flight_chart_draws_the_busiest_processes_and_sums_the_others():
    calls = [c for pid in range(100) for c in read([meta(host="h", pid=pid)] * (2 if pid < 5 else 1))]
    tl = json.loads(dashboard_json(calls))["timeline"]
    assert len(tl["in_flight"]) == figures.TIMELINE_MAX_SERIES + 1
    assert {f"h pid {pid}" for pid in range(5)} <= set(tl["in_flight"])  # two calls each
    assert list(tl["in_flight"])[-1] == figures.OTHER_PROCESSES


def test_the_timeline_is_bounded_even_for_calls_not_read_through_calls_from_xcom():
    tl = figures.timeline([call(start=FAR_PAST, end=NOW + 1e12), call(start=-1e308, end=1e308)], NOW)
    assert tl["buckets"] <= figures.TIMELINE_MAX_BUCKETS + 1
    assert len(json.dumps(tl)) < 10_000


@pytest.mark.parametrize(
    "stored",
    [
        '{"__classname__": "os.system", "__version__": 1, "__data__": "x"}',  # serde outside the allow list
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON decoder recurses
        "not json",
    ],
)
def test_a_stored_value_that_does_not_decode_is_skipped(stored):
    from types import SimpleNamespace

    from airflow_llm_async.monitor import db

    assert db.decode_value(SimpleNamespace(value=stored)) is None


@pytest.mark.parametrize(
    ("classpath", "ours"),
    [
        ("airflow_llm_async.triggers.chat.ChatCompletionTrigger", True),
        ("airflow_llm_async.triggers.fanout.FanOutTrigger", True),
        ("airflow.providers.standard.triggers.temporal.DateTimeTrigger", False),
        ("airflow_llm_async_fork.triggers.chat.ChatCompletionTrigger", False),
        (None, False),
    ],
)
def test_llm_triggers_are_the_triggers_of_this_package(classpath, ours):
    assert figures.is_llm_trigger(classpath) is ours


# ---- aggregates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        (range(1, 11), 50, 5),
        (range(1, 11), 95, 10),
        (range(1, 101), 95, 95),
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([4.2], 95, 4.2),
        ([], 50, None),
    ],
)
def test_percentile_is_the_nearest_rank(values, q, expected):
    assert figures.percentile(values, q) == expected


def test_model_figures_group_by_dag_and_model():
    calls = [
        call(model="gpt-4", latency=1.0, tokens=30, cost=0.001),
        call(model="gpt-4", latency=3.0, tokens=60, cost=None),
        call(model="gpt-4", latency=2.0, tokens=0, ok=False),
        call(model="o3", latency=0.5, tokens=9),
        call(dag="other", model="gpt-4", tokens=1, cost=0.5),
    ]
    rows = figures.model_figures(calls)
    assert [(r["dag_id"], r["model"]) for r in rows] == [("d", "gpt-4"), ("d", "o3"), ("other", "gpt-4")]
    assert rows[0] == {
        "dag_id": "d",
        "model": "gpt-4",
        "calls": 3,
        "failures": 1,
        "latency_p50_s": 2.0,
        "latency_p95_s": 3.0,
        "prompt_tokens": 10 + 20 + 0,
        "completion_tokens": 20 + 40 + 0,
        "total_tokens": 90,
        "cost_usd": 0.001,  # the sum of the costs that are known
    }
    assert rows[1]["cost_usd"] is None  # no call of o3 has a known cost
    assert rows[2]["cost_usd"] == 0.5


def test_run_figures_in_the_order_of_their_first_call():
    calls = [
        call(run="late", end=NOW, latency=1.0, tokens=5, cost=0.25),
        call(run="early", end=NOW - 100, tokens=7),
        call(run="late", end=NOW - 10, latency=1.0, tokens=6, cost=0.5, ok=False),
    ]
    rows = figures.run_figures(calls)
    assert [(r["run_id"], r["calls"], r["failures"], r["total_tokens"], r["cost_usd"]) for r in rows] == [
        ("early", 1, 0, 7, None),
        ("late", 2, 1, 11, 0.75),
    ]
    assert rows[1]["first_call_at"] == NOW - 11


def test_triggerer_figures_count_triggers_capacity_and_recent_completions():
    jobs = [
        TriggererJob(2, "h2", "running", NOW - 100),  # killed: its heartbeat stopped
        TriggererJob(1, "h1", "running", NOW - 3),
        TriggererJob(3, "h1", "running", NOW - 1),
    ]
    calls = [call(host="h1", end=NOW - 5), call(host="h1", end=NOW - 61), call(host="h2", end=NOW - 30)]
    rows = figures.triggerer_figures(jobs, {1: 4, 2: 10}, {1: 3}, 1000, calls, NOW, alive_within_s=30)
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[0] == {
        "id": 1,
        "hostname": "h1",
        "state": "running",
        "heartbeat_age_s": 3.0,
        "alive": True,
        "triggers_running": 4,
        "llm_triggers_running": 3,
        "capacity": 1000,
        "capacity_left": 996,
        "completions_per_min": 1,  # the call that ended 61 s ago is out of the last minute
        "host_shared": True,  # triggerers 1 and 3 share h1: the DB cannot tell their calls apart
    }
    assert (rows[1]["alive"], rows[1]["capacity_left"], rows[1]["completions_per_min"]) == (False, 990, 1)
    assert rows[1]["host_shared"] is False
    assert (rows[2]["triggers_running"], rows[2]["llm_triggers_running"]) == (0, 0)


CHAT = "airflow_llm_async.triggers.chat.ChatCompletionTrigger"
OTHER = "airflow.providers.standard.triggers.temporal.DateTimeTrigger"
# (triggerer_id, classpath, dag_id of the trigger's task instance, count), as db.read_trigger_counts reads
TRIGGER_ROWS = [
    (1, CHAT, "mine", 3),
    (1, CHAT, "secret", 40),
    (1, OTHER, "mine", 1),
    (1, OTHER, None, 7),  # a trigger of no task instance (an asset watcher)
    (2, OTHER, "secret", 5),
    (None, CHAT, "mine", 2),  # not picked up yet
    (None, CHAT, "secret", 9),
    (None, CHAT, None, 4),  # left by `airflow dags test`: no task waits on it, no triggerer runs it
]


def test_trigger_counts_of_every_dag():
    running, llm_running = figures.trigger_counts(TRIGGER_ROWS, None)
    assert running == {1: 51, 2: 5, None: 11}
    assert llm_running == {1: 43, None: 11}


def test_trigger_counts_of_the_dags_a_user_may_read_leave_the_others_out():
    running, llm_running = figures.trigger_counts(TRIGGER_ROWS, {"mine", "unused"})
    assert running == {1: 4, None: 2}
    assert llm_running == {1: 3, None: 2}
    assert figures.trigger_counts(TRIGGER_ROWS, set()) == ({}, {})


def test_the_capacity_left_is_unknown_when_only_some_triggers_are_counted():
    running, llm_running = figures.trigger_counts(TRIGGER_ROWS, {"mine"})
    jobs = [TriggererJob(1, "h1", "running", NOW), TriggererJob(2, "h2", "running", NOW)]
    snap = figures.snapshot([], jobs, running, llm_running, capacity=100, now=NOW, window_s=600,
                            alive_within_s=30, all_triggers=False)  # fmt: skip
    rows = snap["triggerers"]
    assert [(r["triggers_running"], r["llm_triggers_running"], r["capacity_left"]) for r in rows] == [
        (4, 3, None),
        (0, 0, None),
    ]
    assert (snap["unassigned_triggers"], snap["all_triggers_counted"]) == (2, False)
    assert "1   h1    yes    0.00         4         3    -" in text.render(snap)


def test_process_figures_per_host_and_pid():
    calls = [call(pid=1, end=NOW - 1), call(pid=1, end=NOW - 90), call(pid=2, end=NOW - 2)]
    calls.append(call(host=None, pid=None))
    rows = figures.process_figures(calls, NOW)
    assert [(r["process"], r["calls"], r["completions_per_min"]) for r in rows] == [
        ("h1 pid 1", 2, 1),
        ("h1 pid 2", 1, 1),
        ("unknown", 1, 1),
    ]


def test_timeline_averages_calls_in_flight_and_rates_per_bucket():
    # Bucket width 1 s from the first start (NOW - 30): 30 buckets up to NOW.
    calls = [
        call(start=NOW - 30, end=NOW - 28, latency=2.0, pid=1),  # in flight in buckets 0 and 1
        call(start=NOW - 29.5, end=NOW - 28.5, latency=1.0, pid=2),  # half of bucket 0, half of bucket 1
        call(start=NOW - 10, end=NOW - 9.25, latency=0.75, pid=1),
    ]
    tl = figures.timeline(calls, NOW)
    assert (tl["start"], tl["bucket_s"], tl["buckets"]) == (NOW - 30, 1, 30)
    assert tl["in_flight"]["h1 pid 1"][:3] == [1.0, 1.0, 0.0]
    assert tl["in_flight"]["h1 pid 1"][20] == 0.75
    assert tl["in_flight"]["h1 pid 2"][:3] == [0.5, 0.5, 0.0]
    completions = tl["completions_per_min"]
    assert completions[1] == 60.0 and completions[2] == 60.0 and completions[20] == 60.0
    assert sum(completions) == 180.0
    assert tl["latency_p50_s"][1] == 1.0 and tl["latency_p95_s"][2] == 2.0 and tl["latency_p50_s"][0] is None


@pytest.mark.parametrize(("span", "width"), [(30, 1), (61, 2), (3600, 60), (3601, 120), (7 * 86400, 14400)])
def test_timeline_buckets_are_round_widths_at_most_sixty(span, width):
    tl = figures.timeline([call(start=NOW - span, end=NOW - span + 0.5)], NOW)
    assert tl["bucket_s"] == width and tl["buckets"] <= figures.TIMELINE_MAX_BUCKETS + 1


def test_timeline_of_no_calls_is_empty():
    tl = figures.timeline([], NOW)
    assert (tl["buckets"], tl["in_flight"], tl["completions_per_min"]) == (0, {}, [])


def test_snapshot_is_json_and_counts_unassigned_triggers():
    snap = figures.snapshot(
        [call(cost=0.25), call(ok=False)],
        [TriggererJob(1, "h1", "running", NOW)],
        {1: 2, None: 5},
        {1: 2, None: 1},
        capacity=10,
        now=NOW,
        window_s=600,
        alive_within_s=30,
        with_timeline=True,
    )
    assert json.loads(json.dumps(snap)) == snap
    assert (snap["unassigned_triggers"], snap["all_triggers_counted"]) == (5, True)
    assert (snap["totals"]["calls"], snap["totals"]["failures"], snap["totals"]["cost_usd"]) == (2, 1, 0.25)
    assert snap["triggerers"][0]["capacity_left"] == 8
    assert "timeline" in snap


# ---- text and command line ----------------------------------------------------------------------------


def test_text_shows_every_table():
    snap = figures.snapshot(
        [call(dag="pipeline", model="gpt-4", tokens=123, cost=0.0125)],
        [TriggererJob(7, "h1", "running", NOW - 2)],
        {7: 3},
        {7: 2},
        capacity=1000,
        now=NOW,
        window_s=3600,
        alive_within_s=30,
    )
    out = text.render(snap)
    assert "LLM calls in the last 60 min" in out
    assert "7   h1    yes    2.00         3         2    997 of 1000    1" in out
    assert "pipeline  gpt-4  1      0       1.00   1.00   123     0.012500" in out
    assert "Total: 1 calls, 0 failed, 123 tokens, $0.012500" in out


def test_text_of_an_empty_deployment():
    snap = figures.snapshot([], [], {}, {}, capacity=1000, now=NOW, window_s=900, alive_within_s=30)
    out = text.render(snap)
    assert "(no triggerer running)" in out and "(no LLM calls in this window)" in out
    assert "Total: 0 calls, 0 failed, 0 tokens, $-" in out


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("gpt-4o", "gpt-4o"),
        ("模型 ü é", "模型 ü é"),
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # sets the terminal's title
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clears the screen
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("a\x00b\x7fc\x85d", "a\\x00b\\x7fc\\x85d"),
        ("line\r\nnext\ttab", "line\\x0d\\x0anext\\x09tab"),
    ],
)
def test_control_characters_are_shown_escaped(raw, shown):
    assert text.printable(raw) == shown


def is_control(ch: str) -> bool:
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F


def test_text_output_has_no_control_character_whatever_the_servers_and_dags_wrote():
    hostile = "\x1b]0;owned\x07\x1b[2J\x9b31m\x7f"
    calls = read(meta(model=hostile, host=hostile, pid=1, error={"message": hostile}))
    calls = [dataclasses.replace(c, dag_id=hostile, run_id=hostile) for c in calls]
    snap = figures.snapshot(calls, [TriggererJob(1, hostile, "running", NOW)], {1: 1}, {1: 1}, capacity=10,
                            now=NOW, window_s=3600, alive_within_s=30)  # fmt: skip
    out = text.render(snap)
    assert [ch for ch in out if is_control(ch) and ch != "\n"] == []
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x7f" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "0"], "--interval must be more than 0 seconds, got 0"),
        (["--window", "-5"], "--window must be more than 0 minutes, got -5"),
        (["--capacity", "0"], "--capacity must be a positive number of triggers, got 0"),
    ],
)
def test_bad_options_say_what_to_fix(args, message, capsys):
    assert cli.main(["monitor", *args]) == 2
    assert capsys.readouterr().err.strip() == f"airflow-llm monitor: {message}"


def test_the_help_reads_as_text_not_rest(capsys):
    from airflow_llm_async.monitor import cli

    with pytest.raises(SystemExit):
        cli.main(["monitor", "--help"])
    shown = capsys.readouterr().out
    assert "airflow-llm monitor (also airflow llm monitor)" in shown and "``" not in shown


# ---- circuit breakers ---------------------------------------------------------------------------------


def skip_attempt(model="gpt-4", conn_id="llm_default") -> dict:
    reason = {"kind": "circuit_open", "message": "the circuit breaker of gpt-4 ... is open"}
    return {
        "conn_id": conn_id,
        "model": model,
        "status": None,
        "latency_s": 0.0,
        "result": "error",
        "reason": reason,
    }


def test_skipped_attempts_are_counted_per_connection_and_model_with_the_live_state_beside_them():
    answered = {"conn_id": "llm_default", "model": "gpt-3.5-turbo", "status": 200, "latency_s": 0.4}
    calls = [
        *read(meta(model="gpt-3.5-turbo", attempts=[skip_attempt(), answered], finished_at=NOW - 60)),
        *read(meta(model="gpt-3.5-turbo", attempts=[skip_attempt(), answered], finished_at=NOW - 5)),
        *read(meta(attempts=[{"conn_id": "llm_default", "model": "gpt-4", "status": 200}])),
    ]
    assert [c.circuit_skips for c in calls] == [(("llm_default", "gpt-4"),)] * 2 + [()]
    live = [{"conn_id": "llm_default", "model": "gpt-4", "status": "open", "failures": 5,
             "last_error": "HTTP 503", "probe_at": NOW + 20, "opened": 1},
            {"conn_id": "other", "model": "m", "status": "closed", "failures": 0, "last_error": "",
             "probe_at": None}]  # fmt: skip
    rows = figures.circuit_figures(calls, live)
    assert rows == [
        {"conn_id": "llm_default", "model": "gpt-4", "skipped": 2, "last_skipped_at": NOW - 5,
         "status": "open", "failures": 5, "last_error": "HTTP 503", "probe_at": NOW + 20},
        {"conn_id": "other", "model": "m", "skipped": 0, "last_skipped_at": None,
         "status": "closed", "failures": 0, "last_error": "", "probe_at": None},
    ]  # fmt: skip
    snap = figures.snapshot(calls, [], {}, {}, capacity=10, now=NOW, window_s=3600, alive_within_s=30)
    assert snap["circuits"][0]["skipped"] == 2 and snap["circuits"][0]["status"] is None  # no live state here
    out = text.render({**snap, "circuits": rows})
    assert "Circuit breakers" in out
    assert "llm_default  gpt-4  open    5         HTTP 503    08:00:20 UTC  2" in out


def test_a_hostile_attempt_list_is_read_only_so_far():
    calls = read(meta(attempts=[skip_attempt()] * 10_000 + ["junk", {"reason": "x"}]))
    assert len(calls[0].circuit_skips) == figures.MAX_ATTEMPTS
