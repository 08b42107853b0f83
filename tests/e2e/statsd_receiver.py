"""A StatsD daemon's socket on loopback, for tests that check the metrics real Airflow processes send."""

from __future__ import annotations

import socket
import threading


class StatsdReceiver:
    """Read all the time: Airflow's own metrics would soon fill the socket's buffer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.lines.extend(self.sock.recv(65535).decode().splitlines())
            except TimeoutError:
                continue

    def mark(self) -> int:
        """A position in the lines received so far: ``received(since=mark)`` is what came after it."""
        return len(self.lines)

    def received(self, since: int = 0) -> list[str]:
        return self.lines[since:]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
