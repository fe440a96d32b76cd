"""The HTTP/1.1 connection machine driven directly: bytes in, decisions out, virtual time.

No socket and no event loop: each test feeds :class:`ConnectionMachine` byte
strings and a clock value and checks its state, deadline and output. The
wire-level behaviour of the two transports that drive it is in
``test_server_wire.py`` and ``test_transports_same_bytes.py``.
"""

from __future__ import annotations

import itertools
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerver.core._http import Request, Response
from zerver.http._connection import LINGER_MAX_BYTES, LINGER_TIMEOUT_S, ConnectionContext
from zerver.http._machine import (
    TRANSITIONS,
    ConnectionMachine,
    Event,
    Expiry,
    State,
    TransitionError,
)

KEEPALIVE_S = 5.0
HEADER_S = 2.0
BODY_S = 10.0
WRITE_S = 3.0
MAX_HEADER = 1024
MAX_BODY = 100
MAX_PIPELINED = 64
T0 = 1000.0

GET = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"


async def _never(request: Request) -> Response:  # pragma: no cover - never dispatched here
    raise AssertionError("the machine does not dispatch")


def make_ctx(**overrides: object) -> ConnectionContext:
    limits: dict[str, object] = {
        "max_header_bytes": MAX_HEADER,
        "max_body_bytes": MAX_BODY,
        "header_timeout_s": HEADER_S,
        "keepalive_timeout_s": KEEPALIVE_S,
        "max_pipelined": MAX_PIPELINED,
        "body_timeout_s": BODY_S,
        "write_timeout_s": WRITE_S,
    }
    limits.update(overrides)
    return ConnectionContext(_never, **limits)  # type: ignore[arg-type]


def machine(**overrides: object) -> ConnectionMachine:
    return ConnectionMachine(make_ctx(**overrides), ("10.0.0.1", 40000), ("127.0.0.1", 80))


def feed(m: ConnectionMachine, data: bytes, now: float = T0) -> Request | None:
    m.receive(data)
    return m.next_request(now)


def state_of(m: ConnectionMachine) -> State:
    """The state, read through a call (so a type checker does not keep an earlier narrowing)."""
    return m.state


def status_of(output: bytes) -> int:
    return int(output.split(b" ", 2)[1])


def error_body(output: bytes) -> dict[str, object]:
    body = orjson.loads(output.partition(b"\r\n\r\n")[2])
    assert isinstance(body, dict)
    return body


# ------------------------------------------------------------------ the table


def test_every_state_appears_in_the_table_and_is_reachable_from_idle() -> None:
    sources = {state for state, _ in TRANSITIONS}
    targets = set(TRANSITIONS.values())
    assert sources | targets == set(State)
    reached = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        state = frontier.pop()
        for (source, _event), target in TRANSITIONS.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)


def test_every_event_is_used_by_the_table() -> None:
    assert {event for _, event in TRANSITIONS} == set(Event)


def test_close_is_allowed_in_every_state() -> None:
    for state in State:
        assert TRANSITIONS[state, Event.CLOSE] is State.CLOSED


def test_a_response_without_a_request_is_a_transition_error() -> None:
    m = machine()
    assert m.next_request(T0) is None
    with pytest.raises(TransitionError, match="RESPONDED in state IDLE"):
        m.respond(Request(method="GET", path="/"), Response.text("x"))


def test_flushing_an_open_connection_is_a_transition_error() -> None:
    m = machine()
    with pytest.raises(TransitionError, match="FLUSHING in state IDLE"):
        m.flushing(T0)


def test_parsing_while_dispatching_is_a_transition_error() -> None:
    m = machine()
    assert feed(m, GET) is not None
    m.receive(GET)
    with pytest.raises(TransitionError, match="parse in state DISPATCHING"):
        m.next_request(T0)


# ------------------------------------------------------------ reading requests


def test_a_new_connection_waits_idle_for_the_keepalive_timeout() -> None:
    m = machine()
    assert m.next_request(T0) is None
    assert m.state is State.IDLE
    assert m.waiting
    assert m.deadline == T0 + KEEPALIVE_S


def test_a_complete_request_is_dispatched_with_its_parts() -> None:
    m = machine()
    request = feed(m, b"POST /p?q=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
    assert request is not None
    assert (request.method, request.path, request.query, request.body) == (
        "POST",
        "/p",
        "q=1",
        b"abc",
    )
    assert request.client == ("10.0.0.1", 40000)
    assert request.server == ("127.0.0.1", 80)
    assert m.state is State.DISPATCHING
    assert m.deadline == math.inf
    assert not m.waiting


def test_a_started_head_has_the_header_timeout_from_its_first_bytes() -> None:
    m = machine()
    assert feed(m, b"GET /a HT", T0) is None
    assert m.state is State.HEAD
    assert m.deadline == T0 + HEADER_S
    assert feed(m, b"TP/1.1\r\n", T0 + 1) is None
    assert m.deadline == T0 + HEADER_S  # a trickle does not extend it


def test_each_body_wait_is_bounded_and_the_whole_body_too() -> None:
    m = machine()
    assert feed(m, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n", T0) is None
    assert m.state is State.BODY
    assert m.deadline == T0 + HEADER_S
    assert feed(m, b"x", T0 + 1.5) is None
    assert m.deadline == T0 + 1.5 + HEADER_S
    assert feed(m, b"x", T0 + 9) is None
    assert m.deadline == T0 + BODY_S  # the overall deadline wins


def test_expect_100_continue_is_answered_when_the_body_is_waited_for() -> None:
    m = machine()
    head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    assert feed(m, head) is None
    assert m.take_output() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert m.take_output() == b""
    request = feed(m, b"ok")
    assert request is not None and request.body == b"ok"


def test_a_chunked_body_is_joined() -> None:
    m = machine()
    data = (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    request = feed(m, data)
    assert request is not None and request.body == b"abcde"


# ------------------------------------------------------- answering, keep-alive


def test_keep_alive_goes_back_to_idle_and_the_next_pipelined_request_waits() -> None:
    m = machine()
    first = feed(m, GET + b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
    assert first is not None and first.path == "/a"
    head, body = m.respond(first, Response.text("one"))
    assert body == b"one"
    assert b"connection" not in head.lower()
    assert m.state is State.IDLE
    second = m.next_request(T0)
    assert second is not None and second.path == "/b"


@pytest.mark.parametrize(
    ("request_bytes", "response"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", Response.text("x")),
        (b"GET / HTTP/1.0\r\n\r\n", Response.text("x")),
        (GET, Response.text("x", headers=[("connection", "close")])),
    ],
    ids=["client-close", "http-1.0", "app-close"],
)
def test_a_last_response_says_close_and_lingers(request_bytes: bytes, response: Response) -> None:
    m = machine()
    request = feed(m, request_bytes)
    assert request is not None
    head, _ = m.respond(request, response)
    assert b"connection: close\r\n" in head
    assert m.state is State.LINGERING
    assert m.deadline == math.inf  # starts when the driver has half-closed
    m.lingering(T0)
    assert m.deadline == T0 + LINGER_TIMEOUT_S


def test_read_ahead_pauses_only_while_busy() -> None:
    m = machine()
    m.receive(b"GET /a HT")
    assert not m.read_paused  # waiting for bytes: never paused
    m.receive(b"TP/1.1\r\nHost: t\r\n\r\n" + b"x" * MAX_PIPELINED)
    assert m.next_request(T0) is not None
    assert m.read_paused
    m.sending(T0)  # a blocking write also holds reading at the budget
    assert m.write_deadline == T0 + WRITE_S


def test_parsing_running_dry_resets_the_read_ahead_budget() -> None:
    m = machine()
    request = feed(m, GET + b"G" * 10)
    assert request is not None
    m.receive(b"x" * MAX_PIPELINED)
    assert m.read_paused
    m.respond(request, Response.text("x"))
    assert m.next_request(T0) is None  # a partial (malformed later) head: wait for it
    assert m.ahead == 0
    assert not m.read_paused


def test_a_stalled_response_waits_for_the_peer_then_parsing_goes_on() -> None:
    m = machine()
    request = feed(m, GET + GET)
    assert request is not None
    m.respond(request, Response.text("x"))
    m.output_paused(T0)
    assert m.state is State.STALLED
    assert m.deadline == T0 + WRITE_S
    assert m.output_resumed()
    assert state_of(m) is State.IDLE
    assert m.next_request(T0) is not None
    assert not m.output_resumed()  # not stalled: nothing to go on with


# ----------------------------------------------------------------- deadlines


def test_deadlines_by_state() -> None:
    idle = machine()
    idle.next_request(T0)
    assert idle.expire(T0 + KEEPALIVE_S - 0.001) is Expiry.NOTHING
    assert idle.expire(T0 + KEEPALIVE_S) is Expiry.CLOSE
    assert idle.state is State.CLOSED
    assert idle.take_output() == b""  # idle closes silently

    for partial in (b"GET / HT", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nab"):
        m = machine()
        feed(m, partial)
        assert m.expire(T0 + HEADER_S) is Expiry.REFUSE
        assert status_of(m.take_output()) == 408
        assert m.state is State.LINGERING

    stalled = machine()
    request = feed(stalled, GET)
    assert request is not None
    stalled.respond(request, Response.text("x"))
    stalled.output_paused(T0)
    assert stalled.expire(T0 + WRITE_S) is Expiry.DROP

    lingering = machine()
    request = feed(lingering, b"GET / HTTP/1.0\r\n\r\n")
    assert request is not None
    lingering.respond(request, Response.text("x"))
    lingering.lingering(T0)
    assert lingering.expire(T0 + LINGER_TIMEOUT_S) is Expiry.CLOSE
    assert lingering.state is State.CLOSED

    draining = machine()
    draining.close()
    draining.flushing(T0)
    assert draining.state is State.DRAINING
    assert draining.expire(T0 + WRITE_S) is Expiry.DROP
    assert state_of(draining) is State.CLOSED

    dispatching = machine()
    feed(dispatching, GET)
    assert dispatching.expire(T0 + 1e9) is Expiry.NOTHING  # the app's time is its own


def test_a_blocking_write_expires_at_its_write_deadline() -> None:
    m = machine()
    assert not m.write_expired(T0 + 1e9)
    m.sending(T0)
    assert not m.write_expired(T0 + WRITE_S - 0.001)
    assert m.write_expired(T0 + WRITE_S)
    m.sent()
    assert not m.write_expired(T0 + 1e9)


# --------------------------------------------------------------- peer errors


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 2000, 431, "request header block too large"),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 1000 + b"\r\n\r\n",
            431,
            "request header block too large",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "unsupported transfer coding",
        ),
        (b"GET / HTTP/1.2\r\nHost: t\r\n\r\n", 505, "http version not supported"),
        (b"GET nope HTTP/1.1\r\nHost: t\r\n\r\n", 400, "invalid request target"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid host header"),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "ambiguous message framing",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n",
            413,
            "request body too large",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + b"a" * 101,
            413,
            "request body too large",
        ),
        (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: magic\r\n\r\n", 417, "unsupported expectation"),
    ],
    ids=[
        "malformed",
        "431-incomplete",
        "431-complete",
        "501",
        "505",
        "target",
        "host",
        "framing",
        "413",
        "413-chunked",
        "417",
    ],
)
def test_peer_errors_answer_their_status_then_linger(data: bytes, status: int, reason: str) -> None:
    m = machine()
    assert feed(m, data) is None
    output = m.take_output()
    assert status_of(output) == status
    assert error_body(output)["error"] == reason
    assert b"connection: close\r\n" in output
    assert m.state is State.LINGERING


def test_a_refusal_never_quotes_the_input() -> None:
    m = machine()
    feed(m, b"GET / HTTP/1.1\r\nHost: t\r\nBad\x00Header: secret\r\n\r\n")
    assert b"secret" not in m.take_output()


def test_lingering_discards_a_bounded_amount() -> None:
    m = machine()
    feed(m, b"GARBAGE\r\n\r\n")
    assert m.discard(b"x" * LINGER_MAX_BYTES)
    assert not m.discard(b"x")
    assert m.state is State.CLOSED


def test_the_refusal_of_a_connection_over_the_limit() -> None:
    from zerver.http._connection import RejectedError

    m = machine()
    m.refuse(RejectedError(503, "too many connections"))
    assert status_of(m.take_output()) == 503
    assert m.state is State.LINGERING


# ------------------------------------------------------------------ the EOF


def test_eof_while_dispatching_asks_for_cancellation() -> None:
    m = machine()
    assert feed(m, GET) is not None
    assert m.receive_eof() is State.DISPATCHING
    assert m.eof


def test_a_request_complete_before_the_eof_is_not_dispatched() -> None:
    m = machine()
    first = feed(m, GET + GET)
    assert first is not None
    m.respond(first, Response.text("x"))
    m.output_paused(T0)
    assert m.receive_eof() is State.STALLED
    assert m.output_resumed()
    assert m.next_request(T0) is None
    assert m.state is State.CLOSED


def test_eof_when_idle_closes_and_eof_in_a_head_is_refused_without_lingering() -> None:
    idle = machine()
    idle.next_request(T0)
    assert idle.receive_eof() is State.IDLE
    assert idle.next_request(T0) is None
    assert idle.state is State.CLOSED
    assert idle.take_output() == b""

    head = machine()
    feed(head, b"GET / HT")
    head.receive_eof()
    assert head.next_request(T0) is None
    assert status_of(head.take_output()) == 400
    assert head.state is State.CLOSED  # the peer is gone: no lingering


def test_eof_while_lingering_closes() -> None:
    m = machine()
    feed(m, b"GARBAGE\r\n\r\n")
    assert m.receive_eof() is State.CLOSED


# ------------------------------------------------------------------ shutdown


def test_shutdown_closes_an_idle_connection_only() -> None:
    idle = machine()
    idle.next_request(T0)
    assert idle.shutdown()
    assert idle.state is State.CLOSED

    busy = machine()
    request = feed(busy, GET)
    assert request is not None
    assert not busy.shutdown()
    busy._ctx.closing = True
    head, _ = busy.respond(request, Response.text("x"))
    assert b"connection: close\r\n" in head
    assert busy.state is State.LINGERING


def test_once_the_server_closes_running_dry_closes() -> None:
    m = machine()
    request = feed(m, GET)
    assert request is not None
    m.respond(request, Response.text("x"))
    m._ctx.closing = True
    assert m.next_request(T0) is None
    assert m.state is State.CLOSED


# ------------------------------------------------------------------ parsing


PIPELINE = (
    b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n"
    b"POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /three HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
    b"DELETE /four?x=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
)
EXPECTED = [
    ("GET", "/one", b""),
    ("POST", "/two", b"hello"),
    ("PUT", "/three", b"abc"),
    ("DELETE", "/four", b""),
]


def serve_pieces(pieces: list[bytes]) -> list[tuple[str, str, bytes]]:
    """Feed ``pieces`` one at a time, answering each request; what was dispatched."""
    m = machine(max_body_bytes=1000)
    seen: list[tuple[str, str, bytes]] = []
    for piece in pieces:
        m.receive(piece)
        while m.waiting:
            request = m.next_request(T0)
            if request is None:
                break
            seen.append((request.method, request.path, request.body))
            m.respond(request, Response.text("ok"))
        assert m.take_output() == b""
    return seen


def test_the_pipeline_in_one_piece_and_byte_by_byte() -> None:
    assert serve_pieces([PIPELINE]) == EXPECTED
    assert serve_pieces([PIPELINE[i : i + 1] for i in range(len(PIPELINE))]) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(PIPELINE)), max_size=12))
def test_any_split_of_a_pipeline_gives_the_same_requests(cuts: list[int]) -> None:
    points = sorted({0, len(PIPELINE), *cuts})
    pieces = [PIPELINE[a:b] for a, b in itertools.pairwise(points)]
    assert serve_pieces(pieces) == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_arbitrary_bytes_end_in_a_request_a_wait_or_a_refusal(data: bytes, step: int) -> None:
    m = machine()
    for start in range(0, len(data), step):
        if not m.waiting:
            break
        m.receive(data[start : start + step])
        request = m.next_request(T0)
        if request is not None:
            m.respond(request, Response.text("x"))
            m.next_request(T0)
    assert m.state in (State.IDLE, State.HEAD, State.BODY, State.LINGERING, State.CLOSED)
    output = m.take_output()
    assert output == b"" or output.startswith(b"HTTP/1.1 ")
    if m.state is not State.LINGERING:
        # Only a refusal is written without a request; it always ends in LINGERING.
        assert b"connection: close" not in output
