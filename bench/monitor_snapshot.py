"""What a monitor refresh costs: ``load_snapshot`` over N ``llm_meta`` XComs vs the bare read of those rows.

    .venv/bin/python bench/monitor_snapshot.py                          # N = 1,000 and 10,000
    .venv/bin/python bench/monitor_snapshot.py --sizes 1000 10000 100000

A migrated SQLite metadata DB in a temporary AIRFLOW_HOME holds N ``llm_meta`` XComs of the shape
the engine writes (one DAG run, N mapped task instances, 4 models, 10 % failures), inserted directly
with sqlite3 (no task instance rows: SQLite enforces no foreign keys on that connection). Baseline, in the
same process and session: ``SELECT value FROM xcom WHERE key = 'llm_meta'`` and
``XComModel.deserialize_value`` for every row, i.e. what any reader of those XComs pays. Measured:
``monitor.db.load_snapshot`` with the timeline (what one dashboard refresh computes). Median of
``--rounds``; prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

MODELS = ("gpt-4", "gpt-4o-mini", "gpt-3.5-turbo", "o3")


def meta(i: int, finished: float) -> dict:
    model = MODELS[i % len(MODELS)]
    latency = 0.5 + (i % 37) / 10
    base = {
        "latency_s": latency,
        "attempts": [{"conn_id": "llm_default", "model": model, "status": 200, "latency_s": latency}],
        "cost_usd": 0.0001 * (i % 7),
        "started_at": finished - latency,
        "finished_at": finished,
        "host": f"triggerer-{i % 3}",
        "pid": 1000 + i % 3,
    }
    if i % 10 == 9:
        return {**base, "error": {"kind": "server", "status": 503, "code": None, "message": "busy"}}
    usage = {"prompt_tokens": 40 + i % 50, "completion_tokens": 100 + i % 200}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {**base, "model": model, "conn_id": "llm_default", "usage": usage, "finish_reason": "stop",
            "quality": {"passed": True, "failures": []}, "fallback_used": False}  # fmt: skip


def fill(db_path: Path, n: int, now: float) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM xcom")
    rows = []
    for i in range(n):
        finished = now - 3000 * (i / n)  # spread over the last 50 minutes
        stamp = datetime.fromtimestamp(finished, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append((1, "ask", i, "llm_meta", "bench_dag", "bench_run", json.dumps(meta(i, finished)), stamp))
    conn.executemany(
        "INSERT INTO xcom (dag_run_id, task_id, map_index, key, dag_id, run_id, value, timestamp)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.commit()
    conn.close()


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if any(not 0 < n <= 200_000 for n in args.sizes):
        parser.error("--sizes: each from 1 to 200,000")

    home = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    os.environ.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    print(f"migrating a SQLite metadata DB in {home} ...", flush=True)
    airflow = [sys.executable, "-m", "airflow", "db", "migrate"]
    subprocess.run(airflow, check=True, capture_output=True, timeout=600)

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_llm_async.monitor import db

    def bare_read() -> None:
        with create_session() as session:
            rows = session.execute(select(XComModel.value).where(XComModel.key == "llm_meta")).all()
            [XComModel.deserialize_value(row) for row in rows]

    def snapshot() -> None:
        with create_session() as session:
            db.load_snapshot(session, window_s=3600, with_timeline=True)

    print(f"{'N':>8}  {'bare read ms':>12}  {'snapshot ms':>11}  {'ratio':>6}  {'us per call':>11}")
    for n in args.sizes:
        now = time.time()
        fill(home / "airflow.db", n, now)
        with create_session() as session:  # the snapshot must count every row it was given
            figures = db.load_snapshot(session, window_s=3600)
        assert figures["totals"]["calls"] == n, figures["totals"]
        base = median_seconds(bare_read, args.rounds)
        ours = median_seconds(snapshot, args.rounds)
        ratio = ours / base
        print(f"{n:>8,}  {base * 1e3:>12.1f}  {ours * 1e3:>11.1f}  {ratio:>5.2f}x  {ours / n * 1e6:>11.1f}")


if __name__ == "__main__":
    main()
