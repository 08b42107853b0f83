"""Plumbing shared by the benchmarks: processes, the fake server's control API, figures.

Three processes take part in a run, so that only the client's work is measured:

* the orchestrator (the benchmark script): starts the others, watches the fake server's stats
  and reads the worker's RSS from ``/proc``; it never runs a call itself;
* the fake LLM server (``bench/_fake_server.py``), in its own process so its CPU is not counted;
* the worker (``bench/_worker.py``): one asyncio event loop making the calls, timed from inside.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
CONN_ID = "bench_llm"
WARMUP_CONN_ID = "bench_warmup"
# The same two with the response cache in Redis (bench/overhead.py's trigger-cache-redis-* clients).
REDIS_CONN_ID = "bench_llm_redis"
REDIS_WARMUP_CONN_ID = "bench_warmup_redis"
CACHE_BACKEND = "redis://127.0.0.1:6379/0"
API_KEY = "bench-key"
MODEL = "gpt-4"
MAX_IN_FLIGHT = 10_000  # the largest N any benchmark accepts
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def code_version() -> str:
    """The commit measured, marked dirty when airflow_llm_async has uncommitted changes."""
    repo = BENCH_DIR.parent
    run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=repo, check=False)
    head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() or "unknown"
    dirty = run(["git", "status", "--porcelain", "airflow_llm_async"]).stdout.strip()
    return f"{head}{' + uncommitted changes in airflow_llm_async' if dirty else ''}"


def describe_machine() -> str:
    """CPUs, load, fd limit and versions, for the header of every report."""
    versions = []
    for name in ("apache-airflow", "aiohttp", "openai"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return (
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, RLIMIT_NOFILE {raise_nofile_limit()}, "
        f"Python {platform.python_version()}, {', '.join(versions)}; code {code_version()}"
    )


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit: 5,000 sockets need 5,000 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int | str = "self") -> int:
    """Resident set size of a process, read from /proc (cheap enough to poll every few ms)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_KB


def cpu_seconds(pid: int) -> float:
    """User + system CPU time another process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; 0 for no samples."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def read_json_line(stream: IO[str], timeout: float, what: str) -> dict[str, Any]:
    """The next line of a child's protocol stream, parsed; fail loudly if it does not come in time."""
    ready, _, _ = select.select([stream], [], [], timeout)
    line = stream.readline() if ready else ""
    if not line:
        raise RuntimeError(f"no {what} from the worker within {timeout:.0f} s (see the log file)")
    return json.loads(line)


def _http_json(method: str, url: str) -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class FakeServer:
    """The fake LLM server in a child process, and its test-control API (loopback only)."""

    def __init__(self, latency: float, log: IO[bytes]) -> None:
        self.latency = latency
        self._log = log
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 60) -> None:
        argv = [sys.executable, str(BENCH_DIR / "_fake_server.py"), "--latency", str(self.latency)]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True)
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        banner = self._proc.stdout.readline() if ready else ""
        if "listening on" not in banner:
            self.stop()
            raise RuntimeError(f"the fake server did not start within {timeout} s: {banner!r}")
        self.base_url = banner.split("listening on", 1)[1].strip()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)

    def _control(self, method: str, action: str) -> Any:
        return _http_json(method, f"{self.base_url.removesuffix('/v1')}/_fake/{action}")

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "stats")

    def reset(self) -> None:
        self._control("POST", "reset")

    def hold(self) -> None:
        """From now on, chat requests wait at the server (in flight) until ``release()``."""
        self._control("POST", "hold")

    def release(self) -> None:
        self._control("POST", "release")


@contextmanager
def bench_environment(latency: float, keep_logs: bool = False) -> Iterator[tuple[FakeServer, Path]]:
    """A temp dir (AIRFLOW_HOME and logs) and a running fake server; both cleaned up afterwards."""
    raise_nofile_limit()  # inherited by both children
    workdir = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    with open(workdir / "fake_server.log", "wb") as log:
        server = FakeServer(latency, log)
        server.start()
        try:
            yield server, workdir
        except BaseException:
            keep_logs = True  # a failed run's logs are the only clue
            raise
        finally:
            server.stop()
            if keep_logs:
                print(f"logs kept in {workdir}", file=sys.stderr)
    if not keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)


def worker_env(base_url: str, workdir: Path) -> dict[str, str]:
    """The worker's environment: a private AIRFLOW_HOME and the connections, set before Airflow loads."""
    # max_concurrency: the benchmarks measure the event loop with up to 10,000 calls in flight, not the
    # connection's default cap (1,000 per process), which would queue the rest in its limiter.
    extra = {"default_model": MODEL, "max_concurrency": MAX_IN_FLIGHT}
    conn = {"conn_type": "llm", "host": base_url, "password": API_KEY, "extra": extra}
    # Warm-up calls go through a connection whose header makes the fake server answer at once.
    warmup = {**conn, "extra": {**conn["extra"], "headers": {"x-fake-latency": "0"}}}
    home = workdir / "airflow_home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(conn),
        f"AIRFLOW_CONN_{WARMUP_CONN_ID.upper()}": json.dumps(warmup),
        **{
            f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(
                {**c, "extra": {**c["extra"], "cache_backend": CACHE_BACKEND}}
            )
            for conn_id, c in ((REDIS_CONN_ID, conn), (REDIS_WARMUP_CONN_ID, warmup))
        },
    }


def _watch(server: FakeServer, pid: int, counter: str, target: int, deadline: float) -> dict[str, Any]:
    """Poll the server until ``target`` calls are ``counter`` (in_flight or held); RSS at the fullest.

    Reading the worker's RSS from /proc costs the worker nothing, unlike measuring from inside.
    """
    best = {"count": 0, "rss_kb": 0}
    while time.monotonic() < deadline:
        count = server.stats()[counter]
        rss = rss_kb(pid)
        if count > best["count"]:
            best = {"count": count, "rss_kb": rss}
        # Full, or past the peak (answers already coming back): either way, stop watching.
        if count >= target or (best["count"] and count < best["count"] / 2):
            break
        time.sleep(0.02)
    return best


def run_worker(
    mode: str,
    server: FakeServer,
    workdir: Path,
    *,
    calls: int,
    concurrency: int,
    timeout: float,
    watch: bool = False,
    hold: bool = False,
    profile: Path | None = None,
    worker_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one measured worker and return its figures.

    ``watch``: also record the most calls in flight at the server, and the worker's RSS then
    (``peak_in_flight``, ``rss_peak_kb``). ``hold``: the server holds every call until all
    ``calls`` are in flight, so the RSS is taken with exactly that many; then it releases them.
    """
    argv = [sys.executable, str(BENCH_DIR / "_worker.py"), "--mode", mode, "--base-url", server.base_url]
    argv += ["--calls", str(calls), "--concurrency", str(concurrency), "--timeout", str(timeout)]
    argv += worker_args
    log_path = workdir / f"worker-{mode}-{calls}{'-hold' if hold else ''}.log"
    proc = start_worker(argv, log_path, server, workdir)
    spy = None
    peak: dict[str, Any] = {}
    try:
        ready = read_json_line(proc.stdout, 120, "ready message")
        server.reset()  # counters from zero: the warm-up calls are not part of the run
        if hold:
            server.hold()
        if profile is not None:
            spy = _start_py_spy(proc.pid, profile)
        server_cpu = cpu_seconds(server.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if watch or hold:
            counter = "held" if hold else "in_flight"
            peak = _watch(server, proc.pid, counter, calls, time.monotonic() + timeout)
        if hold:
            proc.send_signal(signal.SIGUSR1)  # the worker counts its GC-tracked objects now
            time.sleep(0.5)
            server.release()
        result = read_json_line(proc.stdout, timeout + 30, "result")
        result["server_cpu_s"] = cpu_seconds(server.pid) - server_cpu
        result["server_max_in_flight"] = server.stats()["max_in_flight"]
        proc.wait(timeout=30)
    except Exception:
        print(f"worker {mode} failed; the end of {log_path}:\n{_tail(log_path)}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if spy is not None:
            spy.wait(timeout=60)
    result.update(mode=mode, rss_before_kb=ready["rss_kb"], gc_objects_before=ready["gc_objects"])
    result["log"] = str(log_path)
    if peak:
        result.update(peak_in_flight=peak["count"], rss_peak_kb=peak["rss_kb"])
    return result


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read it: {exc})"


def start_worker(argv: list[str], log_path: Path, server: FakeServer, workdir: Path) -> subprocess.Popen[str]:
    """A measured worker process: commands on its stdin, JSON lines on its stdout, its log in ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=worker_env(server.base_url, workdir),
            text=True,
        )


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample the worker with py-spy (raw collapsed stacks) until it exits.

    ``--gil``: only the thread holding the GIL, so threads waiting for it or for I/O do not count.
    """
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [str(py_spy), "record", "--pid", str(pid), "--rate", "250", "--gil", "--format", "raw"]
    argv += ["-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let py-spy attach before the run starts
    return proc


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, so the output can be pasted into docs/performance.md as it is."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
