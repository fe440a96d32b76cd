"""The GIL hand-over between the pipeline's encoder and sender threads.

The "sender" side runs on a helper thread started from inside the encoder's
wait (a spy condition), so each step happens in a fixed order without sleeps.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zerver.export._handover import Handover


class SpyCondition(threading.Condition):
    """Counts waits; on each, runs ``on_wait`` on another thread (it gets the
    lock once the waiter has released it inside ``wait``)."""

    def __init__(self, on_wait: Callable[[], None] | None = None) -> None:
        super().__init__(threading.Lock())
        self.on_wait = on_wait
        self.results: list[bool] = []

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        helper = threading.Thread(target=self.on_wait) if self.on_wait else None
        if helper is not None:
            helper.start()
        try:
            result = super().wait_for(predicate, timeout)
        finally:
            if helper is not None:
                helper.join(10)
        self.results.append(bool(result))
        return result


def spy(h: Handover, on_wait: Callable[[], None] | None = None) -> SpyCondition:
    cond = SpyCondition(on_wait)
    h._cond = cond
    return cond


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_no_wait_while_the_sender_has_nothing_to_do(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    h = Handover(max_wait_s=30)
    cond = spy(h)
    h.pause()  # nothing in flight
    h.awaiting(pair[0])
    h.pause()  # in flight, no answer yet: the sender is blocked in poll, GIL-free
    h.blocking()
    h.pause()
    assert cond.results == []


def test_an_answer_in_the_socket_makes_the_encoder_wait_for_the_sender(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    h = Handover(max_wait_s=30)

    def sender() -> None:  # reads the answer, posts the next request
        a.recv(16)
        h.answered()
        h.awaiting(a)

    cond = spy(h, sender)
    h.awaiting(a)
    b.sendall(b"HTTP/1.1 200 OK")
    h.pause()
    assert cond.results == [True]  # woken by the end of the sender's turn, not the time-out


def test_after_an_answer_the_turn_lasts_until_the_sender_blocks_again() -> None:
    h = Handover(max_wait_s=30)
    cond = spy(h, h.blocking)  # the sender finds the hand-off empty
    h.answered()
    h.pause()
    assert cond.results == [True]
    h.pause()  # the turn is over
    assert cond.results == [True]


def test_a_batch_handed_to_an_idle_sender_gives_it_the_next_turn() -> None:
    h = Handover(max_wait_s=30)
    h.blocking()
    cond = spy(h, h.blocking)
    h.woke_sender()
    h.pause()
    assert cond.results == [True]


def test_a_sender_busy_elsewhere_costs_one_bounded_wait_then_none() -> None:
    # E.g. a retry back-off after the answer: no turn end comes soon.
    h = Handover(max_wait_s=0.001)
    cond = spy(h)
    h.answered()
    h.pause()
    h.pause()
    h.pause()
    assert cond.results == [False]  # timed out once, then stopped deferring


def test_a_closed_socket_is_left_to_the_sender(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    h = Handover(max_wait_s=30)
    cond = spy(h)
    h.awaiting(a)
    a.close()
    h.pause()
    assert cond.results == []
