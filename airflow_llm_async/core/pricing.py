"""What a call costs: a price table per model, and the worst case of a call before it is sent.

Prices are US dollars per million tokens, input (prompt), output (completion) and, optionally,
cached input (the prompt tokens an answer reports as read from the provider's prompt cache; the
input price when not given). The table a connection uses is, from lowest to highest precedence:
:data:`DEFAULT_PRICES`, the JSON file named by ``[llm_async] prices_file``, and the connection's
``prices`` extra. All three have the same shape:
``{"gpt-4o": {"input": 2.5, "output": 10, "cached_input": 1.25}}``. I/O-free: the hook reads the prices
file (``hooks/llm.py``).

Answers of the Batch API (``LLMFanOutOperator(batch=True)``) cost the batch price: half of each price,
unless the entry gives ``batch_input`` and ``batch_output`` (:meth:`Price.batch`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple


class Price(NamedTuple):
    """US dollars per million tokens."""

    input: float
    output: float
    cached_input: float | None = None  # None: cached prompt tokens cost the input price
    batch_input: float | None = None  # the Batch API's prices; None: half the price above
    batch_output: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> float:
        """What the tokens cost; ``cached`` of the ``prompt_tokens`` at the cached input price."""
        cached = min(cached, prompt_tokens)
        cached_input = self.input if self.cached_input is None else self.cached_input
        usd = (prompt_tokens - cached) * self.input + cached * cached_input + completion_tokens * self.output
        return usd / 1_000_000

    def batch(self) -> Price:
        """The price of the same tokens answered through the Batch API."""
        batch_input = BATCH_DISCOUNT * self.input if self.batch_input is None else self.batch_input
        return Price(
            batch_input,
            BATCH_DISCOUNT * self.output if self.batch_output is None else self.batch_output,
            # Cached tokens never cost more than uncached ones, whatever batch_input says.
            None if self.cached_input is None else min(BATCH_DISCOUNT * self.cached_input, batch_input),
        )


# What the Batch API charges of the list price (OpenAI: half, for every model it batches).
BATCH_DISCOUNT = 0.5

# OpenAI's list prices (standard tier, no batch discount; cached input where the model has prompt
# caching), as published on platform.openai.com/docs/pricing and reproduced in pricing tables
# checked in March-June 2026.
# They change: override them with the connection extra `prices` or `[llm_async] prices_file`.
DEFAULT_PRICES_AS_OF = "2026-06"
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.0, 0.125),
    "gpt-5-mini": Price(0.25, 2.0, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.0, 8.0, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.0, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "o1": Price(15.0, 60.0, 7.50),
    "o1-mini": Price(1.10, 4.40, 0.55),
    "o3": Price(2.0, 8.0, 0.50),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "gpt-4-turbo": Price(10.0, 30.0),
    "gpt-4": Price(30.0, 60.0),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}

# A dated snapshot (gpt-4o-2024-08-06, gpt-4-0613) costs what its model name costs.
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


class PriceTableError(ValueError):
    """A price table that cannot be used; the message names the entry and the expected shape."""


def parse_prices(table: Any, where: str) -> dict[str, Price]:
    """Validate ``{"model": {"input": usd_per_1m, "output": usd_per_1m[, "cached_input": usd_per_1m]}}``."""
    shape = (
        '{"model": {"input": <USD per 1M prompt tokens>, "output": <USD per 1M completion tokens>, '
        '"cached_input": <USD per 1M cached prompt tokens, optional: input>, "batch_input", "batch_output": '
        "<the Batch API's prices, optional: half>}}"
    )
    if not isinstance(table, dict):
        raise PriceTableError(f"{where} must be an object {shape}, got a {type(table).__name__}.")
    prices = {}
    for model, entry in table.items():
        if not isinstance(entry, dict) or not {"input", "output"} <= set(entry) <= _PRICE_FIELDS:
            raise PriceTableError(
                f"{where} entry {model!r} must have input and output, and may have cached_input, batch_input "
                f"and batch_output: {shape}."
            )
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in entry.values()):
            raise PriceTableError(
                f"{where} entry {model!r}: input, output and the other prices must be numbers >= 0 (USD per "
                f"million tokens), got {entry!r}."
            )
        prices[str(model)] = Price(**{name: float(value) for name, value in entry.items()})
    return prices


_PRICE_FIELDS = frozenset(Price._fields)


def price_of(prices: Mapping[str, Price], model: str | None) -> Price | None:
    """The price of ``model``, or of the model a dated snapshot name belongs to; None if unknown."""
    if not model:
        return None
    price = prices.get(model)
    if price is None:
        base = _SNAPSHOT_SUFFIX.sub("", model)
        if base != model:
            price = prices.get(base)
    return price
