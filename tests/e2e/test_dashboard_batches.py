"""The dashboard page draws the Batch API tables (batches waiting, batch cost) from the figures it is given.

No Airflow here: the page (plugins/dashboard.html, as the api-server serves it) and a snapshot made by the
monitor's own functions are served from loopback, and a real headless Chromium loads them. What the
figures hold is checked in tests/unit/test_monitor_batches.py; this checks what the page makes of them,
values written by servers and DAG authors included (shown as text, never as markup).
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest

from airflow_llm_async.monitor import batches, figures
from tests.e2e.chromium import HeadlessChromium
from tests.unit.test_monitor import call
from tests.unit.test_monitor_batches import NOW, batch_meta, item, openai_batch, state

pytestmark = pytest.mark.e2e

# LLM_DASHBOARD_BATCHES_SCREENSHOT=/tmp/batches.png keeps a picture of the page.
SCREENSHOT = os.environ.get("LLM_DASHBOARD_BATCHES_SCREENSHOT")
MARKUP = '<img src=x onerror="document.body.dataset.owned=1">'


def snapshot() -> dict:
    snap = figures.snapshot(
        [call(cost=0.5)],
        [],
        {},
        {},
        capacity=10,
        now=NOW,
        window_s=3600,
        alive_within_s=30,
        with_timeline=True,
    )
    two = state(
        openai_batch("batch_a", "in_progress", 100, 40, 2, created=NOW - 3900),
        openai_batch("batch_b", "finalizing", 50, 50, 0),
    )
    snap["batches_waiting"] = [
        batches.waiting_from_xcom("nightly", "run_1", "summarize", 2, two, NOW, "deferred", NOW),
        batches.waiting_from_xcom(
            MARKUP, "run_1", "t", -1, state(openai_batch(MARKUP)), NOW - 1, "deferred", NOW
        ),
    ]
    uses = [
        batches.batch_use_from_meta(
            "nightly", "run_0", "summarize", -1, batch_meta([item()] * 3, 0.5, 1.0, 1)
        ),
        batches.batch_use_from_meta("nightly", "run_0", "other", -1, batch_meta([item(MARKUP)], None, None)),
    ]
    snap["batch_costs"] = batches.batch_cost_figures(uses)
    snap["batch_cost_totals"] = batches.batch_cost_totals(uses)
    snap["triggerers_visible"] = True
    return snap


@pytest.fixture
def dashboard():
    """The page at /llm-dashboard/ and the snapshot at /llm-dashboard/api/figures, on loopback."""
    page = resources.files("airflow_llm_async.plugins").joinpath("dashboard.html").read_bytes()
    answer = json.dumps(snapshot()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            body, kind = (page, "text/html") if path == "/llm-dashboard/" else (answer, "application/json")
            if path not in ("/llm-dashboard/", "/llm-dashboard/api/figures"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/llm-dashboard/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_page_shows_the_batches_waiting_and_what_batch_answers_cost(dashboard, tmp_path):
    with HeadlessChromium(tmp_path) as browser:
        browser.navigate(dashboard)
        browser.wait_for("Number(document.body.dataset.generation) >= 1 || document.body.dataset.error", 60)
        assert browser.evaluate("document.body.dataset.error || ''") == ""
        tables = browser.evaluate(
            """Object.fromEntries(["batches-waiting", "batch-costs"].map(id => [id,
                 [...document.querySelectorAll(`#${CSS.escape(id)} tr`)]
                   .map(tr => [...tr.cells].map(td => td.textContent))]))"""
        )
        totals = browser.evaluate("document.getElementById('batch-cost-totals').textContent")
        injected = browser.evaluate(
            "[document.querySelectorAll('img').length, document.body.dataset.owned || '']"
        )
        if SCREENSHOT:
            browser.screenshot(Path(SCREENSHOT))
    assert tables["batches-waiting"] == [
        ["DAG", "run", "task", "batches", "status", "completed", "failed", "total", "age"],
        ["nightly", "run_1", "summarize[2]", "batch_a, batch_b", "finalizing 1, in_progress 1", "90", "2",
         "150", "1 h 5 min"],
        [MARKUP, "run_1", "t", MARKUP, "in_progress", "40", "2", "100", "10 min"],
    ]  # fmt: skip
    assert tables["batch-costs"] == [
        ["DAG", "model", "tasks", "batch answers", "re-asked in real time", "batch cost", "real-time cost",
         "saved"],
        ["nightly", MARKUP, "1", "1", "0", "–", "–", "–"],
        ["nightly", "gpt-4o-mini", "1", "3", "1", "$0.500000", "$1.000000", "$0.500000"],
    ]  # fmt: skip
    assert totals == (
        "Batch answers: $0.500000 at the batch price, $1.000000 in real time: saved $0.500000; "
        "1 task(s) whose model has no known price, not summed."
    )
    assert injected == [0, ""]
