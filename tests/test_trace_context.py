"""W3C Trace Context (``traceparent``, ``tracestate``): every case of the W3C test suite.

The suite's cases run on the wire: raw requests to a real server running the
suite's test service (``tests/w3c/service.py``), whose outbound calls go through
zerver's HTTP interpreter to a capturing transport, so what is checked is what
zerver reads from a socket and what it writes to the next hop. The parser and
writer are then checked alone (limits, truncation), by properties (hypothesis)
and against OpenTelemetry's ``TraceContextTextMapPropagator`` where the two
should agree. Messages carry the same context through the broker.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import propagate
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from server_apps import TRANSPORTS, WAIT_S, read_until_eof
from w3c.service import create_app

from zerver import (
    App,
    Context,
    Done,
    HttpInterpreter,
    MemoryBroker,
    Need,
    Publish,
    Response,
    ServerConfig,
    load_settings,
    serve,
    step,
)
from zerver.http._server import Transport
from zerver.testing import AppClient, InMemorySpanSink
from zerver.trace._propagation import (
    TRACESTATE_MAX_CHARS,
    W3CTraceContextPropagator,
    _textmap,
    format_traceparent,
    parse_traceparent,
    parse_tracestate,
)

pytestmark = pytest.mark.anyio

TID = "12345678901234567890123456789012"
PID = "1234567890123456"
TP = f"00-{TID}-{PID}-01"
TP00 = f"00-{TID}-{PID}-00"

# ------------------------------------------------------------------ the wire

Headers = list[tuple[str, str]]


@dataclass
class Service:
    """The W3C test service on a real socket; ``calls`` holds the headers of
    each outbound request its HTTP interpreter made, in order."""

    port: int
    calls: list[Headers] = field(default_factory=list)

    async def post(self, headers: Headers, callbacks: int = 1) -> list[Headers]:
        """Send the suite's request (``headers`` written as given, one field
        each) asking for ``callbacks`` calls back; their headers."""
        body = orjson.dumps([{"url": f"http://harness.test/cb/{i}"} for i in range(callbacks)])
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        raw = (
            f"POST /test HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{head}\r\n"
        ).encode("latin-1") + body
        del self.calls[:]
        async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
            await stream.send(raw)
            reply = await read_until_eof(stream)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
        assert len(self.calls) == callbacks
        return list(self.calls)


@contextlib.asynccontextmanager
async def w3c_service(transport: Transport = "auto") -> AsyncIterator[Service]:
    service = Service(port=0)

    def capture(request: httpx.Request) -> httpx.Response:
        service.calls.append([(k.lower(), v) for k, v in request.headers.multi_items()])
        return httpx.Response(200, json=None)

    app = create_app(HttpInterpreter(transport=httpx.MockTransport(capture), trust_env=False))
    config = ServerConfig(host="127.0.0.1", port=0, transport=transport)
    shutdown = anyio.Event()
    with anyio.fail_after(WAIT_S * 4):
        async with anyio.create_task_group() as tg:
            service.port = await tg.start(functools.partial(serve, app, config, shutdown=shutdown))
            try:
                yield service
            finally:
                shutdown.set()


def only(headers: Headers, name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def sent_traceparent(headers: Headers) -> tuple[str, str, str, str]:
    """The one ``traceparent`` sent on, checked as the suite checks it."""
    values = only(headers, "traceparent")
    assert len(values) == 1, headers
    version, trace_id, parent_id, flags = values[0].split("-")
    assert version == "00" and len(trace_id) == 32 and len(parent_id) == 16 and len(flags) == 2
    assert int(trace_id, 16) and int(parent_id, 16)
    assert values[0] == values[0].lower()
    return version, trace_id, parent_id, flags


def sent_tracestate(headers: Headers) -> str | None:
    values = only(headers, "tracestate")
    assert len(values) <= 1, headers  # sent on as one field
    if values:
        assert values[0] and parse_tracestate(values) == values[0]  # valid as sent
    return values[0] if values else None


@dataclass(frozen=True)
class Case:
    """One request of the W3C suite: the headers it sends and what must go out.

    ``continued``: the trace id ``TID`` is kept (with a new parent id), else a
    new trace starts (the ids in the request are not reused). ``flags``: the
    trace flags sent on when continued. ``tracestate``: the value sent on
    (``None``: no tracestate header).
    """

    name: str
    headers: Headers
    continued: bool
    flags: str = "01"
    tracestate: str | None = None


def new_trace(name: str, *headers: tuple[str, str]) -> Case:
    return Case(name, list(headers), continued=False)


def continued(name: str, value: str, flags: str = "01") -> Case:
    return Case(name, [("traceparent", value)], continued=True, flags=flags)


def state(name: str, fields: list[str], expected: str | None, tp: str = TP00) -> Case:
    return Case(
        name,
        [("traceparent", tp), *(("tracestate", f) for f in fields)],
        continued=True,
        flags="00",
        tracestate=expected,
    )


def tp_with(version: str = "00", trace: str = TID, parent: str = PID, flags: str = "01") -> str:
    return f"{version}-{trace}-{parent}-{flags}"


KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE_CHARS = (
    "".join(map(chr, range(0x20, 0x2C)))
    + "".join(map(chr, range(0x2D, 0x3D)))
    + "".join(map(chr, range(0x3E, 0x7F)))
)
BARS = [f"bar{i:02}={i:02}" for i in range(1, 34)]  # 33 members


def in_fields(members: list[str]) -> list[str]:
    """``members`` ten to a header field, as the suite sends them."""
    return [",".join(members[i : i + 10]) for i in range(0, len(members), 10)]


# Named after the suite's tests (TraceContextTest, AdvancedTest, TraceContext2Test).
SUITE_CASES = [
    new_trace("both_traceparent_and_tracestate_missing"),
    continued("traceparent_included_tracestate_missing", TP),
    Case(
        "traceparent_duplicated",
        [("traceparent", tp_with(trace=TID[:-1] + "1")), ("traceparent", TP)],
        continued=False,
    ),
    Case("traceparent_duplicated_same_value", [("traceparent", TP), ("traceparent", TP)], False),
    new_trace("traceparent_header_name_dash", ("trace-parent", TP)),
    new_trace("traceparent_header_name_dot", ("trace.parent", TP)),
    Case("traceparent_header_name_casing_1", [("TraceParent", TP)], True),
    Case("traceparent_header_name_casing_2", [("TrAcEpArEnT", TP)], True),
    Case("traceparent_header_name_casing_3", [("TRACEPARENT", TP)], True),
    new_trace("traceparent_version_0x00_trailing_dot", ("traceparent", TP + ".")),
    new_trace("traceparent_version_0x00_extra_field", ("traceparent", TP + "-what-the-future")),
    continued("traceparent_version_0xcc", tp_with("cc")),
    continued("traceparent_version_0xcc_extra_field", tp_with("cc") + "-what-the-future"),
    new_trace("traceparent_version_0xcc_trailing_dot", ("traceparent", tp_with("cc") + ".what")),
    new_trace("traceparent_version_0xff", ("traceparent", tp_with("ff"))),
    new_trace("traceparent_version_illegal_1", ("traceparent", tp_with(".0"))),
    new_trace("traceparent_version_illegal_2", ("traceparent", tp_with("0."))),
    new_trace("traceparent_version_too_long_1", ("traceparent", tp_with("000"))),
    new_trace("traceparent_version_too_long_2", ("traceparent", tp_with("0000"))),
    new_trace("traceparent_version_too_short", ("traceparent", tp_with("0"))),
    new_trace("traceparent_version_upper_case", ("traceparent", tp_with("CC"))),
    new_trace("traceparent_trace_id_all_zero", ("traceparent", tp_with(trace="0" * 32))),
    new_trace("traceparent_trace_id_illegal_1", ("traceparent", tp_with(trace="." + TID[1:]))),
    new_trace("traceparent_trace_id_illegal_2", ("traceparent", tp_with(trace=TID[:-1] + "."))),
    new_trace(
        "traceparent_trace_id_upper_case", ("traceparent", tp_with(trace="ABCDEF" + TID[6:]))
    ),
    new_trace("traceparent_trace_id_too_long", ("traceparent", tp_with(trace=TID + "3"))),
    new_trace("traceparent_trace_id_too_short", ("traceparent", tp_with(trace=TID[:-1]))),
    new_trace("traceparent_parent_id_all_zero", ("traceparent", tp_with(parent="0" * 16))),
    new_trace("traceparent_parent_id_illegal_1", ("traceparent", tp_with(parent="." + PID[1:]))),
    new_trace("traceparent_parent_id_illegal_2", ("traceparent", tp_with(parent=PID[:-1] + "."))),
    new_trace("traceparent_parent_id_too_long", ("traceparent", tp_with(parent=PID + "7"))),
    new_trace("traceparent_parent_id_too_short", ("traceparent", tp_with(parent=PID[:-1]))),
    new_trace("traceparent_trace_flags_illegal_1", ("traceparent", tp_with(flags=".0"))),
    new_trace("traceparent_trace_flags_illegal_2", ("traceparent", tp_with(flags="0."))),
    new_trace("traceparent_trace_flags_too_long", ("traceparent", tp_with(flags="001"))),
    new_trace("traceparent_trace_flags_too_short", ("traceparent", tp_with(flags="1"))),
    new_trace("traceparent_fields_not_dashes", ("traceparent", TP.replace("-", "_"))),
    new_trace("traceparent_empty", ("traceparent", "")),
    continued("traceparent_ows_space_before", " " + TP),
    continued("traceparent_ows_tab_before", "\t" + TP),
    continued("traceparent_ows_space_after", TP + " "),
    continued("traceparent_ows_tab_after", TP + "\t"),
    continued("traceparent_ows_both_sides", "\t " + TP + " \t"),
    # Only sampled (0x01) and random (0x02) are known: other bits go out as 0.
    continued("trace_flags_unknown_bits_zeroed", tp_with(flags="ff"), flags="03"),
    continued("trace_flags_unknown_bits_zeroed_unsampled", tp_with(flags="fc"), flags="00"),
    continued("propagates_random_flag", tp_with(flags="02"), flags="02"),
    continued("trace_flags_random_and_sampled", tp_with(flags="03"), flags="03"),
    new_trace("tracestate_included_traceparent_missing_1", ("tracestate", "foo=1")),
    new_trace("tracestate_included_traceparent_missing_2", ("tracestate", "foo=1,bar=2")),
    new_trace(
        "tracestate_with_invalid_traceparent",
        ("traceparent", tp_with("ff")),
        ("tracestate", "foo=1"),
    ),
    state("tracestate_included_traceparent_included", ["foo=1,bar=2"], "foo=1,bar=2"),
    Case(
        "tracestate_header_name_dash",
        [("traceparent", TP00), ("trace-state", "foo=1")],
        True,
        "00",
    ),
    Case(
        "tracestate_header_name_dot",
        [("traceparent", TP00), ("trace.state", "foo=1")],
        True,
        "00",
    ),
    *(
        Case(
            f"tracestate_header_name_casing_{name}",
            [("traceparent", TP00), (name, "foo=1")],
            True,
            "00",
            "foo=1",
        )
        for name in ("TraceState", "TrAcEsTaTe", "TRACESTATE")
    ),
    state("tracestate_empty_header", [""], None),
    state("tracestate_empty_header_after", ["foo=1", ""], "foo=1"),
    state("tracestate_empty_header_before", ["", "foo=1"], "foo=1"),
    state("tracestate_empty_members", [" , ,\t,", "foo=1,,"], "foo=1"),
    state(
        "tracestate_multiple_headers_different_keys",
        ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
        "foo=1,bar=2,rojo=1,congo=2,baz=3",
    ),
    # Duplicate keys: the header is kept; the first (left-most) entry wins.
    state("tracestate_duplicated_keys_same_value", ["foo=1,foo=1"], "foo=1"),
    state("tracestate_duplicated_keys_other_value", ["foo=1,foo=2"], "foo=1"),
    state("tracestate_duplicated_keys_two_fields", ["foo=1", "foo=1"], "foo=1"),
    state("tracestate_duplicated_keys_two_fields_other", ["foo=1", "foo=2"], "foo=1"),
    state(
        "tracestate_all_allowed_characters",
        [f"{KEY_CHARS}={VALUE_CHARS}"],
        f"{KEY_CHARS}={VALUE_CHARS}",
    ),
    state(
        "tracestate_all_allowed_characters_vendor",
        [f"{KEY_CHARS}@a-z0-9_-*/={VALUE_CHARS}"],
        f"{KEY_CHARS}@a-z0-9_-*/={VALUE_CHARS}",
    ),
    state("tracestate_ows_1", ["foo=1 \t , \t bar=2, \t baz=3"], "foo=1,bar=2,baz=3"),
    state("tracestate_ows_2", ["foo=1\t \t,\t \tbar=2,\t \tbaz=3"], "foo=1,bar=2,baz=3"),
    state("tracestate_ows_3", [" foo=1"], "foo=1"),
    state("tracestate_ows_4", ["\tfoo=1"], "foo=1"),
    state("tracestate_ows_5", ["foo=1 "], "foo=1"),
    state("tracestate_ows_6", ["foo=1\t"], "foo=1"),
    state("tracestate_ows_7", ["\t foo=1 \t"], "foo=1"),
    state("tracestate_value_leading_space_kept", ["foo= 1"], "foo= 1"),
    state("tracestate_key_illegal_space", ["foo =1"], None),
    state("tracestate_key_illegal_upper_case", ["FOO=1"], None),
    state("tracestate_key_illegal_dot", ["foo.bar=1"], None),
    state("tracestate_key_illegal_breaks_whole_header", ["foo=1", "Bar=2"], None),
    state("tracestate_key_vendor_trailing_at", ["foo@=1,bar=2"], "foo@=1,bar=2"),
    state("tracestate_key_vendor_leading_at", ["@foo=1,bar=2"], None),
    state("tracestate_key_vendor_double_at", ["foo@@bar=1,bar=2"], "foo@@bar=1,bar=2"),
    state("tracestate_key_vendor_two_ats", ["foo@bar@baz=1,bar=2"], "foo@bar@baz=1,bar=2"),
    state("tracestate_key_starts_with_digit", ["1foo=1"], "1foo=1"),
    state("tracestate_member_count_limit_32", in_fields(BARS[:32]), ",".join(BARS[:32])),
    state("tracestate_member_count_limit_33", in_fields(BARS), None),
    state("tracestate_key_length_256", ["foo=1", "z" * 256 + "=1"], "foo=1," + "z" * 256 + "=1"),
    state("tracestate_key_length_257", ["foo=1", "z" * 257 + "=1"], None),
    *(
        state(f"tracestate_key_length_vendor_{i}", ["foo=1", key + "=1"], f"foo=1,{key}=1")
        for i, key in enumerate(["t" * 241 + "@" + "v" * 14, "t" * 242 + "@v", "t@" + "v" * 15])
    ),
    state("tracestate_value_length_256", ["foo=" + "v" * 256], "foo=" + "v" * 256),
    state("tracestate_value_length_257", ["foo=" + "v" * 257], None),
    state("tracestate_value_illegal_equals", ["foo=bar=baz"], None),
    state("tracestate_value_illegal_empty", ["foo=,bar=3"], None),
    state("tracestate_value_illegal_tab", ["foo=a\tb"], None),
    state("tracestate_member_without_equals", ["foo"], None),
    # Over 512 characters: entries over 128 characters go first, then from the right.
    state(
        "tracestate_truncated_large_entries_first",
        ["a=" + "x" * 200, ",".join(f"k{i:02}=" + "v" * 40 for i in range(8))],
        ",".join(f"k{i:02}=" + "v" * 40 for i in range(8)),
    ),
    state(
        "tracestate_truncated_from_the_right",
        [",".join(f"k{i:02}=" + "v" * 60 for i in range(9))],
        ",".join(f"k{i:02}=" + "v" * 60 for i in range(7)),
    ),
]


@pytest.mark.parametrize("case", SUITE_CASES, ids=lambda c: c.name)
async def test_w3c_suite_case_on_the_wire(case: Case) -> None:
    async with w3c_service() as service:
        (out,) = await service.post(case.headers)
    _, trace_id, parent_id, flags = sent_traceparent(out)
    if case.continued:
        assert trace_id == TID
        assert parent_id != PID
        assert flags == case.flags
        assert sent_tracestate(out) == case.tracestate
    else:
        assert trace_id not in (TID, TID[:-1] + "1")  # neither id of the request
        assert sent_tracestate(out) is None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_traceparent_fields_start_a_new_trace_on_both_transports(
    transport: Transport,
) -> None:
    async with w3c_service(transport) as service:
        (one,) = await service.post([("traceparent", TP), ("tracestate", "foo=1")])
        (two,) = await service.post(
            [("traceparent", TP), ("traceparent", TP), ("tracestate", "a=1")]
        )
    assert sent_traceparent(one)[1] == TID and sent_tracestate(one) == "foo=1"
    assert sent_traceparent(two)[1] != TID and sent_tracestate(two) is None


@pytest.mark.parametrize(
    ("name", "headers"),
    [
        ("multiple_requests_with_valid_traceparent", [("traceparent", TP)]),
        ("multiple_requests_without_traceparent", []),
        (
            "multiple_requests_with_illegal_traceparent",
            [("traceparent", tp_with(trace="0" * 32))],
        ),
    ],
)
async def test_w3c_suite_advanced_cases(name: str, headers: Headers) -> None:
    async with w3c_service() as service:
        calls = await service.post(headers, callbacks=3)
    sent = [sent_traceparent(h) for h in calls]
    assert len({tid for _, tid, _, _ in sent}) == 1  # one trace
    assert len({pid for _, _, pid, _ in sent}) == 3  # one span per call
    (trace_id,) = {tid for _, tid, _, _ in sent}
    assert (trace_id == TID) == (name == "multiple_requests_with_valid_traceparent")


# ------------------------------------------------------------------ messages


async def settle(done: Callable[[], bool]) -> None:
    """Let the consumer run until ``done()`` (bounded in steps and time)."""
    with anyio.fail_after(WAIT_S):
        for _ in range(200):
            if done():
                return
            await anyio.wait_all_tasks_blocked()
    raise AssertionError("the consumer did not finish")


async def test_messages_carry_zeroed_flags_and_the_tracestate() -> None:
    """A Publish effect injects through the same writer: the consumer's trace
    continues with known flags only and the tracestate as parsed."""
    sink = InMemorySpanSink()
    app = App("orders", settings=load_settings({}), broker=MemoryBroker())
    app.trace_to(sink)
    seen: list[dict[str, str]] = []

    @step
    def publish(ctx: Context) -> Need:
        return Need(Publish(topic="orders", message={"n": 1}), then=accepted)

    @step
    def accepted(ctx: Context) -> Done:
        return Done(Response.text("ok", 202))

    @step
    def consume(ctx: Context) -> Done:
        assert ctx.message is not None
        seen.append(dict(ctx.message.headers))
        return Done(Response.text("ok"))

    app.post("/orders", publish)
    app.consumer("orders", consume)
    async with AppClient(app) as c:
        r = await c.post(
            "/orders",
            headers=[
                ("traceparent", tp_with(flags="ff")),
                ("tracestate", "foo@=1,bar=2"),
                ("tracestate", "foo@=3,t@" + "v" * 15 + "=4"),
            ],
        )
        await settle(lambda: bool(seen))
        await settle(lambda: len(sink.traces) == 2)
    assert r.status == 202
    expected_state = "foo@=1,bar=2,t@" + "v" * 15 + "=4"
    producer = next(s for t in sink.traces for s in t if s.name == "queue.publish orders")
    assert seen[0]["traceparent"] == f"00-{TID}-{producer.span_id:016x}-03"
    assert seen[0]["tracestate"] == expected_state
    consumer_root = next(t[0] for t in sink.traces if t[0].name == "queue.process orders")
    assert consumer_root.trace_id == int(TID, 16)
    assert consumer_root.parent_span_id == producer.span_id
    assert consumer_root.trace_state == expected_state
    assert consumer_root.flags & 0xFF == 0x03
    assert [link.trace_state for link in consumer_root.links] == [expected_state]


# ------------------------------------------------------------------ the parser alone


def test_traceparent_is_read_from_exactly_one_field() -> None:
    assert parse_traceparent(None) is None
    assert parse_traceparent([]) is None
    assert parse_traceparent([TP, TP]) is None
    parsed = parse_traceparent([f" \t{TP}\t "])
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id, parsed.flags) == (int(TID, 16), int(PID, 16), 1)
    assert parsed.header == TP
    assert parse_traceparent(TP) == parsed  # a bare string is one field


def test_a_future_version_is_read_up_to_512_characters() -> None:
    future = tp_with("cc") + "-" + "x" * (512 - 56)
    assert len(future) == 512
    parsed = parse_traceparent([future])
    assert parsed is not None and parsed.trace_id == int(TID, 16)
    assert parse_traceparent([future + "x"]) is None


def test_format_zeroes_unknown_flags() -> None:
    assert format_traceparent(int(TID, 16), int(PID, 16), 0xFF) == tp_with(flags="03")
    assert format_traceparent(1, 1, 0x04) == "00-" + "0" * 31 + "1-" + "0" * 15 + "1-00"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (None, None),
        ([], None),
        ([""], None),
        ("foo=1, bar=2", "foo=1,bar=2"),  # a bare string is one field
        (["a=" + "v" * 253, "b=" + "v" * 254], "a=" + "v" * 253 + ",b=" + "v" * 254),  # 512
        (["x=" + "v" * 256, "y=" + "v" * 256], "x=" + "v" * 256),  # 517: y goes
        (["z" * 256 + "=" + "v" * 256], None),  # one member of 513 characters
        # 611 characters: the large entry on the right (b) goes before the small ones.
        (
            ["a=" + "v" * 200, "b=" + "v" * 200, "c=" + "v" * 100, "d=" + "v" * 100],
            "a=" + "v" * 200 + ",c=" + "v" * 100 + ",d=" + "v" * 100,
        ),
        # A repeated key is dropped before the size is measured.
        (["a=" + "v" * 250, "a=" + "v" * 250, "a=1"], "a=" + "v" * 250),
    ],
)
def test_tracestate_limits(fields: Any, expected: str | None) -> None:
    out = parse_tracestate(fields)
    assert out == expected
    assert out is None or len(out) <= TRACESTATE_MAX_CHARS


# ------------------------------------------------------------------ properties

HEX = "0123456789abcdef"
NBLK = VALUE_CHARS.replace(" ", "")
OWS = st.sampled_from(["", " ", "\t", " \t ", "  "])

keys = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"),
    st.text(KEY_CHARS + "@", max_size=24) | st.text(KEY_CHARS + "@", min_size=200, max_size=255),
)
values = st.builds(
    lambda body, last: body + last,
    st.text(VALUE_CHARS, max_size=40) | st.text(VALUE_CHARS, min_size=100, max_size=255),
    st.sampled_from(NBLK),
)


@st.composite
def tracestate_fields(draw: st.DrawFn, members: list[str]) -> list[str]:
    """``members`` written as the wire may carry them: optional whitespace and
    empty members anywhere, split over one or more header fields."""
    items: list[str] = []
    for member in members:
        if draw(st.booleans()):
            items.append(draw(OWS))  # an empty member
        items.append(draw(OWS) + member + draw(OWS))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(items) - 1, 1)), max_size=3)))
    bounds = [0, *(c for c in cuts if c < len(items)), len(items)]
    return [",".join(items[a:b]) for a, b in itertools.pairwise(bounds)]


def split_members(value: str) -> list[str]:
    return value.split(",")


@settings(max_examples=200, deadline=None)
@given(
    trace_id=st.integers(1, 2**128 - 1),
    span_id=st.integers(1, 2**64 - 1),
    flags=st.integers(0, 255),
)
def test_format_then_parse_round_trips(trace_id: int, span_id: int, flags: int) -> None:
    header = format_traceparent(trace_id, span_id, flags)
    parsed = parse_traceparent([header])
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id, parsed.flags) == (trace_id, span_id, flags & 0x03)
    assert format_traceparent(parsed.trace_id, parsed.span_id, parsed.flags) == header


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    pairs=st.lists(st.tuples(keys, values), max_size=32, unique_by=lambda kv: kv[0]),
)
def test_tracestate_round_trips_and_truncates_by_the_rules(
    data: st.DataObject, pairs: list[tuple[str, str]]
) -> None:
    members = [f"{k}={v}" for k, v in pairs]
    out = parse_tracestate(data.draw(tracestate_fields(members)))
    canonical = ",".join(members)
    if len(canonical) <= TRACESTATE_MAX_CHARS:
        assert out == (canonical or None)
        return
    kept = split_members(out) if out else []
    assert len(out or "") <= TRACESTATE_MAX_CHARS
    assert kept == [m for m in members if m in kept]  # whole entries, in order
    small = [m for m in members if len(m) <= 128]
    kept_small = [m for m in kept if len(m) <= 128]
    if any(len(m) > 128 for m in kept):
        assert kept_small == small  # small entries go only once no large one is left
    assert kept_small == small[: len(kept_small)]  # ... and from the right
    dropped = [m for m in members if m not in kept]
    if kept_small != small:
        # Not dropped for nothing: the next small entry would not have fitted.
        assert len(out or "") + 1 + len(small[len(kept_small)]) > TRACESTATE_MAX_CHARS
    assert dropped  # over the limit, something went


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(codec="latin-1"), max_size=80), max_size=4))
def test_parsers_never_raise_and_what_they_keep_is_stable(fields: list[str]) -> None:
    parse_traceparent(fields)
    out = parse_tracestate(fields)
    if out is not None:
        assert parse_tracestate([out]) == out
        assert len(out) <= TRACESTATE_MAX_CHARS and len(split_members(out)) <= 32


# ------------------------------------------------------------------ against OpenTelemetry


@st.composite
def near_traceparents(draw: st.DrawFn) -> str:
    """Mostly valid headers with one or two things wrong: what both parsers
    must judge alike (no line breaks, at most 512 characters)."""
    version = draw(
        st.sampled_from(["00", "01", "cc", "fe", "ff"]) | st.text(HEX + "A.", max_size=3)
    )
    trace = draw(
        st.sampled_from(["0" * 32, TID])
        | st.text(HEX, min_size=31, max_size=33)
        | st.text(HEX + "A.", min_size=32, max_size=32)
    )
    span = draw(
        st.sampled_from(["0" * 16, PID])
        | st.text(HEX, min_size=15, max_size=17)
        | st.text(HEX + "F.", min_size=16, max_size=16)
    )
    flags = draw(st.text(HEX, min_size=2, max_size=2) | st.text(HEX + "F.", max_size=3))
    sep = draw(st.sampled_from(["-", "-", "-", "-", "_"]))
    suffix = draw(st.sampled_from(["", "", "-", "-x", ".x", "-what-the-future", " "]))
    return draw(OWS) + sep.join([version, trace, span, flags]) + suffix + draw(OWS)


def otel_extract(carrier: dict[str, list[str]]) -> tuple[int, int, int, str] | None:
    ctx = TraceContextTextMapPropagator().extract(carrier)
    sc = get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return None
    return sc.trace_id, sc.span_id, int(sc.trace_flags), sc.trace_state.to_header()


def zerver_extract(carrier: dict[str, list[str]]) -> tuple[int, int, int, str] | None:
    ctx = W3CTraceContextPropagator().extract(carrier)
    sc = get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return None
    out: dict[str, str] = {}
    W3CTraceContextPropagator().inject(out, ctx)
    return sc.trace_id, sc.span_id, int(sc.trace_flags), out.get("tracestate", "")


@settings(max_examples=300, deadline=None)
@given(near_traceparents())
def test_traceparent_agrees_with_opentelemetry(header: str) -> None:
    ours = zerver_extract({"traceparent": [header]})
    theirs = otel_extract({"traceparent": [header]})
    if theirs is None:
        assert ours is None
    else:
        assert ours is not None
        assert ours[:2] == theirs[:2]
        assert ours[2] == theirs[2] & 0x03  # unknown bits: zeroed here, kept there


# Keys both grammars accept: OpenTelemetry's (Level 1) simple and tenant@system keys.
otel_keys = st.from_regex(r"[a-z][a-z0-9_\-*/]{0,20}", fullmatch=True) | st.from_regex(
    r"[a-z0-9][a-z0-9_\-*/]{0,10}@[a-z][a-z0-9_\-*/]{0,5}", fullmatch=True
)
short_values = st.builds(
    lambda body, last: body + last, st.text(VALUE_CHARS, max_size=19), st.sampled_from(NBLK)
)
# Members both reject (the whole header goes).
broken_members = st.sampled_from(["FOO=1", "foo=", "foo=a=b", "_x=1", "foo bar=1", "k=\x7f", "=1"])


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    pairs=st.lists(st.tuples(otel_keys, short_values), max_size=10, unique_by=lambda kv: kv[0]),
    broken=st.none() | broken_members,
)
def test_tracestate_agrees_with_opentelemetry(
    data: st.DataObject, pairs: list[tuple[str, str]], broken: str | None
) -> None:
    members = [f"{k}={v}" for k, v in pairs]
    if broken is not None:
        members.insert(data.draw(st.integers(0, len(members))), broken)
    carrier = {"traceparent": [TP], "tracestate": data.draw(tracestate_fields(members))}
    ours, theirs = zerver_extract(carrier), otel_extract(carrier)
    assert ours is not None and theirs is not None
    assert ours[3] == theirs[3]
    assert ours[3] == ("" if broken is not None else ",".join(members))


@pytest.mark.parametrize(
    "fields",
    [["foo@=1"], ["foo@@bar=1"], ["t" * 242 + "@v=1"], ["foo=1,foo=2"], ["foo=1", "foo=1"]],
)
def test_opentelemetry_throws_away_what_zerver_keeps(fields: list[str]) -> None:
    """The cases the issue names: valid to the current grammar, or a repeated key."""
    carrier = {"traceparent": [TP], "tracestate": fields}
    theirs, ours = otel_extract(carrier), zerver_extract(carrier)
    assert theirs is not None and theirs[3] == ""
    assert ours is not None and ours[3] == fields[0].split(",")[0]


# ------------------------------------------------------------------ configuration


@contextlib.contextmanager
def global_textmap(textmap: TextMapPropagator) -> Iterator[None]:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(textmap)
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


def test_opentelemetry_tracecontext_is_replaced_wherever_it_is_configured() -> None:
    from opentelemetry.baggage.propagation import W3CBaggagePropagator

    class Custom(TraceContextTextMapPropagator):
        pass

    with global_textmap(TraceContextTextMapPropagator()):
        assert isinstance(_textmap(), W3CTraceContextPropagator)
    baggage = W3CBaggagePropagator()
    with global_textmap(CompositePropagator([baggage, TraceContextTextMapPropagator()])):
        swapped = _textmap()
        assert swapped is _textmap()  # built once per global propagator
        assert isinstance(swapped, CompositePropagator)
        members = swapped._propagators
        assert members[0] is baggage and isinstance(members[1], W3CTraceContextPropagator)
    custom = Custom()
    with global_textmap(custom):
        assert _textmap() is custom  # a subclass is the application's choice
