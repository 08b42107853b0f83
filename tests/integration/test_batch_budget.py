"""budget_usd and batch mode: a part's worst case is held before it is sent, then settled to its cost."""

from __future__ import annotations

import time

import pytest
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

from airflow_llm_async import budget_store
from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.core.pricing import DEFAULT_PRICES
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens
from tests.integration.conftest import point_connection
from tests.integration.test_batch_trigger import (
    PROMPTS,
    batch_llm,
    batch_stats,
    batch_trigger,
    events_of,
    xcoms,
)

__all__ = ["batch_llm", "xcoms"]  # fixtures


@pytest.fixture(autouse=True)
def empty_ledger():
    budget_store.forget()
    yield
    budget_store.forget()


def worst_of_all(prompts) -> float:
    """The batch's worst case as the trigger reckons it: each item's prompt and max_tokens (64)."""
    price = DEFAULT_PRICES["gpt-4"].batch()
    total = 0.0
    for prompt in prompts:
        request = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "temperature": 0.7}
        total += price.cost(estimate_prompt_tokens(request), completion_budget(request))
    return total


def held(conn_id: str, usd: float) -> float:
    return budget_store._ledger.held_usd(conn_id, BudgetConfig(usd), time.time())


async def test_the_ledger_holds_the_batch_cost_once_collected(batch_llm, xcoms, monkeypatch):
    usd = worst_of_all(PROMPTS) * 1.5
    point_connection(
        monkeypatch, "llm_batch_budget", batch_llm.base_url, default_model="gpt-4", budget_usd=usd
    )
    events = await events_of(batch_trigger(llm_conn_id="llm_batch_budget"))
    assert isinstance(events[0], TaskSuccessEvent)
    cost = xcoms.values["llm_meta"]["batch"]["cost_usd"]
    assert 0 < cost < worst_of_all(PROMPTS)
    assert held("llm_batch_budget", usd) == pytest.approx(
        cost, rel=1e-6
    )  # the worst case settled to the cost


async def test_a_batch_whose_worst_case_the_budget_cannot_hold_is_not_sent(batch_llm, xcoms, monkeypatch):
    usd = worst_of_all(PROMPTS) * 0.9
    point_connection(monkeypatch, "llm_batch_poor", batch_llm.base_url, default_model="gpt-4", budget_usd=usd)
    events = await events_of(batch_trigger(llm_conn_id="llm_batch_poor"))
    assert isinstance(events[0], TaskFailedEvent)
    items = xcoms.values["llm_meta"]["items"]
    assert {item["error"]["kind"] for item in items} == {"budget"}
    assert "would be exceeded" in items[0]["error"]["message"]
    assert batch_stats(batch_llm)["files_uploaded"] == 0 and batch_stats(batch_llm)["batches_created"] == 0
    assert sum(batch_llm.stats()["by_model"].values()) == 0  # not asked in real time either
    assert held("llm_batch_poor", usd) == 0


async def test_a_model_without_a_price_cannot_be_bounded_so_its_batch_is_not_sent(
    batch_llm, xcoms, monkeypatch
):
    point_connection(
        monkeypatch, "llm_batch_unpriced", batch_llm.base_url, default_model="fake-model", budget_usd=5
    )
    events = await events_of(batch_trigger(PROMPTS[:2], llm_conn_id="llm_batch_unpriced", model="fake-model"))
    assert isinstance(events[0], TaskFailedEvent)
    error = xcoms.values["llm_meta"]["items"][0]["error"]
    assert error["kind"] == "budget" and "no price is known for model 'fake-model'" in error["message"]
    assert batch_stats(batch_llm)["batches_created"] == 0
