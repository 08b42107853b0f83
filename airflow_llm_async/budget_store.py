"""Where a connection's ``budget_usd`` ledger lives, and the driver's two questions to it.

The rules (periods, reservations, the refusal's text) are in ``core/budget.py``; this module does
the I/O. With the connection extra ``rate_limit_backend: "redis://..."`` the ledger is in Redis,
shared by every triggerer and worker of the deployment: one Lua script checks and reserves
atomically, so two hosts can never both take the last dollar. Without it, each process keeps its
own ledger (documented as such: N triggerers may spend up to N budgets).

If Redis cannot be reached, the process's own ledger stands in for :data:`RETRY_SECONDS`, with a
warning: the budget still holds per process rather than failing every call.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from airflow_llm_async.core import budget
from airflow_llm_async.core.budget import BudgetConfig, Ledger, Reservation
from airflow_llm_async.core.protocol import Endpoint

log = logging.getLogger(__name__)

KEY_PREFIX = "airflow_llm_async:budget:"
RETRY_SECONDS = 10.0
# A settlement may come after its period has ended (an attempt in flight at midnight): keep the key
# this long past the period's end so it can still be corrected, then let Redis drop it.
GRACE_SECONDS = 86400

# KEYS[1]: the (connection, period) counter of nano-dollars spent or held. ARGV: the attempt's worst
# case, the limit, the epoch second the key may go. Returns {1 if reserved else 0, held before}.
_RESERVE = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, held} end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return {1, held}
"""
# Settle: add (actual - reserved) unless the key is gone (its period is long over).
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 0
"""

_ledger = Ledger()
_lock = threading.Lock()  # sync mode runs calls in private event loops, possibly in several threads
_down_until: dict[str, float] = {}  # Redis URL -> monotonic time to try it again


def _key(reservation: Reservation) -> str:
    return f"{KEY_PREFIX}{reservation.conn_id}:{reservation.period}"


async def reserve(endpoint: Endpoint, worst_usd: float, now: float | None = None) -> Reservation | str:
    """Hold an attempt's worst case in its connection's ledger, or the refusal's message."""
    config = endpoint.budget_usd
    assert config is not None
    now = time.time() if now is None else now
    url = endpoint.rate_limit_backend
    if url and not _down(url):
        from airflow_llm_async import limits_redis  # the hook checked that redis is installed

        try:
            return await _reserve_in_redis(url, endpoint.conn_id, config, worst_usd, now)
        except (limits_redis.RedisError, OSError) as exc:
            _fail(url, endpoint.conn_id, exc)
    with _lock:
        return _ledger.reserve(endpoint.conn_id, config, worst_usd, now)


async def settle(endpoint: Endpoint, reservation: Reservation, actual_usd: float) -> None:
    """Replace a reservation by the attempt's real cost (0 when nothing was answered)."""
    url = endpoint.rate_limit_backend
    if url and not _down(url):
        from airflow_llm_async import limits_redis

        delta = budget.to_nano(actual_usd) - reservation.nano
        try:
            await limits_redis.client_for(url).eval(_SETTLE, 1, _key(reservation), delta)
            return
        except (limits_redis.RedisError, OSError) as exc:
            _fail(url, endpoint.conn_id, exc)
    with _lock:
        _ledger.settle(reservation, actual_usd)


async def _reserve_in_redis(
    url: str, conn_id: str, config: BudgetConfig, worst_usd: float, now: float
) -> Reservation | str:
    from airflow_llm_async.limits_redis import client_for

    period, ends = config.period(now)
    reservation = Reservation(conn_id, period, budget.to_nano(worst_usd))
    limit = budget.to_nano(config.usd)
    expires = math.ceil(ends) + GRACE_SECONDS
    reserved, held = await client_for(url).eval(
        _RESERVE, 1, _key(reservation), reservation.nano, limit, expires
    )
    if reserved:
        return reservation
    return budget.refusal_message(conn_id, config, period, ends, int(held), reservation.nano)


def _down(url: str) -> bool:
    return time.monotonic() < _down_until.get(url, -math.inf)


def _fail(url: str, conn_id: str, exc: BaseException) -> None:
    from airflow_llm_async.limits_redis import redacted

    _down_until[url] = time.monotonic() + RETRY_SECONDS
    log.warning(
        "budget backend %s failed (%s: %s); keeping %r's budget_usd in this process only for %.0f s",
        *(redacted(url), type(exc).__name__, exc, conn_id, RETRY_SECONDS),
    )


def forget() -> None:
    """Tests: start from an empty process ledger."""
    global _ledger
    with _lock:
        _ledger = Ledger()
