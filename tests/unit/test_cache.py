"""The response cache's rules (core/cache.py), its per-process store, and cache_ttl / cache_backend."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from airflow.sdk import DAG, task
from airflow.sdk.exceptions import TaskDeferred

from airflow_llm_async.cache_store import LocalStore
from airflow_llm_async.core import cache, protocol
from airflow_llm_async.core.outcome import Attempt, CallSpec, Outcome
from airflow_llm_async.core.protocol import Endpoint
from airflow_llm_async.core.quality import QualitySpec
from airflow_llm_async.hooks.llm import LLMConfigError, LLMHook
from airflow_llm_async.operators.fanout import LLMFanOutOperator
from airflow_llm_async.operators.llm import LLMOperator

API_KEY = "sk-cache-unit-secret-55aa"
URL = "http://127.0.0.1:9/v1"
REQUEST = {
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0.0,
    "max_tokens": 50,
    "seed": 7,
    "response_format": {"type": "json_object"},
    "top_p": 0.5,
}
NOW = 1_700_000_000.0


def endpoint(conn_id: str = "c1", base_url: str = URL, **fields) -> Endpoint:
    return Endpoint(conn_id=conn_id, base_url=base_url, api_key=API_KEY, default_model="gpt-4", **fields)


def spec(request=REQUEST, models=("gpt-4", "gpt-3.5-turbo"), conns=("c1",), **options) -> CallSpec:
    return CallSpec.of(request, list(conns), list(models), **{"cache_ttl": 60.0, **options})


def key_of(request=REQUEST, model="gpt-4", base_url=URL) -> str:
    return cache.key(endpoint(base_url=base_url).chat_url, protocol.build_payload(request, model))


def success(text: str = "a fine answer", **fields) -> Outcome:
    return Outcome(
        status="success",
        text=text,
        model="gpt-4-0613",
        requested_model="gpt-4",
        conn_id="c1",
        usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        usage_details={"cached_tokens": 2},
        system_fingerprint="fp_1",
        finish_reason="stop",
        attempts=[Attempt("c1", "gpt-4", 200, 0.5, "ok")],
        cost_usd=0.0012,
        **fields,
    )


# ---- the key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]},
        {"temperature": 0.1},
        {"max_tokens": 51},
        {"seed": 8},
        {"response_format": {"type": "text"}},
        {"top_p": 0.6},
        {"stop": ["\n"]},  # an extra the request did not have
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_field_of_the_body_changes_the_key(change):
    assert key_of({**REQUEST, **change}) != key_of()


def test_the_model_and_the_base_url_change_the_key_and_the_same_request_keeps_it():
    assert key_of(model="gpt-3.5-turbo") != key_of()
    assert key_of(base_url="http://127.0.0.1:9/v2") != key_of()
    assert key_of(dict(REQUEST)) == key_of()
    # Ambiguity: the URL is length-prefixed, so moving bytes between URL and body is another key.
    assert cache.key("http://a/b", b"{}") != cache.key("http://a/", b"b{}")


def test_the_key_is_a_sha256_and_never_holds_the_api_key_or_the_headers():
    plain = cache.links(spec(), {"c1": endpoint()})
    other_secrets = cache.links(
        spec(), {"c1": replace(endpoint(), api_key="sk-other-77", organization="org-1", headers={"a": "b"})}
    )
    assert [link.key for link in plain] == [link.key for link in other_secrets]
    key = plain[0].key
    assert key.startswith(cache.KEY_PREFIX) and len(key) == len(cache.KEY_PREFIX) + 64
    assert API_KEY not in key and "gpt-4" not in key and "hi" not in key.removeprefix(cache.KEY_PREFIX)


def test_the_links_are_the_chain_primary_first_and_none_without_cache_ttl():
    endpoints = {"c1": endpoint(), "c2": endpoint("c2", "http://127.0.0.1:10/v1")}
    links = cache.links(spec(models=("gpt-4", None), conns=("c1", "c2")), endpoints)
    assert [(link.position, link.endpoint.conn_id, link.model) for link in links] == [
        (0, "c1", "gpt-4"),
        (1, "c1", "gpt-4"),  # None: the connection's default model
        (2, "c2", "gpt-4"),
        (3, "c2", "gpt-4"),
    ]
    assert links[0].key == links[1].key != links[2].key  # same request, other base URL
    assert cache.links(spec(cache_ttl=None), endpoints) == []
    no_default = {"c1": replace(endpoint(), default_model=None)}
    assert cache.links(spec(models=(None, "gpt-4")), no_default) == []  # the engine reports that error


# ---- entries ------------------------------------------------------------------------------------------


def test_an_entry_keeps_the_answer_and_its_details():
    entry = cache.decode(cache.encode(success(), NOW))
    assert entry == cache.Entry(
        stored_at=NOW,
        text="a fine answer",
        model="gpt-4-0613",
        finish_reason="stop",
        usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        usage_details={"cached_tokens": 2},
        system_fingerprint="fp_1",
    )
    assert API_KEY not in cache.encode(success(), NOW).decode()


@pytest.mark.parametrize(
    "stored",
    [
        None,
        b"not json",
        b"[]",
        json.dumps({"v": 99, "stored_at": NOW, "text": "x", "model": "m", "usage": {}}).encode(),
        json.dumps({"v": 1, "stored_at": NOW, "text": 5, "model": "m", "usage": {}}).encode(),
        json.dumps({"v": 1, "stored_at": "later", "text": "x", "model": "m", "usage": {}}).encode(),
        json.dumps(
            {"v": 1, "stored_at": NOW, "text": "x", "model": "m", "usage": {"prompt_tokens": -1}}
        ).encode(),
        json.dumps(
            {"v": 1, "stored_at": NOW, "text": "x", "model": "m", "usage": {"prompt_tokens": True}}
        ).encode(),
        json.dumps({"v": 1, "stored_at": NOW, "text": "x"}).encode(),
    ],
    ids=[
        "none",
        "not-json",
        "list",
        "other-version",
        "text-not-str",
        "bad-time",
        "negative",
        "bool",
        "short",
    ],
)
def test_anything_but_a_well_formed_entry_is_a_miss(stored):
    assert cache.decode(stored) is None


def test_only_an_answer_that_passed_the_gate_is_kept():
    assert cache.storable(success())
    assert not cache.storable(success(quality_failures=[{"rule": "min_chars", "detail": "3 chars"}]))
    assert not cache.storable(Outcome(status="error"))
    assert not cache.storable(success(cache_hit=True))  # kept again, it would outlive its TTL


@pytest.mark.parametrize(("age", "fresh"), [(0, True), (59.9, True), (60, True), (60.01, False), (-5, True)])
def test_an_entry_is_fresh_while_no_older_than_the_readers_ttl(age, fresh):
    entry = cache.decode(cache.encode(success(), NOW))
    assert cache.fresh(entry, 60.0, NOW + age) is fresh


# ---- finding the answer -------------------------------------------------------------------------------


def test_the_primary_is_looked_up_first_and_a_fallbacks_answer_is_found_too():
    call = spec()
    links = cache.links(call, {"c1": endpoint()})
    primary, fallback = links
    found = {fallback.key: cache.encode(success("from the fallback"), NOW)}
    link, entry = cache.find(call, found, links, NOW + 1)
    assert (link, entry.text) == (fallback, "from the fallback")
    found[primary.key] = cache.encode(success("from the primary"), NOW)
    assert cache.find(call, found, links, NOW + 1)[1].text == "from the primary"


def test_a_stale_entry_or_one_that_fails_this_calls_gate_is_passed_over():
    call = spec(quality=QualitySpec(min_chars=20))
    primary, fallback = links = cache.links(call, {"c1": endpoint()})
    found = {
        primary.key: cache.encode(success("short"), NOW),  # stored by a call with laxer rules
        fallback.key: cache.encode(success("long enough to pass the rule"), NOW - 61),
    }
    assert cache.find(call, found, links, NOW) is None  # too short, and too old
    assert cache.find(replace(call, cache_ttl=120.0), found, links, NOW)[0] == fallback


def test_a_hit_costs_nothing_keeps_the_answers_usage_and_says_so_in_llm_meta():
    call = spec()
    fallback = cache.links(call, {"c1": endpoint()})[1]
    entry = cache.decode(cache.encode(success(), NOW))
    outcome = cache.hit(fallback, entry, started_at=NOW, latency_s=0.0004, host="h", pid=1)
    meta = outcome.meta()
    assert (meta["cache_hit"], meta["cost_usd"], meta["attempts"]) == (True, 0.0, [])
    assert meta["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert (meta["model"], meta["requested_model"], meta["fallback_used"]) == (
        "gpt-4-0613",
        "gpt-3.5-turbo",
        True,
    )
    assert "from the response cache" in outcome.describe()
    payload = json.loads(json.dumps(outcome.to_json()))
    assert Outcome.from_json(payload).meta() == meta  # the event keeps cache_hit
    assert success().meta()["cache_hit"] is False


# ---- cache_ttl: the spec, the operators, the decorators -----------------------------------------------


def test_cache_ttl_rides_in_the_spec_only_when_set():
    assert "cache_ttl" not in spec(cache_ttl=None).to_json()  # kwargs of calls without it are unchanged
    original = spec(cache_ttl=90.0)
    assert original.to_json()["cache_ttl"] == 90.0
    assert CallSpec.from_json(json.loads(json.dumps(original.to_json()))) == original
    for bad in (0, -1, "60", True):
        with pytest.raises(ValueError, match="cache_ttl"):
            CallSpec.from_json({**original.to_json(), "cache_ttl": bad})


@pytest.mark.parametrize(("given", "seconds"), [(60, 60.0), (0.5, 0.5), (timedelta(hours=1), 3600.0)])
def test_the_operator_carries_cache_ttl_into_the_triggers_spec(given, seconds):
    op = LLMOperator(task_id="t", prompt="hi", cache_ttl=given, llm_conn_id="llm_test")
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    _, kwargs = info.value.trigger.serialize()
    assert kwargs["spec"]["cache_ttl"] == seconds
    worker_free = LLMOperator(task_id="w", prompt="hi", cache_ttl=given, start_from_trigger=True)
    assert worker_free.start_trigger_args.trigger_kwargs["spec"]["cache_ttl"] == seconds
    fan_out = LLMFanOutOperator(task_id="f", prompts=["a"], cache_ttl=given)
    assert fan_out.start_trigger_args.trigger_kwargs["spec"]["cache_ttl"] == seconds


@pytest.mark.parametrize("bad", [0, -5, float("inf"), float("nan"), "60", True, timedelta(0)])
def test_a_bad_cache_ttl_is_refused_when_the_dag_is_parsed(bad):
    with pytest.raises(ValueError, match=r"LLMOperator 't': cache_ttl must be a positive number of seconds"):
        LLMOperator(task_id="t", prompt="hi", cache_ttl=bad)
    with pytest.raises(ValueError, match="cache_ttl"):
        LLMFanOutOperator(task_id="t", prompts=["a"], cache_ttl=bad)


def test_both_decorators_take_cache_ttl():
    with DAG("cached", schedule=None) as dag:

        @task.llm_deferred(cache_ttl=300)
        def ask() -> str:
            return "hi"

        @task.llm_fanout(cache_ttl=300)
        def ask_all() -> list[str]:
            return ["a", "b"]

        ask()
        ask_all()
    for task_id in ("ask", "ask_all"):
        with pytest.raises(TaskDeferred) as info:
            dag.get_task(task_id).execute({})
        assert info.value.trigger.serialize()[1]["spec"]["cache_ttl"] == 300.0
    with DAG("bad", schedule=None), pytest.raises(ValueError, match="cache_ttl"):

        @task.llm_deferred(cache_ttl=-1)
        def bad() -> str:
            return "hi"

        bad()


# ---- cache_backend: the connection extra --------------------------------------------------------------


def set_conn(monkeypatch, conn_id: str, **extra) -> None:
    conn = {"conn_type": "llm", "host": URL, "password": API_KEY, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def test_the_cache_backend_extra_is_a_redis_url_kept_out_of_the_endpoints_repr(monkeypatch):
    set_conn(monkeypatch, "llm_cached", cache_backend="redis://:pw-cache-1@127.0.0.1:6379/3")
    resolved = LLMHook("llm_cached").get_endpoint()
    assert resolved.cache_backend == "redis://:pw-cache-1@127.0.0.1:6379/3"
    assert "pw-cache-1" not in repr(resolved)
    set_conn(monkeypatch, "llm_plain")
    assert LLMHook("llm_plain").get_endpoint().cache_backend is None


@pytest.mark.parametrize("bad", ["memcached://127.0.0.1:11211", "http://:pw-9@host", 5])
def test_a_cache_backend_that_is_not_a_redis_url_is_refused_without_echoing_it(monkeypatch, bad):
    set_conn(monkeypatch, "llm_bad", cache_backend=bad)
    with pytest.raises(LLMConfigError, match=r"'llm_bad' extra 'cache_backend'.*must be a Redis URL") as info:
        LLMHook("llm_bad").get_endpoint()
    assert "pw-9" not in str(info.value)


# ---- the per-process store (cache_store.LocalStore): TTL and LRU, with a fake clock ---------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


async def test_the_local_store_forgets_an_entry_after_its_ttl():
    clock = Clock()
    store = LocalStore(clock=clock)
    await store.put("k", b"v", ttl=10)
    clock.now += 10
    assert await store.get_many(["k", "other"]) == [b"v", None]
    clock.now += 0.01
    assert await store.get_many(["k"]) == [None]
    assert len(store) == 0


async def test_the_local_store_drops_the_least_recently_used_past_its_count_or_bytes():
    store = LocalStore(max_entries=2, max_bytes=10, clock=Clock())
    await store.put("a", b"1", 60)
    await store.put("b", b"2", 60)
    assert await store.get_many(["a"]) == [b"1"]  # "a" is now the most recently used
    await store.put("c", b"3", 60)
    assert await store.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    await store.put("big", b"x" * 10, 60)  # 10 + 1 bytes > 10: the oldest go until it fits
    assert await store.get_many(["a", "c", "big"]) == [None, None, b"x" * 10]
    await store.put("huge", b"x" * 11, 60)  # larger than the whole store: not kept, nothing dropped
    assert await store.get_many(["huge", "big"]) == [None, b"x" * 10]
    await store.put("big", b"y", 60)  # replacing an entry frees its bytes
    await store.put("d", b"z" * 8, 60)
    assert await store.get_many(["big", "d"]) == [b"y", b"z" * 8]
