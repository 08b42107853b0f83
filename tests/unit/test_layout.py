"""The architecture holds: core/ is I/O-free, aiohttp stays behind the transport, workarounds in compat."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_llm_async"
CORE = sorted((PACKAGE / "core").glob("*.py"))
# What core/ may import besides itself: pure standard library modules and jsonschema.
ALLOWED = {"__future__", "ast", "calendar", "collections", "dataclasses", "email", "functools", "hashlib",
           "json", "logging", "math", "random", "re", "time", "typing", "jsonschema",
           "airflow_llm_async"}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_modules_import_nothing_that_does_io(path):
    assert imported_modules(path) <= ALLOWED, f"{path.name} imports {imported_modules(path) - ALLOWED}"
    relative = [n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]
    outside = [m for m in relative if m and m.startswith("airflow_llm_async") and ".core" not in m]
    assert outside == [], f"{path.name} imports {outside} from outside core/"


def test_importing_core_loads_neither_airflow_nor_an_event_loop_nor_http():
    modules = ", ".join(f"airflow_llm_async.core.{path.stem}" for path in CORE)
    loaded = "{m.split('.')[0] for m in sys.modules} & {'airflow', 'aiohttp', 'asyncio', 'httpx', 'redis'}"
    code = f"import sys, {modules}; print(sorted({loaded}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_only_the_transport_imports_aiohttp_as_a_client():
    users = [
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "aiohttp" in imported_modules(p)
    ]
    # The fake server is an aiohttp *server*, a test tool (docs/testing.md).
    assert sorted(users) == ["testing/fake_server.py", "transport.py"]


def test_airflow_version_workarounds_live_in_compat():
    mentions = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "3.3.2" in p.read_text() and "testing" not in p.parts
    ]
    assert mentions == ["compat.py"]
