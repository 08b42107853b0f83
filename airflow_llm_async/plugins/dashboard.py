"""The LLM dashboard: an Airflow plugin that serves a page and its figures from the api-server.

Registered by the ``airflow.plugins`` entry point (Airflow loads a provider's ``plugins`` only with
``[core] lazy_discover_providers = False``; entry points always). It adds:

* a FastAPI app at ``/llm-dashboard``: ``/`` the page (plain HTML, charts drawn as inline SVG),
  ``/api/figures`` the figures as JSON (what ``airflow-llm monitor --json`` prints, plus a timeline);
* a "LLM calls" entry in the Airflow UI's navigation (an external view) that opens the page.

Authentication is the UI's own: the JWT in the ``_token`` cookie that the Airflow login sets (or an
``Authorization: Bearer`` header), checked by Airflow's ``get_user``. The figures cover only the DAGs
the user may read, and the triggerer figures need the "Jobs" view permission. A page request without
a valid token is sent to the auth manager's login page.

Every Airflow process imports plugins, so this module stays light: the FastAPI app is built on first use,
which only the api-server makes.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/llm-dashboard"


@cache
def _fastapi_apps() -> list[dict[str, Any]]:
    from airflow_llm_async.plugins.app import create_app

    return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "LLM dashboard"}]


class LLMDashboardPlugin(AirflowPlugin):
    """Figures of the LLM calls and triggerers, as charts over time, in the Airflow UI."""

    name = "llm_dashboard"
    external_views = [
        {
            "name": "LLM calls",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "llm-dashboard",
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return _fastapi_apps()
