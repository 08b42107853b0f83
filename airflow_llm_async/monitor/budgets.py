"""What each connection with ``budget_usd`` has spent this period, and what is left, for the monitor.

Two sources, as the ledger itself has two homes (``budget_store.py``): a connection whose budget is
kept in Redis (``rate_limit_backend``) is read there, exactly as every host enforces it; a
connection without one is enforced by each process on its own, which nobody can read from here, so
its figure is what the ``llm_meta`` XComs of the period recorded for it (``source: "xcom"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from airflow_llm_async.core import budget
from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.monitor.figures import Call

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 2.0


def budget_figures(
    budgets: Mapping[str, BudgetConfig], spent: Mapping[str, tuple[float | None, str]], now: float
) -> list[dict[str, Any]]:
    """One row per connection: its budget, the period, spent and left (None: unknown), and the source."""
    rows = []
    for conn_id in sorted(budgets):
        config = budgets[conn_id]
        period, ends = config.period(now)
        usd, source = spent.get(conn_id, (None, "unknown"))
        rows.append(
            {
                "conn_id": conn_id,
                "budget_usd": config.usd,
                "per": config.per,
                "period": period,
                "resets_at": ends,
                "spent_usd": None if usd is None else round(usd, 6),
                "left_usd": None if usd is None else round(max(0.0, config.usd - usd), 6),
                "source": source,
            }
        )
    return rows


def spent_in_xcoms(calls: Iterable[Call], conn_id: str, since: float) -> float:
    """What the period's calls answered on ``conn_id`` cost, as their ``llm_meta`` recorded it."""
    return sum(c.cost_usd or 0.0 for c in calls if c.conn_id == conn_id and c.finished_at >= since)


def spent_in_redis(url: str, conn_id: str, config: BudgetConfig, now: float) -> float | None:
    """The shared ledger's figure (spent, plus what calls in flight hold); None if Redis cannot say."""
    from redis import Redis
    from redis.exceptions import RedisError

    from airflow_llm_async.budget_store import KEY_PREFIX
    from airflow_llm_async.limits_redis import redacted

    period, _ = config.period(now)
    try:
        with Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S) as r:
            value = r.get(f"{KEY_PREFIX}{conn_id}:{period}")
    except (RedisError, OSError) as exc:
        log.warning("budget of %r: cannot read %s (%s)", conn_id, redacted(url), type(exc).__name__)
        return None
    return budget.to_usd(int(value)) if value is not None else 0.0
