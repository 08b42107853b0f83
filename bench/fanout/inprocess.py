"""The measured process of ``bench.fanout``'s in-process part: one event loop, as in the triggerer.

``fanout``: one ``FanOutTrigger`` with N items, built as ``LLMFanOutOperator.execute`` builds it,
re-created from ``serialize()`` as the triggerer does, and driven with ``async for``.
``triggers``: N ``ChatCompletionTrigger``s (what N LLMOperator tasks put in the triggerer), started
one by one, yielding to the loop between creations, as the triggerer's ``create_triggers`` does.

Like for like: both variants build their operators and serialize the triggers' kwargs to JSON
*before* the measured window (a worker or the scheduler does that, not the triggerer). The window
covers what the triggerer does: ``json.loads`` the kwargs, create the trigger(s), run them.

Prints one JSON line: wall and CPU time of that window, event-loop lag (a task sleeping 10 ms and
recording how late it wakes), answers received. Started by ``python -m bench.fanout``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared harness modules

from _harness import CONN_ID, WARMUP_CONN_ID, percentile, raise_nofile_limit  # noqa: E402
from _worker import GCPauses, sample_lag  # noqa: E402


def prompts(n: int) -> list[str]:
    return [f"Summarize item {i} in one sentence." for i in range(n)]


def fan_out_kwargs(n: int, conn_id: str) -> list[str]:
    """One FanOutTrigger's kwargs as JSON, built as ``LLMFanOutOperator.execute`` builds them."""
    from airflow_llm_async.operators.fanout import LLMFanOutOperator

    op = LLMFanOutOperator(
        task_id="fan_out", prompts=prompts(n), llm_conn_id=conn_id, max_tokens=64, start_from_trigger=False
    )
    _, kwargs = op.build_trigger().serialize()
    return [json.dumps(kwargs)]


def chat_kwargs(n: int, conn_id: str) -> list[str]:
    """N ChatCompletionTriggers' kwargs as JSON, one per LLMOperator task."""
    from airflow_llm_async.operators.llm import LLMOperator

    made = []
    for i, prompt in enumerate(prompts(n)):
        op = LLMOperator(task_id=f"llm_{i}", prompt=prompt, llm_conn_id=conn_id, max_tokens=64)
        _, kwargs = op.build_trigger().serialize()
        made.append(json.dumps(kwargs))
    return made


async def answers_of_fan_out(serialized: list[str]) -> int:
    from airflow_llm_async.triggers.fanout import FanOutTrigger

    (kwargs,) = serialized
    (event,) = [e async for e in FanOutTrigger(**json.loads(kwargs)).run()]
    return sum(text is not None for text in event.payload["results"])


async def answers_of_triggers(serialized: list[str]) -> int:
    from airflow_llm_async.triggers.chat import ChatCompletionTrigger

    async def one(trigger) -> bool:
        (event,) = [e async for e in trigger.run()]
        return event.payload["status"] == "success"

    tasks = []
    for kwargs in serialized:
        tasks.append(asyncio.create_task(one(ChatCompletionTrigger(**json.loads(kwargs)))))
        await asyncio.sleep(0)
    return sum(await asyncio.gather(*tasks))


async def measure(variant: str, n: int) -> dict:
    if variant == "fanout":
        build, run = fan_out_kwargs, answers_of_fan_out
    else:
        build, run = chat_kwargs, answers_of_triggers
    await run(build(20, WARMUP_CONN_ID))  # sessions, imports, the connection lookup: not measured
    serialized = build(n, CONN_ID)  # the operators: built outside the window, for both variants
    gc.collect()
    lag_at: list[tuple[float, float]] = []
    stop = asyncio.Event()
    gc_pauses = GCPauses()
    gc.callbacks.append(gc_pauses)
    sampler = asyncio.create_task(sample_lag(lag_at, stop))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    answered = await run(serialized)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    stop.set()
    await sampler
    gc.callbacks.remove(gc_pauses)
    worst = sorted(lag_at, key=lambda sample: -sample[1])[:3]
    lag = [late for _, late in lag_at]
    return {
        "variant": variant,
        "items": n,
        "answered": answered,
        "wall_s": wall,
        "cpu_s": cpu,
        "lag_p50_ms": percentile(lag, 0.50) * 1000,
        "lag_p99_ms": percentile(lag, 0.99) * 1000,
        "lag_max_ms": max(lag, default=0.0) * 1000,
        "worst_lag": [{"at_s": round(at - wall0, 2), "ms": round(late * 1000)} for at, late in worst],
        "gc": gc_pauses.summary(wall0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=("fanout", "triggers"))
    parser.add_argument("--prompts", type=int, default=1000)
    args = parser.parse_args()
    raise_nofile_limit()
    result = asyncio.run(measure(args.variant, args.prompts))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
