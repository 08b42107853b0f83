"""Shared test set-up: an isolated AIRFLOW_HOME, the tiers, and no shared HTTP session outliving its loop.

Tiers (markers, given by directory; select with ``-m``, e.g. ``-m "not e2e"``, which is what
``scripts/test.sh --fast`` runs):

* ``unit``: no I/O beyond the process; ``integration``: a fake LLM server (and Redis) on loopback;
* ``e2e``: real Airflow processes. Sub-tiers: ``faults`` (tests/e2e/faults: kills triggerers, its own
  deployment), ``docs`` (every code block of the docs, tests/e2e/test_doc_blocks.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# With PYTHONDONTWRITEBYTECODE set, every process a test starts (Airflow components, `airflow` commands
# of the doc blocks, fake servers) would compile all it imports again (~2 s of CPU each): keep their
# bytecode outside the source trees instead, where AirflowStack and scripts/test.sh keep it.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    _cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(_cache_home, "airflow-llm-async", "pycache")

# Before anything imports Airflow: never touch a real ~/airflow from tests.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-llm-tests-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")

import pytest  # noqa: E402

from airflow_llm_async import transport  # noqa: E402

TESTS = Path(__file__).resolve().parent
# Figures the fault tests measure (tests/e2e/faults/conftest.py), in the run's temporary directory.
FIGURES_FILE = "fault-figures.txt"
_TIERS = {"unit": ("unit",), "integration": ("integration",), "e2e": ("e2e",)}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(TESTS).parts
        tier = parts[0] if parts and parts[0] in _TIERS else None
        if tier:
            item.add_marker(tier)
        if tier == "e2e" and "faults" in parts:
            item.add_marker("faults")
        if tier == "e2e" and item.path.name == "test_doc_blocks.py":
            item.add_marker("docs")


# pytest-xdist 3.8's --dist loadgroup marks a group by a suffix to the nodeid, which pytest 9.2 ignores
# (Node.nodeid no longer reads Node._nodeid), so every test became a group of its own and the deployment
# of a group started on each worker. The workers write the groups here instead, for the scheduler below.
GROUPS_FILE = "xdist-groups.json"


@pytest.hookimpl(tryfirst=True)  # before the xdist worker reports its collection to the controller
def pytest_collection_finish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    groups = {}
    for item in session.items:
        marker = item.get_closest_marker("xdist_group")
        if marker is not None:
            groups[item.nodeid] = str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))
    root = session.config._tmp_path_factory.getbasetemp().parent  # the controller's basetemp
    tmp = root / f"{GROUPS_FILE}.{worker}"
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, root / GROUPS_FILE)  # every worker collects the same tests: same content


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: the tests of one ``xdist_group`` run on one worker, in collection order."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                path = config._tmp_path_factory.getbasetemp() / GROUPS_FILE
                if not path.exists():
                    raise RuntimeError(f"no xdist worker wrote {path}: see pytest_collection_finish")
                self._groups = json.loads(path.read_text())
            return self._groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


def _run_base(config) -> Path | None:
    """The run's base temporary directory, if it made one (a unit-only run may not have)."""
    base = getattr(getattr(config, "_tmp_path_factory", None), "_basetemp", None)
    return Path(base) if base is not None else None


def pytest_terminal_summary(terminalreporter, config):
    base = _run_base(config)
    if os.environ.get("PYTEST_XDIST_WORKER") or base is None or not (base / FIGURES_FILE).exists():
        return
    terminalreporter.section("fault survival figures")
    for line in (base / FIGURES_FILE).read_text().splitlines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    """Drop the run's PostgreSQL template (tests/e2e/conftest.py), once every xdist worker is done."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    base = _run_base(session.config)
    if base is None:
        return
    record = base / "postgres-template.url"
    if record.exists():
        from airflow_llm_async.testing.airflow_stack import drop_postgres_database

        drop_postgres_database(record.read_text().strip())
        record.unlink()


@pytest.fixture(autouse=True)
async def _close_shared_session():
    """Each test's event loop dies with the test; its shared aiohttp session must close first."""
    yield
    await transport.close_shared_session()
