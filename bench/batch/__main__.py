"""Batch API (issue 13): submitting N items, B batches waiting, the CPU of a poll; each against a baseline.

One fake OpenAI server in its own process (``FakeServerProcess`` with ``--batch-processing-s 3600``:
no batch ends during the run, so every batch waits), and a fresh measured process per run
(``bench/batch/worker.py``, one event loop as in the triggerer), so neither the server's CPU and
memory nor an earlier run's heap is counted. The orchestrator reads the worker's RSS from /proc every
5 ms, at no cost to the worker. Three parts, each with its baseline in the same run:

1. **Submission** of one N-item batch, ``--rounds`` times, alternating with the baseline: ours is a
   ``BatchTrigger`` built as ``LLMFanOutOperator(batch=True)`` builds it and re-created from its JSON
   as the triggerer does; timed from ``json.loads`` of its kwargs to its batch's id stored (the task's
   ``llm_batch`` XCom, after the plan, ``GET /batches``, the JSONL streamed to ``POST /files`` and ``POST
   /batches``). The baseline is ``openai.AsyncOpenAI`` on the same JSON: the JSONL built in memory with
   the same request lines, ``files.create``, ``batches.create``. Wall and CPU time, the peak RSS growth
   in the window, and in one more run each under ``tracemalloc`` the Python heap's peak and what the
   submission still holds while the batch waits (the largest allocation sites).
2. **Memory while B batches of N items wait**, in one process: the RSS after a warm-up, after the B
   triggers are created from their kwargs (what the items themselves take: the floor, since the
   triggerer holds every trigger's kwargs), after all B are submitted, and while they wait. Growth
   over the floor is ours. Also how long submitting all B at once takes, and the event-loop lag then.
3. **Polling**: the B batches of part 2 polled every ``--poll-interval`` s; the process's CPU time over
   ``--poll-window`` s divided by the polls the server counted. Baselines, each in a fresh process on
   the same batch ids and interval: a bare ``aiohttp`` GET (same headers, the answer read and parsed)
   on pooled connections, then with a new connection per poll (what polls further apart than the
   pool's 4 s keep-alive pay), and ``AsyncOpenAI.batches.retrieve``.

    .venv/bin/python -m bench.batch                                  # 10,000 items, 20 batches (~3 min)
    .venv/bin/python -m bench.batch --items 2000 --batches 5 --rounds 1  # quicker

Targets (issue 13, at 10,000 items): submitted in under 10 s; memory grows by under 100 MB while 20
batches wait; under 1 ms of CPU per batch per poll. The exit status is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # bench/: the shared harness

from _harness import (  # noqa: E402
    API_KEY,
    describe_machine,
    print_table,
    raise_nofile_limit,
    rss_kb,
    worker_env,
)

PROCESSING_S = 3600.0  # no batch gets past "validating" (the first 10 %) during a run
SUBMIT_TARGET_S = 10.0
MEMORY_TARGET_MB = 100.0
POLL_TARGET_MS = 1.0
SAMPLE_S = 0.005
MB = 1024  # KB per MB (RSS is read in KB)


def run_worker(
    mode: str, extra: list[str], env: dict[str, str], workdir: Path, timeout: float
) -> dict[str, Any]:
    """One measured process; its RESULT, plus ``phases``: each phase's RSS at its start and its peak."""
    argv = [sys.executable, "-m", "bench.batch.worker", "--mode", mode, "--dir", str(workdir), *extra]
    log_path = workdir / f"worker-{mode}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n==== {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT)
    phases: dict[str, dict[str, int]] = {}
    current = None
    result = None
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while result is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {mode} gave no result within {timeout:.0f} s")
            ready, _, _ = select.select([proc.stdout], [], [], SAMPLE_S)
            if current is not None:
                try:
                    phases[current]["peak_kb"] = max(phases[current]["peak_kb"], rss_kb(proc.pid))
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    pass
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"worker {mode} exited with {proc.wait()} before its result")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                kind, _, rest = raw.decode().partition(" ")
                if kind == "PHASE":
                    current, kb = rest.split()
                    phases[current] = {"start_kb": int(kb), "peak_kb": int(kb)}
                elif kind == "RESULT":
                    result = json.loads(rest)
        proc.wait(timeout=60)
    except Exception:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        print(f"worker {mode} failed; the end of {log_path}:\n{tail}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result["phases"] = phases
    return result


def bench_commit() -> str:
    out = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", "bench/batch"], capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout.strip() or "uncommitted"


def mb(kb: float) -> str:
    return f"{kb / MB:,.1f}"


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base else "-"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---- the report ------------------------------------------------------------------------------------------


def report_submit(args: argparse.Namespace, runs: dict[str, list[dict]], memory: dict[str, dict]) -> bool:
    print(f"\n## 1. Submitting {args.items:,} items: trigger start -> batch created and its id stored\n")
    rows = []
    for round_no, pair in enumerate(zip(runs["ours"], runs["openai"], strict=True), 1):
        for r in pair:
            window = r["phases"]["window"]
            peak = max(window["peak_kb"], r["phases"]["after"]["start_kb"]) - window["start_kb"]
            r["rss_peak_growth_kb"] = peak
            plan = r.get("plan_done_s")
            rows.append(
                [str(round_no), "ours (BatchTrigger)" if r["variant"] == "ours" else "AsyncOpenAI"]
                + [f"{r['wall_s']:.3f}", f"{r['cpu_s']:.3f}", "-" if plan is None else f"{plan:.3f}"]
                + [mb(peak), mb(r["rss_waiting_kb"] - r["rss_before_kb"]), f"{r['lag_max_ms']:.0f}"]
            )
    headers = ["round", "client", "submit s", "CPU s", "of which plan s", "RSS peak growth MB"]
    headers += ["RSS growth, batch waiting MB", "loop lag max ms"]
    print_table(headers, rows)

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print(
        f"\nours / AsyncOpenAI (medians): submit {ratio(med('ours', 'wall_s'), med('openai', 'wall_s'))}, "
        f"CPU {ratio(med('ours', 'cpu_s'), med('openai', 'cpu_s'))}, RSS peak growth "
        + (
            ratio(med("ours", "rss_peak_growth_kb"), med("openai", "rss_peak_growth_kb"))
            if med("openai", "rss_peak_growth_kb") >= MB
            else "- (the baseline's under 1 MB: it fit in memory the process had already; see tracemalloc)"
        )
    )
    files = {r["variant"]: r["file_bytes"] for r in runs["ours"][:1] + runs["openai"][:1]}
    print(
        f"input file: {files['ours']:,} bytes (ours), {files['openai']:,} bytes (AsyncOpenAI)"
        + (": the same lines" if files["ours"] == files["openai"] else "")
    )
    print("\nPython heap in the window (one more run each, under tracemalloc, so slower; not timed):\n")
    rows = [
        [
            "ours (BatchTrigger)" if v == "ours" else "AsyncOpenAI",
            f"{memory[v]['traced_peak_mb']:.1f}",
            f"{memory[v]['traced_held_mb']:.1f}",
        ]
        for v in ("ours", "openai")
    ]
    print_table(["client", "peak MB", "still held while the batch waits MB (ours: its kwargs too)"], rows)
    peaks = memory["ours"]["traced_peak_mb"], memory["openai"]["traced_peak_mb"]
    print(f"peak ours / AsyncOpenAI: {ratio(*peaks)}; the whole JSONL is {files['ours'] / 2**20:.1f} MB")
    print("what ours still holds while its batch waits (largest allocation sites):")
    for site in memory["ours"]["held_by"]:
        print(f"  {site['mb']:6.2f} MB in {site['blocks']:>7,} blocks  {site['where']}")
    worst = max(r["wall_s"] for r in runs["ours"])
    ok = worst < SUBMIT_TARGET_S
    print(
        f"\ntarget: submitted in under {SUBMIT_TARGET_S:.0f} s: {verdict(ok)} (slowest round {worst:.2f} s)"
    )
    return ok


def report_wait(args: argparse.Namespace, waited: dict[str, Any]) -> bool:
    n, b = args.items, waited["batches"]
    print(f"\n## 2. Memory while {b} batches of {n:,} items wait, in one process\n")
    rss = waited["rss_kb"]
    peak = waited["phases"]["submit"]["peak_kb"]
    rows = [
        ["before (after a warm-up batch)", mb(rss["before"]), "0.0"],
        [f"{b} triggers created from their kwargs: the items", mb(rss["items_loaded"])],
        [f"all {b} submitted", mb(rss["submitted"])],
        [f"waiting, after {waited['polling']['seconds']:.0f} s of polling", mb(rss["waiting"])],
        ["waiting, after a full gc.collect()", mb(rss["after_gc"])],
        ["peak while submitting", mb(peak)],
    ]
    after = (rss["items_loaded"], rss["submitted"], rss["waiting"], rss["after_gc"], peak)
    for row, kb in zip(rows[1:], after, strict=True):
        row.append(mb(kb - rss["before"]))
    print_table(["when", "RSS MB", "growth MB"], rows)
    growth = rss["waiting"] - rss["before"]
    items = rss["items_loaded"] - rss["before"]
    ours = rss["waiting"] - rss["items_loaded"]
    print(
        f"\ngrowth while waiting: {mb(growth)} MB ({mb(growth / b)} MB per batch) = the items themselves "
        f"{mb(items)} MB (the floor: the prompts of {args.prompt_chars} characters as the triggers' kwargs "
        f"hold them, plain lists of str) + ours {mb(ours)} MB ({mb(ours / b)} MB per batch, "
        f"{ours * 1024 / (b * n):,.0f} bytes per item); growth / floor: {ratio(growth, items)}"
    )
    each = waited["submit_each_s"]
    lag = waited["submit_lag_ms"]
    gen2 = waited["submit_gc"]["gen2"]
    print(
        f"submitting all {b} at once: {waited['submit_all_s']:.2f} s until the last id was stored (each "
        f"{each['min']:.2f} / {each['median']:.2f} / {each['max']:.2f} s min/median/max), "
        f"{waited['submit_cpu_s']:.2f} s CPU, event-loop lag p99 {lag['p99']:.0f} ms, max {lag['max']:.0f} "
        f"ms; full garbage collections meanwhile: {gen2['count']}, the longest {gen2['max_ms']:.0f} ms"
    )
    print(f"batch states at the server at the end: {', '.join(waited['statuses'])}")
    ok = growth / MB < MEMORY_TARGET_MB
    print(
        f"\ntarget: memory grows by under {MEMORY_TARGET_MB:.0f} MB while {b} batches wait: {verdict(ok)} "
        f"({mb(growth)} MB)"
    )
    return ok


def report_polling(args: argparse.Namespace, waited: dict, bare: dict, sdk: dict | None) -> bool:
    b = waited["batches"]
    print(f"\n## 3. Polling: {b} waiting batches, each polled every {args.poll_interval} s\n")
    base = bare["pooled"]["cpu_ms_per_poll"]
    cases = [("ours: BatchTriggers waiting", waited["polling"]), ("bare aiohttp GET, pooled", bare["pooled"])]
    if "new_connection" in bare:
        cases.append(("bare aiohttp GET, a new connection per poll", bare["new_connection"]))
    if sdk is not None:
        cases.append(("AsyncOpenAI.batches.retrieve, pooled", sdk["pooled"]))
    rows = [
        [label, f"{m['seconds']:.0f}", f"{m['polls']:,}", f"{m['new_connections']:,}", f"{m['cpu_s']:.3f}"]
        + [f"{m['cpu_ms_per_poll']:.3f}", ratio(m["cpu_ms_per_poll"], base)]
        for label, m in cases
    ]
    print_table(
        ["client", "window s", "polls", "new connections", "CPU s", "CPU ms per poll", "/ bare pooled"], rows
    )
    ours = waited["polling"]["cpu_ms_per_poll"]
    ok = ours < POLL_TARGET_MS
    print(f"\ntarget: under {POLL_TARGET_MS:.0f} ms of CPU per batch per poll: {verdict(ok)} ({ours:.3f} ms)")
    return ok


# ---- main ------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch",
        description=__doc__.split("\n\n")[0],
        epilog="Each part's method: the module docstring (bench/batch/__main__.py).",
    )
    parser.add_argument("--items", type=int, default=10_000, help="items per batch (default 10,000)")
    parser.add_argument(
        "--batches", type=int, default=20, help="batches waiting at once in part 2 (default 20)"
    )
    parser.add_argument(
        "--prompt-chars", type=int, default=100, help="characters per prompt (default 100; the items' memory)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="submission rounds per client (default 2)")
    parser.add_argument(
        "--poll-interval", type=float, default=0.1, help="seconds between polls (default 0.1)"
    )
    parser.add_argument(
        "--poll-window", type=float, default=15.0, help="seconds of polling measured (default 15)"
    )
    parser.add_argument("--no-openai-poll", action="store_true", help="skip the AsyncOpenAI polling baseline")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' and server's logs")
    args = parser.parse_args()
    if not (1 <= args.items <= 50_000 and 1 <= args.batches <= 40 and 1 <= args.rounds <= 10):
        parser.error("bounded: --items 1..50,000, --batches 1..40, --rounds 1..10")
    if not (0.05 <= args.poll_interval <= 10 and 1 <= args.poll_window <= 120 and args.prompt_chars >= 1):
        parser.error("bounded: --poll-interval 0.05..10 s, --poll-window 1..120 s, --prompt-chars >= 1")
    raise_nofile_limit()

    from airflow_llm_async.testing.fake_server_process import FakeServerProcess

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="llm-bench-batch-"))
    print(f"# Batch API benchmark: {args.items:,} items per batch, {args.batches} batches, prompts of "
          f"{args.prompt_chars} characters")  # fmt: skip
    print(f"{describe_machine()}; bench/batch at {bench_commit()}")
    server = FakeServerProcess(api_key=API_KEY, log_path=workdir / "fake_server.log")
    server.argv += ["--batch-processing-s", str(PROCESSING_S)]
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    keep = args.keep_logs
    try:
        server.start()
        env = worker_env(server.base_url, workdir)
        url = ["--base-url", server.base_url]
        sizes = [
            "--items",
            str(args.items),
            "--batches",
            str(args.batches),
            "--prompt-chars",
            str(args.prompt_chars),
        ]
        built = run_worker("build", sizes + ["--poll-interval", str(args.poll_interval)], env, workdir, 600)
        kwargs_mb = built["kwargs_bytes"]["batch-0"] / 2**20
        print(f"trigger kwargs built ({args.batches} + a warm-up one): {kwargs_mb:.1f} MB of JSON each")

        runs: dict[str, list[dict]] = {"ours": [], "openai": []}
        for _ in range(args.rounds):
            for variant in runs:
                server.reset()  # no batch of an earlier run to find: each run submits
                runs[variant].append(run_worker(f"submit-{variant}", url, env, workdir, 300))
        memory = {}
        for variant in runs:
            server.reset()
            memory[variant] = run_worker(f"submit-{variant}", url + ["--tracemalloc"], env, workdir, 300)
        results.update(submit=runs, submit_tracemalloc=memory)

        server.reset()
        wait_args = url + ["--batches", str(args.batches), "--poll-window", str(args.poll_window)]
        waited = results["wait"] = run_worker("wait-ours", wait_args, env, workdir, 600)
        poll_args = url + [
            "--batch-ids",
            ",".join(waited["batch_ids"]),
            "--poll-interval",
            str(args.poll_interval),
        ]
        bare = results["poll_aiohttp"] = run_worker(
            "poll-aiohttp",
            poll_args
            + ["--poll-window", str(args.poll_window), "--cold-window", str(args.poll_window * 2 / 3)],
            env,
            workdir,
            300,
        )
        sdk = None
        if not args.no_openai_poll:
            sdk_window = str(
                args.poll_window * 2 / 3
            )  # the SDK's polls cost more: a shorter window is enough
            sdk = results["poll_openai"] = run_worker(
                "poll-openai", poll_args + ["--poll-window", sdk_window], env, workdir, 300
            )
        results["server_batches"] = server.stats()["batches"]
    except BaseException:
        keep = True
        raise
    finally:
        server.stop()
        if keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    met = [
        report_submit(args, runs, memory),
        report_wait(args, waited),
        report_polling(args, waited, bare, sdk),
    ]
    print(f"\nserver: {results['server_batches']}")
    print(f"run took {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
