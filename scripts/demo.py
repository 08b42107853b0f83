"""Run ``llm_content_pipeline`` on a real, temporary Airflow (SQLite) against the fake LLM server.

Starts the fake server and the scheduler, dag-processor, triggerer and api-server in a temporary
AIRFLOW_HOME, triggers one run through the REST API, shows progress (LLM tasks waiting in the
triggerer as ``deferred``), then prints every task's state and the final analysis, and stops
everything it started. Exit status 0 means every task succeeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from airflow_llm_async.testing.airflow_stack import AirflowStack
from airflow_llm_async.testing.fake_server_process import FakeServerProcess

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "llm_content_pipeline"
TASK_ORDER = [
    "start",
    "extract_data",
    "validate_data",
    "summarize_articles",
    "aggregate_results",
    "analyze_trends",
    "end",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=2.0, help="fake LLM latency per call, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary AIRFLOW_HOME for inspection")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="airflow-llm-demo-"))
    say(f"AIRFLOW_HOME={home}")
    with FakeServerProcess(latency=args.latency, log_path=home / "fake-llm.log") as llm:
        say(f"fake LLM server at {llm.base_url} ({args.latency:g} s per call)")
        connection = {
            "conn_type": "llm",
            "host": llm.base_url,
            "password": "demo-key",
            "extra": {"default_model": "gpt-4"},
        }
        stack = AirflowStack(
            home / "airflow", ROOT / "example_dags", env={"AIRFLOW_CONN_LLM_DEFAULT": json.dumps(connection)}
        )
        say("starting Airflow: db migrate, scheduler, dag-processor, triggerer, api-server ...")
        with stack:
            say(f"Airflow is up at {stack.base_url} (started in {stack.timings.get('start', 0):.0f} s)")
            stack.wait_for_dag(DAG_ID)
            stack.unpause(DAG_ID)
            run_id = stack.trigger(DAG_ID)
            say(f"triggered {DAG_ID} run {run_id}")
            started = time.monotonic()
            last = [""]

            def progress(_run: dict) -> None:
                counts = Counter(ti["state"] or "none" for ti in stack.task_instances(DAG_ID, run_id))
                line = ", ".join(f"{state}: {n}" for state, n in sorted(counts.items()))
                if line != last[0]:
                    say(f"  {time.monotonic() - started:5.1f} s  {line}")
                    last[0] = line

            state = stack.wait_for_run(DAG_ID, run_id, timeout=600, on_poll=progress)
            report(stack, run_id, state)
    # Every process has stopped: the home can go, unless asked for or needed to see what failed.
    if args.keep or state != "success":
        say(f"kept {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if state == "success" else 1


def report(stack: AirflowStack, run_id: str, state: str) -> None:
    say(f"\nDAG run {run_id}: {state}")
    say("task states:")
    for ti in sorted(
        stack.task_instances(DAG_ID, run_id), key=lambda t: (TASK_ORDER.index(t["task_id"]), t["map_index"])
    ):
        index = f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""
        say(f"  {ti['task_id'] + index:<24} {ti['state']}")
    if state != "success":
        say(stack.process_logs())
        return
    analysis = stack.xcom(DAG_ID, run_id, "analyze_trends", key="analysis")
    meta = stack.xcom(DAG_ID, run_id, "analyze_trends", key="llm_meta")
    say(f"\nfinal analysis ({meta['model']}, {meta['usage']['total_tokens']} tokens, {meta['latency_s']} s):")
    say(analysis)
    say("\nthe LLM calls of this deployment, as `airflow llm monitor --once` shows them:")
    say(stack.airflow("llm", "monitor", "--once").stdout)


def say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
