"""The call engine's decisions, with no network, no sleeps and a fake clock.

Every test drives ``call_flow`` the way the driver does: each ``Send`` is answered with a scripted
reply, each ``Wait`` moves the fake clock. What the engine asked for (the steps) and what it
concluded (the outcome) are then compared with the rules: retries per status and header form,
the fallback chain over connections and models, the quality gate, the budget and the deadline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from airflow_llm_async.core.breaker import Skip
from airflow_llm_async.core.budget import BudgetConfig
from airflow_llm_async.core.engine import Answer, Clock, NoAnswer, Send, Wait, call_flow
from airflow_llm_async.core.outcome import CallSpec, Outcome
from airflow_llm_async.core.pricing import Price
from airflow_llm_async.core.protocol import Endpoint
from airflow_llm_async.core.quality import QualitySpec
from airflow_llm_async.core.tokens import completion_budget, estimate_prompt_tokens

START = 1_700_000_000.0
REQUEST = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
PRICES = {"m1": Price(1.0, 2.0), "m2": Price(0.5, 1.0)}
LONG = "a long enough answer, well past the article's fifty characters minimum"


def endpoint(conn_id: str = "c1", **fields) -> Endpoint:
    fields.setdefault("prices", PRICES)
    fields.setdefault("api_key", "sk-test")
    return Endpoint(conn_id=conn_id, timeout=30.0, **fields)


def answer(text: str = LONG, model: str = "", status: int = 200, usage=(10, 20), **headers) -> Answer:
    body = {
        "model": model,
        "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }
    return Answer(status, {k.replace("_", "-"): v for k, v in headers.items()}, json.dumps(body).encode())


def error(status: int, code: str | None = None, **headers) -> Answer:
    body = {"error": {"message": f"status {status}", "type": "x", "code": code}}
    return Answer(status, {k.replace("_", "-"): v for k, v in headers.items()}, json.dumps(body).encode())


@dataclass
class Run:
    """What a driven flow did: the steps it asked for, and its outcome."""

    steps: list = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def sends(self) -> list[tuple[str, str]]:
        return [(s.endpoint.conn_id, s.model) for s in self.steps if isinstance(s, Send)]

    @property
    def waits(self) -> list[float]:
        return [s.seconds for s in self.steps if isinstance(s, Wait)]

    @property
    def results(self) -> list[tuple]:
        return [(a.model, a.status, a.result) for a in self.outcome.attempts]


class FakeClock:
    def __init__(self) -> None:
        self.wall, self.mono = START, 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def clock(self) -> Clock:
        return Clock(now=lambda: self.wall, monotonic=lambda: self.mono)


def drive(
    spec: CallSpec,
    replies: Sequence[object] | Callable[[Send], object],
    endpoints: dict[str, Endpoint] | None = None,
    *,
    latency: float = 0.5,
    clock: FakeClock | None = None,
    rand: float = 0.5,
    on_wait: Callable[[Wait], object] | None = None,
) -> Run:
    """Answer the n-th Send with ``replies[n]`` (or ``replies(send)``); each reply takes ``latency``.

    A Wait is answered with None, or with ``on_wait(wait)`` when that is given and not None
    (without the clock moving: the driver did not sleep).
    """
    clock = clock or FakeClock()
    endpoints = endpoints or {c: endpoint(c) for c, _ in spec.chain}
    flow = call_flow(spec, endpoints, clock=clock.clock(), rand=lambda: rand, host="h", pid=1)
    run, reply, sent = Run(), None, 0
    try:
        while True:
            step = flow.send(reply)
            run.steps.append(step)
            assert len(run.steps) < 100, "the flow does not end"
            if isinstance(step, Wait):
                reply = on_wait(step) if on_wait is not None else None
                if reply is None:
                    clock.advance(step.seconds)
            else:
                reply = replies(step) if callable(replies) else replies[sent]
                sent += 1
                clock.advance(latency)
    except StopIteration as done:
        run.outcome = done.value
    return run


def spec(models=("m1",), conns=("c1",), **options) -> CallSpec:
    return CallSpec.of(REQUEST, list(conns), list(models), **options)


# ---- success and the chain ----------------------------------------------------------------------


def test_a_first_answer_ends_the_call_with_its_details_and_cost():
    run = drive(spec(), [answer(model="m1-2024-01-01", usage=(1000, 500))])
    outcome = run.outcome
    assert run.sends == [("c1", "m1")] and run.waits == []
    assert (outcome.status, outcome.text, outcome.model, outcome.requested_model) == (
        "success", LONG, "m1-2024-01-01", "m1")  # fmt: skip
    assert outcome.usage == {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    assert outcome.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert run.results == [("m1", 200, "ok")] and outcome.attempts[0].latency_s == 0.5
    assert (outcome.latency_s, outcome.started_at, outcome.finished_at) == (0.5, START, START + 0.5)
    assert (outcome.host, outcome.pid, outcome.fallback_used) == ("h", 1, False)


def test_the_request_body_carries_the_model_of_each_link():
    run = drive(spec(models=("m1", "m2")), [error(404), answer()])
    bodies = [json.loads(s.body) for s in run.steps if isinstance(s, Send)]
    assert [b["model"] for b in bodies] == ["m1", "m2"]
    assert all(b["messages"] == REQUEST["messages"] and b["max_tokens"] == 100 for b in bodies)


def test_the_chain_is_every_model_on_each_connection_in_turn():
    run = drive(spec(models=("m1", "m2"), conns=("c1", "c2"), max_retries=0), lambda s: error(503))
    assert run.sends == [("c1", "m1"), ("c1", "m2"), ("c2", "m1"), ("c2", "m2")]
    assert run.outcome.error.kind == "server" and run.waits == []


@pytest.mark.parametrize("position", range(4))
def test_the_first_link_that_answers_ends_the_call_wherever_it_is_in_the_chain(position):
    chain = [("c1", "m1"), ("c1", "m2"), ("c2", "m1"), ("c2", "m2")]
    run = drive(
        spec(models=("m1", "m2"), conns=("c1", "c2"), max_retries=0), [error(500)] * position + [answer()]
    )
    assert run.sends == chain[: position + 1]
    assert (run.outcome.conn_id, run.outcome.requested_model) == chain[position]
    assert run.outcome.fallback_used is (position > 0)


def test_a_fallback_answer_says_so():
    run = drive(spec(models=("m1", "m2"), max_retries=0), [error(500), answer()])
    assert run.outcome.ok and run.outcome.fallback_used and run.outcome.requested_model == "m2"
    assert run.results == [("m1", 500, "error"), ("m2", 200, "ok")]


def test_a_chain_link_without_a_model_takes_the_connections_default():
    endpoints = {"c1": endpoint(default_model="m2")}
    assert drive(spec(models=(None,)), [answer()], endpoints).sends == [("c1", "m2")]


def test_no_model_anywhere_fails_before_anything_is_sent():
    run = drive(spec(models=(None,)), [], {"c1": endpoint()})
    assert run.steps == [] and run.outcome.error.kind == "config"
    assert "default_model" in run.outcome.error.message


# ---- retries: every status, every header form ---------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 520])
def test_retryable_statuses_are_retried_on_the_same_model_after_a_backoff(status):
    run = drive(spec(max_retries=2), [error(status), error(status), answer()], rand=0.5)
    assert run.sends == [("c1", "m1")] * 3 and run.outcome.ok
    assert run.waits == [0.25, 0.5]  # full jitter (0.5) under 0.5 s, then 1 s


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_move_down_the_chain_at_once(status):
    run = drive(spec(models=("m1", "m2"), max_retries=5), [error(status), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m2")] and run.waits == []
    assert run.outcome.attempts[0].reason["kind"] == "client"


def test_retries_exhausted_move_to_the_next_model():
    run = drive(spec(models=("m1", "m2"), max_retries=1), [error(503), error(503), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m1"), ("c1", "m2")] and run.outcome.fallback_used


def test_the_connections_max_retries_applies_when_the_call_sets_none():
    endpoints = {"c1": endpoint(max_retries=0)}
    assert drive(spec(), [error(503)], endpoints).sends == [("c1", "m1")]


@pytest.mark.parametrize(
    ("headers", "waited"),
    [
        ({"retry_after_ms": "1500"}, 1.5),
        ({"retry_after": "3"}, 3.0),
        ({"retry_after": "Tue, 14 Nov 2023 22:13:40 GMT"}, 20.0),  # START + 20 s as an HTTP date
        ({"retry_after": "0"}, 0.25),  # 0: our own back-off, as openai-python does
        ({"retry_after": "later"}, 0.25),
    ],
)
def test_the_servers_retry_after_is_honoured_in_every_form(headers, waited):
    run = drive(spec(), [error(429, **headers), answer()], latency=0.0)
    assert run.waits == [pytest.approx(waited)]


def test_a_retry_after_beyond_the_cap_moves_down_the_chain_instead_of_waiting():
    run = drive(spec(models=("m1", "m2")), [error(429, retry_after="600"), answer()])
    assert run.waits == [] and run.sends == [("c1", "m1"), ("c1", "m2")]


def test_x_should_retry_overrides_the_status_both_ways():
    run = drive(spec(models=("m1", "m2")), [error(400, x_should_retry="true"), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m1")]
    run = drive(spec(models=("m1", "m2")), [error(503, x_should_retry="false"), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m2")] and run.waits == []


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (NoAnswer("timeout"), "timeout"),
        (NoAnswer("connection", "ClientConnectorError: refused"), "connection"),
        (Answer(200, {}, b"<html>"), "invalid_response"),
        (Answer(200, {}, b'{"choices": []}'), "invalid_response"),
    ],
)
def test_no_usable_answer_is_retried(reply, kind):
    run = drive(spec(max_retries=1), [reply, answer()])
    assert run.outcome.ok and run.outcome.attempts[0].reason["kind"] == kind
    if kind == "connection":
        assert run.outcome.attempts[0].reason["message"].startswith("cannot reach https://api.openai.com/v1:")


def test_every_failure_is_reported_with_its_last_error_and_all_attempts():
    run = drive(spec(models=("m1", "m2"), max_retries=1), lambda s: error(503))
    outcome = run.outcome
    assert not outcome.ok and outcome.error.kind == "server" and outcome.error.status == 503
    assert run.results == [("m1", 503, "error")] * 2 + [("m2", 503, "error")] * 2
    assert outcome.cost_usd == 0.0  # no answer, no usage
    assert "m1@c1: error; m1@c1: error; m2@c1: error; m2@c1: error" in outcome.describe()


# ---- quality gate ---------------------------------------------------------------------------------


def test_an_answer_failing_quality_is_asked_again_then_the_chain_moves_on():
    rules = QualitySpec(min_chars=50)
    run = drive(
        spec(models=("m1", "m2"), quality=rules, quality_retries=1), [answer("short")] * 2 + [answer()]
    )
    assert run.sends == [("c1", "m1"), ("c1", "m1"), ("c1", "m2")] and run.waits == []
    assert run.results == [("m1", 200, "quality_failed")] * 2 + [("m2", 200, "ok")]
    assert run.outcome.cost_usd == pytest.approx((2 * (10 * 1.0 + 20 * 2.0) + (10 * 0.5 + 20 * 1.0)) / 1e6)


def test_every_answer_failing_quality_fails_the_call_or_returns_the_last_one():
    rules = QualitySpec(refusal_markers=("抱歉",))
    failing = drive(spec(quality=rules), [answer("抱歉, I cannot")])
    assert failing.outcome.error.kind == "quality" and "refusal_markers" in failing.outcome.error.message
    returned = drive(spec(models=("m1", "m2"), quality=rules, on_quality_failure="return"),
                     [answer("抱歉 1"), error(503)] + [error(503)] * 2)  # fmt: skip
    assert returned.outcome.ok and returned.outcome.text == "抱歉 1"
    assert returned.outcome.requested_model == "m1" and not returned.outcome.fallback_used
    assert returned.outcome.quality_failures[0]["rule"] == "refusal_markers"


# ---- budget -----------------------------------------------------------------------------------------


def test_an_attempt_whose_worst_case_passes_the_budget_is_not_sent_and_the_chain_moves_on():
    # worst case of m1: ~7 prompt tokens at $1/M + 100 max_tokens at $2/M = $0.000207; m2 costs half
    run = drive(spec(models=("m1", "m2"), max_cost_usd=0.00015), [answer()])
    assert run.sends == [("c1", "m2")] and run.outcome.ok
    refused = run.outcome.attempts[0]
    assert (refused.model, refused.status, refused.reason["kind"]) == ("m1", None, "budget")


def test_spending_counts_against_the_budget_of_later_attempts():
    # the first answer costs $0.00013 and fails quality; asking again would risk $0.000207 more
    rules = QualitySpec(min_chars=50)
    run = drive(spec(max_cost_usd=0.00025, quality=rules, quality_retries=3), [answer("x", usage=(10, 60))])
    assert len(run.sends) == 1 and run.outcome.error.kind == "budget"
    assert [a.result for a in run.outcome.attempts] == ["quality_failed", "error"]
    assert run.outcome.cost_usd == pytest.approx(0.00013)


def test_a_budget_with_no_known_price_refuses_with_the_fix():
    run = drive(spec(models=("gpt-unknown",), max_cost_usd=1.0), [])
    assert run.steps == [] and run.outcome.error.kind == "budget"
    assert '"prices": {"gpt-unknown"' in run.outcome.error.message


def test_a_connection_budget_gets_each_attempts_worst_case_and_its_real_cost():
    budgeted = {"c1": endpoint("c1", budget_usd=BudgetConfig(5.0))}
    run = drive(spec(), [error(500), answer(usage=(10, 20))], budgeted, on_wait=lambda wait: None)
    worst = PRICES["m1"].cost(estimate_prompt_tokens(REQUEST), completion_budget(REQUEST))
    assert [s.worst_cost_usd for s in run.steps if isinstance(s, Send)] == [pytest.approx(worst)] * 2
    # The driver settles each reservation to what its attempt cost: nothing, then the answer's price.
    assert [a.cost_usd for a in run.outcome.attempts] == [0.0, pytest.approx(PRICES["m1"].cost(10, 20))]
    # Without a connection budget nothing is reserved.
    assert drive(spec(), [answer()]).steps[0].worst_cost_usd is None


def test_a_connection_budget_refusal_moves_to_the_next_link_and_is_not_retried():
    endpoints = {"c1": endpoint("c1", budget_usd=BudgetConfig(1.0)), "c2": endpoint("c2")}
    refusal = NoAnswer("budget", "the LLM connection 'c1' budget_usd of $1 per day (UTC) would be exceeded")
    run = drive(spec(conns=("c1", "c2")), [refusal, answer()], endpoints)
    assert run.sends == [("c1", "m1"), ("c2", "m1")] and run.waits == [] and run.outcome.ok
    refused = run.outcome.attempts[0]
    assert (refused.status, refused.reason["kind"]) == (None, "budget")
    assert "budget_usd of $1 per day" in refused.reason["message"]
    alone = drive(spec(), [refusal], {"c1": endpoints["c1"]})
    assert alone.outcome.error.kind == "budget" and len(alone.sends) == 1


def test_a_connection_budget_refuses_an_unpriced_model_before_sending():
    budgeted = {"c1": endpoint("c1", budget_usd=BudgetConfig(1.0, "month"))}
    run = drive(spec(models=("gpt-unknown",)), [], budgeted)
    assert run.steps == [] and run.outcome.error.kind == "budget"
    assert "'c1' connection has budget_usd of $1 per month (UTC)" in run.outcome.error.message
    assert '"prices": {"gpt-unknown"' in run.outcome.error.message


def test_an_unusable_answer_that_was_billed_counts_in_the_cost_and_the_budget():
    tools = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather"}}]}
    body = {
        "model": "m1",
        "choices": [{"message": tools, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    }
    billed = Answer(200, {}, json.dumps(body).encode())
    run = drive(spec(max_retries=0, max_cost_usd=1.0), [billed])
    assert run.outcome.error.kind == "invalid_response"
    assert run.outcome.cost_usd == pytest.approx(PRICES["m1"].cost(10, 20))
    assert run.outcome.attempts[0].cost_usd == pytest.approx(PRICES["m1"].cost(10, 20))


def test_a_model_without_a_price_makes_the_total_unknown():
    assert drive(spec(models=("gpt-unknown",)), [answer()]).outcome.cost_usd is None


# ---- rate-limit storms: 429s waited out within the connection's patience ------------------------------


def storm(until: float, clock: FakeClock, **headers) -> Callable[[Send], Answer]:
    """429 (retry-after-ms 300 unless ``headers`` say otherwise) until the fake clock reaches ``until``."""
    headers = headers or {"retry_after_ms": "300"}
    return lambda send: error(429, **headers) if clock.wall < until else answer()


def test_a_60_s_storm_of_429s_is_outlasted_with_the_default_settings():
    clock = FakeClock()
    run = drive(spec(), storm(START + 60, clock), clock=clock)  # max_retries 2, patience 120 s
    assert run.outcome.ok and len(run.sends) > 3
    refused = [a for a in run.outcome.attempts if a.status == 429]
    assert len(refused) == len(run.sends) - 1 and len(run.waits) == len(refused)
    # Never sooner than the server asked; ever sparser as the storm goes on, up to the back-off's cap
    # (8 s, full jitter: 4 s at rand 0.5): 60 s of storm cost 17 refusals, not 60 / 0.8 = 75 (the
    # server's 300 ms and a 0.5 s round trip each time).
    assert min(run.waits) >= 0.3 and run.waits == sorted(run.waits)
    assert run.waits[:5] == [0.3, 0.5, 1.0, 2.0, 4.0] and max(run.waits) == 4.0
    assert len(refused) == 17


def test_the_call_deadline_ends_a_storm_before_the_patience_does():
    clock = FakeClock()
    run = drive(spec(deadline=START + 30), storm(START + 60, clock), clock=clock)
    assert run.outcome.error.kind == "deadline" and "HTTP 429" in run.outcome.error.message
    assert clock.wall < START + 30  # no wait was started that would end past the deadline


def test_a_storm_longer_than_the_patience_fails_with_the_extra_to_raise():
    clock = FakeClock()
    endpoints = {"c1": endpoint(rate_limit_patience_s=10)}
    run = drive(spec(), storm(START + 600, clock), endpoints, clock=clock)
    error = run.outcome.error
    assert (error.kind, error.status) == ("rate_limit", 429)
    assert "rate_limit_patience_s of 10 s" in error.message and "raise the connection's" in error.message
    # The first 429 came back 0.5 s in; the last retry went out within the 10 s after it.
    assert clock.wall - 0.5 <= START + 0.5 + 10


def test_other_retryable_errors_keep_their_count_during_and_after_a_storm():
    run = drive(spec(), lambda send: error(500))
    assert len(run.sends) == 3 and run.outcome.error.status == 500  # the default max_retries: 2
    replies = [error(429, retry_after_ms="300")] * 5 + [error(503)] * 3 + [answer()]
    run = drive(spec(), replies)
    assert not run.outcome.ok and len(run.sends) == 8  # five 429s waited out, then 503: 2 retries


def test_patience_0_counts_429s_as_retries_as_before():
    clock = FakeClock()
    endpoints = {"c1": endpoint(rate_limit_patience_s=0)}
    run = drive(spec(), storm(START + 60, clock), endpoints, clock=clock)
    assert len(run.sends) == 3 and run.outcome.error.kind == "rate_limit"
    assert run.waits == [0.3, 0.3]  # retry-after-ms, exactly, as openai-python waits
    assert "rate_limit_patience_s" not in run.outcome.error.message


def test_a_call_with_max_retries_0_still_waits_a_storm_out_on_its_last_model():
    clock = FakeClock()
    run = drive(spec(max_retries=0), storm(START + 20, clock), clock=clock)
    assert run.outcome.ok and len(run.sends) > 3


def test_a_link_with_a_fallback_after_it_hands_over_after_its_count():
    clock = FakeClock()
    run = drive(
        spec(models=("m1", "m2")),
        lambda send: (
            error(429, retry_after_ms="300") if send.model == "m1" or clock.wall < START + 20 else answer()
        ),
        clock=clock,
    )
    assert run.sends[:4] == [("c1", "m1")] * 3 + [("c1", "m2")]
    assert run.outcome.ok and run.outcome.requested_model == "m2" and len(run.sends) > 5


def test_an_exhausted_quota_is_counted_not_waited_out():
    run = drive(spec(), lambda send: error(429, code="insufficient_quota"))
    assert len(run.sends) == 3 and run.outcome.error.code == "insufficient_quota"


# ---- deadline ---------------------------------------------------------------------------------------


def test_an_attempt_near_the_deadline_gets_only_the_time_left():
    run = drive(spec(deadline=START + 10), [answer()])
    assert run.steps[0].timeout == 10.0 and run.steps[0].deadline == START + 10


def test_a_timeout_cut_short_by_the_deadline_is_a_deadline_error_not_retried():
    run = drive(spec(deadline=START + 10, max_retries=5), [NoAnswer("timeout")], latency=10)
    assert run.outcome.error.kind == "deadline" and len(run.sends) == 1


def test_a_back_off_that_would_pass_the_deadline_ends_the_call_at_once():
    run = drive(spec(deadline=START + 2, max_retries=5), [error(429, retry_after="5")], latency=0.1)
    assert run.waits == [] and run.outcome.error.kind == "deadline"
    assert "HTTP 429" in run.outcome.error.message


def test_a_deadline_passed_while_waiting_for_the_limits_is_reported_as_such():
    run = drive(spec(deadline=START + 5), [NoAnswer("limits")])
    assert run.outcome.error.kind == "deadline" and "rate limits" in run.outcome.error.message


def test_a_deadline_already_past_sends_nothing():
    run = drive(spec(deadline=START - 1), [])
    assert run.steps == [] and run.outcome.error.kind == "deadline"


# ---- the outcome as JSON --------------------------------------------------------------------------------


def test_outcomes_round_trip_through_json():
    for run in (drive(spec(models=("m1", "m2"), max_retries=0), [error(503), answer()]),
                drive(spec(max_retries=0), [error(404, code="model_not_found")])):  # fmt: skip
        payload = json.loads(json.dumps(run.outcome.to_json()))
        assert Outcome.from_json(payload).to_json() == payload


def test_a_spec_round_trips_through_json():
    original = spec(models=("m1", None), conns=("c1", "c2"), deadline=START, max_retries=1,
                    quality=QualitySpec(min_chars=3), quality_retries=2, on_quality_failure="return",
                    max_cost_usd=0.5)  # fmt: skip
    assert CallSpec.from_json(json.loads(json.dumps(original.to_json()))) == original


class Recorder:
    """An observer that writes down what the engine reports (the driver passes ``metrics``)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def attempt(self, conn_id, model, latency_s, error_kind):
        self.events.append(("attempt", model, error_kind))

    def count(self, name, conn_id, model):
        self.events.append((name, model))

    def error(self, conn_id, model, kind):
        self.events.append(("error", model, kind))

    def usage(self, conn_id, model, usage, cost):
        self.events.append(("usage", model, usage["total_tokens"]))

    def call(self, conn_id, model, latency_s, succeeded):
        self.events.append(("call", model, succeeded))


def test_the_observer_hears_every_attempt_retry_fallback_and_the_end():
    recorder = Recorder()
    flow = call_flow(
        spec(models=("m1", "m2"), max_retries=1), {"c1": endpoint()}, observer=recorder, rand=lambda: 0
    )
    replies = iter([error(503), error(503), answer()])
    step = next(flow)
    with pytest.raises(StopIteration):
        while True:
            step = flow.send(next(replies) if isinstance(step, Send) else None)
    assert recorder.events == [
        ("attempt", "m1", "server"),
        ("retries", "m1"),
        ("attempt", "m1", "server"),
        ("fallbacks", "m1"),
        ("attempt", "m2", None),
        ("usage", "m2", 30),
        ("call", "m2", True),
    ]


def test_a_redirect_moves_down_the_chain_without_following_it():
    run = drive(spec(models=("m1", "m2")), [Answer(307, {"location": "http://other/v1"}), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m2")] and run.waits == []
    assert "redirects to 'http://other/v1'" in run.outcome.attempts[0].reason["message"]


def test_an_answer_too_large_to_read_is_an_invalid_response_naming_the_extra():
    endpoints = {"c1": endpoint(max_response_bytes=1000)}
    run = drive(spec(max_retries=0), [NoAnswer("too_large", "Content-Length 5000")], endpoints)
    error = run.outcome.error
    assert error.kind == "invalid_response" and "Content-Length 5000" in error.message
    assert "max_response_bytes=1000" in error.message


def test_what_an_echoing_server_sends_back_reaches_the_outcome_redacted():
    key = "sk-live-0123456789abcdef"
    endpoints = {"c1": endpoint(api_key=key, headers={"api-key": "gateway-secret"})}
    echo = Answer(500, {}, f"Authorization: Bearer {key}; api-key: gateway-secret".encode())
    replies = [echo, NoAnswer("connection", f"reset ({key})")] * 2
    run = drive(spec(models=("m1", "m2"), max_retries=1), replies, endpoints)
    stored = json.dumps(run.outcome.to_json())
    assert len(run.outcome.attempts) == 4 and run.outcome.status == "error"
    assert key[:8] not in stored and "gateway-secret" not in stored
    assert stored.count("***") == 7  # twice per echo, once per connection error, once in the error


# ---- usage details (issue 12, item 5) ---------------------------------------------------------------


def detailed_answer(cached: int, reasoning: int, usage=(1000, 500), model: str = "") -> Answer:
    body = json.loads(answer(model=model, usage=usage).body)
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
    body["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    body["system_fingerprint"] = "fp_1"
    return Answer(200, {}, json.dumps(body).encode())


def test_the_answers_usage_details_and_fingerprint_reach_llm_meta_and_survive_the_event():
    outcome = drive(spec(), [detailed_answer(cached=768, reasoning=128)]).outcome
    meta = outcome.meta()
    assert meta["usage"] == {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    assert meta["usage_details"] == {"cached_tokens": 768, "reasoning_tokens": 128}
    assert meta["system_fingerprint"] == "fp_1"
    assert Outcome.from_json(json.loads(json.dumps(outcome.to_json()))).meta() == meta


def test_an_older_event_without_usage_details_still_reads():
    payload = drive(spec(), [answer()]).outcome.to_json()
    del payload["meta"]["usage_details"], payload["meta"]["system_fingerprint"]
    outcome = Outcome.from_json(payload)
    assert (outcome.usage_details, outcome.system_fingerprint) == ({}, None)
    assert outcome.meta()["usage_details"] == {}


# ---- cost of unpriced models (issue 12, item 5) ------------------------------------------------------


def test_a_failed_attempt_without_an_answer_on_an_unpriced_model_leaves_the_cost_known():
    run = drive(spec(models=("gpt-unknown", "m1"), max_retries=0), [error(503), answer(usage=(1000, 500))])
    assert run.results == [("gpt-unknown", 503, "error"), ("m1", 200, "ok")]
    assert run.outcome.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    failed = drive(spec(models=("gpt-unknown",), max_retries=1), [error(503), error(500)]).outcome
    assert (failed.status, failed.cost_usd) == ("error", 0.0)


def test_only_an_answer_with_usage_on_an_unpriced_model_makes_the_total_unknown():
    run = drive(
        spec(models=("gpt-unknown", "m1"), quality=QualitySpec(min_chars=50)), [answer("short"), answer()]
    )
    assert run.results == [("gpt-unknown", 200, "quality_failed"), ("m1", 200, "ok")]
    assert run.outcome.cost_usd is None  # the unpriced answer was paid for, at an unknown price
    free = drive(spec(models=("gpt-unknown",)), [answer(usage=(0, 0))]).outcome
    assert free.cost_usd == 0.0  # no tokens cost nothing at any price


def test_cached_prompt_tokens_are_priced_at_the_cached_input_price():
    prices = {"m1": Price(1.0, 2.0, cached_input=0.25)}
    run = drive(spec(), [detailed_answer(cached=768, reasoning=0)], {"c1": endpoint(prices=prices)})
    assert run.outcome.cost_usd == pytest.approx(((1000 - 768) * 1.0 + 768 * 0.25 + 500 * 2.0) / 1e6)
    uncached = drive(spec(), [detailed_answer(cached=768, reasoning=0)])  # m1 without a cached price
    assert uncached.outcome.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)


def test_the_cost_a_gateway_reports_wins_over_the_price_table():
    run = drive(spec(), [answer(usage=(1000, 500), x_litellm_response_cost="0.00042")])
    assert run.outcome.cost_usd == pytest.approx(0.00042)
    unpriced = drive(spec(models=("gpt-unknown",)), [answer(x_litellm_response_cost="0.001")])
    assert unpriced.outcome.cost_usd == pytest.approx(0.001)  # known although the table has no price
    dropped = drive(spec(), [answer(usage=(1000, 500), x_litellm_response_cost="None")])
    assert dropped.outcome.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)


# ---- circuit breaker ------------------------------------------------------------------------------


def circuit_open(probe_in: float = 20.0) -> NoAnswer:
    return NoAnswer("circuit_open", circuit=Skip(5, "HTTP 503", START + probe_in))


def test_an_open_circuit_moves_down_the_chain_at_once_and_is_recorded_as_not_sent():
    run = drive(spec(models=("m1", "m2")), [circuit_open(), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m2")] and run.waits == [] and run.outcome.ok
    skipped = run.outcome.attempts[0]
    assert (skipped.model, skipped.status, skipped.result, skipped.reason["kind"]) == (
        "m1", None, "error", "circuit_open"
    )  # fmt: skip
    assert run.outcome.fallback_used


def test_a_circuit_that_opens_during_a_retrys_back_off_ends_the_link_without_waiting():
    waits = []

    def on_wait(wait: Wait) -> object:
        waits.append((wait.endpoint.conn_id, wait.model))
        return circuit_open()

    run = drive(spec(models=("m1", "m2"), max_retries=2), [error(503), answer()], on_wait=on_wait)
    assert run.sends == [("c1", "m1"), ("c1", "m2")] and run.outcome.ok
    assert waits == [("c1", "m1")]  # the back-off names its link, so the driver can answer it
    assert [a.reason and a.reason["kind"] for a in run.outcome.attempts] == ["server", "circuit_open", None]


def test_with_no_fallback_left_an_open_circuit_fails_fast_naming_connection_model_failures_and_probe():
    run = drive(spec(models=("m1",), conns=("c1",)), [circuit_open(probe_in=20.0)])
    error_ = run.outcome.error
    assert run.waits == [] and error_.kind == "circuit_open" and not error_.retryable
    assert "m1 on 'c1'" in error_.message and "5 consecutive failures (last: HTTP 503)" in error_.message
    assert "(in 20 s)" in error_.message and "22:13:40 UTC" in error_.message  # START + 20 s
    assert 'circuit_open="wait"' in error_.message and '"circuit_breaker": false' in error_.message


def test_circuit_open_wait_waits_for_the_probe_on_the_last_link_then_sends_again():
    run = drive(spec(circuit_open="wait"), [circuit_open(probe_in=20.0), answer()], latency=0.0)
    assert run.sends == [("c1", "m1"), ("c1", "m1")] and run.waits == [20.0] and run.outcome.ok
    assert run.outcome.attempts[0].reason["kind"] == "circuit_open"


def test_circuit_open_wait_still_takes_a_fallback_first():
    run = drive(spec(models=("m1", "m2"), circuit_open="wait"), [circuit_open(), answer()])
    assert run.sends == [("c1", "m1"), ("c1", "m2")] and run.waits == []


def test_circuit_open_wait_fails_at_once_when_the_probe_comes_after_the_deadline():
    run = drive(spec(circuit_open="wait", deadline=START + 10), [circuit_open(probe_in=20.0)], latency=0.0)
    assert run.waits == [] and run.outcome.error.kind == "deadline"
    assert "circuit breaker" in run.outcome.error.message


def test_a_skip_is_reported_to_the_observer_as_a_refusal_not_an_attempt():
    recorder = Recorder()
    flow = call_flow(spec(models=("m1", "m2")), {"c1": endpoint()}, observer=recorder)
    next(flow)
    flow.send(circuit_open())
    assert ("error", "m1", "circuit_open") in recorder.events
    assert not [e for e in recorder.events if e[0] == "attempt"]


def test_circuit_open_round_trips_in_the_spec_and_a_bad_value_is_refused():
    waiting = spec(circuit_open="wait")
    assert CallSpec.from_json(waiting.to_json()) == waiting
    assert "circuit_open" not in spec().to_json()  # kwargs of a call without it stay as they were
    with pytest.raises(ValueError, match="circuit_open must be one of"):
        CallSpec.from_json({**spec().to_json(), "circuit_open": "retry"})
