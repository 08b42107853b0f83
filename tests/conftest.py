"""Shared test set-up: an isolated AIRFLOW_HOME, and no shared HTTP session outliving its loop."""

from __future__ import annotations

import os
import tempfile

# Before anything imports Airflow: never touch a real ~/airflow from tests.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-llm-tests-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")

import pytest  # noqa: E402

from airflow_llm_async import transport  # noqa: E402


@pytest.fixture(autouse=True)
async def _close_shared_session():
    """Each test's event loop dies with the test; its shared aiohttp session must close first."""
    yield
    await transport.close_shared_session()
