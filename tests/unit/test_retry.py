from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from airflow_llm_async.retry import RetryPolicy, retry_after_seconds

NOW = 1_700_000_000.0


def test_should_retry_only_retryable_errors_within_the_budget():
    policy = RetryPolicy(max_retries=2)
    assert policy.should_retry(True, 0)
    assert policy.should_retry(True, 1)
    assert not policy.should_retry(True, 2)
    assert not policy.should_retry(False, 0)
    assert not RetryPolicy(max_retries=0).should_retry(True, 0)


@pytest.mark.parametrize(
    ("retries_done", "ceiling"), [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]
)
def test_backoff_is_exponential_capped_with_full_jitter(retries_done, ceiling):
    policy = RetryPolicy()
    assert policy.delay(retries_done, rand=lambda: 1.0) == ceiling
    assert policy.delay(retries_done, rand=lambda: 0.5) == ceiling / 2
    assert policy.delay(retries_done, rand=lambda: 0.0) == 0.0


def test_retry_after_ms_wins_over_retry_after():
    headers = {"Retry-After-Ms": "250", "Retry-After": "7"}
    assert RetryPolicy().delay(0, headers) == 0.25


def test_retry_after_seconds_is_honoured():
    assert RetryPolicy().delay(3, {"retry-after": "1.5"}) == 1.5


def test_retry_after_http_date_is_honoured():
    moment = format_datetime(datetime.fromtimestamp(NOW + 12, tz=UTC), usegmt=True)
    assert RetryPolicy().delay(0, {"retry-after": moment}, now=lambda: NOW) == pytest.approx(12)


def test_a_retry_after_beyond_the_cap_falls_back_to_backoff():
    policy = RetryPolicy(max_retry_after=60)
    assert policy.delay(1, {"retry-after": "3600"}, rand=lambda: 1.0) == 1.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00"}, None),  # no zone: ambiguous, ignored
    ],
)
def test_retry_after_parsing(headers, expected):
    assert retry_after_seconds(headers, now=lambda: NOW) == expected


def test_a_past_http_date_means_no_wait():
    moment = format_datetime(datetime.fromtimestamp(NOW - 30, tz=UTC), usegmt=True)
    assert retry_after_seconds({"retry-after": moment}, now=lambda: NOW) == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"max_retries": -1}, {"max_retries": 1.5}, {"initial_delay": 5, "max_delay": 1}]
)
def test_invalid_policies_are_rejected(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)
