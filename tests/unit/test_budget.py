"""core/budget.py: the connection's budget_usd extra, its periods, and the process's ledger."""

from __future__ import annotations

import calendar

import pytest

from airflow_llm_async.core.budget import NANO_PER_USD, BudgetConfig, Ledger, Reservation, to_nano, to_usd

# 2026-12-04 17:30:00 UTC
NOW = float(calendar.timegm((2026, 12, 4, 17, 30, 0)))
DAY = BudgetConfig(1.0, "day")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"usd": 50, "per": "day"}, BudgetConfig(50.0, "day")),
        ({"usd": 2.5, "per": "month"}, BudgetConfig(2.5, "month")),
        ({"usd": 10}, BudgetConfig(10.0, "day")),
        (7, BudgetConfig(7.0, "day")),
        ('{"usd": 50, "per": "month"}', BudgetConfig(50.0, "month")),  # a URI-form extra is text
        ("12.5", BudgetConfig(12.5, "day")),
    ],
)
def test_the_extra_is_read(given, expected):
    assert BudgetConfig.parse(given) == expected


@pytest.mark.parametrize(
    ("given", "names"),
    [
        ({"usd": 0}, "'usd'"),
        ({"usd": -1, "per": "day"}, "'usd'"),
        ({"usd": True}, "'usd'"),
        ({"usd": "fifty"}, "'usd'"),
        ({"usd": float("inf")}, "'usd'"),
        ({"usd": 5, "per": "week"}, "'per'"),
        ({"per": "day"}, '{"usd": 50'),
        ({"usd": 5, "every": "day"}, '{"usd": 50'),
        ([50], '{"usd": 50'),
        ("fifty dollars", '{"usd": 50'),
        (False, '{"usd": 50'),
    ],
)
def test_a_bad_extra_says_what_to_write(given, names):
    with pytest.raises(ValueError, match="must be") as raised:
        BudgetConfig.parse(given)
    assert names in str(raised.value)


def test_a_day_runs_from_midnight_to_midnight_utc():
    assert DAY.period(NOW) == ("2026-12-04", float(calendar.timegm((2026, 12, 5, 0, 0, 0))))
    midnight = float(calendar.timegm((2026, 12, 5, 0, 0, 0)))
    assert DAY.period(midnight - 0.001)[0] == "2026-12-04"
    assert DAY.period(midnight)[0] == "2026-12-05"


def test_a_month_ends_on_the_first_of_the_next_even_in_december():
    month = BudgetConfig(1.0, "month")
    assert month.period(NOW) == ("2026-12", float(calendar.timegm((2027, 1, 1, 0, 0, 0))))
    assert month.period(float(calendar.timegm((2026, 2, 28, 23, 0, 0))))[1] == calendar.timegm(
        (2026, 3, 1, 0, 0, 0)
    )


def test_amounts_are_exact_whole_nano_dollars():
    assert to_nano(0.1) + to_nano(0.2) == to_nano(0.3)
    assert to_usd(to_nano(12.345678901)) == pytest.approx(12.345678901, abs=1 / NANO_PER_USD)


def test_reservations_are_refused_once_spent_plus_held_would_pass_the_limit():
    ledger = Ledger()
    first = ledger.reserve("llm", DAY, 0.4, NOW)
    second = ledger.reserve("llm", DAY, 0.4, NOW)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    third = ledger.reserve("llm", DAY, 0.4, NOW)
    assert isinstance(third, str)
    assert "'llm' budget_usd of $1 per day (UTC) would be exceeded" in third
    assert "$0.800000 spent or held" in third and "worst case $0.400000" in third
    assert "resets at 2026-12-05 00:00 UTC" in third and "Raise the connection's budget_usd" in third
    # Exactly up to the limit is allowed.
    assert isinstance(ledger.reserve("llm", DAY, 0.2, NOW), Reservation)
    assert ledger.held_usd("llm", DAY, NOW) == pytest.approx(1.0)


def test_settling_replaces_the_worst_case_by_the_real_cost():
    ledger = Ledger()
    held = ledger.reserve("llm", DAY, 0.9, NOW)
    assert isinstance(ledger.reserve("llm", DAY, 0.2, NOW), str)
    ledger.settle(held, 0.05)
    assert ledger.held_usd("llm", DAY, NOW) == pytest.approx(0.05)
    assert isinstance(ledger.reserve("llm", DAY, 0.2, NOW), Reservation)
    failed = ledger.reserve("llm", DAY, 0.5, NOW)
    ledger.settle(failed, 0.0)  # no answer: nothing spent
    assert ledger.held_usd("llm", DAY, NOW) == pytest.approx(0.25)


def test_a_cost_above_the_worst_case_is_still_counted():
    ledger = Ledger()
    ledger.settle(ledger.reserve("llm", DAY, 0.1, NOW), 0.95)  # e.g. the gateway's own, higher figure
    assert isinstance(ledger.reserve("llm", DAY, 0.1, NOW), str)


def test_connections_have_their_own_ledgers_and_a_new_day_starts_at_zero():
    ledger = Ledger()
    month = BudgetConfig(1.0, "month")
    ledger.reserve("a", DAY, 1.0, NOW)
    ledger.reserve("b", month, 0.7, NOW)
    assert isinstance(ledger.reserve("a", DAY, 0.01, NOW), str)
    tomorrow = NOW + 86400
    assert isinstance(ledger.reserve("a", DAY, 1.0, tomorrow), Reservation)
    # The new day of "a" dropped only "a"'s old day, not "b"'s month.
    assert ledger.held_usd("b", month, tomorrow) == pytest.approx(0.7)
    assert ledger.held_usd("a", DAY, NOW) == 0.0


def test_a_settlement_after_its_period_was_dropped_changes_nothing():
    ledger = Ledger()
    late = ledger.reserve("a", DAY, 0.5, NOW)
    ledger.reserve("a", DAY, 0.2, NOW + 86400)  # the next day begins; yesterday is dropped
    ledger.settle(late, 0.4)
    assert ledger.held_usd("a", DAY, NOW + 86400) == pytest.approx(0.2)
