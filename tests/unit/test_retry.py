"""The retry policy, against openai-python's semantics (``_should_retry``, ``_calculate_retry_timeout``)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from airflow_llm_async.core.retry import RetryPolicy, retry_after_seconds

NOW = 1_700_000_000.0


def wait(policy: RetryPolicy, retries_done: int = 0, headers=None, *, retryable=True, rand=1.0):
    return policy.decide(retryable, retries_done, headers, rand=lambda: rand, now=lambda: NOW).wait


def test_only_retryable_errors_are_retried_within_the_budget():
    policy = RetryPolicy(max_retries=2)
    assert wait(policy, 0) is not None and wait(policy, 1) is not None
    assert wait(policy, 2) is None
    assert wait(policy, 0, retryable=False) is None
    assert wait(RetryPolicy(max_retries=0), 0) is None


@pytest.mark.parametrize(
    ("retries_done", "ceiling"), [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]
)
def test_backoff_is_exponential_capped_with_full_jitter(retries_done, ceiling):
    policy = RetryPolicy(max_retries=10)
    assert wait(policy, retries_done, rand=1.0) == ceiling
    assert wait(policy, retries_done, rand=0.5) == ceiling / 2
    assert wait(policy, retries_done, rand=0.0) == 0.0


def test_retry_after_ms_wins_over_retry_after():
    assert wait(RetryPolicy(), 0, {"retry-after-ms": "250", "retry-after": "9"}) == 0.25


def test_retry_after_seconds_is_honoured_whatever_the_header_case():
    assert wait(RetryPolicy(max_retries=5), 3, {"Retry-After": "1.5"}) == 1.5


@pytest.mark.parametrize(
    ("headers", "waited"),
    [
        ({"llm_provider-retry-after": "7"}, 7.0),  # LiteLLM's proxy, forwarding the provider's header
        ({"LLM_Provider-Retry-After-Ms": "1500"}, 1.5),
        ({"retry-after": "2", "llm_provider-retry-after": "7"}, 2.0),  # the gateway's own wins
    ],
)
def test_a_gateways_forwarded_retry_after_is_honoured(headers, waited):
    assert wait(RetryPolicy(), 0, headers) == waited


def test_retry_after_http_date_is_honoured():
    moment = format_datetime(datetime.fromtimestamp(NOW + 12, tz=UTC), usegmt=True)
    assert wait(RetryPolicy(), 0, {"retry-after": moment}) == pytest.approx(12)


def test_a_server_asking_for_longer_than_the_cap_is_not_waited_on():
    """openai-python would back off instead; we move down the chain (the next model may answer now)."""
    decision = RetryPolicy(max_retry_after=60).decide(True, 0, {"retry-after": "3600"})
    assert decision.wait is None and "3600 s" in decision.why
    assert wait(RetryPolicy(max_retry_after=60), 0, {"retry-after": "60"}) == 60.0


@pytest.mark.parametrize("value", ["0", "-5", "soon", ""])
def test_retry_after_zero_or_unreadable_falls_back_to_our_backoff(value):
    assert wait(RetryPolicy(), 1, {"retry-after": value}, rand=0.5) == 0.5


@pytest.mark.parametrize(
    ("header", "retryable", "retried"),
    [
        ("true", False, True),  # e.g. a 400 the server says is worth another try
        ("false", True, False),  # e.g. a 503 the server says is not
        ("TRUE", False, False),  # the header is compared exactly, as openai-python does
        (None, True, True),
        (None, False, False),
    ],
)
def test_x_should_retry_decides_before_the_status(header, retryable, retried):
    headers = {"x-should-retry": header} if header is not None else {}
    assert (wait(RetryPolicy(), 0, headers, retryable=retryable) is not None) is retried


def test_x_should_retry_true_still_respects_the_retry_budget():
    assert wait(RetryPolicy(max_retries=1), 1, {"x-should-retry": "true"}, retryable=False) is None


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"retry-after": "soon"}, {"retry-after": "Mon, 32 Foo 2026"}, {"retry-after-ms": "x"}],
)
def test_missing_or_bad_headers_are_ignored(headers):
    assert retry_after_seconds(headers) is None


def test_a_date_in_the_past_means_no_wait():
    moment = format_datetime(datetime.fromtimestamp(NOW - 30, tz=UTC), usegmt=True)
    assert retry_after_seconds({"retry-after": moment}, now=lambda: NOW) == 0.0


@pytest.mark.parametrize(
    "bad", [{"max_retries": -1}, {"max_retries": 1.5}, {"initial_delay": 5, "max_delay": 1}]
)
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


def patient_wait(policy: RetryPolicy, refusals: int, refused_for: float, headers=None, *, rand=1.0):
    return policy.decide(True, refusals, headers, rand=lambda: rand, now=lambda: NOW, refused_for=refused_for)


def test_a_429_within_the_patience_is_retried_whatever_the_count():
    policy = RetryPolicy(max_retries=2)  # patience: 120 s by default
    assert policy.rate_limit_patience == 120.0
    decision = patient_wait(policy, 40, 100.0, {"retry-after-ms": "300"})
    assert decision.wait == 8.0 and decision.why == "rate limit: patience"


@pytest.mark.parametrize(
    ("refusals", "rand", "waited"), [(0, 1.0, 0.5), (0, 0.2, 0.3), (3, 0.5, 2.0), (9, 0.01, 0.3)]
)
def test_a_patient_wait_is_the_longer_of_the_servers_and_the_growing_back_off(refusals, rand, waited):
    policy = RetryPolicy()
    assert patient_wait(policy, refusals, 1.0, {"retry-after-ms": "300"}, rand=rand).wait == waited


def test_a_wait_that_would_end_past_the_patience_is_not_started():
    policy = RetryPolicy(rate_limit_patience=10)
    assert patient_wait(policy, 4, 1.9, rand=1.0).wait == 8.0  # ends at 9.9 s
    decision = patient_wait(policy, 4, 2.1, rand=1.0)
    assert decision.wait is None and "rate_limit_patience_s of 10 s" in decision.why


def test_the_server_still_decides_first_and_a_long_retry_after_still_moves_on():
    policy = RetryPolicy()
    assert patient_wait(policy, 0, 0.0, {"x-should-retry": "false"}).wait is None
    assert patient_wait(policy, 0, 0.0, {"retry-after": "600"}).wait is None


def test_patience_0_or_an_exhausted_quota_counts_429s_as_retries():
    counted = RetryPolicy(max_retries=2, rate_limit_patience=0)
    assert patient_wait(counted, 2, 1.0).wait is None
    assert not counted.patient("rate_limit", None)
    policy = RetryPolicy()
    assert policy.patient("rate_limit", None) and policy.patient("rate_limit", "rate_limit_exceeded")
    assert not policy.patient("rate_limit", "insufficient_quota") and not policy.patient("server", None)
    with pytest.raises(ValueError, match="rate_limit_patience must be >= 0"):
        RetryPolicy(rate_limit_patience=-1)
