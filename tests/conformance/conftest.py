"""The conformance tier: the provider against LiteLLM's proxy, a real OpenAI-compatible server.

Its tests carry the ``conformance`` marker and run only when asked: ``bash scripts/test.sh
--conformance`` (which makes ``.venv-litellm`` first), ``pytest -m conformance``, or a path inside
tests/conformance. Any other run deselects them, so the regular suite needs no LiteLLM.
One proxy serves the whole session (it takes ~15 s to start).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conformance.litellm_proxy import MASTER_KEY, LiteLLMProxy

HERE = Path(__file__).resolve().parent
CONN_ID = "llm_litellm"
BAD_KEY_CONN_ID = "llm_litellm_bad_key"


def _asked(config) -> bool:
    if "conformance" in (config.option.markexpr or ""):
        return True
    # Paths named on the command line, e.g. `pytest tests/conformance/test_litellm.py -k plain`.
    args = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return any(arg == HERE or HERE in arg.parents for arg in args)


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    for item in mine:
        item.add_marker("conformance")
        # Under xdist (--dist loadgroup), all on one worker: one proxy, not one per worker.
        item.add_marker(pytest.mark.xdist_group("litellm"))
    if mine and not _asked(config):
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if item not in set(mine)]


@pytest.fixture(scope="session")
def litellm(tmp_path_factory):
    """LiteLLM's proxy on a free loopback port, for the whole session."""
    log = tmp_path_factory.mktemp("litellm") / "litellm.log"
    with LiteLLMProxy(log) as proxy:
        yield proxy


def point_connection(monkeypatch, conn_id: str, base_url: str, api_key: str, **extra) -> None:
    conn = {"conn_type": "llm", "host": base_url, "password": api_key, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


@pytest.fixture
def litellm_conn(litellm, monkeypatch):
    """Connection ``llm_litellm`` to the proxy (master key, default model gpt-4o-mini, 10 s per attempt),
    and ``llm_litellm_bad_key`` with a key the proxy does not know."""
    point_connection(
        monkeypatch, CONN_ID, litellm.base_url, MASTER_KEY, default_model="gpt-4o-mini", timeout=10
    )
    point_connection(monkeypatch, BAD_KEY_CONN_ID, litellm.base_url, "sk-not-the-master-key-9d2e")
    return litellm
