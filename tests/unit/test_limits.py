"""The I/O-free core of the rate limiter: TokenBucket, AdaptiveRate, LocalBuckets, estimate_tokens.

Every test runs on a fake clock: time only moves when the test says so.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from multidict import CIMultiDict

from airflow_llm_async.core import tokens
from airflow_llm_async.core.buckets import (
    BURST_SECONDS,
    AdaptiveRate,
    Limits,
    LocalBuckets,
    ServerBudget,
    ServerPace,
    ServerWindow,
    TokenBucket,
    parse_duration,
    server_budget,
)
from airflow_llm_async.core.protocol import Endpoint
from airflow_llm_async.core.tokens import estimate_tokens
from airflow_llm_async.limits import ConnectionLimiter, check_backend, limiter_for
from airflow_llm_async.testing.fake_server import estimate_tokens as fake_server_tokens


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- TokenBucket ------------------------------------------------------------------------------


def test_bucket_starts_full_and_goes_at_once_within_capacity():
    bucket = TokenBucket(rate=2.0, capacity=10.0, now=0.0)
    assert bucket.available(0.0) == 10.0
    assert bucket.reserve(4, 0.0) == 0.0
    assert bucket.reserve(6, 0.0) == 0.0
    assert bucket.available(0.0) == 0.0


def test_bucket_refills_at_its_rate_up_to_capacity():
    bucket = TokenBucket(rate=2.0, capacity=10.0, now=0.0)
    bucket.reserve(10, 0.0)
    assert bucket.available(1.5) == 3.0
    assert bucket.available(100.0) == 10.0


def test_reservations_in_order_wait_in_order_at_the_rate():
    bucket = TokenBucket(rate=1.0, capacity=1.0, now=0.0)
    assert [bucket.reserve(1, 0.0) for _ in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert bucket.available(0.0) == -4.0


def test_wait_counts_from_the_time_of_the_reservation():
    bucket = TokenBucket(rate=1.0, capacity=1.0, now=0.0)
    bucket.reserve(1, 0.0)
    assert bucket.reserve(1, 0.25) == 0.75


def test_request_larger_than_the_bucket_waits_for_a_full_bucket_and_leaves_a_debt():
    bucket = TokenBucket(rate=10.0, capacity=100.0, now=0.0)
    bucket.reserve(50, 0.0)
    # 250 > capacity: it goes once the bucket is full (5 s), not never.
    assert bucket.reserve(250, 0.0) == pytest.approx(5.0)
    # ...and its excess (150) plus a full bucket for the next: (1 + 200) / 10.
    assert bucket.reserve(1, 0.0) == pytest.approx(20.1)


def test_wait_time_does_not_take():
    bucket = TokenBucket(rate=1.0, capacity=5.0, now=0.0)
    bucket.reserve(5, 0.0)
    assert bucket.wait_time(2, 0.0) == 2.0
    assert bucket.wait_time(2, 0.0) == 2.0
    assert bucket.wait_time(0, 0.0) == 0.0


def test_zero_amount_never_waits_even_in_debt():
    bucket = TokenBucket(rate=1.0, capacity=1.0, now=0.0)
    bucket.reserve(10, 0.0)
    assert bucket.reserve(0, 0.0) == 0.0


def test_refund_gives_back_a_cancelled_reservation_exactly():
    bucket = TokenBucket(rate=1.0, capacity=3.0, now=0.0)
    bucket.reserve(3, 0.0)
    bucket.reserve(2, 0.0)
    bucket.refund(2, 0.0)
    assert bucket.available(0.0) == 0.0
    assert bucket.reserve(1, 0.0) == 1.0


def test_refund_is_capped_at_capacity():
    bucket = TokenBucket(rate=1.0, capacity=3.0, now=0.0)
    bucket.reserve(1, 0.0)
    bucket.refund(50, 0.0)
    assert bucket.available(0.0) == 3.0


def test_charge_takes_without_waiting_and_the_next_caller_pays():
    bucket = TokenBucket(rate=1.0, capacity=10.0, now=0.0)
    bucket.reserve(10, 0.0)
    bucket.charge(5, 0.0)
    assert bucket.available(0.0) == -5.0
    assert bucket.reserve(1, 0.0) == 6.0


def test_adjust_dispatches_on_sign():
    bucket = TokenBucket(rate=1.0, capacity=10.0, now=0.0)
    bucket.adjust(4, 0.0)
    assert bucket.available(0.0) == 6.0
    bucket.adjust(-3, 0.0)
    assert bucket.available(0.0) == 9.0


def test_settling_an_over_estimate_lets_the_next_call_go_sooner():
    bucket = TokenBucket(rate=10.0, capacity=100.0, now=0.0)
    bucket.reserve(100, 0.0)  # estimated 100
    bucket.adjust(30 - 100, 1.0)  # used 30
    assert bucket.available(1.0) == 80.0


def test_set_rate_refills_the_past_at_the_old_rate():
    bucket = TokenBucket(rate=10.0, capacity=100.0, now=0.0)
    bucket.reserve(100, 0.0)
    bucket.set_rate(1.0, 2.0)
    assert bucket.available(2.0) == 20.0
    assert bucket.available(4.0) == 22.0


def test_set_rate_with_a_smaller_capacity_clamps_the_level():
    bucket = TokenBucket(rate=10.0, capacity=100.0, now=0.0)
    bucket.set_rate(5.0, 0.0, capacity=50.0)
    assert bucket.available(0.0) == 50.0
    assert bucket.available(1000.0) == 50.0


def test_drain_empties_but_keeps_a_debt():
    bucket = TokenBucket(rate=1.0, capacity=10.0, now=0.0)
    bucket.drain(0.0)
    assert bucket.available(0.0) == 0.0
    bucket.reserve(5, 0.0)
    bucket.drain(0.0)
    assert bucket.available(0.0) == -5.0


def test_a_clock_stepping_back_refills_nothing():
    bucket = TokenBucket(rate=1.0, capacity=10.0, now=100.0)
    bucket.reserve(10, 100.0)
    assert bucket.available(50.0) == 0.0
    assert bucket.available(101.0) == 1.0


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (-1, 1), (1, 0), (math.nan, 1)])
def test_bucket_rejects_non_positive_parameters(rate, capacity):
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(rate, capacity, 0.0)
    bucket = TokenBucket(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="must be > 0"):
        bucket.set_rate(rate, 0.0, capacity=capacity)


@pytest.mark.parametrize("seed", range(20))
def test_grants_never_exceed_capacity_plus_rate_times_window(seed):
    """Randomised: callers arrive at random times and act when told; no window sees too many tokens."""
    rng = random.Random(seed)
    rate, capacity = rng.uniform(0.5, 5), rng.uniform(1, 20)
    bucket = TokenBucket(rate, capacity, 0.0)
    now, grants = 0.0, []
    for _ in range(300):
        now += rng.expovariate(rate)  # arrivals a bit faster than the rate on average
        amount = rng.uniform(0.1, capacity)
        grants.append((now + bucket.reserve(amount, now), amount))
    times = [t for t, _ in grants]
    assert times == sorted(times), "reservations made in order must be served in order"
    for i, (start, _) in enumerate(grants):
        total = 0.0
        for end, amount in grants[i:]:
            total += amount
            assert total <= capacity + rate * (end - start) + 1e-6


def test_long_run_rate_is_exact_under_saturation():
    bucket = TokenBucket(rate=3.0, capacity=5.0, now=0.0)
    now, served = 0.0, 0
    while now < 1000:
        now += bucket.reserve(1, now)  # a greedy caller acts as soon as allowed
        served += 1
    assert served == pytest.approx(5 + 3 * 1000, abs=2)


# --- AdaptiveRate -----------------------------------------------------------------------------


def test_aimd_halves_on_429_down_to_the_floor():
    rate = AdaptiveRate(1.0, floor=0.2, increase=0.1, cooldown=0)
    values = []
    for second in range(4):
        assert rate.on_rate_limited(float(second))
        values.append(rate.value)
    assert values == [0.5, 0.25, 0.2, 0.2]


def test_aimd_recovers_additively_to_the_ceiling():
    rate = AdaptiveRate(10.0, floor=1.0, increase=2.0, start=3.0)
    steps = []
    while rate.on_success():
        steps.append(rate.value)
    assert steps == [5.0, 7.0, 9.0, 10.0]
    assert not rate.throttled
    assert not rate.on_success()


def test_a_burst_of_429s_within_the_cooldown_is_one_cut():
    rate = AdaptiveRate(1.0, floor=0.01, increase=0.1, cooldown=1.0)
    assert rate.on_rate_limited(10.0)
    assert not rate.on_rate_limited(10.5)
    assert not rate.on_rate_limited(10.99)
    assert rate.value == 0.5
    assert rate.on_rate_limited(11.0)
    assert rate.value == 0.25


def test_a_429_for_a_request_sent_before_the_cut_is_ignored_whatever_the_cooldown():
    rate = AdaptiveRate(1.0, floor=0.01, increase=0.1, cooldown=0.0)
    assert rate.on_rate_limited(10.0, sent_at=9.0)
    assert not rate.on_rate_limited(60.0, sent_at=9.5)  # late answer to an old request
    assert rate.on_rate_limited(10.1, sent_at=10.0)  # sent after the cut: real news
    assert rate.value == 0.25


def test_aimd_start_is_clamped():
    assert AdaptiveRate(10.0, floor=2.0, increase=1.0, start=50.0).value == 10.0
    assert AdaptiveRate(10.0, floor=2.0, increase=1.0, start=0.0).value == 2.0
    assert AdaptiveRate(10.0, floor=2.0, increase=1.0).value == 10.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ceiling": 0, "floor": 0.1, "increase": 0.1},
        {"ceiling": 1, "floor": 0, "increase": 0.1},
        {"ceiling": 1, "floor": 2, "increase": 0.1},
        {"ceiling": 1, "floor": 0.1, "increase": 0},
        {"ceiling": 1, "floor": 0.1, "increase": 0.1, "decrease": 1.0},
        {"ceiling": 1, "floor": 0.1, "increase": 0.1, "cooldown": -1},
    ],
)
def test_aimd_rejects_bad_parameters(kwargs):
    ceiling = kwargs.pop("ceiling")
    with pytest.raises(ValueError):
        AdaptiveRate(ceiling, **kwargs)


# --- LocalBuckets -----------------------------------------------------------------------------


def test_local_buckets_wait_for_the_slower_bucket():
    clock = FakeClock()
    buckets = LocalBuckets(requests_per_minute=60, tokens_per_minute=600, clock=clock)
    # Capacities: 10 requests, 100 tokens. 100 tokens go at once; the next 50 wait 5 s (10 tokens/s).
    assert buckets.reserve_now(100) == 0.0
    assert buckets.reserve_now(50) == 5.0
    assert buckets.snapshot() == {"requests_available": 8.0, "tokens_available": -50.0}


def test_local_buckets_without_a_tokens_limit_ignore_tokens():
    buckets = LocalBuckets(requests_per_minute=60, tokens_per_minute=None, clock=FakeClock())
    assert buckets.reserve_now(10**9) == 0.0
    assert buckets.snapshot()["tokens_available"] is None


def test_local_buckets_throttle_scales_rate_and_burst():
    clock = FakeClock()
    buckets = LocalBuckets(requests_per_minute=600, tokens_per_minute=6000, clock=clock)
    buckets.set_throttle(0.5)
    assert buckets.requests.rate == 5.0 and buckets.requests.capacity == 5.0 * BURST_SECONDS
    assert buckets.tokens.rate == 50.0 and buckets.tokens.capacity == 50.0 * BURST_SECONDS
    buckets.drain()
    assert buckets.reserve_now(50) == 1.0  # the token bucket is the slower: 50 / 50 per s
    buckets.set_throttle(1.0)
    clock.now += 1000
    assert buckets.snapshot() == {"requests_available": 100.0, "tokens_available": 1000.0}


def test_local_buckets_adjust_settles_and_refunds():
    clock = FakeClock()
    buckets = LocalBuckets(requests_per_minute=60, tokens_per_minute=600, clock=clock)
    buckets.reserve_now(80)
    buckets.adjust(0, 30 - 80)
    assert buckets.snapshot() == {"requests_available": 9.0, "tokens_available": 70.0}
    buckets.adjust(-1, -30)
    assert buckets.snapshot() == {"requests_available": 10.0, "tokens_available": 100.0}


# --- what the server says is left: x-ratelimit-* headers --------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("1.5µs", 1.5e-6),
        ("12", 12.0),  # plain seconds, as some servers send
        (" 0.5 ", 0.5),
    ],
)
def test_reset_durations_in_openais_format_or_plain_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", [None, "", "s", "-1s", "1e3", "inf", "nan", "1.s", "2d", "1s 2m", "1s2", "1 s", "25h", "9" * 50]
)
def test_a_reset_that_is_no_duration_is_ignored(text):
    assert parse_duration(text) is None


def openai_headers(**overrides) -> CIMultiDict:
    """An OpenAI answer's rate-limit headers (mixed case, as a server may send them)."""
    headers = CIMultiDict(
        {
            "X-RateLimit-Limit-Requests": "60",
            "X-RateLimit-Remaining-Requests": "5",
            "X-RateLimit-Reset-Requests": "2s",
            "X-RateLimit-Limit-Tokens": "1000",
            "X-RateLimit-Remaining-Tokens": "400",
            "X-RateLimit-Reset-Tokens": "1m0s",
        }
    )
    for name, value in overrides.items():
        headers.popall(name.replace("_", "-"), None)
        if value is not None:
            headers[name.replace("_", "-")] = value
    return headers


def test_an_answers_budgets_are_read_from_its_headers():
    assert server_budget(openai_headers()) == ServerBudget(ServerWindow(5, 2.0), ServerWindow(400, 60.0))


def test_an_answer_without_rate_limit_headers_has_no_budget():
    assert server_budget(CIMultiDict({"content-type": "application/json"})) is None
    assert server_budget({}) is None


@pytest.mark.parametrize(
    ("overrides", "budget"),
    [
        ({"x_ratelimit_remaining_requests": "lots"}, ServerBudget(None, ServerWindow(400, 60.0))),
        ({"x_ratelimit_remaining_requests": "-1"}, ServerBudget(None, ServerWindow(400, 60.0))),
        ({"x_ratelimit_remaining_requests": "4.5"}, ServerBudget(None, ServerWindow(400, 60.0))),
        ({"x_ratelimit_reset_requests": "soon"}, ServerBudget(None, ServerWindow(400, 60.0))),
        ({"x_ratelimit_reset_requests": None}, ServerBudget(None, ServerWindow(400, 60.0))),
        ({"x_ratelimit_remaining_tokens": "", "x_ratelimit_remaining_requests": "x"}, None),
    ],
)
def test_a_malformed_budget_is_ignored_and_the_other_kept(overrides, budget):
    assert server_budget(openai_headers(**overrides)) == budget


def test_a_gateways_own_budget_wins_over_the_one_it_forwards():
    forwarded = CIMultiDict(
        {
            "llm_provider-x-ratelimit-remaining-requests": "0",
            "llm_provider-x-ratelimit-reset-requests": "20ms",
            "llm_provider-x-ratelimit-remaining-tokens": "900",
            "llm_provider-x-ratelimit-reset-tokens": "6s",
        }
    )
    assert server_budget(forwarded) == ServerBudget(ServerWindow(0, 0.02), ServerWindow(900, 6.0))
    forwarded.update({"x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "1s"})
    assert server_budget(forwarded) == ServerBudget(ServerWindow(7, 1.0), ServerWindow(900, 6.0))
    # The gateway's own count without a reset is no budget: the forwarded pair is read instead.
    del forwarded["x-ratelimit-reset-requests"]
    assert server_budget(forwarded).requests == ServerWindow(0, 0.02)


@pytest.mark.parametrize(
    ("budget", "tokens", "tight"),
    [
        (ServerBudget(ServerWindow(9999, 0.006), None), 100, False),  # a high tier: 0.6 us apart
        (ServerBudget(ServerWindow(5, 2.0), None), 100, True),  # 0.4 s apart
        (ServerBudget(ServerWindow(0, 0.5), None), 0, True),  # nothing left: wait for the reset
        (ServerBudget(ServerWindow(0, 0.0), None), 0, False),  # nothing left, but reset already
        (ServerBudget(None, ServerWindow(10**6, 1.0)), 100, False),  # 0.1 ms per call's tokens
        (ServerBudget(None, ServerWindow(10**6, 1.0)), 10_000, True),  # 10 ms
        (ServerBudget(None, ServerWindow(50, 1.0)), 0, False),  # a call of no tokens
    ],
)
def test_a_budget_is_tight_when_spreading_it_spaces_calls_a_millisecond_apart(budget, tokens, tight):
    assert budget.tight(tokens) is tight


def test_pace_spreads_what_is_left_over_the_time_to_the_reset():
    pace = ServerPace()
    pace.update(ServerBudget(ServerWindow(4, 2.0), None), now=10.0)
    # Four sends fit before the reset, half a second apart; a fifth waits for the reset.
    assert [pace.reserve(1, 10.0) for _ in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_pace_with_nothing_left_holds_every_send_until_the_reset_then_lets_go():
    pace = ServerPace()
    pace.update(ServerBudget(ServerWindow(0, 1.5), None), now=0.0)
    assert pace.active(0.0)
    assert pace.reserve(1, 0.0) == 1.5
    assert pace.reserve(1, 1.0) == 0.5
    assert pace.reserve(1, 1.5) == 0.0 and not pace.active(1.5)  # the window is over
    assert pace.reserve(1, 1.5) == 0.0


def test_pace_books_tokens_and_a_send_that_does_not_fit_waits_for_the_tokens_reset():
    pace = ServerPace()
    pace.update(ServerBudget(ServerWindow(100, 1.0), ServerWindow(1000, 10.0)), now=0.0)
    assert pace.reserve(500, 0.0) == 0.0
    assert pace.reserve(400, 0.0) == pytest.approx(5.0)  # half the tokens booked: half the window
    assert pace.reserve(200, 5.0) == pytest.approx(5.0)  # 900 + 200 > 1000: the reset, at 10 s


def test_sends_made_while_an_answer_travelled_stay_booked_against_it():
    pace = ServerPace()
    pace.update(ServerBudget(ServerWindow(10, 1.0), None), now=0.0)
    pace.reserve(1, 0.0)
    sent = pace.mark()  # request A goes
    pace.reserve(1, 0.0)
    pace.reserve(1, 0.0)  # two more go before A's answer comes back
    pace.update(ServerBudget(ServerWindow(2, 1.0), None), now=0.1, mark=sent)  # A's answer: 2 left
    # The server may not have counted the two sent after A: they take what is left until the reset.
    assert pace.reserve(1, 0.1) == pytest.approx(1.0)


def test_the_latest_answer_replaces_what_earlier_ones_said():
    pace = ServerPace()
    pace.update(ServerBudget(ServerWindow(0, 30.0), None), now=0.0)
    pace.update(ServerBudget(ServerWindow(10, 1.0), None), now=0.2)  # a newer answer: 10 left
    assert pace.reserve(1, 0.2) == 0.0
    assert pace.reserve(1, 0.2) == pytest.approx(0.1)


# --- estimate_tokens --------------------------------------------------------------------------


def _chat(*contents, **extra):
    return {"messages": [{"role": "user", "content": c} for c in contents], **extra}


def test_estimate_english_is_a_quarter_of_the_characters_plus_max_tokens():
    assert estimate_tokens(_chat("x" * 40, max_tokens=100)) == 4 + 10 + 100


def test_estimate_counts_a_cjk_character_as_one_token():
    assert estimate_tokens(_chat("你好世界", max_tokens=10)) == 4 + 4 + 10
    assert estimate_tokens(_chat("你好 abcd", max_tokens=10)) == 4 + 2 + 2 + 10  # " abcd" -> ceil(5/4)


@pytest.mark.parametrize("seed", range(5))
def test_estimate_text_agrees_with_the_fake_server(seed):
    rng = random.Random(seed)
    alphabet = "abc xyz.,\n" + "人工智能天气" + "ひらカタ" + "한국어" + "éüß€" + "😀"
    for length in range(0, 120, 7):
        text = "".join(rng.choice(alphabet) for _ in range(length))
        assert tokens._text_tokens(text) == fake_server_tokens(text), text


def test_estimate_sums_messages_and_content_parts():
    parts = [{"type": "text", "text": "abcdefgh"}, {"type": "image_url", "image_url": {"url": "x"}}]
    request = {
        "messages": [{"role": "system", "content": "abcd"}, {"role": "user", "content": parts}],
        "max_completion_tokens": 7,
    }
    assert estimate_tokens(request) == (4 + 1) + (4 + 2 + tokens.NON_TEXT_PART_TOKENS) + 7


def test_estimate_multiplies_the_completion_by_n_and_counts_schemas():
    assert estimate_tokens(_chat("", max_tokens=10, n=3)) == 4 + 30
    with_tools = estimate_tokens(_chat("", max_tokens=10, tools=[{"type": "function", "name": "f" * 100}]))
    assert with_tools > 4 + 10 + 25


def test_estimate_defaults_the_completion_and_survives_odd_input():
    assert estimate_tokens({}) == tokens.DEFAULT_COMPLETION_TOKENS
    odd = {"messages": ["not a dict", {"role": "user"}], "max_tokens": "many"}
    assert estimate_tokens(odd) == 8 + tokens.DEFAULT_COMPLETION_TOKENS


# --- limits, registry, config -----------------------------------------------------------------


def test_limits_of_an_endpoint_with_and_without_a_backend():
    assert Limits.of(Endpoint("a", max_concurrency=3, requests_per_minute=60)) == Limits(3, 60, None, None)
    endpoint = Endpoint("a", tokens_per_minute=9, rate_limit_backend="redis://localhost/0")
    assert Limits.of(endpoint).backend == "redis://localhost/0"


def test_limiter_for_is_one_per_connection_and_loop_and_rebuilt_on_change():
    async def lookups():
        first = limiter_for(Endpoint("conn", max_concurrency=2))
        again = limiter_for(Endpoint("conn", max_concurrency=2, api_key="other"))
        other = limiter_for(Endpoint("other", max_concurrency=2))
        changed = limiter_for(Endpoint("conn", max_concurrency=3))
        return first, again, other, changed

    first, again, other, changed = asyncio.run(lookups())
    assert first is again
    assert other is not first
    assert changed is not first and changed.stats()["max_concurrency"] == 3
    second_loop, *_ = asyncio.run(lookups())
    assert second_loop is not first


def test_limiter_for_needs_a_running_loop():
    with pytest.raises(RuntimeError):
        limiter_for(Endpoint("conn"))


def test_stats_of_a_fresh_limiter():
    limiter = ConnectionLimiter("c", Limits(5, 60, 6000), clock=FakeClock())
    assert limiter.stats() == {
        "conn_id": "c",
        "backend": "local",
        "in_flight": 0,
        "waiting": 0,
        "max_concurrency": 5,
        "requests_per_minute": 60.0,
        "tokens_per_minute": 6000.0,
        "rate_fraction": 1.0,
        "rate_limited": 0,
        "requests_available": 10.0,
        "tokens_available": 1000.0,
        "models": {},  # the models backing off after a 429
    }
    assert ConnectionLimiter("n").stats()["backend"] is None


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380", "unix:///tmp/r.sock"])
def test_check_backend_accepts_redis_urls(url):
    assert check_backend(url) == url


@pytest.mark.parametrize("value", ["http://:secret@host", "localhost:6379", 6379, None])
def test_check_backend_rejects_anything_else_without_echoing_it(value):
    with pytest.raises(ValueError, match="must be a Redis URL") as caught:
        check_backend(value)
    assert "secret" not in str(caught.value)
