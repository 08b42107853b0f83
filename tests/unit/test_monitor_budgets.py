"""The monitor's budget rows (monitor/budgets.py) and how the text view shows them."""

from __future__ import annotations

import calendar
import dataclasses

import pytest

from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.monitor import budgets, text
from tests.unit.test_monitor import call

NOW = float(calendar.timegm((2026, 12, 4, 17, 30, 0)))
MIDNIGHT = float(calendar.timegm((2026, 12, 4, 0, 0, 0)))


def test_each_budget_shows_its_period_spent_and_left():
    rows = budgets.budget_figures(
        {"llm_b": BudgetConfig(50.0, "month"), "llm_a": BudgetConfig(2.0)},
        {"llm_a": (0.5, "xcom"), "llm_b": (60.0, "redis")},
        NOW,
    )
    assert rows == [
        {"conn_id": "llm_a", "budget_usd": 2.0, "per": "day", "period": "2026-12-04",
         "resets_at": MIDNIGHT + 86400, "spent_usd": 0.5, "left_usd": 1.5, "source": "xcom"},
        {"conn_id": "llm_b", "budget_usd": 50.0, "per": "month", "period": "2026-12",
         "resets_at": float(calendar.timegm((2027, 1, 1, 0, 0, 0))), "spent_usd": 60.0, "left_usd": 0.0,
         "source": "redis"},
    ]  # fmt: skip


def test_a_budget_whose_ledger_cannot_be_read_shows_unknown():
    [row] = budgets.budget_figures({"llm_a": BudgetConfig(2.0)}, {"llm_a": (None, "redis")}, NOW)
    assert (row["spent_usd"], row["left_usd"]) == (None, None)


def test_spent_in_xcoms_counts_the_connections_calls_of_this_period_only():
    calls = [
        call(cost=0.25, end=NOW),
        call(cost=0.5, end=MIDNIGHT),  # the period's first second counts
        call(cost=4.0, end=MIDNIGHT - 1),  # yesterday
        call(cost=None, end=NOW),  # unpriced
        dataclasses.replace(call(cost=8.0, end=NOW), conn_id="llm_other"),
    ]
    assert budgets.spent_in_xcoms(calls, "llm_default", MIDNIGHT) == pytest.approx(0.75)


def test_the_text_view_has_a_budget_table_only_when_there_are_budgets():
    snapshot = {
        "generated_at": NOW, "window_s": 3600, "triggerers": [], "unassigned_triggers": 0,
        "processes": [], "models": [],
        "totals": {"calls": 0, "failures": 0, "total_tokens": 0, "cost_usd": 0},
    }  # fmt: skip
    assert "Budgets" not in text.render(snapshot)
    snapshot["budgets"] = budgets.budget_figures({"llm_a": BudgetConfig(2.0)}, {"llm_a": (0.5, "redis")}, NOW)
    out = text.render(snapshot)
    assert "Budgets (budget_usd)" in out
    assert "llm_a       2 per day  2026-12-04    0.500000  1.500000  Redis, for every host" in out
