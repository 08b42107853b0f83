"""The circuit breaker's policy (core/breaker.py), on a fake clock: every state and every transition.

Closed -> open after N consecutive retryable failures within the window; open -> half-open after the
cool-down, where exactly one call goes out as the probe; its success closes, its failure re-opens.
"""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from airflow_llm_async.core import breaker
from airflow_llm_async.core.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    PROBE,
    SEND,
    BreakerConfig,
    Skip,
    State,
    admit,
    peek,
    record,
    release,
    trials,
    verdict,
)

CONFIG = BreakerConfig(failures=3, window_s=10.0, cooldown_s=30.0)
LEASE = 20.0


def fail(
    state: State, now: float, *, probe: bool = False, error: str = "HTTP 503"
) -> tuple[State, str | None]:
    return record(state, CONFIG, now, True, error, probe=probe)


def succeed(state: State, now: float, *, probe: bool = False) -> tuple[State, str | None]:
    return record(state, CONFIG, now, False, probe=probe)


def opened_at(now: float) -> State:
    state = State()
    for t in (now - 2, now - 1, now):
        state, change = fail(state, t)
    assert change == "opened"
    return state


def test_the_defaults_are_those_the_issue_names():
    assert breaker.DEFAULT.to_dict() == {"failures": 5, "window_s": 30.0, "cooldown_s": 30.0}


def test_a_new_breaker_is_closed_and_lets_every_call_go():
    assert State().status(0.0) == CLOSED
    assert admit(State(), CONFIG, 0.0, LEASE) == (SEND, State())
    assert peek(State(), CONFIG, 0.0) is None


def test_it_opens_on_the_nth_consecutive_failure_within_the_window():
    state = State()
    state, change = fail(state, 100.0)
    assert (state.status(100.0), change) == (CLOSED, None)
    state, change = fail(state, 101.0)
    assert (state.status(101.0), change) == (CLOSED, None)
    state, change = fail(state, 102.0, error="timeout")
    assert (state.status(102.0), change) == (OPEN, "opened")
    assert state.open_until == 132.0 and state.opened == 1 and state.last_error == "timeout"


def test_a_success_between_failures_starts_the_count_again():
    state, _ = fail(State(), 100.0)
    state, _ = fail(state, 101.0)
    state, change = succeed(state, 101.5)
    assert state.failures == () and change is None
    state, _ = fail(state, 102.0)
    state, change = fail(state, 103.0)
    assert state.status(103.0) == CLOSED and change is None


def test_failures_older_than_the_window_do_not_count():
    state, _ = fail(State(), 100.0)
    state, _ = fail(state, 105.0)
    state, change = fail(state, 110.5)  # the first is 10.5 s old: two within 10 s
    assert change is None and state.failures == (105.0, 110.5)
    state, change = fail(state, 112.0)
    assert change == "opened"


def test_a_failure_exactly_at_the_windows_edge_still_counts():
    state, _ = fail(State(), 100.0)
    state, _ = fail(state, 105.0)
    _, change = fail(state, 110.0)
    assert change == "opened"


def test_a_threshold_of_one_opens_on_the_first_failure():
    config = BreakerConfig(failures=1, window_s=1.0, cooldown_s=5.0)
    state, change = record(State(), config, 0.0, True, "HTTP 500")
    assert change == "opened" and state.open_until == 5.0 and state.failures == (0.0,)


def test_an_open_circuit_skips_every_call_until_the_cool_down_ends():
    state = opened_at(100.0)
    for now in (100.0, 115.0, 129.99):
        decision, after = admit(state, CONFIG, now, LEASE)
        assert decision == Skip(failures=3, last_error="HTTP 503", probe_at=130.0) and after == state
        assert peek(state, CONFIG, now) == decision


def test_after_the_cool_down_exactly_one_call_is_the_probe_and_the_others_skip():
    state = opened_at(100.0)
    assert state.status(130.0) == HALF_OPEN
    assert peek(state, CONFIG, 130.0) is None  # peeking does not take the probe
    decision, state = admit(state, CONFIG, 130.0, LEASE)
    assert decision == PROBE and state.probe_until == 150.0
    for now in (130.0, 131.0, 149.0):
        other, unchanged = admit(state, CONFIG, now, LEASE)
        assert isinstance(other, Skip) and unchanged == state
        # they look again within a tenth of the cool-down, or when the probe must have reported
        assert other.probe_at == min(150.0, now + 3.0)


def test_the_probes_success_closes_the_circuit_and_forgets_the_failures():
    _, state = admit(opened_at(100.0), CONFIG, 130.0, LEASE)
    state, change = succeed(state, 131.0, probe=True)
    assert change == "closed" and state == State(opened=1)
    assert admit(state, CONFIG, 131.0, LEASE)[0] == SEND


def test_the_probes_failure_opens_it_again_for_a_whole_cool_down():
    _, state = admit(opened_at(100.0), CONFIG, 130.0, LEASE)
    state, change = fail(state, 135.0, probe=True, error="connection")
    assert change == "opened" and state.status(135.0) == OPEN
    assert state.open_until == 165.0 and state.probe_until is None and state.last_error == "connection"
    assert state.opened == 1  # the same outage: counted once
    decision, _ = admit(state, CONFIG, 165.0, LEASE)
    assert decision == PROBE


def test_a_probe_that_never_reports_lets_another_go_once_its_lease_ends():
    _, state = admit(opened_at(100.0), CONFIG, 130.0, LEASE)
    assert isinstance(admit(state, CONFIG, 149.9, LEASE)[0], Skip)
    decision, state = admit(state, CONFIG, 150.0, LEASE)
    assert decision == PROBE and state.probe_until == 170.0


def test_a_released_probe_lets_the_next_call_probe_at_once():
    _, state = admit(opened_at(100.0), CONFIG, 130.0, LEASE)
    state = release(state)
    assert admit(state, CONFIG, 130.5, LEASE)[0] == PROBE
    assert release(State()) == State()


@pytest.mark.parametrize("failed", [True, False])
def test_late_results_of_calls_sent_before_it_opened_change_nothing(failed):
    state = opened_at(100.0)
    assert record(state, CONFIG, 101.0, failed, "HTTP 502") == (state, None)
    _, half_open = admit(state, CONFIG, 130.0, LEASE)
    assert record(half_open, CONFIG, 131.0, failed, "HTTP 502") == (half_open, None)


def test_a_success_on_a_closed_circuit_without_failures_keeps_the_same_state():
    state = State()
    assert succeed(state, 1.0) == (state, None)


def test_a_model_that_never_failed_is_never_capped_however_many_requests_are_in_flight():
    assert trials(State(), CONFIG, 0.0) is None
    assert admit(State(), CONFIG, 0.0, LEASE, in_flight=100_000) == (SEND, State())
    state, _ = succeed(fail(State(), 1.0)[0], 2.0)  # a success ends the doubt
    assert admit(state, CONFIG, 3.0, LEASE, in_flight=100_000)[0] == SEND


def test_in_doubt_only_the_requests_still_needed_to_open_it_may_be_in_flight():
    state, _ = fail(State(), 1.0)
    assert trials(state, CONFIG, 2.0) == CONFIG.failures - 1
    assert admit(state, CONFIG, 2.0, LEASE, in_flight=1)[0] == SEND
    decision, after = admit(state, CONFIG, 2.0, LEASE, in_flight=2)
    assert after == state and isinstance(decision, Skip) and decision.in_doubt
    assert (decision.failures, decision.last_error) == (1, "HTTP 503") and decision.probe_at > 2.0
    state, _ = fail(state, 2.0)
    assert trials(state, CONFIG, 3.0) == 1  # one more failure opens it: one trial at a time
    assert isinstance(admit(state, CONFIG, 3.0, LEASE, in_flight=1)[0], Skip)
    assert peek(state, CONFIG, 3.0) is None  # not open: nothing to skip before a call has queued


def test_the_doubt_ends_when_its_failures_leave_the_window():
    state, _ = fail(State(), 1.0)
    assert trials(state, CONFIG, 1.0 + CONFIG.window_s + 0.1) is None
    assert admit(state, CONFIG, 1.0 + CONFIG.window_s + 0.1, LEASE, in_flight=50)[0] == SEND


def test_a_dead_model_is_sent_at_most_its_threshold_after_its_first_failure_however_many_calls_come():
    """Calls arrive without end while results report one by one: the model sees ``failures`` requests
    from the first failure on (the requests in flight before it are the only others)."""
    state, now, in_flight, sent = fail(State(), 0.0)[0], 0.0, 0, 1
    while state.status(now) == CLOSED:
        now += 0.01
        decision, state = admit(state, CONFIG, now, LEASE, in_flight)
        if decision == SEND:
            in_flight, sent = in_flight + 1, sent + 1
        elif in_flight:  # a trial reports its failure
            state, _ = fail(state, now)
            in_flight -= 1
    assert sent == CONFIG.failures


# ---- a stall: requests out, none answered, no failure reported yet ---------------------------------


def test_a_stall_is_silence_past_twice_what_answers_took_lately_at_least_the_floor():
    assert breaker.stall_after(None, 60.0) == 30.0  # never answered here: half the timeout
    assert breaker.stall_after(0.3, 60.0) == breaker.STALL_FLOOR_S  # fast answers: the floor
    assert breaker.stall_after(8.0, 60.0) == 16.0  # twice what answers took
    assert breaker.stall_after(0.01, 1.0) == 0.5  # a timeout shorter than twice the floor: its half


def test_a_silent_model_with_enough_requests_out_is_in_doubt_and_says_how_long_it_has_been_silent():
    decision, after = admit(State(), CONFIG, 5.0, LEASE, in_flight=CONFIG.failures, silent_s=2.5)
    assert after == State() and isinstance(decision, Skip) and decision.in_doubt
    assert (decision.failures, decision.silent_s) == (0, 2.5)
    # Fewer out than failures needed to open it: they are the trials, the call goes.
    assert admit(State(), CONFIG, 5.0, LEASE, in_flight=CONFIG.failures - 1, silent_s=2.5)[0] == SEND


def test_once_a_failure_came_back_the_failures_decide_not_the_silence():
    state, _ = fail(State(), 1.0)
    decision, _ = admit(state, CONFIG, 2.0, LEASE, in_flight=CONFIG.failures - 1, silent_s=2.5)
    assert isinstance(decision, Skip) and decision.in_doubt and decision.silent_s == 0.0


class FakeTimer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def local_breaker(timer: FakeTimer):
    from airflow_llm_async.breakers import LocalBreaker

    return LocalBreaker("llm", "gpt-4", CONFIG, clock=timer, timer=timer)


async def test_requests_out_with_no_answer_for_half_the_timeout_put_a_model_never_answered_in_doubt():
    timer = FakeTimer()
    gate = local_breaker(timer)
    for _ in range(CONFIG.failures):
        gate.sent()
    timer.now += 4.9
    assert await gate.admit(LEASE + 5, 10.0) == SEND  # under half the 10 s timeout
    timer.now += 0.2
    decision = await gate.admit(LEASE + 5, 10.0)
    assert isinstance(decision, Skip) and decision.in_doubt and decision.silent_s == pytest.approx(5.1)
    assert gate.state == State()  # nothing remembered: no failure, and the first answer ends it


async def test_a_slow_model_that_answers_is_not_capped_and_its_first_answer_ends_the_doubt():
    timer = FakeTimer()
    gate = local_breaker(timer)
    sent = [gate.sent() for _ in range(CONFIG.failures)]
    timer.now += 6.0
    assert isinstance(await gate.admit(LEASE + 5, 10.0), Skip)
    gate.answered(sent[0])  # it was only slow: answered after 6 s
    gate.in_flight -= 1
    gate.sent()
    assert gate.typical_s == pytest.approx(6.0)
    timer.now += 11.0  # silent 11 s, under twice what its answer took
    assert await gate.admit(LEASE + 5, 60.0) == SEND
    timer.now += 1.1
    assert isinstance(await gate.admit(LEASE + 5, 60.0), Skip)


def test_what_answers_took_falls_back_slowly_after_a_slow_one():
    timer = FakeTimer()
    gate = local_breaker(timer)
    started = gate.sent()
    timer.now += 10.0
    gate.answered(started)
    for _ in range(5):  # fast answers bring it down 5 % each, never below themselves
        gate.answered(timer.now - 0.1)
    assert gate.typical_s == pytest.approx(10.0 * 0.95**5)


async def test_in_a_stall_a_call_with_a_fallback_skips_and_one_without_is_sent():
    from airflow_llm_async.breakers import through
    from airflow_llm_async.core.engine import Answer

    timer = FakeTimer()
    gate = local_breaker(timer)
    for _ in range(CONFIG.failures):
        gate.sent()
    timer.now += 6.0  # past half the 10 s timeout, nothing answered
    sent = []

    async def send():
        sent.append(1)
        return Answer(200)

    skipped = await through(gate, 10.0, send, fallback=True)
    assert skipped.kind == "circuit_open" and skipped.circuit.silent_s == pytest.approx(6.0) and not sent
    async with asyncio.timeout(1):  # nothing else to try: it goes at once, never held for the timeout
        answered = await through(gate, 10.0, send)
    assert answered.status == 200 and sent == [1]
    assert await gate.admit(LEASE + 5, 10.0) == SEND  # that answer ended the silence


def test_every_sequence_of_events_keeps_the_invariants():
    """All sequences of 7 events from {fail, succeed, admit, release} over a moving clock."""
    events = ("fail", "ok", "admit", "release")
    for sequence in itertools.product(events, repeat=7):
        state, now, probe_out, granted = State(), 0.0, False, 0.0
        for event in sequence:
            now += 6.0
            if event == "admit":
                decision, state = admit(state, CONFIG, now, LEASE, in_flight=3)
                if decision == PROBE:
                    assert (
                        not probe_out or now >= granted + LEASE
                    )  # one probe at a time, unless its lease ended
                    probe_out, granted = True, now
                if isinstance(decision, Skip):
                    assert decision.probe_at > now
                    assert (state.status(now) == CLOSED) == decision.in_doubt
                    assert not decision.in_doubt or trials(state, CONFIG, now) <= 3
            elif event == "release":
                state, probe_out = release(state), False
            else:
                status = state.status(now)
                state, change = record(state, CONFIG, now, event == "fail", "x", probe=probe_out)
                if change == "closed":
                    assert probe_out and status == HALF_OPEN and state.failures == ()
                if change == "opened":
                    assert event == "fail" and state.open_until == now + CONFIG.cooldown_s
                probe_out = False
            assert len(state.failures) <= CONFIG.failures
            assert (state.open_until is None) == (state.status(now) == CLOSED)


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (500, "server", True),
        (502, "server", True),
        (503, "server", True),
        (504, "server", True),
        (None, "timeout", True),
        (None, "connection", True),
        (200, None, False),
        (400, "client", False),
        (401, "client", False),
        (404, "client", False),
        (408, "server", False),  # a 4xx: the server is up
        (429, "rate_limit", False),  # the limiter's business
        (None, "limits", None),  # never sent
        (None, "too_large", None),
        (None, "circuit_open", None),
    ],
)
def test_only_5xx_timeouts_and_connection_errors_count_as_failures(status, kind, expected):
    assert verdict(status, kind) is expected


def test_a_stored_state_round_trips_and_garbage_reads_as_closed():
    state = opened_at(100.0)
    assert State.from_dict(state.to_dict()) == state
    for garbage in (None, "x", {"failures": "abc"}, {"open_until": "soon"}):
        assert State.from_dict(garbage) == State()


# ---- the operator argument circuit_open ------------------------------------------------------------


def test_the_operators_and_decorators_carry_circuit_open_into_the_call_spec():
    from airflow.sdk import DAG

    from airflow_llm_async.decorators.llm import llm_deferred_task, llm_fanout_task
    from airflow_llm_async.operators.fanout import LLMFanOutOperator
    from airflow_llm_async.operators.llm import LLMOperator

    assert LLMOperator(task_id="a", prompt="p").call_spec().circuit_open == "fail"
    assert LLMOperator(task_id="b", prompt="p", circuit_open="wait").call_spec().circuit_open == "wait"
    fan = LLMFanOutOperator(task_id="c", prompts=["x"], circuit_open="wait")
    assert fan.call_spec(with_messages=False).circuit_open == "wait"

    def ask() -> str:
        return "p"

    def ask_many() -> list[str]:
        return ["p"]

    with DAG("breaker_decorators", schedule=None):
        one = llm_deferred_task(circuit_open="wait")(ask)()
        many = llm_fanout_task(circuit_open="wait")(ask_many)()
    assert one.operator.circuit_open == many.operator.circuit_open == "wait"


def test_a_bad_circuit_open_is_refused_when_the_dag_is_parsed():
    from airflow_llm_async.operators.llm import LLMOperator

    with pytest.raises(ValueError, match=r"LLMOperator 'a': circuit_open must be one of \['fail', 'wait'\]"):
        LLMOperator(task_id="a", prompt="p", circuit_open="retry")


# ---- the connection extra circuit_breaker ----------------------------------------------------------


def endpoint_with(extra: dict):
    import json

    from airflow.sdk import Connection

    from airflow_llm_async.hooks.llm import endpoint_from_connection

    conn = Connection(conn_id="c", conn_type="llm", password="sk-test-key", extra=json.dumps(extra))
    return endpoint_from_connection(conn)


@pytest.mark.parametrize(
    ("extra", "config"),
    [
        ({}, breaker.DEFAULT),
        ({"circuit_breaker": {}}, breaker.DEFAULT),
        ({"circuit_breaker": True}, breaker.DEFAULT),
        ({"circuit_breaker": False}, None),
        ({"circuit_breaker": "false"}, None),  # a URI-form connection's extras are text
        ({"circuit_breaker": {"failures": 3}}, BreakerConfig(3, 30.0, 30.0)),
        (
            {"circuit_breaker": {"failures": "2", "window_s": 10, "cooldown_s": 0.5}},
            BreakerConfig(2, 10.0, 0.5),
        ),
    ],
)
def test_the_extra_is_on_by_default_and_takes_any_of_its_three_fields(extra, config):
    assert endpoint_with(extra).circuit_breaker == config


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            7,
            "extra 'circuit_breaker' must be false (off) or an object with any of ['failures', 'window_s', "
            '\'cooldown_s\'], e.g. {"failures": 5, "window_s": 30, "cooldown_s": 30}; got 7.',
        ),
        ({"failure": 5}, "must be false (off) or an object with any of"),
        ({"failures": 0}, "extra 'circuit_breaker' field 'failures' must be a positive integer, got 0"),
        ({"failures": 2.5}, "field 'failures' must be a positive integer, got 2.5"),
        ({"cooldown_s": -1}, "field 'cooldown_s' must be a positive number of seconds, got -1"),
        ({"window_s": "soon"}, "field 'window_s' must be a positive number of seconds, got 'soon'"),
    ],
)
def test_a_bad_extra_names_the_field_and_the_fix(value, message):
    from airflow_llm_async.hooks.llm import LLMConfigError

    with pytest.raises(LLMConfigError, match=re.escape(message)):
        endpoint_with({"circuit_breaker": value})
