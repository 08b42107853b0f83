from __future__ import annotations

import asyncio
import json

import pytest

from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.core.protocol import DEFAULT_BASE_URL
from airflow_llm_async.hooks.llm import LLMConfigError, LLMHook, shared_endpoint


def set_conn(monkeypatch, conn_id: str, **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "llm", **fields}))


@pytest.fixture(autouse=True)
def _no_openai_env(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "AIRFLOW_CONN_LLM_DEFAULT"):
        monkeypatch.delenv(name, raising=False)


def test_a_full_connection_resolves_sync_and_async(monkeypatch):
    extra = {
        "default_model": "gpt-4o-mini",
        "organization": "org-9",
        "timeout": 30,
        "headers": {"X-Team": "ai"},
        "max_retries": 4,
        "max_concurrency": 8,
        "requests_per_minute": 600,
        "tokens_per_minute": 90000,
    }
    set_conn(monkeypatch, "llm_full", host="http://127.0.0.1:9/v1/", password="sk-1", extra=extra)
    endpoint = LLMHook("llm_full").get_endpoint()
    assert endpoint.base_url == "http://127.0.0.1:9/v1"
    assert endpoint.api_key == "sk-1"
    assert (endpoint.default_model, endpoint.organization, endpoint.timeout) == ("gpt-4o-mini", "org-9", 30.0)
    assert endpoint.headers == {"X-Team": "ai"}
    assert (endpoint.max_retries, endpoint.max_concurrency) == (4, 8)
    assert (endpoint.requests_per_minute, endpoint.tokens_per_minute) == (600, 90000)


async def test_async_resolution_matches_sync(monkeypatch):
    set_conn(
        monkeypatch, "llm_a", host="http://127.0.0.1:9/v1", password="sk-1", extra={"default_model": "m"}
    )
    assert await LLMHook("llm_a").aget_endpoint() == LLMHook("llm_a").get_endpoint()


def test_no_host_means_openai(monkeypatch):
    set_conn(monkeypatch, "llm_openai", password="sk-1")
    assert LLMHook("llm_openai").get_endpoint().base_url == DEFAULT_BASE_URL


def test_uri_style_host_port_and_schema_form_the_base_url(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LLM_URI", "llm://:sk-2@gateway.internal:8443/v1")
    endpoint = LLMHook("llm_uri").get_endpoint()
    assert endpoint.base_url == "https://gateway.internal:8443/v1"
    assert endpoint.api_key == "sk-2"


def test_without_llm_default_the_openai_environment_is_used(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    endpoint = LLMHook().get_endpoint()
    assert (endpoint.conn_id, endpoint.base_url, endpoint.api_key) == (
        "llm_default",
        "http://127.0.0.1:9/v1",
        "sk-env",
    )


def test_a_missing_llm_default_says_how_to_configure_it():
    with pytest.raises(LLMConfigError) as info:
        LLMHook().get_endpoint()
    message = str(info.value)
    assert "airflow connections add llm_default --conn-type llm" in message
    assert "OPENAI_API_KEY" in message


def test_an_unknown_conn_id_names_it_and_does_not_use_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    with pytest.raises(
        LLMConfigError, match="'llm_missing' is not defined.*AIRFLOW_CONN_LLM_MISSING"
    ) as info:
        LLMHook("llm_missing").get_endpoint()
    assert "OPENAI_API_KEY" not in str(info.value)


async def test_an_unknown_conn_id_fails_the_same_way_async():
    with pytest.raises(LLMConfigError, match="'llm_missing' is not defined"):
        await LLMHook("llm_missing").aget_endpoint()


def test_a_connection_without_key_says_to_set_the_password(monkeypatch):
    set_conn(monkeypatch, "llm_nokey", host="http://127.0.0.1:9/v1")
    with pytest.raises(LLMConfigError, match="has no API key. Set its password"):
        LLMHook("llm_nokey").get_endpoint()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"timeout": 0}, "'timeout' must be a positive number"),
        ({"timeout": "soon"}, "'timeout' must be a positive number"),
        ({"max_concurrency": 2.5}, "'max_concurrency' must be a positive integer"),
        ({"max_response_bytes": 0}, "'max_response_bytes' must be a positive integer"),
        ({"requests_per_minute": -1}, "'requests_per_minute' must be a positive integer"),
        ({"tokens_per_minute": True}, "'tokens_per_minute' must be a positive integer"),
        ({"max_retries": -1}, "'max_retries' must be an integer >= 0"),
        ({"headers": ["X"]}, "'headers' must be an object"),
        ({"default_modle": "gpt-4"}, "unknown extra field"),
        ({"rate_limit_backend": "memcached://x"}, "'rate_limit_backend' must be a Redis URL"),
    ],
)
def test_bad_extras_name_the_field_and_the_fix(monkeypatch, extra, fragment):
    set_conn(monkeypatch, "llm_bad", host="http://127.0.0.1:9/v1", password="sk-1", extra=extra)
    with pytest.raises(LLMConfigError, match=fragment):
        LLMHook("llm_bad").get_endpoint()


def test_a_redis_rate_limit_backend_is_kept_out_of_the_endpoint_repr(monkeypatch):
    backend = "redis://:hunter22@127.0.0.1:6379/0"
    set_conn(monkeypatch, "llm_redis", password="sk-1", extra={"rate_limit_backend": backend})
    endpoint = LLMHook("llm_redis").get_endpoint()
    assert endpoint.rate_limit_backend == backend
    assert "hunter22" not in repr(endpoint)


def test_error_messages_never_contain_the_key(monkeypatch):
    set_conn(monkeypatch, "llm_bad", host="http://x/v1", password="sk-very-secret", extra={"timeout": -1})
    with pytest.raises(LLMConfigError) as info:
        LLMHook("llm_bad").get_endpoint()
    assert "sk-very-secret" not in str(info.value)


def test_the_provider_declares_the_llm_connection_type():
    from airflow_llm_async import get_provider_info

    info = get_provider_info()
    assert info["connection-types"] == [
        {"connection-type": "llm", "hook-class-name": "airflow_llm_async.hooks.llm.LLMHook"}
    ]
    assert LLMHook.conn_type == "llm" and LLMHook.default_conn_name == "llm_default"


async def test_the_triggerer_reuses_a_resolved_connection_until_it_expires(monkeypatch):
    set_conn(monkeypatch, "llm_cached", password="sk-1", extra={"default_model": "a"})
    first = await shared_endpoint("llm_cached")
    set_conn(monkeypatch, "llm_cached", password="sk-1", extra={"default_model": "b"})
    assert await shared_endpoint("llm_cached") is first  # within the TTL: no new lookup
    assert (await shared_endpoint("llm_cached", ttl=0)).default_model == "b"  # expired: looked up again


async def test_concurrent_first_calls_share_one_lookup(monkeypatch):
    set_conn(monkeypatch, "llm_burst", password="sk-1")
    endpoints = await asyncio.gather(*(shared_endpoint("llm_burst") for _ in range(50)))
    assert all(endpoint is endpoints[0] for endpoint in endpoints)


async def test_a_failed_lookup_is_not_kept(monkeypatch):
    with pytest.raises(LLMConfigError, match="is not defined"):
        await shared_endpoint("llm_later")
    set_conn(monkeypatch, "llm_later", password="sk-1")  # the user fixes the connection
    assert (await shared_endpoint("llm_later")).api_key == "sk-1"


def test_uri_style_extras_arrive_as_text_and_integers_are_read_from_it(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_URI_EXTRAS",
        "llm://:sk-3@gateway.internal/v1?max_concurrency=50&requests_per_minute=600&max_retries=4&timeout=30",
    )
    endpoint = LLMHook("llm_uri_extras").get_endpoint()
    assert (endpoint.max_concurrency, endpoint.requests_per_minute, endpoint.max_retries) == (50, 600, 4)
    assert endpoint.timeout == 30.0


@pytest.mark.parametrize("text", ["1.5", "-3", "many", ""])
def test_uri_style_integer_extras_that_are_not_whole_numbers_are_refused(monkeypatch, text):
    monkeypatch.setenv("AIRFLOW_CONN_LLM_URI_BAD", f"llm://:sk-3@gateway.internal/v1?max_concurrency={text}")
    with pytest.raises(LLMConfigError, match="'max_concurrency' must be a positive integer"):
        LLMHook("llm_uri_bad").get_endpoint()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"password": "sk-secret-9f\n"}, "API key (password)"),
        ({"password": "sk-x", "extra": {"organization": "org\r\nX-Evil: 1"}}, "extra 'organization'"),
        ({"password": "sk-x", "extra": {"headers": {"api-key": "k\nInjected: 1"}}}, "extra 'headers'"),
        ({"password": "sk-x", "extra": {"headers": {"bad\nname": "v"}}}, "extra 'headers'"),
    ],
)
def test_a_line_break_in_a_header_value_is_refused_naming_the_field_not_the_value(monkeypatch, fields, named):
    """aiohttp would raise a bare ValueError mid-call, killing the trigger without an event."""
    set_conn(monkeypatch, "llm_crlf", host="http://127.0.0.1:9/v1", **fields)
    with pytest.raises(LLMConfigError, match="line break") as info:
        LLMHook("llm_crlf").get_endpoint()
    assert named in str(info.value) and "secret" not in str(info.value) and "Injected" not in str(info.value)


@pytest.mark.parametrize("resolve", ["sync", "async"])
def test_resolving_a_connection_registers_each_secret_with_the_log_masker(monkeypatch, resolve):
    from airflow.sdk._shared.secrets_masker import redact

    # Airflow masks the extra only as one whole text: the header value and the organization are ours.
    secrets = [f"sk-{resolve}-key-0001", f"org-{resolve}-mask", f"gw-{resolve}-token"]
    extra = {"organization": secrets[1], "headers": {"X-Gateway-Token": secrets[2]}}
    set_conn(monkeypatch, "llm_mask", password=secrets[0], extra=extra)
    assert redact(" ".join(secrets)) == " ".join(secrets)
    hook = LLMHook("llm_mask")
    endpoint = hook.get_endpoint() if resolve == "sync" else asyncio.run(hook.aget_endpoint())
    assert redact(" ".join(secrets)) == "*** *** ***"
    assert all(secret not in repr(endpoint) for secret in secrets)


def test_a_key_from_the_openai_environment_is_masked_too(monkeypatch):
    from airflow.sdk._shared.secrets_masker import redact

    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    LLMHook().get_endpoint()
    assert redact("key sk-from-the-environment") == "key ***"


def test_a_connection_caps_calls_in_flight_at_1000_unless_its_extra_says_otherwise(monkeypatch):
    set_conn(monkeypatch, "llm_plain", password="k")
    set_conn(monkeypatch, "llm_wide", password="k", extra={"max_concurrency": 5000})
    assert LLMHook("llm_plain").get_endpoint().max_concurrency == 1000
    assert LLMHook("llm_wide").get_endpoint().max_concurrency == 5000


def test_a_budget_extra_is_read_in_json_and_uri_form(monkeypatch):
    set_conn(monkeypatch, "llm_b", password="sk-1", extra={"budget_usd": {"usd": 50, "per": "month"}})
    assert LLMHook("llm_b").get_endpoint().budget_usd == BudgetConfig(50.0, "month")
    monkeypatch.setenv("AIRFLOW_CONN_LLM_U", "llm://:sk-2@gateway.internal/v1?budget_usd=12.5")
    assert LLMHook("llm_u").get_endpoint().budget_usd == BudgetConfig(12.5, "day")
    set_conn(monkeypatch, "llm_none", password="sk-1")
    assert LLMHook("llm_none").get_endpoint().budget_usd is None


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [
        ({"usd": 50, "per": "week"}, "field 'per' must be one of ['day', 'month']"),
        ({"usd": -5}, "field 'usd' must be a positive number of US dollars"),
        ("lots", 'must be an object such as {"usd": 50, "per": "day"}'),
    ],
)
def test_a_bad_budget_extra_names_the_connection_and_the_fix(monkeypatch, budget, fragment):
    set_conn(monkeypatch, "llm_b", password="sk-1", extra={"budget_usd": budget})
    with pytest.raises(LLMConfigError) as info:
        LLMHook("llm_b").get_endpoint()
    assert "The LLM connection 'llm_b' extra 'budget_usd'" in str(info.value)
    assert fragment in str(info.value)


def test_rate_limit_patience_defaults_to_two_minutes_and_is_read_in_json_and_uri_form(monkeypatch):
    set_conn(monkeypatch, "llm_plain", password="k")
    set_conn(monkeypatch, "llm_counted", password="k", extra={"rate_limit_patience_s": 0})
    monkeypatch.setenv("AIRFLOW_CONN_LLM_U", "llm://:sk-2@gateway.internal/v1?rate_limit_patience_s=30.5")
    assert LLMHook("llm_plain").get_endpoint().rate_limit_patience_s == 120.0
    assert LLMHook("llm_counted").get_endpoint().rate_limit_patience_s == 0.0
    assert LLMHook("llm_u").get_endpoint().rate_limit_patience_s == 30.5


@pytest.mark.parametrize("given", [-1, "forever", True, float("inf"), [60]])
def test_a_bad_rate_limit_patience_names_the_connection_and_the_fix(monkeypatch, given):
    set_conn(monkeypatch, "llm_p", password="k", extra={"rate_limit_patience_s": given})
    with pytest.raises(LLMConfigError) as info:
        LLMHook("llm_p").get_endpoint()
    assert "The LLM connection 'llm_p' extra 'rate_limit_patience_s' must be a number of seconds >= 0" in str(
        info.value
    )
