"""The fake LLM server as a separate process, with its test-control API, for e2e tests and the demo.

Airflow's triggerer and workers are other processes, so they need a server they can reach over
loopback; the control API (``/_fake/...``) lets a test script faults and hold calls in flight.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

_LISTENING = re.compile(r"listening on (?P<url>http://\S+/v1)")


class FakeServerProcess:
    """``with FakeServerProcess(latency=2) as server:`` then point a connection at ``server.base_url``."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        faults: dict[str, str] | None = None,
        models: tuple[str, ...] = (),
        log_path: Path | None = None,
    ) -> None:
        self.argv = [sys.executable, "-m", "airflow_llm_async.testing.fake_server", "--port", "0"]
        self.argv += ["--latency", str(latency)]
        if api_key:
            self.argv += ["--api-key", api_key]
        for model in models:
            self.argv += ["--model", model]
        for model, spec in (faults or {}).items():
            self.argv += ["--fault", f"{model}={spec}"]
        self.log_path = log_path
        self.base_url = ""
        self._proc: subprocess.Popen | None = None
        self._http = httpx.Client(timeout=10)

    def start(self, timeout: float = 30) -> None:
        if self.log_path:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
                self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log)
        else:
            self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        found = threading.Event()

        def read_stdout() -> None:
            # Keep draining after the banner so the server never blocks on a full pipe.
            for raw in self._proc.stdout:
                match = _LISTENING.search(raw.decode(errors="replace"))
                if match and not found.is_set():
                    self.base_url = match["url"]
                    found.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError(f"the fake LLM server did not start within {timeout} s: {' '.join(self.argv)}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)
        if self._proc and self._proc.stdout:
            self._proc.stdout.close()
        self._http.close()

    def __enter__(self) -> FakeServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _control(self, method: str, action: str, json: Any = None) -> Any:
        root = self.base_url.removesuffix("/v1")
        response = self._http.request(method, f"{root}/_fake/{action}", json=json)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "stats")

    def set_faults(self, faults: dict[str, str | None]) -> dict[str, str]:
        return self._control("POST", "faults", faults)

    def configure_batches(self, **settings: Any) -> dict[str, Any]:
        """Change the fake Batch API's settings (``POST /_fake/batches``), e.g.
        ``configure_batches(batch_processing_s=20)``; returns them all. ``reset()`` restores them."""
        return self._control("POST", "batches", settings)

    def hold(self) -> None:
        self._control("POST", "hold")

    def release(self) -> None:
        self._control("POST", "release")

    def reset(self) -> None:
        self._control("POST", "reset")
