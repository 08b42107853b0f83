"""driver._Pacer: answers that arrive together go on in slices, first come first served, none lost.

Driven turn by turn with a clock of the test's own: ``FakeLoop.time`` is set by the test, and a new
turn of the loop is the test calling the callback the pacer scheduled (``FakeLoop.run_soon``).
"""

from __future__ import annotations

import asyncio

import pytest

from airflow_llm_async import driver
from airflow_llm_async.driver import PACE_SLICE_S, _Pacer


class FakeLoop:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 0.0
        self.scheduled: list = []
        self._loop = loop

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future:
        return self._loop.create_future()

    def call_soon(self, callback) -> None:
        self.scheduled.append(callback)

    def run_soon(self) -> None:
        """The next turn of the loop: what the pacer scheduled runs."""
        callbacks, self.scheduled = self.scheduled, []
        for callback in callbacks:
            callback()


@pytest.fixture
def loop():
    real = asyncio.new_event_loop()
    yield FakeLoop(real)
    real.close()


def test_an_answer_alone_goes_on_at_once_every_turn(loop):
    pacer = _Pacer(loop)
    for turn in range(3):
        loop.now = turn * 1.0
        assert pacer.turn() is None
        loop.run_soon()
    assert loop.scheduled == []


def test_answers_past_the_slice_wait_for_later_turns_first_come_first_served(loop):
    pacer = _Pacer(loop)
    assert pacer.turn() is None  # the turn's first answer
    loop.now = PACE_SLICE_S / 2
    assert pacer.turn() is None  # within the slice: 2 went on
    loop.now = PACE_SLICE_S * 1.5
    waiters = [pacer.turn() for _ in range(7)]  # the slice is spent: they wait, in order
    assert all(isinstance(w, asyncio.Future) and not w.done() for w in waiters)

    loop.run_soon()  # next turn: as many as fitted (2)
    assert [w.done() for w in waiters] == [True] * 2 + [False] * 5
    late = pacer.turn()  # a newcomer queues behind those still waiting
    assert isinstance(late, asyncio.Future)

    loop.now += PACE_SLICE_S / 10  # that batch took less than the slice: the next one doubles (4)
    loop.run_soon()
    assert [w.done() for w in waiters] == [True] * 6 + [False] and not late.done()
    loop.now += PACE_SLICE_S / 10
    loop.run_soon()
    assert all(w.done() for w in waiters) and late.done()
    assert loop.scheduled == []  # the line is empty: nothing more scheduled


def test_a_batch_that_took_more_than_two_slices_halves_the_next(loop):
    pacer = _Pacer(loop)
    pacer.turn()
    for _ in range(7):  # 8 go on within the slice
        assert pacer.turn() is None
    loop.now = PACE_SLICE_S * 1.1
    waiters = [pacer.turn() for _ in range(20)]
    loop.run_soon()
    assert sum(w.done() for w in waiters) == 8
    loop.now += PACE_SLICE_S * 3  # too slow: half as many next time
    loop.run_soon()
    assert sum(w.done() for w in waiters) == 12


def test_a_cancelled_call_leaves_the_line_without_taking_a_place(loop):
    pacer = _Pacer(loop)
    pacer.turn()
    loop.now = PACE_SLICE_S * 2
    first, second = pacer.turn(), pacer.turn()
    first.cancel()  # the trigger was cancelled while its answer waited
    loop.run_soon()  # fit is 1: the place goes to the next live waiter
    assert second.done() and not second.cancelled()


async def test_the_pacer_is_one_per_event_loop():
    assert driver._pacer() is driver._pacer()
    other = await asyncio.to_thread(lambda: asyncio.run(_pacer_of_a_new_loop()))
    assert other is not driver._pacer()


async def _pacer_of_a_new_loop():
    return driver._pacer()


def test_the_heap_is_frozen_once_per_process_and_never_in_sync_mode(monkeypatch):
    frozen = []
    monkeypatch.setattr(driver.gc, "freeze", lambda: frozen.append(1))
    monkeypatch.setattr(driver, "_heap_frozen", False)

    async def first_calls():
        driver.freeze_heap()
        driver.freeze_heap()

    driver.run_sync(first_calls)  # a worker's sync mode: its process ends with its task
    assert frozen == []
    asyncio.run(first_calls())  # a triggerer's loop
    asyncio.run(first_calls())
    assert frozen == [1]
