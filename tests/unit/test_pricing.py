"""The price table: defaults, a prices file, a connection's `prices` extra, snapshot names, validation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading

import pytest

from airflow_llm_async.core import pricing
from airflow_llm_async.core.pricing import DEFAULT_PRICES, Price, PriceTableError
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens, estimate_tokens
from airflow_llm_async.hooks.llm import LLMConfigError, LLMHook, file_prices, price_table


def test_cost_is_tokens_times_usd_per_million():
    assert Price(2.5, 10.0).cost(1_000_000, 0) == 2.5
    assert Price(2.5, 10.0).cost(2_000, 500) == pytest.approx(0.005 + 0.005)
    assert Price(0, 0).cost(10**9, 10**9) == 0


def test_the_defaults_price_the_models_the_demo_and_tests_use():
    for model in ("gpt-4", "gpt-3.5-turbo", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini"):
        price = DEFAULT_PRICES[model]
        assert 0 < price.input <= price.output, model  # output tokens never cost less than input
    assert DEFAULT_PRICES["gpt-4"] == Price(30.0, 60.0)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),  # a dated snapshot costs what its model costs
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # ...never what a shorter name costs
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
    ],
)
def test_a_model_and_its_dated_snapshots_share_a_price(model, expected):
    assert pricing.price_of(DEFAULT_PRICES, model) == DEFAULT_PRICES[expected]


@pytest.mark.parametrize("model", ["gpt-4o-audio-preview", "llama3", "gpt-4-32k", "", None])
def test_an_unknown_model_has_no_price_rather_than_a_neighbours(model):
    assert pricing.price_of(DEFAULT_PRICES, model) is None


def test_the_connection_overrides_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpt-4": {"input": 1, "output": 2}, "llama3": {"input": 0, "output": 0}}))
    table = price_table({"llama3": Price(0.1, 0.2)}, str(path))
    assert table["gpt-4"] == Price(1.0, 2.0)
    assert table["llama3"] == Price(0.1, 0.2)
    assert table["gpt-4o"] == DEFAULT_PRICES["gpt-4o"]
    assert price_table() == DEFAULT_PRICES


def test_a_changed_prices_file_is_read_again(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input": 1, "output": 1}}))
    assert file_prices(str(path))["m"] == Price(1.0, 1.0)
    path.write_text(json.dumps({"m": {"input": 3, "output": 4}}))
    os.utime(path, (1, 1))  # a new mtime even within the file system's timestamp resolution
    assert file_prices(str(path))["m"] == Price(3.0, 4.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([], "must be an object"),
        ({"m": 3}, "entry 'm' must have input and output"),
        ({"m": {"input": 1}}, "entry 'm' must have input and output"),
        ({"m": {"input": 1, "output": 2, "cached": 0.5}}, "input and output, and may have cached_input"),
        ({"m": {"input": 1, "output": 2, "cached_input": -0.5}}, "numbers >= 0"),
        ({"m": {"input": 1, "output": 2, "cached_input": None}}, "numbers >= 0"),
        ({"m": {"input": -1, "output": 2}}, "numbers >= 0"),
        ({"m": {"input": "2.5", "output": 2}}, "numbers >= 0"),
        ({"m": {"input": True, "output": 2}}, "numbers >= 0"),
    ],
)
def test_a_bad_price_table_says_what_shape_is_expected(table, message):
    with pytest.raises(PriceTableError, match=message) as info:
        pricing.parse_prices(table, "where")
    assert str(info.value).startswith("where")


def test_a_missing_or_broken_prices_file_is_named(tmp_path):
    with pytest.raises(PriceTableError, match=r"prices_file '.*nope.json' cannot be read"):
        file_prices(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PriceTableError, match="is not a JSON price table"):
        file_prices(str(broken))


def set_conn(monkeypatch, conn_id: str, **extra) -> None:
    conn = {"conn_type": "llm", "host": "http://127.0.0.1:9/v1", "password": "sk-1", "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def test_the_connection_extra_prices_reach_the_endpoint(monkeypatch, tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"house-model": {"input": 0.5, "output": 1}}))
    monkeypatch.setenv("AIRFLOW__LLM_ASYNC__PRICES_FILE", str(path))
    set_conn(monkeypatch, "llm_priced", prices={"gpt-4": {"input": 3, "output": 6}})
    prices = LLMHook("llm_priced").get_endpoint().prices
    assert prices["gpt-4"] == Price(3.0, 6.0)
    assert prices["house-model"] == Price(0.5, 1.0)
    assert prices["gpt-4o-mini"] == DEFAULT_PRICES["gpt-4o-mini"]


def test_bad_prices_in_a_connection_name_the_connection_and_the_shape(monkeypatch):
    set_conn(monkeypatch, "llm_badprice", prices={"gpt-4": {"input": "cheap", "output": 1}})
    with pytest.raises(LLMConfigError, match=r"'llm_badprice' extra 'prices' entry 'gpt-4'.*>= 0"):
        LLMHook("llm_badprice").get_endpoint()


def test_the_prompt_estimate_and_the_completion_budget_add_up_to_the_token_estimate():
    request = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 300, "n": 2}
    assert estimate_prompt_tokens(request) == 4 + 100
    assert completion_budget(request) == 600
    assert estimate_tokens(request) == 704
    assert completion_budget({"messages": []}) == 1000  # no max_tokens: the default budget


def test_a_prices_file_past_1_mib_is_refused_unread(tmp_path):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({f"model-{i}": {"input": 1, "output": 2} for i in range(40_000)}))
    assert path.stat().st_size > 1024 * 1024
    with pytest.raises(PriceTableError, match=r"prices_file '.*huge.json' is larger than 1024 KiB"):
        file_prices(str(path))


async def test_the_triggerer_reads_the_prices_file_off_its_event_loop(monkeypatch, tmp_path):
    """A FIFO stands in for a slow disk: its read blocks until written. The loop must keep running."""
    fifo = tmp_path / "prices.json"
    os.mkfifo(fifo)
    monkeypatch.setenv("AIRFLOW__LLM_ASYNC__PRICES_FILE", str(fifo))
    set_conn(monkeypatch, "llm_fifo")
    ticks, ticked = 0, threading.Event()

    def write_when_the_loop_has_ticked() -> int:
        ticked.wait(timeout=5)  # never set if the read blocks the loop: then write anyway, and fail
        seen = ticks
        fifo.write_text(json.dumps({"house-model": {"input": 0.5, "output": 1}}))
        return seen

    writer = concurrent.futures.ThreadPoolExecutor(1).submit(write_when_the_loop_has_ticked)
    lookup = asyncio.ensure_future(LLMHook("llm_fifo").aget_endpoint())
    while not lookup.done() and ticks < 5:
        await asyncio.sleep(0.01)
        ticks += 1
    ticked.set()
    endpoint = await lookup
    assert writer.result(timeout=10) == 5  # the loop ticked while the file was being read
    assert endpoint.prices["house-model"] == Price(0.5, 1.0)


# ---- cached input (issue 12, item 5) ----------------------------------------------------------------


def test_cached_prompt_tokens_cost_the_cached_input_price():
    price = Price(2.5, 10.0, cached_input=1.25)
    assert price.cost(2_000, 500, cached=1_920) == pytest.approx((80 * 2.5 + 1_920 * 1.25 + 500 * 10.0) / 1e6)
    assert price.cost(2_000, 500) == pytest.approx((2_000 * 2.5 + 500 * 10.0) / 1e6)


def test_without_a_cached_input_price_cached_tokens_cost_the_input_price():
    assert Price(2.5, 10.0).cost(2_000, 500, cached=1_920) == Price(2.5, 10.0).cost(2_000, 500)
    assert Price(2.5, 10.0).cached_input is None


def test_a_price_table_may_give_a_cached_input_price():
    table = pricing.parse_prices(
        {"m": {"input": 1, "output": 2, "cached_input": 0.25}, "n": {"input": 1, "output": 2}}, "w"
    )
    assert table == {"m": Price(1.0, 2.0, 0.25), "n": Price(1.0, 2.0)}


def test_the_defaults_know_openais_cached_input_prices():
    assert DEFAULT_PRICES["gpt-4o"] == Price(2.5, 10.0, 1.25)
    assert DEFAULT_PRICES["gpt-4o-mini"].cached_input == 0.075
    assert DEFAULT_PRICES["gpt-4"].cached_input is None  # no prompt caching: the input price applies
    for model, price in DEFAULT_PRICES.items():
        assert price.cached_input is None or 0 < price.cached_input < price.input, model


# ---- the Batch API's price (issue 13) ---------------------------------------------------------------


def test_the_batch_price_is_half_of_each_price():
    assert Price(2.5, 10.0, 1.25).batch() == Price(1.25, 5.0, 0.625)
    assert Price(30.0, 60.0).batch() == Price(15.0, 30.0)  # no cached price: cached tokens cost batch input
    assert Price(30.0, 60.0).batch().cached_input is None
    assert Price(0, 0).batch() == Price(0, 0)
    assert pricing.BATCH_DISCOUNT == 0.5


def test_a_batch_answer_costs_half_the_real_time_answer_cached_tokens_included():
    price = DEFAULT_PRICES["gpt-4o"]
    assert price.batch().cost(2_000, 500, cached=1_920) == pytest.approx(
        (80 * 1.25 + 1_920 * 0.625 + 500 * 5.0) / 1e6
    )
    assert price.batch().cost(2_000, 500, cached=1_920) == pytest.approx(
        price.cost(2_000, 500, cached=1_920) / 2
    )
    assert Price(30.0, 60.0).batch().cost(2_000, 500, cached=1_920) == pytest.approx(
        (2_000 * 15 + 500 * 30) / 1e6
    )


@pytest.mark.parametrize(
    ("price", "batch"),
    [
        (Price(1.0, 2.0, batch_input=0.2, batch_output=0.3), Price(0.2, 0.3)),
        (Price(1.0, 2.0, batch_input=0.2), Price(0.2, 1.0)),  # each one given or halved on its own
        (Price(1.0, 2.0, batch_output=0.3), Price(0.5, 0.3)),
        (Price(1.0, 2.0, 0.4, batch_input=0.2, batch_output=0.3), Price(0.2, 0.3, 0.2)),
        (Price(1.0, 2.0, batch_input=0.0, batch_output=0.0), Price(0.0, 0.0)),  # free is a price, not "none"
    ],
)
def test_a_price_may_name_its_batch_prices(price, batch):
    assert price.batch() == batch


def test_the_real_time_price_ignores_the_batch_prices():
    assert Price(1.0, 2.0, batch_input=0.2, batch_output=0.3).cost(1_000, 500) == Price(1.0, 2.0).cost(
        1_000, 500
    )


def test_a_price_table_may_give_batch_prices():
    table = pricing.parse_prices(
        {
            "m": {"input": 1, "output": 2, "batch_input": 0.25, "batch_output": 0.75},
            "n": {"input": 1, "output": 2, "cached_input": 0.5, "batch_input": 0.4},
            "o": {"input": 1, "output": 2},
        },
        "w",
    )
    assert table == {
        "m": Price(1.0, 2.0, None, 0.25, 0.75),
        "n": Price(1.0, 2.0, 0.5, 0.4, None),
        "o": Price(1.0, 2.0),
    }
    assert all(isinstance(value, float) for value in table["m"] if value is not None)
    assert table["m"].batch() == Price(0.25, 0.75)
    assert table["n"].batch() == Price(0.4, 1.0, 0.25)
    assert table["o"].batch() == Price(0.5, 1.0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"input": 1, "output": 2, "batch_input": -0.1}, "numbers >= 0"),
        ({"input": 1, "output": 2, "batch_output": "half"}, "numbers >= 0"),
        ({"input": 1, "output": 2, "batch_output": None}, "numbers >= 0"),
        ({"input": 1, "output": 2, "batch_input": False}, "numbers >= 0"),
        ({"input": 1, "output": 2, "batch": 0.5}, "may have cached_input, batch_input and batch_output"),
        ({"batch_input": 1, "batch_output": 2}, "must have input and output"),
    ],
)
def test_bad_batch_prices_are_refused_with_the_expected_shape(entry, message):
    with pytest.raises(PriceTableError, match=message) as info:
        pricing.parse_prices({"m": entry}, "where")
    assert str(info.value).startswith("where entry 'm'")


def test_the_expected_shape_names_the_batch_prices():
    with pytest.raises(PriceTableError, match='"batch_input", "batch_output"'):
        pricing.parse_prices([], "where")


def test_batch_cached_input_never_costs_more_than_the_batch_input():
    price = Price(2.0, 8.0, cached_input=1.5, batch_input=0.5)
    assert price.batch() == Price(0.5, 4.0, 0.5)  # half of 1.5 is 0.75, above the batch input price
    assert Price(2.0, 8.0, cached_input=0.5).batch() == Price(1.0, 4.0, 0.25)
