"""Run a real Airflow 3 deployment (scheduler, dag-processor, triggerer(s), api-server) in a temporary home.

Used by the demo script, the e2e tests and the benchmarks::

    with AirflowStack(tmp_path / "home", dags_folder) as stack:
        stack.wait_for_dag("my_dag")
        stack.unpause("my_dag")
        run_id = stack.trigger("my_dag", conf={"x": 1})
        assert stack.wait_for_run("my_dag", run_id) == "success"

Every component is a separate ``python -m airflow ...`` subprocess of the *calling* interpreter (so it
works in any virtualenv), in its own process group, logging to ``<home>/logs/<name>.log``. All of them
get the same configuration as ``AIRFLOW__SECTION__KEY`` environment variables (also written to
``<home>/airflow.cfg`` so ``AIRFLOW_HOME=<home> airflow ...`` reproduces the stack from a shell).
Inherited ``AIRFLOW*`` variables are dropped so that a caller's own Airflow settings (e.g. unit-test
mode) cannot leak into the stack.

Metadata database backends (Airflow 3.3.2):

* SQLite (``db_url=None``, a file in ``home``) works with ``LocalExecutor`` and all components in
  parallel: 3.3.2 no longer rejects that combination (Airflow 2's "cannot use SQLite with the
  LocalExecutor" check is gone; ``AirflowConfigParser._validators`` in ``airflow/configuration.py`` only
  checks the SQLite version, and ``SimpleAuthManager._looks_like_production`` treats sqlite +
  LocalExecutor as the development setup). The file is switched to WAL journalling after
  ``db migrate`` so that readers (api-server) do not block writers (scheduler, triggerer, workers).
* PostgreSQL: pass ``db_url=create_postgres_database()``; use it for concurrency-heavy tests.

Migrating a fresh metadata DB costs tens of seconds of CPU. A test suite that starts several stacks
migrates once and copies: :func:`migrate_database` on a template (a PostgreSQL database, or a SQLite
file), then ``create_postgres_database(template=url)`` (``CREATE DATABASE ... TEMPLATE``) or
:func:`copy_sqlite_database` for each stack, started with ``AirflowStack(..., migrate=False)``.

Authentication uses the default SimpleAuthManager. The harness pre-seeds the generated password file
with a random password for ``admin`` (the manager keeps existing entries), so no log scraping is needed
to obtain a JWT from ``POST /auth/token``.

If the caller runs with ``PYTHONDONTWRITEBYTECODE`` set, the components get a ``PYTHONPYCACHEPREFIX``
under ``~/.cache/airflow-llm-async`` instead: otherwise each of them recompiles all of Airflow, which
doubled the start-up time.

``celery_workers=K`` runs the CeleryExecutor instead, with K ``airflow celery worker`` processes
(``celery-worker-<i>``): broker ``celery_broker_url`` (Redis), results in the stack's own database,
tasks on a queue of the stack's own (so two stacks can share one broker), ``[celery]
worker_concurrency`` 2. Each worker stands for a host of its own: its task instances record
``127.0.1.<i+1>`` as their hostname (still loopback). ``start()`` waits until every worker answers a
Celery ping. The provider ``apache-airflow-providers-celery`` must be installed (the ``test`` extra).

Processes the harness starts carry a marker environment variable; ``stop()`` kills every process that
still carries it (e.g. task processes orphaned by a ``kill -9`` of the scheduler, which run in their own
process groups), so nothing is left behind.
"""

from __future__ import annotations

import atexit
import base64
import configparser
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import psutil

__all__ = [
    "AirflowApiError",
    "AirflowStack",
    "copy_sqlite_database",
    "create_postgres_database",
    "drop_postgres_database",
    "free_port",
    "loopback_hostname",
    "migrate_database",
]

DEFAULT_POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
DEFAULT_CELERY_BROKER = "redis://127.0.0.1:6379/5"
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
_MARKER_ENV = "LLM_ASYNC_AIRFLOW_STACK_ID"
_HOSTNAME_ENV = "LLM_ASYNC_AIRFLOW_STACK_HOSTNAME"  # a component's own host name (Celery workers)
_LOG_TAIL_LINES = 60
_STOP_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.5


class AirflowApiError(RuntimeError):
    """A REST call answered with status >= 400; carries the status code and response body."""

    def __init__(self, method: str, url: str, status_code: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status_code}: {body}")
        self.status_code = status_code
        self.body = body


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_hostname() -> str:
    """``[core] hostname_callable`` of the stack: keeps task/job host names (and log fetches) on loopback.

    127.0.0.1, or the loopback address a component was given as its own host (a Celery worker's).
    """
    return os.environ.get(_HOSTNAME_ENV, "127.0.0.1")


# --------------------------------------------------------------------------------------------------------
# PostgreSQL helpers
# --------------------------------------------------------------------------------------------------------


def _pg_admin_connection(server: str):
    """Autocommit connection to a maintenance database, or None if no server/user answers."""
    import psycopg2

    parts = urlsplit(server)
    users = dict.fromkeys([parts.username or "postgres", "postgres", "root"])
    for user in users:
        for dbname in ("postgres", "test"):
            try:
                conn = psycopg2.connect(
                    host=parts.hostname or "127.0.0.1",
                    port=parts.port or 5432,
                    user=user,
                    password=parts.password,
                    dbname=dbname,
                    connect_timeout=3,
                )
            except psycopg2.OperationalError:
                continue
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
            return conn
    return None


def create_postgres_database(
    name_prefix: str = "airflow_llm_e2e",
    server: str = DEFAULT_POSTGRES_SERVER,
    *,
    template: str | None = None,
    name: str | None = None,
) -> str | None:
    """Create a fresh, uniquely named database; return its SQLAlchemy URL, or None if no server answers.

    ``template``: the URL of a database to copy (``CREATE DATABASE ... TEMPLATE``; nobody may be
    connected to it), e.g. one that :func:`migrate_database` migrated: a copy takes well under a second.
    ``name``: this exact name instead of ``<name_prefix>_<random>``.
    """
    conn = _pg_admin_connection(server)
    if conn is None:
        return None
    name = name or f"{name_prefix}_{secrets.token_hex(4)}"
    copy_of = f' TEMPLATE "{urlsplit(template).path.lstrip("/")}"' if template else ""
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"{copy_of}')
        info = conn.info
        password = f":{quote(info.password, safe='')}" if info.password else ""
        return f"postgresql+psycopg2://{info.user}{password}@{info.host}:{info.port}/{name}"
    finally:
        conn.close()


def drop_postgres_database(url: str) -> None:
    """Drop a database made by :func:`create_postgres_database`, closing leftover connections (PG >= 13)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    conn = _pg_admin_connection(f"postgresql://{parts.netloc}")
    if conn is None:
        return
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def copy_sqlite_database(template: Path, home: Path) -> str:
    """Copy a migrated SQLite file into ``home`` (as AirflowStack's default ``home/airflow.db``); its URL."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "airflow.db"
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def migrate_database(db_url: str, home: Path, timeout: float = 300) -> float:
    """``airflow db migrate`` of ``db_url`` (with a throwaway home); returns the seconds it took.

    Migrates a template that stacks then copy (see the module docstring). A SQLite file is left in WAL
    mode, as every stack's is.
    """
    stack = AirflowStack(home, home, db_url=db_url, triggerers=0)
    stack._write_home()
    stack._migrate(time.monotonic() + timeout)
    return stack.timings["db_migrate"]


# --------------------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Process:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None  # on top of the stack's
    popen: subprocess.Popen | None = None
    wanted: bool = False  # started and not deliberately stopped: exiting would be a failure

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class AirflowStack:
    """A real Airflow deployment in ``home``; see the module docstring."""

    username = "admin"

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        *,
        db_url: str | None = None,
        api_port: int | None = None,
        triggerers: int = 1,
        celery_workers: int = 0,
        celery_broker_url: str = DEFAULT_CELERY_BROKER,
        parallelism: int = 4,
        env: dict[str, str] | None = None,
        config: dict[str, dict[str, str]] | None = None,
        migrate: bool = True,
    ) -> None:
        """``migrate=False``: the DB at ``db_url`` is already migrated (a copy of a migrated template)."""
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.db_url = db_url or f"sqlite:///{self.home / 'airflow.db'}"
        self.api_port = api_port or free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.triggerers = triggerers
        self.celery_workers = celery_workers
        self.celery_broker_url = celery_broker_url
        self.parallelism = parallelism
        self.migrate = migrate
        self.password = secrets.token_urlsafe(16)
        self.timings: dict[str, float] = {}  # seconds: "db_migrate", "start" (whole start())
        self._stack_id = secrets.token_hex(8)
        self.config = self._build_config(config or {})
        self.env = self._build_env(env or {})
        self._processes = self._define_processes()
        self._http: httpx.Client | None = None

    # ---- configuration -------------------------------------------------------------------------------

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def _build_config(self, overrides: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        config: dict[str, dict[str, str]] = {
            "core": {
                "executor": "LocalExecutor",
                "parallelism": str(self.parallelism),
                "load_examples": "False",
                "dags_folder": str(self.dags_folder),
                "execution_api_server_url": f"{self.base_url}/execution/",
                "simple_auth_manager_users": f"{self.username}:admin",
                "simple_auth_manager_passwords_file": str(self._passwords_file),
                # Fernet keys are url-safe base64 of 32 random bytes; fixed so every process agrees.
                "fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
                "hostname_callable": f"{__name__}.loopback_hostname",
            },
            "database": {"sql_alchemy_conn": self.db_url},
            "api": {
                "host": "127.0.0.1",
                "port": str(self.api_port),
                "base_url": self.base_url,
                "secret_key": secrets.token_hex(16),
            },
            # Workers, scheduler and api-server must sign/verify JWTs with the same secret.
            "api_auth": {"jwt_secret": secrets.token_hex(32)},
            # Narrows (does not close) a 3.3.2 race with short deferred tasks: the supervisor's select loop
            # (airflow/sdk/execution_time/supervisor.py _monitor_subprocess) reports a deferred exit late
            # by up to this interval. See docs/fault-survival.md.
            "workers": {"min_heartbeat_interval": "1"},
            # Tests trigger their own runs; no cron-driven runs interfering.
            "scheduler": {"use_job_schedule": "False"},
            # Pick up new/changed DAG files within seconds instead of 5 min / 30 s.
            "dag_processor": {"refresh_interval": "2", "min_file_process_interval": "5"},
        }
        if self.celery_workers:
            config["core"]["executor"] = "CeleryExecutor"
            config["celery"] = {
                "broker_url": self.celery_broker_url,
                "result_backend": f"db+{self.db_url}",
                "worker_concurrency": "2",
            }
            # The Celery queue (and exchange) of the stack's tasks: another stack's workers on the same
            # broker never take them, and messages left by an earlier stack are never delivered here.
            config["operators"] = {"default_queue": f"airflow_llm_stack_{self._stack_id}"}
        for section, options in overrides.items():
            config.setdefault(section.lower(), {}).update({k.lower(): str(v) for k, v in options.items()})
        return config

    def _build_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lstrip("_").startswith("AIRFLOW")}
        env["AIRFLOW_HOME"] = str(self.home)
        for section, options in self.config.items():
            for key, value in options.items():
                env[f"AIRFLOW__{section.upper()}__{key.upper()}"] = value
        env["PYTHONUNBUFFERED"] = "1"  # process logs are complete when we tail them on failure
        if env.pop("PYTHONDONTWRITEBYTECODE", None) and "PYTHONPYCACHEPREFIX" not in env:
            # Without bytecode every component recompiles all of Airflow (~3.5 s CPU each); cache it
            # outside the source trees instead, which is what "don't write bytecode" usually protects.
            env["PYTHONPYCACHEPREFIX"] = str(_pycache_dir())
        # Workers call the execution API on 127.0.0.1: never through a proxy from the caller's env.
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        env[_MARKER_ENV] = self._stack_id
        env.update(extra)
        return env

    def _define_processes(self) -> dict[str, _Process]:
        # Logs live on the shared local disk, where the api-server reads them directly, so the
        # per-component log servers (bound to 0.0.0.0 on fixed ports) are not started.
        commands = {
            "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port)],
            "scheduler": ["scheduler", "--skip-serve-logs"],
            "dag-processor": ["dag-processor"],
        }
        for i in range(self.triggerers):
            commands[f"triggerer-{i}"] = ["triggerer", "--skip-serve-logs"]
        processes = {
            name: _Process(name, args, self.log_dir / f"{name}.log") for name, args in commands.items()
        }
        for i, node in enumerate(self.celery_nodes):
            name = f"celery-worker-{i}"
            queue = self.config["operators"]["default_queue"]
            args = ["celery", "worker", "--celery-hostname", node.removeprefix("celery@"), "--queues", queue,
                    "--skip-serve-logs", "--without-mingle", "--without-gossip",
                    "--pid", str(self.home / f"{name}.pid")]  # fmt: skip
            env = {_HOSTNAME_ENV: f"127.0.1.{i + 1}"}
            processes[name] = _Process(name, args, self.log_dir / f"{name}.log", env)
        return processes

    @property
    def celery_nodes(self) -> list[str]:
        """The Celery node names of the workers (``celery@<hostname>``), unique per stack."""
        return [f"celery@celery-worker-{i}-{self._stack_id}" for i in range(self.celery_workers)]

    @property
    def _passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def _write_home(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        parser = configparser.ConfigParser(interpolation=None)
        for section, options in self.config.items():
            # Airflow's parser interpolates, so a literal % must be doubled in the file.
            parser[section] = {k: v.replace("%", "%%") for k, v in options.items()}
        with open(self.home / "airflow.cfg", "w") as fh:
            parser.write(fh)
        self._passwords_file.write_text(f'{{"{self.username}": "{self.password}"}}\n')

    # ---- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> AirflowStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 240) -> None:
        """Migrate the DB, start every component and wait until the API reports them healthy."""
        if any(p.popen is not None for p in self._processes.values()):
            raise RuntimeError("an AirflowStack can only be started once")
        started = time.monotonic()
        deadline = started + timeout
        atexit.register(self.stop)  # also clean up if the caller never reaches stop()
        try:
            self._write_home()
            if self.migrate:
                self._migrate(deadline)
            for name in self._processes:
                self._spawn(name)
            self.wait_until_healthy(timeout=deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM every component, SIGKILL whatever is left after a short grace period. Idempotent.

        SIGTERM goes to each component's main process, which stops its own children: a group-wide
        SIGTERM also hits the triggerer's trigger-runner child directly and the triggerer then waits its
        full 10 s escalation delay for it. Even so the triggerer sometimes takes those 10 s
        (airflow/jobs/triggerer_job_runner.py ``_execute``: ``trigger_runner.kill(escalation_delay=10)``),
        hence the short grace period before the SIGKILL of the process groups.
        """
        running = [p for p in self._processes.values() if p.running]
        for proc in running:
            proc.wanted = False
            proc.popen.send_signal(signal.SIGTERM)
        for proc in _wait_for_exit(running, _STOP_GRACE_SECONDS):
            _signal_group(proc.popen, signal.SIGKILL)
        _wait_for_exit(running, 10)
        self._kill_marked_processes()  # task processes live in their own groups; orphans
        if self._http is not None:
            self._http.close()
            self._http = None
        atexit.unregister(self.stop)

    def _migrate(self, deadline: float) -> None:
        started = time.monotonic()
        log_path = self.log_dir / "db-migrate.log"
        with open(log_path, "ab") as log:
            result = subprocess.run(
                self._airflow_argv("db", "migrate"),
                env=self.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        if result.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed ({result.returncode}):\n{_tail(log_path)}")
        if self.is_sqlite:
            _enable_sqlite_wal(self.db_url)
        self.timings["db_migrate"] = time.monotonic() - started

    def _airflow_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "airflow", *args]

    def _spawn(self, name: str) -> None:
        proc = self._processes[name]
        with open(proc.log_path, "ab") as log:
            proc.popen = subprocess.Popen(
                self._airflow_argv(*proc.args),
                env={**self.env, **(proc.env or {})},
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: a SIGKILL takes the component's children too
            )
        proc.wanted = True

    def live_processes(self) -> list[psutil.Process]:
        """Every live process this stack started: components, workers, task processes, orphans."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(_MARKER_ENV) == self._stack_id:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def _kill_marked_processes(self) -> None:
        """SIGKILL whatever still carries the marker (e.g. task processes orphaned by a kill -9)."""
        leftovers = self.live_processes()
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)

    def wait_until_healthy(self, timeout: float = 120) -> None:
        """Until /api/v2/monitor/health says every started component is healthy and every Celery worker
        answers a ping; then log in."""
        deadline = time.monotonic() + timeout
        needed = {"metadatabase", "scheduler", "dag_processor"}
        if self.triggerers:
            needed.add("triggerer")
        health: dict[str, Any] = {}
        unhealthy: set[str] = set()
        while time.monotonic() < deadline:
            self._raise_if_exited()
            health = self.health()
            unhealthy = {c for c in needed if (health.get(c) or {}).get("status") != "healthy"}
            if not unhealthy:
                unhealthy = self._silent_celery_workers()
            if not unhealthy:
                self._login()
                return
            time.sleep(_POLL_SECONDS)
        raise TimeoutError(
            f"Airflow stack not healthy after {timeout:.0f}s; last health: {health}; not ready: "
            f"{sorted(unhealthy)}\n{self.process_logs()}"
        )

    def _silent_celery_workers(self) -> set[str]:
        """The Celery workers that do not answer a ping yet (tasks queued now could not go to them)."""
        if not self.celery_workers:
            return set()
        from celery import Celery

        app = Celery(broker=self.celery_broker_url)
        try:
            replies = app.control.ping(destination=self.celery_nodes, timeout=1.0)
        finally:
            app.close()
        return set(self.celery_nodes) - {node for reply in replies for node in reply}

    def health(self) -> dict:
        """``GET /api/v2/monitor/health`` (needs no token); ``{}`` while the api-server does not answer."""
        try:
            return httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def _raise_if_exited(self) -> None:
        for proc in self._processes.values():
            if proc.wanted and not proc.running:
                raise RuntimeError(
                    f"{proc.name} exited with code {proc.popen.returncode} while waiting for the stack:\n"
                    f"{_tail(proc.log_path)}"
                )

    def _login(self) -> None:
        resp = httpx.post(
            f"{self.base_url}/auth/token",
            json={"username": self.username, "password": self.password},
            timeout=30,
            trust_env=False,
        )
        if resp.status_code >= 400:
            raise AirflowApiError("POST", "/auth/token", resp.status_code, resp.text)
        if self._http is not None:
            self._http.close()
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {resp.json()['access_token']}"},
            timeout=30,
            trust_env=False,  # no proxies: all traffic stays on 127.0.0.1
        )

    # ---- process control (crash tests) ---------------------------------------------------------------

    @property
    def process_names(self) -> list[str]:
        return list(self._processes)

    def is_running(self, name: str) -> bool:
        return self._processes[name].running

    def pid(self, name: str) -> int | None:
        popen = self._processes[name].popen
        return popen.pid if popen is not None else None

    def kill_process(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Signal component ``name`` (e.g. "triggerer-0"); for SIGTERM/SIGKILL wait until it exited.

        SIGKILL hits the whole process group, like a crash or OOM kill of the component's container
        (task processes run in their own groups and survive, as they would there). Other signals go
        to the main process only, like ``kill <pid>``.
        """
        proc = self._processes[name]
        if not proc.running:
            return
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            proc.wanted = False
        if sig == signal.SIGKILL:
            _signal_group(proc.popen, sig)
        else:
            proc.popen.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.popen.wait(timeout=timeout)

    def start_process(self, name: str) -> None:
        """(Re)start a component that is not running; its log file is appended to."""
        if self._processes[name].running:
            raise RuntimeError(f"{name} is already running")
        self._spawn(name)

    def restart_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 120) -> None:
        """Kill ``name`` with ``sig``, start it again and wait until the new instance is up.

        "Up" means a new scheduler/triggerer/dag-processor job is heartbeating (the health endpoint only
        looks at the most recent job of each type) or, for the api-server, that it answers again.
        """
        deadline = time.monotonic() + timeout
        job_type = _job_type(name)
        known_jobs = {job["id"] for job in self.jobs(job_type)} if job_type else set()
        self.kill_process(name, sig)
        self.start_process(name)
        if job_type is None:
            self.wait_until_healthy(timeout=deadline - time.monotonic())
            return
        while time.monotonic() < deadline:
            self._raise_if_exited()
            new = [j for j in self.jobs(job_type) if j["id"] not in known_jobs and j["latest_heartbeat"]]
            if new:
                return
            time.sleep(_POLL_SECONDS)
        raise TimeoutError(
            f"{name} restarted but no new {job_type} after {timeout:.0f}s\n{_tail(self.log_path(name))}"
        )

    # ---- logs ----------------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self._processes[name].log_path

    def process_logs(self, tail_lines: int | None = _LOG_TAIL_LINES) -> str:
        """The (tails of the) logs of db migrate and every process, concatenated with headers."""
        paths = [self.log_dir / "db-migrate.log", *(p.log_path for p in self._processes.values())]
        return "\n".join(
            f"===== {path.name} =====\n{_tail(path, tail_lines)}" for path in paths if path.exists()
        )

    # ---- REST API ------------------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Authenticated REST call; ``path`` without a leading "/" is relative to /api/v2/.

        Returns the decoded JSON (or text, or None when empty); raises AirflowApiError on >= 400.
        """
        if self._http is None:
            raise RuntimeError("the stack is not started")
        url = path if path.startswith("/") else f"/api/v2/{path}"
        resp = self._http.request(method, url, **kwargs)
        if resp.status_code >= 400:
            raise AirflowApiError(method, url, resp.status_code, resp.text)
        if not resp.content:
            return None
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def jobs(self, job_type: str | None = None, state: str | None = "running") -> list[dict]:
        """Airflow jobs (SchedulerJob, TriggererJob, DagProcessorJob), by default only running ones."""
        filters = {k: v for k, v in {"job_type": job_type, "job_state": state}.items() if v}
        return list(_paginate(lambda params: self.api("GET", "jobs", params={**filters, **params}), "jobs"))

    def import_errors(self) -> list[dict]:
        return list(_paginate(lambda params: self.api("GET", "importErrors", params=params), "import_errors"))

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        """Until the dag-processor has stored ``dag_id``; fail fast if an import error names it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.api("GET", f"dags/{_q(dag_id)}")
            except AirflowApiError as err:
                if err.status_code != 404:
                    raise
            errors = self.import_errors()
            related = [e for e in errors if dag_id in e["filename"] or dag_id in e["stack_trace"]]
            if related:
                raise RuntimeError(f"DAG {dag_id!r} failed to import:\n{_format_import_errors(related)}")
            time.sleep(_POLL_SECONDS)
        raise TimeoutError(
            f"DAG {dag_id!r} not parsed after {timeout:.0f}s. Import errors:\n"
            f"{_format_import_errors(self.import_errors()) or '(none)'}\n"
            f"{_tail(self.log_path('dag-processor'))}"
        )

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{_q(dag_id)}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Create a manual run (no logical date) and return its dag_run_id."""
        run = self.api("POST", f"dags/{_q(dag_id)}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float = 300,
        on_poll: Callable[[dict], None] | None = None,
        poll_interval: float = _POLL_SECONDS,
    ) -> str:
        """Poll until the run is success/failed and return that state; ``on_poll(run)`` sees every poll."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if on_poll is not None:
                on_poll(run)
            if run["state"] in TERMINAL_RUN_STATES:
                return run["state"]
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {run_id} of {dag_id} still {run['state']} after {timeout:.0f}s\n"
                    f"{self.describe_run(dag_id, run_id)}\n{self.process_logs()}"
                )
            time.sleep(poll_interval)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Every task instance of the run, mapped ones included (one entry per map_index)."""
        path = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances"
        return list(_paginate(lambda params: self.api("GET", path, params=params), "task_instances"))

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``{task_id: state}``, with ``task_id[map_index]`` keys for mapped instances."""
        return {_ti_key(ti): ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def describe_run(self, dag_id: str, run_id: str) -> str:
        """Run state plus one line per task instance, for assertion messages."""
        try:
            run = self.dag_run(dag_id, run_id)
            tis = self.task_instances(dag_id, run_id)
        except (AirflowApiError, httpx.HTTPError) as err:
            return f"(could not describe run {run_id}: {err})"
        lines = [f"run {run_id} of {dag_id}: {run['state']}"]
        lines += [f"  {_ti_key(ti)}: {ti['state']} (try {ti['try_number']})" for ti in tis]
        return "\n".join(lines)

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        """The XCom value as JSON data.

        Without ``deserialize=true`` 3.3.2 returns the raw column: fine for values pushed by workers, but
        a JSON *string* for values stored via ``XComModel.serialize_value`` and raw ``__classname__``
        dicts for serde-encoded ones (airflow/api_fastapi/core_api/routes/public/xcom.py,
        ``get_xcom_entry``). With it, both decode; types JSON lacks (tuples, sets, objects) come back
        stringified (airflow/serialization/stringify.py).
        """
        path = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}"
        entry = self.api("GET", path, params={"map_index": map_index, "deserialize": "true"})
        return entry["value"]

    def task_log(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        try_number: int = 1,
        map_index: int = -1,
        *,
        contains: tuple[str, ...] = (),
        timeout: float = 30,
    ) -> str:
        """The task's log (worker and triggerer parts) as plain text lines.

        With ``contains``, read again (up to ``timeout``) until every fragment is in it: the triggerer's
        part can reach the log after the task has ended (its runner forwards log lines on its own
        schedule), so a test that reads once right after the run may see only the worker's part.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self._read_task_log(dag_id, run_id, task_id, try_number, map_index)
            if all(fragment in text for fragment in contains) or time.monotonic() >= deadline:
                return text
            time.sleep(_POLL_SECONDS)

    def _read_task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int) -> str:
        path = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/logs/{try_number}"
        # NDJSON, because the JSON variant makes the 3.3.2 api-server log Pydantic serializer warnings.
        body = self.api(
            "GET",
            path,
            params={"map_index": map_index, "full_content": "true"},
            headers={"Accept": "application/x-ndjson"},
        )
        return "\n".join(_format_log_line(json.loads(line)) for line in body.splitlines() if line.strip())

    # ---- CLI -----------------------------------------------------------------------------------------

    def airflow(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``airflow <args>`` with the stack's environment (e.g. ``connections add``)."""
        result = subprocess.run(
            self._airflow_argv(*args),
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def _q(segment: str) -> str:
    """Quote one URL path segment (run ids contain ':' and '+')."""
    return quote(segment, safe="")


def _wait_for_exit(processes: list[_Process], timeout: float) -> list[_Process]:
    """Wait (bounded) for the processes to exit; return those still running."""
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [p for p in processes if p.running]


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)  # start_new_session=True: the group id is the leader's pid
    except ProcessLookupError:
        pass


def _pycache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "airflow-llm-async" / "pycache"


def _job_type(process_name: str) -> str | None:
    if process_name.startswith("triggerer-"):
        return "TriggererJob"
    return {"scheduler": "SchedulerJob", "dag-processor": "DagProcessorJob"}.get(process_name)


def _enable_sqlite_wal(db_url: str) -> None:
    # journal_mode=WAL is stored in the database file, so setting it once covers every process.
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _tail(path: Path, lines: int | None = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text if lines is None else "\n".join(text.splitlines()[-lines:])


def _paginate(fetch: Callable[[dict], dict], key: str, page_size: int = 100) -> Iterable[dict]:
    """Offset pagination: the REST API caps ``limit`` at [api] maximum_page_limit (100)."""
    offset = 0
    while True:
        page = fetch({"limit": page_size, "offset": offset})
        items = page[key]
        yield from items
        offset += len(items)
        if not items or offset >= page["total_entries"]:
            return


def _ti_key(ti: dict) -> str:
    return ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"


def _format_import_errors(errors: list[dict]) -> str:
    return "\n".join(f"--- {e['filename']}\n{e['stack_trace']}" for e in errors)


_LOG_CONTEXT_KEYS = {"dag_id", "run_id", "task_id", "map_index", "try_number", "ti_id", "filename", "lineno"}


def _format_log_line(line: dict) -> str:
    """``timestamp [level] event key=value...`` without the per-task context repeated on every line."""
    head = [str(line.get("timestamp") or ""), f"[{line['level']}]" if "level" in line else ""]
    extra = [
        f"{k}={v}"
        for k, v in line.items()
        if k not in _LOG_CONTEXT_KEYS and k not in ("timestamp", "level", "event", "logger")
    ]
    return " ".join(p for p in [*head, str(line.get("event", "")), *extra] if p)
