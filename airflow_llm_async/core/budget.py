"""A connection's spending limit across calls (the extra ``budget_usd``): the rules, no I/O.

``max_cost_usd`` bounds one call; ``budget_usd`` (``{"usd": 50, "per": "day"}``) bounds everything a
connection spends in a UTC day or month, in every call, task and process that shares its ledger.
Before an attempt is sent, its worst case (the whole prompt and ``max_tokens`` at the model's price)
is *reserved*; once its answer is priced, the reservation is *settled* to the real cost. An attempt
whose reservation would take spent + reserved past the limit is refused and never sent.

Amounts are whole nano-dollars, so the process's ledger (:class:`Ledger`) and Redis's (``INCRBY``,
``budget_store.py``) add exactly and agree; the period's key names its UTC day or month, so a new
period starts at zero without anyone resetting anything.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PERIODS = ("day", "month")
NANO_PER_USD = 1_000_000_000


def to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """At most ``usd`` US dollars per UTC ``per`` ("day" or "month") on one connection."""

    usd: float
    per: str = "day"

    @classmethod
    def parse(cls, given: Any) -> BudgetConfig:
        """The extra's value; ValueError saying what is wrong (the caller names the connection)."""
        if isinstance(given, str):  # a URI-form connection's extras are text
            try:
                given = json.loads(given)
            except ValueError:
                pass
        if isinstance(given, int | float) and not isinstance(given, bool):
            given = {"usd": given}  # a bare number: per day
        if not isinstance(given, Mapping) or set(given) - {"usd", "per"} or "usd" not in given:
            raise ValueError(f'must be an object such as {{"usd": 50, "per": "day"}}, got {given!r}')
        usd, per = given["usd"], given.get("per", "day")
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not usd > 0 or usd == float("inf"):
            raise ValueError(f"field 'usd' must be a positive number of US dollars, got {given['usd']!r}")
        if per not in PERIODS:
            raise ValueError(f"field 'per' must be one of {list(PERIODS)}, got {per!r}")
        return cls(float(usd), per)

    def period(self, now: float) -> tuple[str, float]:
        """The current period's name (``2026-12-04`` / ``2026-12``, UTC) and the epoch second it ends."""
        today = time.gmtime(now)
        if self.per == "day":
            midnight = calendar.timegm((today.tm_year, today.tm_mon, today.tm_mday, 0, 0, 0))
            return time.strftime("%Y-%m-%d", today), float(midnight + 86400)
        year, month = (today.tm_year + 1, 1) if today.tm_mon == 12 else (today.tm_year, today.tm_mon + 1)
        return time.strftime("%Y-%m", today), float(calendar.timegm((year, month, 1, 0, 0, 0)))

    def start(self, now: float) -> float:
        """The epoch second the current period began."""
        today = time.gmtime(now)
        day = today.tm_mday if self.per == "day" else 1
        return float(calendar.timegm((today.tm_year, today.tm_mon, day, 0, 0, 0)))

    def describe(self) -> str:
        return f"${self.usd:g} per {self.per} (UTC)"


@dataclass(frozen=True, slots=True)
class Reservation:
    """An attempt's worst case, held in its connection's ledger until :meth:`Ledger.settle`."""

    conn_id: str
    period: str
    nano: int


def refusal_message(
    conn_id: str, config: BudgetConfig, period: str, ends: float, held_nano: int, worst_nano: int
) -> str:
    """Why an attempt is refused: what is spent or held, what it would add, and when it resets."""
    resets = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ends))
    return (
        f"the LLM connection {conn_id!r} budget_usd of {config.describe()} would be exceeded: "
        f"${to_usd(held_nano):.6f} spent or held by calls in flight in {period} + this attempt's worst "
        f"case ${to_usd(worst_nano):.6f} > ${config.usd:g}; it resets at {resets}. Raise the connection's "
        f"budget_usd, lower max_tokens, or add a fallback on another connection"
    )


class Ledger:
    """This process's spending per (connection, period), for connections without a shared backend."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], int] = {}  # spent + reserved, in nano-dollars

    def reserve(self, conn_id: str, config: BudgetConfig, worst_usd: float, now: float) -> Reservation | str:
        """Hold ``worst_usd`` for an attempt, or the refusal's message if that would pass the limit."""
        period, ends = config.period(now)
        key, worst = (conn_id, period), to_nano(worst_usd)
        held = self._held.get(key, 0)
        if held + worst > to_nano(config.usd):
            return refusal_message(conn_id, config, period, ends, held, worst)
        if key not in self._held:  # a new period for this connection: the past ones are done
            for old in [old for old in self._held if old[0] == conn_id]:
                del self._held[old]
        self._held[key] = held + worst
        return Reservation(conn_id, period, worst)

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reservation by what the attempt really cost (0 when nothing was answered)."""
        key = (reservation.conn_id, reservation.period)
        if key in self._held:  # else the period ended while the attempt was in flight: nothing to correct
            self._held[key] = max(0, self._held[key] - reservation.nano + to_nano(actual_usd))

    def held_usd(self, conn_id: str, config: BudgetConfig, now: float) -> float:
        return to_usd(self._held.get((conn_id, config.period(now)[0]), 0))
