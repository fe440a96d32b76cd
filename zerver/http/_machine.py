"""One HTTP/1.1 server connection as a sans-I/O state machine.

Both transports (:mod:`zerver.http._protocol`, callbacks on asyncio, and
:mod:`zerver.http._streams`, a reader task on anyio streams) drive a
:class:`ConnectionMachine`: they feed it what happened (bytes, the peer's EOF,
a response to send, output paused or resumed, the time) and do what it says
(dispatch this request, write these bytes, half-close and linger, close, drop,
pause or resume reading, wake up at this deadline). The machine touches no
socket and no event loop; time is a number passed in. h11 parses requests;
the limits, keep-alive, pipelining and error rules live here, once.

The states, named for what the connection waits for::

    IDLE         a new request, nothing buffered    deadline keepalive_timeout_s: close silently
    HEAD         the rest of a started request head deadline header_timeout_s: 408
    BODY         more body bytes                    deadline (see below): 408
    DISPATCHING  the app's response                 no deadline; the peer's EOF cancels it
    STALLED      the peer to take a sent response   deadline write_timeout_s: drop
    LINGERING    the peer's EOF after our half-close deadline LINGER_TIMEOUT_S: close
    DRAINING     closed; output still buffered      deadline write_timeout_s: drop
    CLOSED       nothing

The transitions are :data:`TRANSITIONS`, one table; a pair that is not in it
is a bug in a driver and raises :class:`TransitionError`. The rules:

* Requests are answered strictly in order, one at a time: a complete request
  moves the connection to DISPATCHING, and pipelined bytes wait in h11's
  buffer until its response has been sent. HTTP/1.1 connections stay open
  unless either side says ``connection: close``; HTTP/1.0 connections close
  after one response (h11 has no 1.0 keep-alive).
* Read-ahead is bounded: while the connection is not waiting for bytes
  (DISPATCHING, STALLED), reading pauses once ``max_pipelined`` bytes have
  been read since parsing last ran dry (:attr:`ConnectionMachine.read_paused`),
  and resumes when parsing runs dry again. So h11's buffer never holds more
  than ``max_pipelined`` + ``max_header_bytes`` + one read.
* Reading ahead is also how a disconnect is noticed. The peer's EOF means it
  is gone (a half-close is treated as a close, as most servers do): EOF while
  DISPATCHING tells the driver to cancel the dispatch (and whatever jobs the
  app ties to it); a request that was complete before the EOF is not
  dispatched.
* Waiting in IDLE after ``keepalive_timeout_s``, or at once when the server
  shuts down, closes silently.
* Once a request head has started it must be complete within
  ``header_timeout_s``; each wait for more body bytes is bounded by the same
  value, and the whole body must arrive within ``body_timeout_s`` of the head
  (an overall deadline: a trickle of bytes does not extend it). Running out of
  time answers 408 and closes.
* Writing waits on the peer: a response the peer does not take (output
  paused) must be taken within ``write_timeout_s``, else the connection is
  dropped without a word; meanwhile no further pipelined request is parsed, so
  a peer that never reads holds at most one response and ``max_pipelined``
  bytes of input. A driver whose writes block (anyio streams) bounds each
  write by :attr:`ConnectionMachine.write_deadline` instead.
* A peer error answers with a small JSON body and closes: h11's status hint
  for malformed input (400, 431 for an incomplete head over
  ``max_header_bytes``, 501 for an unknown transfer coding), 431 for a complete
  head over the limit, 505 for an HTTP version other than 1.0 and 1.1, 400 for
  a request target that is not origin-, absolute- or asterisk-form, for a
  ``Host`` that is not ``host[:port]``, and for framing that could be read two
  ways (``Content-Length`` together with ``Transfer-Encoding``, or
  ``Transfer-Encoding`` in HTTP/1.0; RFC 9112 §6.1), 413 for a body over
  ``max_body_bytes`` (a Content-Length over the limit is refused before any
  body byte is read; chunked bodies are counted), 417 for an ``Expect`` other
  than ``100-continue``. The body names the rule, never the offending input.
  ``Expect: 100-continue`` is answered when the body is first waited for.
* A connection accepted while ``max_connections`` are open is answered 503
  and closed (with a lingering close, counted apart by the server); one
  accepted while as many such refusals are still lingering is closed at once.
* Every server-side close after a response is a *lingering close*: half-close,
  then discard what the peer still sends (at most ``LINGER_MAX_BYTES``, for at
  most ``LINGER_TIMEOUT_S``) until its EOF, so that a TCP reset cannot destroy
  the response in flight. Closing with output still buffered (DRAINING) gives
  the peer ``write_timeout_s`` to take it.
"""

from __future__ import annotations

import enum
import math

import h11
import structlog

from zerver.core._errors import ZerverError
from zerver.core._http import Request, Response

from ._connection import (
    LINGER_MAX_BYTES,
    LINGER_TIMEOUT_S,
    ConnectionContext,
    RejectedError,
    check_head,
    encode_response,
    make_request,
    next_cycle,
    reject_for,
    rejection,
)

__all__ = [
    "BODY",
    "CLOSED",
    "DISPATCHING",
    "DRAINING",
    "HEAD",
    "IDLE",
    "LINGERING",
    "STALLED",
    "TRANSITIONS",
    "ConnectionMachine",
    "Event",
    "Expiry",
    "State",
    "TransitionError",
]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("zerver.server")

_CONTINUE = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")


class State(enum.IntEnum):
    """What a connection waits for (an ``IntEnum``: the table is looked up per request)."""

    IDLE = 0
    HEAD = 1
    BODY = 2
    DISPATCHING = 3
    STALLED = 4
    LINGERING = 5
    DRAINING = 6
    CLOSED = 7


class Event(enum.IntEnum):
    """What happened to a connection, as the machine's transitions name it."""

    HEAD_STARTED = 0
    """Part of a request head is buffered."""
    HEAD_RECEIVED = 1
    """A complete request head passed the server's checks."""
    REQUEST_RECEIVED = 2
    """The request is complete: hand it to the app."""
    RESPONDED = 3
    """Its response is encoded and the connection stays open."""
    RESPONDED_LAST = 4
    """Its response is encoded and the connection closes after it."""
    REFUSED = 5
    """A peer error (or a 408, or the 503 of a connection over the limit) is answered."""
    OUTPUT_PAUSED = 6
    """The peer is not taking a sent response."""
    OUTPUT_RESUMED = 7
    """It is taking it again."""
    PEER_EOF = 8
    """The peer's EOF (or anything that ends its input)."""
    DEADLINE = 9
    """The current state's deadline passed."""
    SHUTDOWN = 10
    """The server stops: an idle connection closes."""
    CLOSE = 11
    """The driver closes (or lost) the connection."""
    FLUSHING = 12
    """Closed with output still buffered."""


S = State
E = Event

# An enum member looked up on its class costs a descriptor call (Python 3.11),
# several times a module global: the per-request paths use these names.
IDLE, HEAD, BODY, DISPATCHING, STALLED, LINGERING, DRAINING, CLOSED = State
(
    _HEAD_STARTED,
    _HEAD_RECEIVED,
    _REQUEST_RECEIVED,
    _RESPONDED,
    _RESPONDED_LAST,
    _REFUSED,
    _OUTPUT_PAUSED,
    _OUTPUT_RESUMED,
    _PEER_EOF,
    _DEADLINE,
    _SHUTDOWN,
    _CLOSE,
    _FLUSHING,
) = Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    # Reading a request.
    (S.IDLE, E.HEAD_STARTED): S.HEAD,
    (S.IDLE, E.HEAD_RECEIVED): S.BODY,
    (S.HEAD, E.HEAD_RECEIVED): S.BODY,
    (S.BODY, E.REQUEST_RECEIVED): S.DISPATCHING,
    (S.IDLE, E.REFUSED): S.LINGERING,
    (S.HEAD, E.REFUSED): S.LINGERING,
    (S.BODY, E.REFUSED): S.LINGERING,
    (S.IDLE, E.DEADLINE): S.CLOSED,
    # HEAD and BODY answer their deadline with a 408 (REFUSED).
    # Answering it.
    (S.DISPATCHING, E.RESPONDED): S.IDLE,
    (S.DISPATCHING, E.RESPONDED_LAST): S.LINGERING,
    (S.IDLE, E.OUTPUT_PAUSED): S.STALLED,
    (S.STALLED, E.OUTPUT_RESUMED): S.IDLE,
    (S.STALLED, E.DEADLINE): S.CLOSED,
    # Closing.
    (S.LINGERING, E.DEADLINE): S.CLOSED,
    (S.LINGERING, E.PEER_EOF): S.CLOSED,
    (S.DRAINING, E.DEADLINE): S.CLOSED,
    (S.CLOSED, E.FLUSHING): S.DRAINING,
    (S.IDLE, E.SHUTDOWN): S.CLOSED,
    # The peer's EOF elsewhere is noted; parsing (or the cancelled dispatch) ends it.
    **{(s, E.PEER_EOF): s for s in S if s not in (S.LINGERING,)},
    # The driver may close in any state.
    **{(s, E.CLOSE): S.CLOSED for s in S},
}


class TransitionError(ZerverError, RuntimeError):
    """A driver fed an event the connection's state does not allow (a bug in zerver, as
    h11's ``LocalProtocolError`` is a bug in its caller, not the peer's fault)."""


class Expiry(enum.IntEnum):
    """What the driver must do when a deadline is reached (:meth:`ConnectionMachine.expire`)."""

    NOTHING = 0
    """Not yet (the deadline moved), or no deadline applies."""
    CLOSE = 1
    """Close the connection."""
    DROP = 2
    """Abort it (the peer does not take our output)."""
    REFUSE = 3
    """Write :meth:`~ConnectionMachine.take_output` (a 408), then linger or close."""


_WAITING = frozenset({IDLE, HEAD, BODY})
_BUSY = frozenset({DISPATCHING, STALLED})


class ConnectionMachine:
    """The state of one HTTP/1.1 server connection; see the module rules.

    The driver reads :attr:`state` after each call to learn what to do:
    waiting states (IDLE, HEAD, BODY) want bytes until :attr:`deadline`;
    LINGERING wants a half-close; CLOSED a close. Bytes to write first (a
    ``100 Continue``, a refusal) are in :meth:`take_output`.
    """

    __slots__ = (
        "_body_deadline",
        "_body_size",
        "_client",
        "_ctx",
        "_discarded",
        "_h11",
        "_head",
        "_headers",
        "_local",
        "_parts",
        "_target",
        "ahead",
        "deadline",
        "eof",
        "output",
        "state",
        "write_deadline",
    )

    def __init__(
        self,
        ctx: ConnectionContext,
        client: tuple[str, int] | None,
        local: tuple[str, int] | None,
    ) -> None:
        self._ctx = ctx
        self._client = client
        self._local = local
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.max_header_bytes)
        self.state = IDLE
        self.deadline = math.inf
        """When the current state's wait ends (``inf``: it has none)."""
        self.write_deadline = 0.0
        """When the write in progress must be done (0: none); for drivers whose writes block."""
        self.ahead = 0
        """Bytes received since parsing last ran dry (the read-ahead budget)."""
        self.eof = False
        """Whether the peer's input has ended."""
        self.output = b""
        """Bytes to write first (``100 Continue``, a refusal); see :meth:`take_output`."""
        # The request being read.
        self._head: h11.Request | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._target = ("", "")
        self._parts: list[bytes] = []
        self._body_size = 0
        self._body_deadline = 0.0
        self._discarded = 0

    def __repr__(self) -> str:
        return f"<ConnectionMachine {self.state.name} client={self._client}>"

    def _go(self, event: Event) -> State:
        """Take the transition the table gives for ``event`` (the per-request ones are inlined)."""
        try:
            state = self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise self._invalid(event) from None
        return state

    def _invalid(self, event: Event) -> TransitionError:
        return TransitionError(f"cannot handle {event.name} in state {self.state.name}")

    # ----------------------------------------------------------------- input

    @property
    def waiting(self) -> bool:
        """Whether the connection waits for bytes (so new bytes should be parsed now)."""
        return self.state in _WAITING

    @property
    def read_paused(self) -> bool:
        """Whether reading should pause: the read-ahead budget is spent while the
        connection does not wait for bytes (busy, or a blocking write in progress)."""
        return self.ahead >= self._ctx.max_pipelined and (
            self.state in _BUSY or self.write_deadline != 0.0
        )

    def receive(self, data: bytes) -> bool:
        """Bytes from the peer (not while LINGERING: see :meth:`discard`); whether
        the connection waits for bytes (so they should be parsed now)."""
        self.ahead += len(data)
        self._h11.receive_data(data)
        return self.state in _WAITING

    def discard(self, data: bytes) -> bool:
        """Bytes received while LINGERING; ``False`` once past ``LINGER_MAX_BYTES`` (closed)."""
        self._discarded += len(data)
        if self._discarded > LINGER_MAX_BYTES:
            self._go(_CLOSE)
            return False
        return True

    def receive_eof(self) -> State:
        """The peer's input ended; the state says what follows.

        LINGERING becomes CLOSED. DISPATCHING stays: the driver cancels the
        dispatch and closes. STALLED stays: the transport closes once the
        output is flushed. A waiting state stays: parse
        (:meth:`next_request`), which refuses an incomplete request and
        closes otherwise.
        """
        state = self._go(_PEER_EOF)
        if state is not CLOSED:
            self.eof = True
            if state in _WAITING:
                self._h11.receive_data(b"")
        return state

    # --------------------------------------------------------------- parsing

    def next_request(self, now: float) -> Request | None:
        """The next complete request to dispatch (the state becomes DISPATCHING).

        ``None`` when there is none yet: the state is then a waiting one (with
        its :attr:`deadline`), LINGERING after a refusal, or CLOSED.
        """
        conn = self._h11
        ctx = self._ctx
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.refuse(reject_for(exc))
                return None
            if event is h11.NEED_DATA:
                self._need_data(now)
                return None
            if type(event) is h11.Request:
                headers = list(event.headers)
                try:
                    self._target = check_head(ctx, event, headers)
                except RejectedError as reject:
                    self.refuse(reject)
                    return None
                try:  # inline: once per request
                    self.state = TRANSITIONS[self.state, _HEAD_RECEIVED]
                except KeyError:
                    raise self._invalid(_HEAD_RECEIVED) from None
                self._head = event
                self._headers = headers
                self._body_deadline = now + ctx.body_timeout_s
            elif type(event) is h11.Data:
                self._body_size += len(event.data)
                if self._body_size > ctx.max_body_bytes:
                    self.refuse(
                        RejectedError(413, "request body too large", limit=ctx.max_body_bytes)
                    )
                    return None
                self._parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                head = self._head
                if head is None:  # pragma: no cover - h11 never ends a message it did not start
                    self._go(_CLOSE)
                    return None
                if self.eof:
                    # A request complete before the peer's EOF is dropped, not dispatched.
                    _log.debug("client disconnected before dispatch", client=self._client)
                    self._go(_CLOSE)
                    return None
                request = make_request(
                    head, self._headers, self._target, self._parts, self._client, self._local
                )
                self._head = None
                self._parts = []
                self._body_size = 0
                try:
                    self.state = TRANSITIONS[self.state, _REQUEST_RECEIVED]
                except KeyError:
                    raise self._invalid(_REQUEST_RECEIVED) from None
                self.deadline = math.inf
                return request
            elif event is h11.PAUSED:
                # A cycle starts after its response: parsing before it is a driver's bug.
                raise TransitionError(f"cannot parse in state {self.state.name}: a response is due")
            else:  # ConnectionClosed
                self._go(_CLOSE)
                return None

    def _need_data(self, now: float) -> None:
        self.ahead = 0
        ctx = self._ctx
        conn = self._h11
        if self._head is None:
            if not conn.trailing_data[0]:
                if ctx.closing:
                    self._go(_SHUTDOWN)
                else:
                    self.deadline = now + ctx.keepalive_timeout_s
            elif self.state is not HEAD:
                self._go(_HEAD_STARTED)
                self.deadline = now + ctx.header_timeout_s
            return
        if conn.they_are_waiting_for_100_continue:
            self.output += conn.send(_CONTINUE) or b""
        self.deadline = min(now + ctx.header_timeout_s, self._body_deadline)

    # ------------------------------------------------------------- answering

    def respond(self, request: Request, response: Response) -> tuple[bytes, bytes]:
        """The head and body bytes of the response to the request being dispatched.

        Afterwards the state is IDLE (keep-alive: parse what is buffered) or
        LINGERING (the connection closes after this response).
        """
        head, body, keep_alive = encode_response(self._ctx, request, response)
        if keep_alive:
            try:
                self.state = TRANSITIONS[self.state, _RESPONDED]
            except KeyError:
                raise self._invalid(_RESPONDED) from None
            self._h11 = next_cycle(self._h11, self._ctx.max_header_bytes)
        else:
            self._linger(_RESPONDED_LAST)
        return head, body

    def refuse(self, reject: RejectedError) -> None:
        """Answer a peer error: the refusal goes to :meth:`take_output`, then linger."""
        self.output += rejection(self._ctx, reject, self._client)
        self._linger(_REFUSED)

    def _linger(self, event: Event) -> None:
        self._go(event)
        self._discarded = 0
        # The wait starts once the driver has half-closed (see lingering).
        self.deadline = math.inf
        if self.eof:
            self._go(_CLOSE)  # the peer is gone: nothing to linger for

    def lingering(self, now: float) -> None:
        """The driver half-closed: the linger deadline starts now."""
        self.deadline = now + LINGER_TIMEOUT_S

    def take_output(self) -> bytes:
        """Bytes the driver must write now (``100 Continue`` or a refusal), once."""
        output = self.output
        self.output = b""
        return output

    # --------------------------------------------------------- output, time

    def output_paused(self, now: float) -> None:
        """The peer stopped taking output: after a response, wait for it (STALLED)."""
        if self.state is IDLE:
            self._go(_OUTPUT_PAUSED)
            self.deadline = now + self._ctx.write_timeout_s

    def output_resumed(self) -> bool:
        """The peer takes output again; ``True`` if parsing should go on (it was STALLED)."""
        if self.state is STALLED:
            self._go(_OUTPUT_RESUMED)
            self.deadline = math.inf
            return True
        return False

    def sending(self, now: float) -> None:
        """A blocking write starts (must be done by :attr:`write_deadline`)."""
        self.write_deadline = now + self._ctx.write_timeout_s

    def sent(self) -> None:
        """The blocking write is done."""
        self.write_deadline = 0.0

    def write_expired(self, now: float) -> bool:
        """Whether a blocking write has waited past the write timeout (drop the connection)."""
        since = self.write_deadline
        return bool(since) and now >= since

    def expire(self, now: float) -> Expiry:
        """The timer fired at ``now``: what the current state's deadline means."""
        if now < self.deadline:
            return Expiry.NOTHING
        state = self.state
        self.deadline = math.inf
        if state is HEAD or state is BODY:
            self.refuse(RejectedError(408, "request timeout"))
            return Expiry.REFUSE
        if state is IDLE or state is LINGERING:
            self._go(_DEADLINE)
            return Expiry.CLOSE
        if state is STALLED or state is DRAINING:
            _log.debug("write timed out; dropping the connection", client=self._client)
            self._go(_DEADLINE)
            return Expiry.DROP
        return Expiry.NOTHING  # pragma: no cover - only waiting states have deadlines

    def shutdown(self) -> bool:
        """The server stops; ``True`` if the connection was idle and is now CLOSED."""
        if self.state is IDLE:
            self._go(_SHUTDOWN)
            self.deadline = math.inf
            return True
        return False

    def close(self) -> None:
        """The driver closes the connection (or it was lost)."""
        self._go(_CLOSE)
        self.deadline = math.inf

    def flushing(self, now: float) -> None:
        """Closed with output still buffered: the peer has ``write_timeout_s`` to take it."""
        self._go(_FLUSHING)
        self.deadline = now + self._ctx.write_timeout_s
