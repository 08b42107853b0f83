"""LiteLLM's proxy as a process on loopback: the real OpenAI-compatible server of the conformance tier.

It runs from its own virtualenv (``.venv-litellm``, made by ``scripts/setup_litellm.sh``) with the
mocked models of ``litellm-config.yaml`` beside this file: no upstream provider, no network beyond
127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENV = ROOT / ".venv-litellm"
CONFIG = HERE / "litellm-config.yaml"
MASTER_KEY = "sk-litellm-master-1234"  # litellm-config.yaml's general_settings.master_key
START_TIMEOUT_S = 120.0  # it imports for ~15 s on an idle 2-core machine; far more under load


# Socket states in /proc/net/tcp.
ESTABLISHED, CLOSE_WAIT = "01", "08"


def _client_socket_states(port: int) -> list[str]:
    """The states of this host's TCP sockets connected to ``port`` on loopback (the clients' side)."""
    states = []
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port:
            states.append(fields[3])
    return states


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiteLLMProxy:
    """``with LiteLLMProxy(log_path) as proxy:`` starts it, waits until it answers, stops it on exit."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.log_path = log_path
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None
        self.started_in_s: float | None = None

    def __enter__(self) -> LiteLLMProxy:
        executable = VENV / "bin" / "litellm"
        if not executable.exists():
            raise RuntimeError(f"{executable} is missing: run `bash scripts/setup_litellm.sh` first")
        # Its price map from the package, not from GitHub: the tests reach nothing beyond loopback.
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        command = [str(executable), "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(self.port)]
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            # Its own process group: stopping it stops any worker it forks too.
            self.process = subprocess.Popen(
                [*command, "--num_workers", "1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - started
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.port}/health/liveliness"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"LiteLLM's proxy exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"LiteLLM's proxy did not answer within {START_TIMEOUT_S:.0f} s:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.2)  # polling for readiness: the proxy gives no other signal

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def block_until_idle_connections_closed(self, timeout: float = 15.0) -> float:
        """Block the calling thread until the proxy has closed every client connection; the seconds it took.

        Called on an event loop, this is a busy loop (a triggerer running thousands of triggers): the server's
        close (uvicorn's, after 5 s idle) has reached the client's socket, which the loop has not seen yet.
        """
        started = time.monotonic()
        while True:
            states = _client_socket_states(self.port)
            if CLOSE_WAIT in states and ESTABLISHED not in states:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"the proxy did not close its idle connections within {timeout} s: {states}"
                )
            time.sleep(0.05)  # polling the kernel's socket table: no other signal of a peer's close

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
