"""What a call costs: a price table per model, and the worst case of a call before it is sent.

Prices are US dollars per million tokens, input (prompt) and output (completion). The table a
connection uses is, from lowest to highest precedence: :data:`DEFAULT_PRICES`, the JSON file
named by ``[llm_async] prices_file``, and the connection's ``prices`` extra. All three have the
same shape: ``{"gpt-4o": {"input": 2.5, "output": 10}}``. I/O-free: the hook reads the prices
file (``hooks/llm.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple


class Price(NamedTuple):
    """US dollars per million tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


# OpenAI's list prices (standard tier, no cache or batch discount), as published on
# platform.openai.com/docs/pricing and reproduced in pricing tables checked in March-June 2026.
# They change: override them with the connection extra `prices` or `[llm_async] prices_file`.
DEFAULT_PRICES_AS_OF = "2026-06"
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.0),
    "gpt-5-mini": Price(0.25, 2.0),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-4.1": Price(2.0, 8.0),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.0),
    "gpt-4o-mini": Price(0.15, 0.60),
    "o1": Price(15.0, 60.0),
    "o1-mini": Price(1.10, 4.40),
    "o3": Price(2.0, 8.0),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    "gpt-4-turbo": Price(10.0, 30.0),
    "gpt-4": Price(30.0, 60.0),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}

# A dated snapshot (gpt-4o-2024-08-06, gpt-4-0613) costs what its model name costs.
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


class PriceTableError(ValueError):
    """A price table that cannot be used; the message names the entry and the expected shape."""


def parse_prices(table: Any, where: str) -> dict[str, Price]:
    """Validate ``{"model": {"input": usd_per_million, "output": usd_per_million}}``."""
    shape = '{"model": {"input": <USD per 1M prompt tokens>, "output": <USD per 1M completion tokens>}}'
    if not isinstance(table, dict):
        raise PriceTableError(f"{where} must be an object {shape}, got a {type(table).__name__}.")
    prices = {}
    for model, entry in table.items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise PriceTableError(f"{where} entry {model!r} must have exactly input and output: {shape}.")
        values = entry["input"], entry["output"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values):
            raise PriceTableError(
                f"{where} entry {model!r}: input and output must be numbers >= 0 (USD per million tokens), "
                f"got {entry!r}."
            )
        prices[str(model)] = Price(float(values[0]), float(values[1]))
    return prices


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
