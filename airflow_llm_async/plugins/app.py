"""The dashboard's FastAPI app, mounted by Airflow's api-server at ``/llm-dashboard`` (see dashboard.py)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import GetUserDep, get_user
from airflow.utils.session import create_session
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from airflow_llm_async.monitor import db

MAX_WINDOW_MIN = 7 * 24 * 60


def create_app() -> FastAPI:
    page = resources.files("airflow_llm_async.plugins").joinpath("dashboard.html").read_text()
    app = FastAPI(title="LLM dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> Response:
        try:
            await get_user(request, None, None)  # the UI's cookie, as for the UI's own pages
        except HTTPException:
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)))
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/api/figures")
    def figures(
        user: GetUserDep,
        window_min: Annotated[float, Query(gt=0, le=MAX_WINDOW_MIN)] = 60,
    ) -> dict[str, Any]:
        """The monitor's snapshot with a timeline, for the DAGs this user may read."""
        auth = get_auth_manager()
        with create_session() as session:
            dag_ids = auth.get_authorized_dag_ids(user=user, method="GET", session=session)
            see_jobs = auth.is_authorized_view(access_view=AccessView.JOBS, user=user)
            snapshot = db.load_snapshot(
                session,
                window_s=window_min * 60,
                dag_ids=dag_ids,
                with_triggerers=see_jobs,
                with_timeline=True,
            )
        snapshot["triggerers_visible"] = see_jobs
        return snapshot

    return app
