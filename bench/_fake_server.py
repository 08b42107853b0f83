"""The project's fake LLM server, served for benchmarks: own process, fd limit raised, deep backlog.

``FakeLLMServer`` listens with aiohttp's default backlog of 128; a burst of 5,000 connects would
overflow it and the kernel's SYN retries (1 s, 3 s, ...) would show up as client latency that is
not the client's. So this serves the same application (``create_app``) with a backlog of 4,096.

    python bench/_fake_server.py --latency 5    # prints "fake LLM server listening on <base_url>"
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from _harness import raise_nofile_limit
from aiohttp import web

from airflow_llm_async.testing.fake_server import create_app


async def serve(latency: float, backlog: int) -> None:
    # handler_cancellation: a client that disconnects ends its request, as in FakeLLMServer.
    runner = web.AppRunner(
        create_app(latency=latency), access_log=None, handler_cancellation=True, shutdown_timeout=5
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=backlog).start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print(f"fake LLM server listening on http://127.0.0.1:{port}/v1", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--latency", type=float, default=5.0, help="seconds before each answer")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (capped by somaxconn)")
    args = parser.parse_args()
    raise_nofile_limit()
    asyncio.run(serve(args.latency, args.backlog))


if __name__ == "__main__":
    main()
