"""LLMHook: turns an ``llm`` connection into an :class:`~airflow_llm_async.core.protocol.Endpoint`."""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseHook, Connection
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.sdk.log import amask_secret, mask_secret

from airflow_llm_async import compat, limits
from airflow_llm_async.core import breaker, pricing
from airflow_llm_async.core.breaker import BreakerConfig
from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.core.pricing import DEFAULT_PRICES, Price, PriceTableError
from airflow_llm_async.core.protocol import DEFAULT_BASE_URL, Endpoint


class LLMConfigError(ValueError):
    """The LLM connection is missing or malformed; the message says what to configure."""


_POSITIVE_NUMBER_EXTRAS = ("timeout",)
_POSITIVE_INT_EXTRAS = ("max_concurrency", "requests_per_minute", "tokens_per_minute", "max_response_bytes")
_KNOWN_EXTRAS = (
    "default_model",
    "organization",
    "timeout",
    "headers",
    "max_retries",
    "rate_limit_backend",
    "cache_backend",
    "prices",
    "circuit_breaker",
    "budget_usd",
    "rate_limit_patience_s",
    *_POSITIVE_INT_EXTRAS,
)


class LLMHook(BaseHook):
    """
    Resolve an OpenAI-compatible LLM connection (OpenAI, Azure-style gateways, vLLM, Ollama, LiteLLM...).

    Connection fields: host = base URL (default ``https://api.openai.com/v1``), password = API key,
    extra = ``default_model``, ``organization``, ``timeout`` (seconds per attempt), ``headers``,
    ``max_retries``, ``rate_limit_patience_s`` (seconds the last model of a chain keeps retrying 429s,
    default 120; 0 counts them as ``max_retries``; see docs/rate-limits.md), ``max_concurrency``,
    ``requests_per_minute``, ``tokens_per_minute``,
    ``rate_limit_backend`` (``redis://...`` to share the request/token buckets across hosts),
    ``cache_backend`` (``redis://...``: where calls with ``cache_ttl`` keep answers; default: in this
    process, see docs/cache.md),
    ``prices`` (``{"model": {"input": usd_per_1M_tokens, "output": usd_per_1M_tokens}}``, over the
    built-in prices and ``[llm_async] prices_file``; see docs/cost.md), ``circuit_breaker``
    (``{"failures": 5, "window_s": 30, "cooldown_s": 30}``, the default, or ``false``; see
    docs/circuit-breaker.md).

    With no ``llm_default`` connection, the ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` environment
    variables are used, as the OpenAI SDK does.

    :param llm_conn_id: the connection id (default ``llm_default``).
    """

    conn_name_attr = "llm_conn_id"
    default_conn_name = "llm_default"
    conn_type = "llm"
    hook_name = "LLM (OpenAI-compatible)"

    def __init__(self, llm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm_conn_id = llm_conn_id

    def get_conn(self) -> Endpoint:
        return self.get_endpoint()

    def get_endpoint(self) -> Endpoint:
        """Resolve the connection (sync: in an operator's ``execute`` on a worker)."""
        try:
            conn: Connection | None = self.get_connection(self.llm_conn_id)
        except AirflowNotFoundException:
            conn = None
        endpoint = self._endpoint(conn)
        # Airflow masks the password and the extra as a whole text, not each header value or the
        # organization, nor a key from OPENAI_API_KEY: register each with the logs' secret masker.
        mask_secret(list(endpoint.secrets))
        return endpoint

    async def aget_endpoint(self) -> Endpoint:
        """Resolve the connection without blocking the event loop (in the triggerer)."""
        try:
            conn: Connection | None = await self.aget_connection(self.llm_conn_id)
        except AirflowNotFoundException:
            conn = await compat.get_connection_in_dags_test(self.llm_conn_id)
        # Off the event loop: building the endpoint may read [llm_async] prices_file.
        endpoint = await asyncio.to_thread(self._endpoint, conn)
        await amask_secret(list(endpoint.secrets))
        return endpoint

    def _endpoint(self, conn: Connection | None) -> Endpoint:
        return self._endpoint_without_connection() if conn is None else endpoint_from_connection(conn)

    def _endpoint_without_connection(self) -> Endpoint:
        if self.llm_conn_id == self.default_conn_name and os.environ.get("OPENAI_API_KEY"):
            return Endpoint(
                conn_id=self.llm_conn_id,
                base_url=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                api_key=os.environ["OPENAI_API_KEY"],
                organization=os.environ.get("OPENAI_ORG_ID"),
                prices=_price_table(self.llm_conn_id, None),
            )
        also = (
            " or set the OPENAI_API_KEY (and optionally OPENAI_BASE_URL) environment variable"
            if self.llm_conn_id == self.default_conn_name
            else ""
        )
        raise LLMConfigError(
            f"The LLM connection {self.llm_conn_id!r} is not defined. Create it, e.g. "
            f"`airflow connections add {self.llm_conn_id} --conn-type llm "
            f"--conn-host https://api.openai.com/v1 --conn-password <API key>`, "
            f"or define AIRFLOW_CONN_{self.llm_conn_id.upper()}{also}."
        )

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"host": "Base URL", "password": "API key"},
            "placeholders": {
                "host": DEFAULT_BASE_URL,
                "password": "sk-...",
                "extra": '{"default_model": "gpt-4o-mini", "timeout": 120, "max_concurrency": 50}',
            },
        }


# Seconds a triggerer reuses a resolved connection. Thousands of calls start together, and each
# Airflow lookup costs about half a millisecond of CPU and a hop to a thread (compat.py, entry 6);
# a changed key or limit is picked up within this delay.
ENDPOINT_TTL = 60.0
_endpoints: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, tuple[float, asyncio.Future[Endpoint]]]  # (looked up at, lookup)
] = weakref.WeakKeyDictionary()


async def shared_endpoint(conn_id: str, ttl: float = ENDPOINT_TTL) -> Endpoint:
    """Resolve ``conn_id`` at most once per ``ttl`` per event loop; concurrent callers share one lookup."""
    loop = asyncio.get_running_loop()
    cache = _endpoints.setdefault(loop, {})
    entry = cache.get(conn_id)
    stale = entry is None or entry[0] + ttl < loop.time()
    failed = entry is not None and entry[1].done() and entry[1].exception() is not None
    if stale or failed:  # a failed lookup is not kept: the user may be fixing the connection
        entry = (loop.time(), loop.create_task(LLMHook(conn_id).aget_endpoint()))
        cache[conn_id] = entry
    # Shielded: one caller being cancelled must not cancel the lookup the others wait for.
    return await asyncio.shield(entry[1])


def endpoint_from_connection(conn: Connection) -> Endpoint:
    """Validate a connection's fields and extras; errors name the field and the fix."""
    conn_id = conn.conn_id
    if not conn.password:
        raise LLMConfigError(
            f"The LLM connection {conn_id!r} has no API key. Set its password to the key "
            f"(for a local server that needs none, such as vLLM or Ollama, use any placeholder, e.g. EMPTY)."
        )
    extra = conn.extra_dejson
    unknown = sorted(set(extra) - set(_KNOWN_EXTRAS))
    if unknown:
        raise LLMConfigError(
            f"The LLM connection {conn_id!r} has unknown extra field(s) {unknown}; "
            f"valid fields are {list(_KNOWN_EXTRAS)}."
        )
    options: dict[str, Any] = {}
    for name in _POSITIVE_NUMBER_EXTRAS:
        if name in extra:
            options[name] = _positive(conn_id, name, extra[name], float)
    for name in _POSITIVE_INT_EXTRAS:
        if extra.get(name) is not None:
            options[name] = _positive(conn_id, name, extra[name], int)
    if extra.get("max_retries") is not None:
        value = _from_uri_text(extra["max_retries"])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LLMConfigError(
                f"The LLM connection {conn_id!r} extra 'max_retries' must be an integer >= 0, "
                f"got {extra['max_retries']!r}."
            )
        options["max_retries"] = value
    if extra.get("rate_limit_patience_s") is not None:
        options["rate_limit_patience_s"] = _patience(conn_id, extra["rate_limit_patience_s"])
    if extra.get("rate_limit_backend"):
        try:
            options["rate_limit_backend"] = limits.check_backend(extra["rate_limit_backend"])
        except ValueError as exc:
            raise LLMConfigError(
                f"The LLM connection {conn_id!r} extra 'rate_limit_backend': {exc}"
            ) from None
    if extra.get("cache_backend"):
        try:
            options["cache_backend"] = limits.check_backend(extra["cache_backend"], "cache_backend")
        except ValueError as exc:
            raise LLMConfigError(f"The LLM connection {conn_id!r} extra 'cache_backend': {exc}") from None
    options["prices"] = _price_table(conn_id, extra.get("prices"))
    if "circuit_breaker" in extra:
        options["circuit_breaker"] = _circuit_breaker(conn_id, extra["circuit_breaker"])
    if extra.get("budget_usd") is not None:
        try:
            options["budget_usd"] = BudgetConfig.parse(extra["budget_usd"])
        except ValueError as exc:
            raise LLMConfigError(
                f"The LLM connection {conn_id!r} extra 'budget_usd' {exc}; e.g. "
                '{"usd": 50, "per": "day"} (or "month").'
            ) from None
    headers = extra.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise LLMConfigError(
            f"The LLM connection {conn_id!r} extra 'headers' must be an object of string values."
        )
    _check_header_texts(conn_id, conn.password, extra.get("organization"), headers)
    return Endpoint(
        conn_id=conn_id,
        base_url=_base_url(conn),
        api_key=conn.password,
        organization=extra.get("organization") or None,
        headers=headers,
        default_model=extra.get("default_model") or None,
        **options,
    )


def _patience(conn_id: str, given: Any) -> float:
    """The extra ``rate_limit_patience_s``: seconds >= 0 (0: 429s count as retries, as other failures do)."""
    value = given.strip() if isinstance(given, str) else given  # a URI-form connection's extras are text
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = None
    if isinstance(value, bool) or seconds is None or not 0 <= seconds < float("inf"):
        raise LLMConfigError(
            f"The LLM connection {conn_id!r} extra 'rate_limit_patience_s' must be a number of seconds "
            f">= 0 (how long to keep retrying 429s; 0 counts them as max_retries), got {given!r}."
        )
    return seconds


def _circuit_breaker(conn_id: str, given: Any) -> BreakerConfig | None:
    """The extra ``circuit_breaker``: false (off), true or {} (the defaults), or some of the three fields."""
    value = (
        {"false": False, "true": True}.get(given.strip().lower(), given) if isinstance(given, str) else given
    )
    if value is False:
        return None
    if value is True:
        value = {}
    fields = tuple(breaker.DEFAULT.to_dict())
    example = '{"failures": 5, "window_s": 30, "cooldown_s": 30}'
    if not isinstance(value, dict) or set(value) - set(fields):
        raise LLMConfigError(
            f"The LLM connection {conn_id!r} extra 'circuit_breaker' must be false (off) or an object with "
            f"any of {list(fields)}, e.g. {example}; got {given!r}."
        )
    options = {}
    for name, number in value.items():
        kind = int if name == "failures" else float
        try:
            options[name] = _positive(conn_id, name, number, kind)
        except LLMConfigError:
            raise LLMConfigError(
                f"The LLM connection {conn_id!r} extra 'circuit_breaker' field {name!r} must be "
                f"{'a positive integer' if kind is int else 'a positive number of seconds'}, got {number!r}; "
                f"e.g. {example}."
            ) from None
    return BreakerConfig(**options)


def _check_header_texts(conn_id: str, api_key: str, organization: Any, headers: dict[str, str]) -> None:
    """Each goes into an HTTP header, where a line break would end it (aiohttp refuses it mid-call)."""
    for field, text in (
        ("API key (password)", api_key),
        ("extra 'organization'", str(organization or "")),
        *(("extra 'headers'", f"{name}{value}") for name, value in headers.items()),
    ):
        if "\r" in text or "\n" in text:
            raise LLMConfigError(
                f"The LLM connection {conn_id!r} {field} contains a line break: set it again without one."
            )


def _price_table(conn_id: str, extra_prices: Any) -> dict[str, Price]:
    try:
        overrides = None
        if extra_prices is not None:
            overrides = pricing.parse_prices(extra_prices, f"The LLM connection {conn_id!r} extra 'prices'")
        return price_table(overrides, conf.get("llm_async", "prices_file", fallback=None))
    except PriceTableError as exc:
        raise LLMConfigError(str(exc)) from None


_file_cache: dict[str, tuple[float, dict[str, Price]]] = {}  # path -> (mtime, prices)
MAX_PRICES_FILE_BYTES = 1024 * 1024


def file_prices(path: str | None) -> dict[str, Price]:
    """The prices in a JSON file (at most 1 MiB), re-read only when the file changes. Blocking I/O."""
    if not path:
        return {}
    try:
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise PriceTableError(f"[llm_async] prices_file {path!r} cannot be read: {exc.strerror}.") from None
    cached = _file_cache.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_PRICES_FILE_BYTES + 1)
        table = json.loads(text) if len(text) <= MAX_PRICES_FILE_BYTES else None
    except (OSError, ValueError) as exc:
        raise PriceTableError(f"[llm_async] prices_file {path!r} is not a JSON price table: {exc}") from None
    if table is None:
        raise PriceTableError(
            f"[llm_async] prices_file {path!r} is larger than {MAX_PRICES_FILE_BYTES // 1024} KiB; a price "
            f"table is a few KB: check that the option names the right file."
        )
    prices = pricing.parse_prices(table, f"[llm_async] prices_file {path!r}")
    _file_cache[path] = (mtime, prices)
    return prices


def price_table(
    overrides: Mapping[str, Price] | None = None, prices_file: str | None = None
) -> dict[str, Price]:
    """Defaults, then the prices file, then a connection's own prices."""
    return {**DEFAULT_PRICES, **file_prices(prices_file), **(overrides or {})}


def _base_url(conn: Connection) -> str:
    host = (conn.host or "").strip()
    if not host:
        return DEFAULT_BASE_URL
    if "://" in host:
        return host.rstrip("/")
    # A URI-style connection (llm://:key@host:port/v1) splits the URL into host, port and schema.
    url = f"https://{host}"
    if conn.port:
        url += f":{conn.port}"
    if conn.schema:
        url += f"/{conn.schema.strip('/')}"
    return url


def _from_uri_text(value: Any) -> Any:
    """An integer written as text, as every extra of a URI-form connection (``?max_retries=5``) is."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _positive(conn_id: str, name: str, given: Any, kind: type) -> Any:
    value = _from_uri_text(given)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if isinstance(value, bool) or number is None or number <= 0 or (kind is int and number != value):
        expected = "a positive integer" if kind is int else "a positive number"
        raise LLMConfigError(
            f"The LLM connection {conn_id!r} extra {name!r} must be {expected}, got {given!r}."
        )
    return number
