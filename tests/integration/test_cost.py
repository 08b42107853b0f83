"""What calls cost (llm_meta.cost_usd) and max_cost_usd refusals, against the fake server."""

from __future__ import annotations

import os
import time

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_llm_async import driver, metrics
from airflow_llm_async.core.outcome import CallSpec
from airflow_llm_async.core.pricing import DEFAULT_PRICES, Price
from airflow_llm_async.core.protocol import LLMCallError
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens
from airflow_llm_async.operators.llm import LLMOperator
from airflow_llm_async.triggers.chat import ChatCompletionTrigger
from tests.doubles import RecordingTI
from tests.integration.conftest import chat_trigger, point_connection

REQUEST = {
    "messages": [{"role": "user", "content": "Summarize: the triggerer waits for many calls at once."}],
    "max_tokens": 400,
}
GPT4 = DEFAULT_PRICES["gpt-4"]


async def run(spec: CallSpec | None = None, **kwargs) -> dict:
    trigger = ChatCompletionTrigger(spec=spec.to_json()) if spec else chat_trigger(REQUEST, **kwargs)
    events = [event async for event in trigger.run()]
    assert len(events) == 1
    return events[0].payload


def cost(price: Price, usage: dict) -> float:
    return (usage["prompt_tokens"] * price.input + usage["completion_tokens"] * price.output) / 1e6


def worst_case(price: Price) -> float:
    return price.cost(estimate_prompt_tokens(REQUEST), completion_budget(REQUEST))


async def test_a_call_reports_its_cost_when_and_where_it_ran(fake_llm):
    before = time.time()
    outcome = await run(models=["gpt-4"])
    meta = outcome["meta"]
    assert outcome["status"] == "success"
    assert meta["cost_usd"] == pytest.approx(cost(GPT4, meta["usage"])) and meta["cost_usd"] > 0
    assert before <= meta["started_at"] <= meta["finished_at"] <= time.time()
    assert meta["finished_at"] - meta["started_at"] == pytest.approx(meta["latency_s"], abs=0.05)
    assert (meta["host"], meta["pid"]) == (metrics.hostname(), os.getpid())


async def test_the_cost_adds_up_every_answer_the_call_paid_for(fake_llm):
    fake_llm.set_fault("gpt-4", "short")
    outcome = await run(
        models=["gpt-4"], quality={"min_chars": 50}, quality_retries=1, on_quality_failure="return"
    )
    meta = outcome["meta"]
    assert [a["result"] for a in meta["attempts"]] == ["quality_failed", "quality_failed"]
    assert meta["cost_usd"] == pytest.approx(2 * cost(GPT4, meta["usage"]))  # the same short answer twice


async def test_a_fallback_is_priced_at_its_own_model_and_failed_attempts_cost_nothing(fake_llm):
    fake_llm.set_fault("gpt-4", "503")
    outcome = await run(models=["gpt-4", "gpt-4o-mini"], max_retries=0)
    meta = outcome["meta"]
    assert meta["model"] == "gpt-4o-mini"
    assert meta["cost_usd"] == pytest.approx(cost(DEFAULT_PRICES["gpt-4o-mini"], meta["usage"]))
    failed = await run(models=["gpt-4"], max_retries=0)
    assert failed["status"] == "error" and failed["meta"]["cost_usd"] == 0.0
    assert failed["meta"]["started_at"] <= failed["meta"]["finished_at"]


async def test_a_model_without_a_price_makes_the_cost_unknown_until_the_connection_prices_it(
    fake_llm, monkeypatch
):
    assert (await run(models=["fake-model"]))["meta"]["cost_usd"] is None
    point_connection(
        monkeypatch, "llm_priced", fake_llm.base_url, prices={"fake-model": {"input": 1, "output": 2}}
    )
    meta = (await run(conn_id="llm_priced", models=["fake-model"]))["meta"]
    assert meta["cost_usd"] == pytest.approx(cost(Price(1, 2), meta["usage"]))


async def test_a_call_that_cannot_start_still_carries_the_meta_fields():
    meta = driver.not_started(LLMCallError("config", "no connection")).to_json()["meta"]
    assert meta["attempts"] == [] and meta["cost_usd"] == 0.0
    assert meta["started_at"] <= meta["finished_at"] and meta["pid"] == os.getpid()


async def test_max_cost_refuses_a_model_whose_worst_case_is_too_dear_and_falls_back(fake_llm):
    limit = worst_case(DEFAULT_PRICES["gpt-4o-mini"]) * 2  # far below gpt-4's worst case
    assert worst_case(GPT4) > limit
    outcome = await run(models=["gpt-4", "gpt-4o-mini"], max_cost_usd=limit)
    meta = outcome["meta"]
    assert (outcome["status"], meta["model"], meta["fallback_used"]) == ("success", "gpt-4o-mini", True)
    refused = meta["attempts"][0]
    assert (refused["model"], refused["status"], refused["result"]) == ("gpt-4", None, "error")
    assert refused["reason"]["kind"] == "budget"
    assert f"${worst_case(GPT4):.6f}" in refused["reason"]["message"]  # the figures, and the fixes
    assert "raise max_cost_usd, lower max_tokens" in refused["reason"]["message"]
    assert fake_llm.stats()["by_model"].get("gpt-4", 0) == 0  # never sent
    assert meta["cost_usd"] <= limit


async def test_max_cost_counts_what_was_already_spent(fake_llm):
    fake_llm.set_fault("gpt-4", "short")
    ask = {"models": ["gpt-4"], "quality": {"min_chars": 50}, "on_quality_failure": "return"}
    first_answer = (await run(**ask))["meta"]["cost_usd"]
    limit = worst_case(GPT4) + first_answer / 2  # room for one attempt, not for a second
    outcome = await run(**ask, quality_retries=3, max_cost_usd=limit)
    attempts = outcome["meta"]["attempts"]
    assert [a["result"] for a in attempts] == ["quality_failed", "error"]
    assert attempts[1]["reason"]["kind"] == "budget"
    assert outcome["status"] == "success" and outcome["meta"]["quality"]["passed"] is False
    assert outcome["meta"]["cost_usd"] == pytest.approx(first_answer)


async def test_max_cost_with_an_unpriced_model_says_which_extra_to_set(fake_llm):
    outcome = await run(models=["fake-model"], max_cost_usd=1.0)
    assert outcome["status"] == "error"
    assert outcome["error"]["kind"] == "budget"
    assert "no price is known for model 'fake-model'" in outcome["error"]["message"]
    assert "'llm_fake' connection's extra" in outcome["error"]["message"]
    assert '"prices": {"fake-model": {"input"' in outcome["error"]["message"]
    assert fake_llm.stats()["requests"] == 0


async def test_a_call_refused_by_its_budget_fails_the_task_without_task_retries(fake_llm):
    op = LLMOperator(
        task_id="t", prompt="Summarize: x", model="gpt-4", llm_conn_id="llm_fake", max_cost_usd=0.001
    )
    outcome = await run(op.call_spec())
    with pytest.raises(AirflowFailException, match=r"LLM call failed \(budget\): max_cost_usd=0.001"):
        op.execute_complete({"ti": RecordingTI()}, outcome)


@pytest.mark.parametrize("bad", [0, -1, "1", True, float("inf"), float("nan")])
def test_max_cost_must_be_a_positive_number_when_the_dag_is_parsed(bad):
    with pytest.raises(ValueError, match="max_cost_usd must be a positive number of US dollars"):
        LLMOperator(task_id="t", prompt="x", max_cost_usd=bad)
