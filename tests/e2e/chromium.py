"""A real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol.

The protocol is JSON over one WebSocket, so a driver library is not needed for what the tests do:
set a cookie, open a page, evaluate JavaScript in it, take a screenshot.

    with HeadlessChromium(tmp_path) as browser:
        browser.set_cookie("_token", jwt, "http://127.0.0.1:8080")
        browser.navigate("http://127.0.0.1:8080/llm-dashboard/")
        browser.wait_for("document.body.dataset.generation >= 1", 30)
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

# The real binary: /usr/bin/chromium is a shell wrapper around it.
_BINARIES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")


def chromium_binary() -> str:
    for name in _BINARIES:
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    raise RuntimeError(
        "Chromium is not installed: `bash scripts/setup.sh --browser` installs Debian's chromium"
    )


class BrowserError(RuntimeError):
    pass


class HeadlessChromium:
    def __init__(self, workdir: Path, width: int = 1280, height: int = 900, start_timeout: float = 60):
        self.profile = Path(workdir) / "chromium-profile"
        self.width, self.height = width, height
        self.start_timeout = start_timeout
        self.log_path = Path(workdir) / "chromium.log"
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._ws = None
        self._closing = contextlib.ExitStack()

    def __enter__(self) -> HeadlessChromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        (self.profile / "DevToolsActivePort").unlink(missing_ok=True)  # a previous browser's port
        args = [
            chromium_binary(),
            "--headless=new",
            "--no-sandbox",  # we run as root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",  # the port it picked is written to DevToolsActivePort
            f"--user-data-dir={self.profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            socket = connect(self._page_socket_url(), max_size=None, proxy=None, open_timeout=30)
            self._ws = self._closing.enter_context(socket)
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.close()
        self._ws = None
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # its renderer and helper processes too (start_new_session: the group is the browser's pid)
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(10)

    def _page_socket_url(self) -> str:
        deadline = time.monotonic() + self.start_timeout
        port_file = self.profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}:\n{self.log()}")
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False, timeout=10).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.2)
        raise BrowserError(f"chromium did not open its DevTools port within {self.start_timeout:.0f} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    # ---- DevTools protocol ----------------------------------------------------------------------------

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """One command; its result (events that arrive meanwhile are not needed and dropped)."""
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") != message_id:
                continue
            if "error" in message:
                raise BrowserError(f"{method}: {message['error']}")
            return message.get("result", {})

    def set_cookie(self, name: str, value: str, url: str, http_only: bool = True) -> None:
        result = self.send("Network.setCookie", name=name, value=value, url=url, httpOnly=http_only)
        if not result.get("success", True):
            raise BrowserError(f"cookie {name} was refused for {url}")

    def navigate(self, url: str) -> None:
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), as JSON data."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll a JavaScript expression until it is truthy (bounded); errors count as false (page loading)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value, error = self.evaluate(expression), None
            except BrowserError as exc:
                value, error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} still false after {timeout:.0f} s (last error: {error})")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page, not just the window."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(shot["data"]))
