"""The measured processes of ``python -m bench.batch``: one asyncio event loop each, as in the triggerer.

Modes (``--mode``):

* ``build``: the kwargs of ``--batches`` BatchTriggers of ``--items`` items each (plus a 20-item
  warm-up one), built as ``LLMFanOutOperator(batch=True).build_trigger()`` builds them on a worker,
  serialized with ``serialize()``, one JSON file each: what the triggerer reads from its database.
* ``submit-ours``: one BatchTrigger re-created from its JSON (``BatchTrigger(**json.loads(...))``, as
  the triggerer does) and run until its batch exists and its id is stored (the task's ``llm_batch``
  XCom): ``json.loads``, one CallSpec per item, the connection, the input's fingerprint, the plan,
  ``GET /batches`` (is it there already?), the JSONL streamed to ``POST /files``, ``POST /batches``.
* ``submit-openai``: the same items from the same JSON through ``openai.AsyncOpenAI``: the JSONL
  built in memory (one ``json.dumps`` per line, the same request bodies), ``files.create``,
  ``batches.create``.
* ``wait-ours``: ``--batches`` BatchTriggers created from their JSON and started one by one (the
  loop yields between them, as the triggerer's ``create_triggers`` does), all submitted, then
  waiting: they poll ``GET /batches/{id}`` every ``--poll-interval`` s while the process's CPU time
  and the server's request count are read over ``--poll-window`` s.
* ``poll-aiohttp``: the same batch ids polled with a bare ``aiohttp`` GET (same headers, the answer
  read and parsed), first on pooled connections, then with a new connection per poll.
* ``poll-openai``: the same with ``AsyncOpenAI.batches.retrieve``.

A trigger's XComs go to an in-process store standing in for the triggerer's supervisor (as in
``tests/integration/test_batch_trigger.py``); the store notes when each ``llm_batch`` arrives.

Protocol with the orchestrator: ``PHASE <name> <rss_kb>`` lines when a phase starts (it samples this
process's RSS from /proc meanwhile, at no cost to this process), then one ``RESULT <json>`` line.
Everything else written to stdout (Airflow's log handlers) goes to the log file on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import statistics
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared harness modules

from _harness import API_KEY, CONN_ID, MODEL, percentile, raise_nofile_limit, rss_kb  # noqa: E402
from _worker import GCPauses, sample_lag  # noqa: E402

WARMUP_ITEMS = 20
STATE_KEY = "llm_batch"  # triggers/batch.py's STATE_KEY, checked on import below
DAG_ID, TASK_ID = "batch_bench", "fan_out"
# A product review; each item's prompt is a header naming it, then this, cut to --prompt-chars.
REVIEW = (
    "I bought this kettle for the office after the old one died. It boils a full litre in about two "
    "minutes, the lid opens with one hand and the water gauge is easy to read from both sides. The "
    "cable is a little short and the base slides on a wet counter, but for the price it does what it "
    "should, quietly, and the filter keeps the scale out of our tea. Would buy again. "
) * 8
OUT: IO[str] = sys.stdout


def emit(kind: str, payload: Any) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    print(f"{kind} {text}", file=OUT, flush=True)


def phase(name: str) -> int:
    """Tell the orchestrator a phase starts (it keeps each phase's peak RSS); this process's RSS now."""
    rss = rss_kb()
    emit("PHASE", f"{name} {rss}")
    return rss


def prompts(batch_no: int, items: int, chars: int) -> list[str]:
    return [
        (f"Sentiment of review {batch_no}.{i} (positive, negative, neutral)? " + REVIEW)[:chars]
        for i in range(items)
    ]


def kwargs_text(args: argparse.Namespace, name: str) -> str:
    """A trigger's serialized kwargs, as the triggerer reads them from its database (a blocking read,
    outside every measured window, or before the loop has anything else to run)."""
    return Path(args.dir, f"{name}.json").read_text()


def task_instance(name: str) -> SimpleNamespace:
    return SimpleNamespace(dag_id=DAG_ID, task_id=TASK_ID, run_id=name, map_index=-1, try_number=1)


# ---- build -------------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> dict[str, Any]:
    from airflow_llm_async.operators.fanout import LLMFanOutOperator

    out = Path(args.dir)
    sizes = {}
    for name, batch_no, items in [("warmup", -1, WARMUP_ITEMS)] + [
        (f"batch-{b}", b, args.items) for b in range(args.batches)
    ]:
        op = LLMFanOutOperator(
            task_id=TASK_ID,
            prompts=prompts(batch_no, items, args.prompt_chars),
            llm_conn_id=CONN_ID,
            max_tokens=64,
            batch=True,
            batch_poll_interval=args.poll_interval,
            batch_poll_max_interval=args.poll_interval,
        )
        classpath, kwargs = op.build_trigger().serialize()
        assert classpath == "airflow_llm_async.triggers.batch.BatchTrigger", classpath
        text = json.dumps(kwargs)
        (out / f"{name}.json").write_text(text)
        sizes[name] = len(text)
    return {"kwargs_bytes": sizes}


# ---- the triggerer's side: an XCom store, and our triggers -------------------------------------------------


class XComStore:
    """The triggerer's channel to its supervisor, as an XCom table; notes when a batch id is stored."""

    def __init__(self) -> None:
        self.values: dict[tuple, Any] = {}
        self.stored_at: dict[str, float] = {}  # run_id -> when its llm_batch first named a batch
        self.changed = asyncio.Event()

    async def asend(self, message: Any) -> Any:
        from airflow.sdk.execution_time.comms import GetXCom, SetXCom, XComResult

        where = (message.dag_id, message.task_id, message.run_id, message.map_index)
        if isinstance(message, SetXCom):
            value = json.loads(message.value) if isinstance(message.value, str) else message.value
            self.values[(*where, message.key)] = value
            if message.key == STATE_KEY and message.run_id not in self.stored_at:
                if any(part.get("id") for part in (value.get("batches") or {}).values()):
                    self.stored_at[message.run_id] = time.perf_counter()
                    self.changed.set()
            return None
        if isinstance(message, GetXCom):
            return XComResult(key=message.key, value=self.values.get((*where, message.key)))
        raise AssertionError(f"unexpected message {message!r}")

    def batch_ids(self, run_id: str) -> list[str]:
        state = self.values.get((DAG_ID, TASK_ID, run_id, -1, STATE_KEY)) or {}
        return [part["id"] for part in (state.get("batches") or {}).values()]

    async def wait_stored(self, run_ids: list[str], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not all(run_id in self.stored_at for run_id in run_ids):
                self.changed.clear()
                await self.changed.wait()


def install_store() -> XComStore:
    import airflow.sdk.execution_time.task_runner as task_runner

    from airflow_llm_async.triggers import batch as batch_trigger

    assert batch_trigger.STATE_KEY == STATE_KEY
    store = XComStore()
    task_runner.SUPERVISOR_COMMS = store
    return store


class LogTimes(logging.Handler):
    """When batches.py logged what (its "N items to <model> ... in K batch(es)" line ends the plan)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.perf_counter(), record.getMessage()))

    def first(self, contains: str, since: float) -> float | None:
        return next((at for at, text in self.records if at >= since and contains in text), None)


def watch_batch_log() -> LogTimes:
    handler = LogTimes()
    logger = logging.getLogger("airflow_llm_async.batches")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


async def drain(trigger: Any) -> list[Any]:
    return [event async for event in trigger.run()]


def start_trigger(text: str, run_id: str) -> tuple[Any, asyncio.Task]:
    """A BatchTrigger from its serialized kwargs, as the triggerer makes it, running in a task."""
    from airflow_llm_async.triggers.batch import BatchTrigger

    trigger = BatchTrigger(**json.loads(text))
    trigger.task_instance = task_instance(run_id)
    return trigger, asyncio.create_task(drain(trigger))


async def stop(tasks: list[asyncio.Task]) -> None:
    """Stop the triggers as a triggerer restart does: cancelled, no on_kill, the batches left waiting."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()


async def submit_ours(text: str, run_id: str, store: XComStore, timeout: float) -> asyncio.Task:
    """One BatchTrigger until its batch exists and its id is stored; its task, still waiting."""
    _, task = start_trigger(text, run_id)
    try:
        await store.wait_stored([run_id], timeout)
    except BaseException:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception() from None
        await stop([task])
        raise
    return task


def server_json(base_url: str, path: str) -> Any:
    """A GET of the fake server (its API with the key, or its /_fake control API): outside the windows."""
    root = base_url.removesuffix("/v1")
    url = f"{base_url}{path}" if not path.startswith("/_fake") else f"{root}{path}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def input_file_bytes(base_url: str, batch_id: str) -> int:
    found = server_json(base_url, f"/batches/{batch_id}")
    return server_json(base_url, f"/files/{found['input_file_id']}")["bytes"]


# ---- the baseline's submission: AsyncOpenAI ----------------------------------------------------------------


async def submit_openai(client: Any, text: str, run_id: str) -> tuple[str, int]:
    """The JSONL built in memory from the same JSON, then files.create and batches.create."""
    kwargs = json.loads(text)
    request = kwargs["spec"]["request"]
    lines = []
    for index, item in enumerate(kwargs["items"]):
        body = {"model": MODEL, **request, "messages": [{"role": "user", "content": item}]}
        line = {"custom_id": f"item-{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        lines.append(json.dumps(line))
    data = ("\n".join(lines) + "\n").encode()
    file = await client.files.create(file=(f"{run_id}.jsonl", data, "application/jsonl"), purpose="batch")
    made = await client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"airflow_dag_id": DAG_ID, "airflow_run_id": run_id},
    )
    return made.id, file.bytes


# ---- part 1: one submission --------------------------------------------------------------------------------


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    ours = args.mode == "submit-ours"
    warm_text = kwargs_text(args, "warmup")
    if ours:
        store, log_times = install_store(), watch_batch_log()
        await stop([await submit_ours(warm_text, "warmup", store, args.timeout)])
    else:
        import openai

        client = openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY)
        await submit_openai(client, warm_text, "warmup")
    text = kwargs_text(args, "batch-0")  # read from the "database" before the window
    gc.collect()
    if args.tracemalloc:
        tracemalloc.start()
        snapshot0 = tracemalloc.take_snapshot()
    traced0 = tracemalloc.get_traced_memory()[0] if args.tracemalloc else 0
    lag_at: list[tuple[float, float]] = []
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_lag(lag_at, done))
    rss0 = phase("window")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    waiting = None
    if ours:
        waiting = await submit_ours(text, "run-0", store, args.timeout)
        created = store.stored_at["run-0"]
        batch_id = store.batch_ids("run-0")[0]
    else:
        batch_id, _ = await submit_openai(client, text, "run-0")
        created = time.perf_counter()
    cpu, wall = time.process_time() - cpu0, created - wall0
    done.set()
    await sampler
    # While the batch waits (ours still running): what the submission left behind.
    await asyncio.sleep(0.5)
    gc.collect()
    rss1 = phase("after")
    result: dict[str, Any] = {
        "variant": "ours" if ours else "openai",
        "tracemalloc": args.tracemalloc,
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_before_kb": rss0,
        "rss_waiting_kb": rss1,
        "lag_max_ms": max((late for _, late in lag_at), default=0.0) * 1000,
        "batch_id": batch_id,
    }
    if args.tracemalloc:
        current, peak = tracemalloc.get_traced_memory()
        held = tracemalloc.take_snapshot().compare_to(snapshot0, "lineno")
        tracemalloc.stop()
        result.update(traced_peak_mb=(peak - traced0) / 2**20, traced_held_mb=(current - traced0) / 2**20)
        result["held_by"] = [
            {"where": where(stat.traceback[0]), "mb": stat.size_diff / 2**20, "blocks": stat.count_diff}
            for stat in held[:6]
        ]
    if waiting is not None:
        await stop([waiting])
    result["file_bytes"] = input_file_bytes(args.base_url, batch_id)
    if ours:
        planned = log_times.first(" items to ", wall0)
        result["plan_done_s"] = None if planned is None else planned - wall0
    else:
        await client.close()
    return result


def where(frame: tracemalloc.Frame) -> str:
    """A source line, relative to our package or the library it is in (stdlib: its last two parts)."""
    parts = Path(frame.filename).parts
    for anchor, skip in (("airflow_llm_async", 0), ("site-packages", 1), ("bench", 0)):
        if anchor in parts:
            return f"{Path(*parts[parts.index(anchor) + skip :])}:{frame.lineno}"
    return f"{Path(*parts[-2:])}:{frame.lineno}"


# ---- parts 2 and 3: many batches waiting ------------------------------------------------------------------


def server_counts(base_url: str) -> dict[str, int]:
    stats = server_json(base_url, "/_fake/stats")
    return {"requests": stats["requests"], "connections": stats["connections"]}


async def poll_window(base_url: str, seconds: float) -> dict[str, Any]:
    """This process's CPU time over ``seconds`` of waiting, and the server's requests (the polls) then."""
    before = server_counts(base_url)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    after = server_counts(base_url)
    polls = after["requests"] - before["requests"]
    return {
        "seconds": wall,
        "cpu_s": cpu,
        "polls": polls,
        "new_connections": after["connections"] - before["connections"],
        "cpu_ms_per_poll": cpu / polls * 1000 if polls else None,
    }


async def wait(args: argparse.Namespace) -> dict[str, Any]:
    store = install_store()
    await stop([await submit_ours(kwargs_text(args, "warmup"), "warmup", store, args.timeout)])
    gc.collect()
    rss0 = phase("load")
    # The items themselves: what the triggerer holds once it has read the triggers' kwargs (json.loads).
    from airflow_llm_async.triggers.batch import BatchTrigger

    made = []
    for b in range(args.batches):
        trigger = BatchTrigger(**json.loads(kwargs_text(args, f"batch-{b}")))
        trigger.task_instance = task_instance(f"run-{b}")
        made.append(trigger)
    gc.collect()
    rss1 = phase("submit")
    lag_at: list[tuple[float, float]] = []
    lag_done = asyncio.Event()
    sampler = asyncio.create_task(sample_lag(lag_at, lag_done))
    gc_pauses = GCPauses()
    gc.callbacks.append(gc_pauses)
    started: dict[str, float] = {}
    tasks = []
    cpu0 = time.process_time()
    for trigger in made:
        started[trigger.task_instance.run_id] = time.perf_counter()
        tasks.append(asyncio.create_task(drain(trigger)))
        await asyncio.sleep(0)
    del made, trigger
    await store.wait_stored(list(started), args.timeout)
    submit_cpu = time.process_time() - cpu0
    first = min(started.values())
    lag_done.set()
    await sampler
    gc.callbacks.remove(gc_pauses)
    ended = [task for task in tasks if task.done()]
    if ended:
        why = ended[0].exception() or ended[0].result()
        raise RuntimeError(f"{len(ended)} trigger(s) ended instead of waiting: {why!r:.500}")
    rss2 = phase("settle")
    await asyncio.sleep(args.settle)
    phase("poll")
    polling = await poll_window(args.base_url, args.poll_window)
    rss3 = phase("end")
    gc.collect()
    rss4 = rss_kb()
    ids = [batch_id for run_id in started for batch_id in store.batch_ids(run_id)]
    statuses = {server_json(args.base_url, f"/batches/{batch_id}")["status"] for batch_id in ids}
    await stop(tasks)
    per_batch = [store.stored_at[run_id] - started[run_id] for run_id in started]
    lag = [late for _, late in lag_at]
    return {
        "variant": "ours",
        "batches": args.batches,
        "batch_ids": ids,
        "statuses": sorted(statuses),
        "rss_kb": {
            "before": rss0,
            "items_loaded": rss1,
            "submitted": rss2,
            "waiting": rss3,
            "after_gc": rss4,
        },
        "submit_all_s": max(store.stored_at.values()) - first,
        "submit_each_s": {
            "min": min(per_batch),
            "median": statistics.median(per_batch),
            "max": max(per_batch),
        },
        "submit_cpu_s": submit_cpu,
        "submit_lag_ms": {
            "p99": percentile(lag, 0.99) * 1000,
            "max": max(lag, default=0.0) * 1000,
        },
        "submit_gc": gc_pauses.summary(first),
        "polling": polling,
    }


async def poll_baseline(args: argparse.Namespace) -> dict[str, Any]:
    ids = args.batch_ids.split(",")
    stop_polling = asyncio.Event()
    result: dict[str, Any] = {"variant": args.mode, "batches": len(ids)}

    async def poller(get: Any, batch_id: str) -> None:
        while not stop_polling.is_set():
            await asyncio.sleep(args.poll_interval)
            await get(batch_id)

    async def window(get: Any, seconds: float) -> dict[str, Any]:
        for batch_id in ids:  # warm: every poller's first request (and connection) outside the window
            await get(batch_id)
        stop_polling.clear()
        pollers = []
        for batch_id in ids:
            pollers.append(asyncio.create_task(poller(get, batch_id)))
            await asyncio.sleep(0)
        await asyncio.sleep(args.settle)
        measured = await poll_window(args.base_url, seconds)
        stop_polling.set()
        await asyncio.gather(*pollers)
        return measured

    if args.mode == "poll-aiohttp":
        import aiohttp

        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": f"Bearer {API_KEY}",
        }

        def getter(session: aiohttp.ClientSession) -> Any:
            async def get(batch_id: str) -> None:
                async with session.get(f"{args.base_url}/batches/{batch_id}", headers=headers) as response:
                    body = await response.read()
                    if response.status != 200 or not json.loads(body).get("id"):
                        raise RuntimeError(f"poll answered {response.status}: {body[:200]!r}")

            return get

        # As our transport's shared session: no pool cap, idle connections kept 4 s.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        async with aiohttp.ClientSession(connector=connector) as session:
            result["pooled"] = await window(getter(session), args.poll_window)
        if args.cold_window > 0:
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                result["new_connection"] = await window(getter(session), args.cold_window)
    else:
        import openai

        async with openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY) as client:

            async def get(batch_id: str) -> None:
                found = await client.batches.retrieve(batch_id)
                if not found.id:
                    raise RuntimeError("no batch id")

            result["pooled"] = await window(get, args.poll_window)
    return result


# ---- main --------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # Every mode imports the same modules, so every process starts with the same heap.
    import aiohttp  # noqa: F401
    import openai  # noqa: F401

    import airflow_llm_async.triggers.batch  # noqa: F401
    from airflow_llm_async import transport

    try:
        if args.mode.startswith("submit-"):
            return await submit(args)
        if args.mode == "wait-ours":
            return await wait(args)
        return await poll_baseline(args)
    finally:
        await transport.close_shared_session()


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description="one measured process of python -m bench.batch")
    parser.add_argument(
        "--mode",
        required=True,
        choices=("build", "submit-ours", "submit-openai", "wait-ours", "poll-aiohttp", "poll-openai"),
    )
    parser.add_argument("--dir", required=True, help="where the triggers' JSON files are")
    parser.add_argument("--base-url", default="")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--prompt-chars", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--poll-window", type=float, default=20.0)
    parser.add_argument("--cold-window", type=float, default=0.0)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--batch-ids", default="")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    # Keep the real stdout for the protocol; send fd 1 (log handlers, prints) to the log on stderr.
    OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    raise_nofile_limit()
    if args.mode == "build":
        result = build(args)
    else:
        result = asyncio.run(run(args))
    emit("RESULT", result)


if __name__ == "__main__":
    main()
