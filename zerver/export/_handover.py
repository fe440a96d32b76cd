"""Handing the GIL from the encoder thread to the sending thread.

Why: the encoder thread is pure Python and holds the GIL for the whole of a
batch unless someone takes it. CPython makes a thread that wakes from I/O
wait for the GIL until the holder drops it, which a busy thread does only
every switch interval (5 ms by default, longer than a whole 512-span batch
takes to encode). Measured end to end, the sending thread sat on the
backend's answer until the encoder had finished its batch, so encoding and
the backend's work ran one after the other instead of side by side, and the
sender's few hundred µs of work between two requests waited again.

The rules (the sender is the pipeline's sending thread, the encoder its
encoder thread; every method is called only by the thread named):

- The sender calls :meth:`Handover.awaiting` right before it blocks until an
  answer can be read from a socket (with ``poll``, which leaves the answer in
  the socket), :meth:`Handover.answered` once it has read the answer, and
  :meth:`Handover.blocking` right before any other wait (an empty hand-off).
  ``awaiting`` and ``blocking`` end the sender's *turn*.
- The encoder calls :meth:`Handover.woke_sender` after handing a batch to
  an idle sender, and :meth:`Handover.pause` every few dozen spans. ``pause``
  returns at once unless the sender has work: it was handed a batch or has
  read an answer since it last blocked, or the answer it waits for is in the
  socket (one ``poll`` with no timeout, ~1 µs). Then it blocks on a
  condition, which releases the GIL to the sender, until the sender's turn
  ends, or ``max_wait_s`` at most (1 ms; a turn takes a few hundred µs of
  Python, but the sender may also be blocked in a slow send, a retry
  back-off or an open breaker, where it needs no GIL); after such a time-out
  it stops deferring until the sender's next answer.

Nothing here changes what is sent, in which order, or when a batch counts as
done; it only decides which of two threads runs Python first.
"""

from __future__ import annotations

import select
import socket
import threading

__all__ = ["Handover"]

_HAVE_POLL = hasattr(select, "poll")  # not on Windows: the encoder never steps aside there


class Handover:
    """Gives the GIL to the sending thread while it has work (see the module docstring)."""

    __slots__ = ("_cond", "_runnable", "_sock", "_turn", "max_wait_s")

    def __init__(self, *, max_wait_s: float = 0.001) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._sock: socket.socket | None = None
        self._runnable = False
        self._turn = 0
        self.max_wait_s = max_wait_s

    # -- sender thread ----------------------------------------------------------

    def awaiting(self, sock: socket.socket) -> None:
        """About to block until ``sock`` has an answer to read."""
        with self._cond:
            self._sock = sock
            self._end_turn()

    def answered(self) -> None:
        """The answer was read (or the request failed); the turn goes on."""
        self._sock = None
        self._runnable = True

    def blocking(self) -> None:
        """About to block on something other than an answer."""
        with self._cond:
            self._sock = None
            self._end_turn()

    def _end_turn(self) -> None:
        self._runnable = False
        self._turn += 1
        self._cond.notify_all()

    # -- encoder thread ---------------------------------------------------------

    def woke_sender(self) -> None:
        """A batch was handed to the sender: it has work until it blocks again."""
        self._runnable = True

    def pause(self) -> None:
        """Step aside until the sender's turn ends, if the sender has work."""
        turn = self._turn  # read first: a turn that ends after this returns at once
        if not self._runnable:
            sock = self._sock
            if sock is None or not _readable(sock):
                return
        with self._cond:
            if not self._cond.wait_for(lambda: self._turn != turn, self.max_wait_s):
                self._runnable = False  # the sender waits on something else: stop deferring


def _readable(sock: socket.socket) -> bool:
    if not _HAVE_POLL:
        return False
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile: the sender deals with it
        return False
