"""After real DAG runs, `airflow-llm monitor` and the dashboard page show what the XComs record.

On the shared e2e deployment (tests/e2e/conftest.py), before any other module's DAG runs there: the demo
pipeline (6 calls; its 5 summaries are held at the server for a while) and the worker-free DAG (one of
its calls fails, with its ``llm_meta``) run. Then the figures of
``airflow-llm monitor --once --json``, of ``airflow llm monitor`` and of the dashboard page, loaded from
the api-server in a real headless Chromium, are compared with figures computed here from the
``llm_meta`` XComs read through the REST API.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.chromium import HeadlessChromium
from tests.e2e.polling import wait_for

pytestmark = pytest.mark.e2e

PIPELINE = "llm_content_pipeline"
WORKER_FREE = "e2e_worker_free"
LLM_TASKS = {PIPELINE: ["summarize_articles", "analyze_trends"], WORKER_FREE: ["ask", "translate", "fails"]}
AIRFLOW_LLM = str(Path(sys.executable).parent / "airflow-llm")
DASHBOARD = "/llm-dashboard/"
# LLM_DASHBOARD_SCREENSHOT=docs/dashboard.png refreshes the screenshot in the docs.
SCREENSHOT = os.environ.get("LLM_DASHBOARD_SCREENSHOT")


def monitor_json(airflow) -> dict:
    result = subprocess.run(
        [AIRFLOW_LLM, "monitor", "--once", "--json"],
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])  # the JSON is one line, after any warning printed


# The snapshot the dashboard computes for a user who may read only the DAG named by each argument.
READABLE_ONLY = """
import json, sys
from airflow.utils.session import create_session
from airflow_llm_async.monitor import db
with create_session() as session:
    snapshots = {dag: db.load_snapshot(session, window_s=3600, dag_ids={dag}) for dag in sys.argv[1:]}
print(json.dumps(snapshots))
"""


@pytest.fixture(scope="module")
def runs(airflow, fake_llm):
    """The DAGs' runs, {dag_id: run_id}, and while the five summaries were held: the monitor's snapshot,
    and the dashboard's for a user who may read only one DAG, {dag_id: snapshot}."""
    fake_llm.reset()
    for dag_id in (PIPELINE, WORKER_FREE):
        airflow.wait_for_dag(dag_id)
        airflow.unpause(dag_id)
    run_ids = {}
    fake_llm.hold()  # every LLM call waits at the server until released
    try:
        run_ids[PIPELINE] = airflow.trigger(PIPELINE)
        wait_for(
            lambda: fake_llm.stats()["held"] == 5,
            180,
            "five summaries in flight",
            lambda: f"{fake_llm.stats()}\n{airflow.describe_run(PIPELINE, run_ids[PIPELINE])}",
        )
        readable_only = subprocess.Popen(
            [sys.executable, "-c", READABLE_ONLY, PIPELINE, WORKER_FREE],
            env=airflow.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        held = monitor_json(airflow)
        out, err = readable_only.communicate(timeout=120)
        assert readable_only.returncode == 0, err[-3000:]
        held_readable_only = json.loads(out.splitlines()[-1])
    finally:
        fake_llm.release()
    run_ids[WORKER_FREE] = airflow.trigger(WORKER_FREE)
    expected_states = {PIPELINE: "success", WORKER_FREE: "failed"}  # its `fails` task fails, on purpose
    for dag_id, run_id in run_ids.items():
        state = airflow.wait_for_run(dag_id, run_id, timeout=300)
        assert state == expected_states[dag_id], airflow.describe_run(dag_id, run_id)
    return run_ids, held, held_readable_only


@pytest.fixture(scope="module")
def expected(airflow, runs):
    """Per (dag, model) and per run, from the llm_meta XComs: computed here, independently of the monitor."""
    metas = []
    for dag_id, run_id in runs[0].items():
        for ti in airflow.task_instances(dag_id, run_id):
            if ti["task_id"] in LLM_TASKS[dag_id]:
                meta = airflow.xcom(dag_id, run_id, ti["task_id"], key="llm_meta", map_index=ti["map_index"])
                metas.append((dag_id, run_id, meta))
    assert len(metas) == 9  # 5 summaries + the analysis; ask, translate and the failed call
    models: dict[tuple[str, str], dict] = {}
    per_run: dict[str, dict] = {}
    for dag_id, run_id, meta in metas:
        model = meta.get("model") or meta["attempts"][-1]["model"]
        row = models.setdefault(
            (dag_id, model), {"calls": 0, "failures": 0, "tokens": 0, "costs": [], "latencies": []}
        )
        run = per_run.setdefault(run_id, {"calls": 0, "tokens": 0, "costs": []})
        tokens = (meta.get("usage") or {}).get("total_tokens", 0)
        for figures in (row, run):
            figures["calls"] += 1
            figures["tokens"] += tokens
            if meta.get("cost_usd") is not None:
                figures["costs"].append(meta["cost_usd"])
        row["failures"] += "error" in meta
        row["latencies"].append(meta["latency_s"])
    assert models[(WORKER_FREE, "gpt-5x")]["failures"] == 1  # the unknown model, refused by the server
    assert sum(row["tokens"] for row in models.values()) > 0
    return {"models": models, "runs": per_run}


def nearest_rank(values: list[float], q: float) -> float:
    return sorted(values)[max(1, math.ceil(q / 100 * len(values))) - 1]


def cost(costs: list[float]) -> float | None:
    return sum(costs) if costs else None


def test_monitor_shows_the_calls_in_flight_on_the_triggerer(runs):
    _, held, _ = runs
    triggerers = held["triggerers"]  # the shared deployment runs two
    assert len(triggerers) == 2
    assert all(t["alive"] and t["hostname"] == "127.0.0.1" for t in triggerers), triggerers
    assert sum(t["llm_triggers_running"] for t in triggerers) == 5, triggerers
    assert sum(t["triggers_running"] for t in triggerers) == 5, triggerers
    for t in triggerers:
        assert t["capacity"] == 1000 and t["capacity_left"] == 1000 - t["triggers_running"], t
    assert held["unassigned_triggers"] == 0


def test_a_user_who_may_read_one_dag_counts_only_its_triggers(runs):
    _, held, readable_only = runs
    assert held["all_triggers_counted"] is True  # the monitor reads the whole DB: every trigger
    pipeline, other = readable_only[PIPELINE], readable_only[WORKER_FREE]
    assert sum(t["triggers_running"] for t in pipeline["triggerers"]) == 5
    assert sum(t["llm_triggers_running"] for t in pipeline["triggerers"]) == 5
    # The five held summaries are the pipeline's: a user of the other DAG sees none of them, nor how
    # many there are through the capacity left.
    assert [(t["triggers_running"], t["llm_triggers_running"]) for t in other["triggerers"]] == [(0, 0)] * 2
    for snapshot in (pipeline, other):
        assert snapshot["all_triggers_counted"] is False
        assert [t["capacity_left"] for t in snapshot["triggerers"]] == [None, None]


def test_monitor_once_json_shows_the_calls_tokens_and_cost_the_xcoms_record(airflow, runs, expected):
    run_ids, _, _ = runs
    snapshot = monitor_json(airflow)

    shown = {(m["dag_id"], m["model"]): m for m in snapshot["models"]}
    assert set(shown) == set(expected["models"])
    for key, want in expected["models"].items():
        got = shown[key]
        assert (got["calls"], got["failures"], got["total_tokens"]) == (
            want["calls"],
            want["failures"],
            want["tokens"],
        ), key
        assert got["cost_usd"] == pytest.approx(cost(want["costs"])), key
        assert got["latency_p50_s"] == nearest_rank(want["latencies"], 50), key
        assert got["latency_p95_s"] == nearest_rank(want["latencies"], 95), key
    for run in snapshot["runs"]:
        want = expected["runs"][run["run_id"]]
        assert (run["calls"], run["total_tokens"]) == (want["calls"], want["tokens"])
        assert run["cost_usd"] == pytest.approx(cost(want["costs"]))
    assert {run["run_id"] for run in snapshot["runs"]} == set(run_ids.values())
    # Every call says which process ran it.
    assert sum(p["calls"] for p in snapshot["processes"]) == 9
    assert "unknown" not in {p["process"] for p in snapshot["processes"]}

    # The same command through the Airflow CLI (the provider's `cli` hook).
    via_airflow = json.loads(airflow.airflow("llm", "monitor", "--once", "--json").stdout.splitlines()[-1])
    assert via_airflow["models"] == snapshot["models"]


def test_live_monitor_redraws_until_ctrl_c_and_exits_cleanly(airflow, runs, tmp_path):
    out = tmp_path / "monitor.out"
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(
            [AIRFLOW_LLM, "monitor", "--interval", "0.5"],
            env=airflow.env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            # As in a terminal: a background job ignores SIGINT, and children inherit that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    redraw = b"\x1b[H\x1b[2J"  # cursor home, clear screen
    try:
        wait_for(lambda: out.read_bytes().count(redraw) >= 2, 120, "two redraws", lambda: out.read_text())
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert b"Traceback" not in stderr, stderr.decode()
    last = out.read_text().split("\x1b[H\x1b[2J")[-1]
    assert "llm_content_pipeline  gpt-4" in last and "Total: 9 calls, 1 failed" in last


def test_the_dashboard_in_chromium_shows_the_figures_of_the_xcoms(airflow, runs, expected, tmp_path):
    # The page and its data are behind the UI's authentication.
    # The api-server loaded the plugin: its app, and the "LLM calls" entry of the UI's navigation.
    plugins = {p["name"]: p for p in airflow.api("GET", "plugins")["plugins"]}
    assert [a["url_prefix"] for a in plugins["llm_dashboard"]["fastapi_apps"]] == ["/llm-dashboard"]
    assert [v["href"] for v in plugins["llm_dashboard"]["external_views"]] == [DASHBOARD]
    with httpx.Client(base_url=airflow.base_url, trust_env=False, timeout=30) as anonymous:
        assert anonymous.get(f"{DASHBOARD}api/figures").status_code == 401
        login = anonymous.get(DASHBOARD, follow_redirects=False)
        assert login.status_code == 307 and "/auth/login" in login.headers["location"]
        credentials = {"username": airflow.username, "password": airflow.password}
        token = anonymous.post("/auth/token", json=credentials).json()["access_token"]
    with HeadlessChromium(tmp_path) as browser:
        # What the Airflow login leaves in the browser: the JWT in the `_token` cookie.
        browser.set_cookie("_token", token, airflow.base_url)
        browser.navigate(airflow.base_url + DASHBOARD)
        browser.wait_for("Number(document.body.dataset.generation) >= 1 || document.body.dataset.error", 60)
        assert browser.evaluate("document.body.dataset.error || ''") == ""
        tables = browser.evaluate(
            """Object.fromEntries(["models", "runs", "triggerers"].map(id => [id,
                 [...document.querySelectorAll(`#${id} tbody tr`)]
                   .map(tr => [...tr.cells].map(td => td.textContent))]))"""
        )
        totals = browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('[data-figure]')]"
            ".map(b => [b.dataset.figure, b.textContent]))"
        )
        bar_labels = browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#chart-runs text.bar-label')]"
            ".map(t => [t.dataset.run, t.textContent]))"
        )
        charts = browser.evaluate("document.querySelectorAll('.charts svg').length")
        browser.screenshot(Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png")

    def money(costs: list[float]) -> str:
        return "–" if not costs else f"${sum(costs):.6f}"

    models = {(row[0], row[1]): row[2:] for row in tables["models"]}
    assert set(models) == set(expected["models"])
    for key, want in expected["models"].items():
        calls, failed, p50, p95, _prompt, _completion, tokens, shown_cost = models[key]
        assert (calls, failed, tokens, shown_cost) == (
            str(want["calls"]),
            str(want["failures"]),
            str(want["tokens"]),
            money(want["costs"]),
        ), key
        assert float(p50) == pytest.approx(nearest_rank(want["latencies"], 50), abs=0.005)
        assert float(p95) == pytest.approx(nearest_rank(want["latencies"], 95), abs=0.005)

    runs_shown = {row[1]: row for row in tables["runs"]}
    assert set(runs_shown) == set(runs[0].values())
    all_costs = []
    for run_id, want in expected["runs"].items():
        _dag, _run, _first, calls, _failed, tokens, shown_cost = runs_shown[run_id]
        assert (calls, tokens, shown_cost) == (str(want["calls"]), str(want["tokens"]), money(want["costs"]))
        assert bar_labels[run_id] == f"{want['tokens']} tokens · {money(want['costs'])}"
        all_costs += want["costs"]

    assert totals["calls"] == "9" and totals["failures"] == "1"
    assert totals["tokens"] == str(sum(run["tokens"] for run in expected["runs"].values()))
    assert totals["cost"] == money(all_costs)
    assert [row[1:3] for row in tables["triggerers"]] == [["127.0.0.1", "yes"]] * 2
    assert charts == 4  # in flight, completions per minute, latency, tokens and cost per run


# What any DAG author, or any user allowed to write XComs through the REST API, may store as llm_meta.
FAR_PAST_DAYS = 2_000_000  # a start this far back once made every refresh take 15 s and answer 57 MiB
HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\x9b31m" + "m" * 200_000  # sets the title, clears the screen


def hostile_metas(now: float) -> list[dict]:
    return [
        {
            "model": HOSTILE_TEXT,
            "host": HOSTILE_TEXT,
            "attempts": [{}],
            "started_at": now - FAR_PAST_DAYS * 86400,
            "latency_s": -5,
            "usage": {"prompt_tokens": 1e308, "completion_tokens": "many", "total_tokens": -1},
            "cost_usd": 1e300,
            "pid": 10**400,  # valid JSON; no float holds it
        },
        {"attempts": [], "started_at": 1e308, "finished_at": -1e308, "latency_s": 1e308, "model": ["x"]},
        {"usage": {"total_tokens": {"nested": [[[]]]}}, "attempts": "x", "finished_at": now + 1e12},
    ]


@pytest.fixture
def hostile_xcoms(airflow, runs):
    """A hostile llm_meta, stored through the REST API on a task of the pipeline's run, then removed."""
    path = f"dags/{PIPELINE}/dagRuns/{runs[0][PIPELINE]}/taskInstances/extract_data/xcomEntries"
    airflow.api("POST", path, json={"key": "llm_meta", "value": hostile_metas(time.time()), "map_index": -1})
    try:
        yield
    finally:
        airflow.api("DELETE", f"{path}/llm_meta")


def test_a_hostile_llm_meta_leaves_the_dashboard_small_and_fast(airflow, hostile_xcoms):
    with httpx.Client(base_url=airflow.base_url, trust_env=False, timeout=120) as client:
        credentials = {"username": airflow.username, "password": airflow.password}
        token = client.post("/auth/token", json=credentials).json()["access_token"]
        started = time.monotonic()
        # The widest window the page offers (7 days), so the most buckets a window can ask for.
        resp = client.get(
            f"{DASHBOARD}api/figures",
            params={"window_min": 7 * 24 * 60},
            headers={"Authorization": f"Bearer {token}"},
        )
        elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text[:3000]
    # Before the clamp: one such XCom made the answer 57 MiB, and every refresh 15 s.
    assert len(resp.content) < 1_000_000, len(resp.content)
    snapshot = resp.json()
    timeline = snapshot["timeline"]
    assert timeline["buckets"] <= 61 and timeline["bucket_s"] <= 14400, timeline["bucket_s"]
    assert timeline["start"] >= snapshot["generated_at"] - 7 * 86400 - timeline["bucket_s"]
    assert snapshot["totals"]["calls"] == 9 + 3  # the DAGs' calls and the three hostile ones
    assert snapshot["totals"]["total_tokens"] < 10**6 and snapshot["totals"]["cost_usd"] < 1
    assert max(len(m["model"]) for m in snapshot["models"]) <= 250
    assert elapsed < 30, f"{elapsed:.1f} s"  # generous: well under a second here
    # An admin reads every DAG: every trigger is counted, and the capacity left shown.
    assert snapshot["all_triggers_counted"] is True
    assert all(t["capacity_left"] is not None for t in snapshot["triggerers"])

    # The terminal shows the hostile model and host escaped: no title set, no screen cleared.
    result = subprocess.run(
        [AIRFLOW_LLM, "monitor", "--once"], env=airflow.env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    controls = {ch for ch in result.stdout if ch != "\n" and (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F)}
    assert controls == set(), controls
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m" in result.stdout


def test_monitor_on_a_db_that_is_not_airflows_says_what_to_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path), AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path}/empty.db"
    )
    result = subprocess.run(
        [AIRFLOW_LLM, "monitor", "--once"], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 1
    assert "cannot read the metadata DB (OperationalError: no such table: xcom)" in result.stderr
    assert "airflow db migrate" in result.stderr and "Traceback" not in result.stderr
