"""Secrets never reach telemetry: query redaction, userinfo, captured headers.

Every secret below is a unique marker string; the tests look for it in the
exported bytes (OTLP/JSON and protobuf), in the log lines and in the access log.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from zerver import App, Context, Done, HttpGet, Need, Response, Slot, load_settings, step
from zerver.core._attributes import DEFAULT_REDACTED_PARAMS, Redaction
from zerver.export import JsonEncoder, ProtobufWireEncoder
from zerver.http._connection import split_target
from zerver.runtime.interpreters import HttpInterpreter
from zerver.testing import AppClient, InMemorySpanSink, capture_logs
from zerver.trace._logging import AccessLog
from zerver.trace._semconv import HeaderCapture, HeaderCaptures

pytestmark = pytest.mark.anyio

SECRETS = {
    "AWSAccessKeyId": "AKIAQSECRET01",
    "Signature": "SIGSECRET02",
    "sig": "SIGSECRET03",
    "X-Goog-Signature": "GOOGSECRET04",
    "token": "TOKSECRET05",  # an operator-added name
}
QUERY = "&".join(f"{k}={v}" for k, v in SECRETS.items()) + "&page=2"
AUTH = "Bearer AUTHSECRET06"
COOKIE = "session=COOKIESECRET07"
HOST = "alice:HOSTPASS08@example.com:8443"
OUT_URL = "http://bob:OUTPASS09@upstream.test:9000/v1/x?sig=OUTSIG10&Signature=OUTSIG11&n=1"
ALL = [*SECRETS.values(), "AUTHSECRET06", "COOKIESECRET07", "HOSTPASS08", "alice", "bob"]
ALL += ["OUTPASS09", "OUTSIG10", "OUTSIG11"]


# -- the redaction rule ---------------------------------------------------------------


def test_default_names_are_the_semantic_conventions() -> None:
    assert DEFAULT_REDACTED_PARAMS == ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")
    r = Redaction()
    assert r.query("sig=abc&x=1") == "sig=REDACTED&x=1"
    assert r.query("AWSAccessKeyId=A&Signature=B&X-Goog-Signature=C") == (
        "AWSAccessKeyId=REDACTED&Signature=REDACTED&X-Goog-Signature=REDACTED"
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("page=2", "page=2"),
        ("SIG=abc", "SIG=REDACTED"),  # names ignore case
        ("%73ig=abc", "%73ig=REDACTED"),  # and percent-encoding
        ("a=1;sig=abc", "a=1;sig=REDACTED"),  # ';' separates too
        ("sig", "sig"),  # no value, nothing to hide
        ("sig=", "sig=REDACTED"),
        ("sig=a&sig=b", "sig=REDACTED&sig=REDACTED"),
        ("design=x&signature2=y", "design=x&signature2=y"),  # only whole names
        ("sig=REDACTED", "sig=REDACTED"),
        ("x=%zz&sig=1", "x=%zz&sig=REDACTED"),  # a broken escape elsewhere is kept
    ],
)
def test_redaction_cases(query: str, expected: str) -> None:
    assert Redaction().query(query) == expected


def test_a_query_without_sensitive_names_is_returned_as_is() -> None:
    q = "page=2&sort=date"
    assert Redaction(["token"]).query(q) is q


def test_operator_names_add_to_the_defaults() -> None:
    r = Redaction.parse(" token , api_key,")
    assert r.names == (*DEFAULT_REDACTED_PARAMS, "token", "api_key")
    assert (
        r.query("token=t&api_key=k&sig=s&a=1") == "token=REDACTED&api_key=REDACTED&sig=REDACTED&a=1"
    )


@pytest.mark.parametrize("bad", ["a=b", "a&b", "with space", "x#y"])
def test_bad_operator_names_stop_start_up(bad: str) -> None:
    from zerver import ConfigError

    with pytest.raises(ConfigError, match="ZER_VER_REDACT_QUERY_PARAMS"):
        load_settings({"ZER_VER_REDACT_QUERY_PARAMS": bad})


_names = st.sampled_from(["sig", "SIG", "Signature", "token", "page", "a", "%73ig", "x"])
_values = st.text(alphabet="abcXYZ019-_.%", min_size=0, max_size=8)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_names, _values, st.sampled_from("&;")), max_size=6))
def test_no_sensitive_value_survives(params: list[tuple[str, str, str]]) -> None:
    query = "".join(f"{sep if i else ''}{n}={v}" for i, (n, v, sep) in enumerate(params))
    out = Redaction(["token"]).query(query)
    if not params:
        assert out == ""
        return
    parts = re.split(r"[&;]", out)
    assert len(parts) == len(re.split(r"[&;]", query))
    for (name, value, _), part in zip(params, parts, strict=True):
        if name.lower() in {"sig", "signature", "token", "%73ig"}:
            assert part == f"{name}=REDACTED"
        else:
            assert part == f"{name}={value}"


# -- header capture ---------------------------------------------------------------------


def test_header_capture_matches_opentelemetry_python() -> None:
    """Same names, same sanitising as opentelemetry-util-http's SanitizeValue."""
    util = pytest.importorskip("opentelemetry.util.http")
    headers = [("X-Request-Id", "r1"), ("X-Custom-A", "a"), ("X-Secret-Key", "k"), ("Other", "o")]
    wanted, sanitize = ["x-request-id", "x-custom-.*", "x-secret-key"], ["secret"]
    ours = HeaderCapture(",".join(wanted), ",".join(sanitize), "http.request.header.")._capture(
        headers
    )
    theirs = util.SanitizeValue(sanitize).sanitize_header_values(
        dict(headers), wanted, lambda h: "http.request.header." + h
    )
    assert ours == theirs


def test_credentials_headers_are_always_sanitised() -> None:
    cap = HeaderCapture("authorization,cookie,set-cookie,proxy-authorization,x-a", "", "p.")
    got = cap._capture(
        [
            ("Authorization", "a"),
            ("Cookie", "c"),
            ("Set-Cookie", "s1"),
            ("Set-Cookie", "s2"),
            ("Proxy-Authorization", "p"),
            ("X-A", "visible"),
        ]
    )
    assert got == {
        "p.authorization": ["[REDACTED]"],
        "p.cookie": ["[REDACTED]"],
        "p.set-cookie": ["[REDACTED]", "[REDACTED]"],
        "p.proxy-authorization": ["[REDACTED]"],
        "p.x-a": ["visible"],
    }
    assert HeaderCapture("", "", "p.").capture is None  # nothing asked: nothing walked


def test_a_bad_header_expression_stops_start_up() -> None:
    from zerver import ConfigError

    var = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST"
    with pytest.raises(ConfigError, match=var):
        load_settings({var: "x-(a"})


# -- end to end: spans, logs, access log --------------------------------------------------


class Upstream(httpx.AsyncBaseTransport):
    """An upstream that answers every request and remembers it."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(
            200, headers={"set-cookie": "up=UPCOOKIE12", "x-upstream": "u1"}, content=b"{}"
        )


def _app(env: dict[str, str], upstream: Upstream) -> tuple[App, InMemorySpanSink]:
    app = App("secrets", settings=load_settings(env))
    captures = HeaderCaptures.from_settings(app.settings)
    app.interpreter("http", HttpInterpreter(transport=upstream, capture_headers=captures))
    out: Slot[Any] = Slot("out")

    @step(writes=[out])
    def call(ctx: Context) -> Need:
        auth = (("authorization", "Basic OUTAUTH13"),)
        return Need([HttpGet(url=OUT_URL, slot=out, headers=auth)])

    @step(reads=[out])
    def answer(ctx: Context) -> Done:
        return Done(Response.json({"ok": True}, headers=[("set-cookie", "s=RESPCOOKIE14")]))

    app.get("/r", call, answer)
    sink = InMemorySpanSink()
    app.trace_to(sink)
    app.subscribe(AccessLog())
    return app, sink


ENV = {
    "ZER_VER_REDACT_QUERY_PARAMS": "token",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST": "authorization,cookie,x-trace-me",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE": "set-cookie,content-type",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": "authorization,traceparent",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE": "set-cookie,x-upstream",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS": "x-trace-.*",
}


async def _exchange(env: dict[str, str]) -> tuple[list[Any], list[Any], Upstream]:
    upstream = Upstream()
    app, sink = _app(env, upstream)
    headers = [
        ("host", HOST),
        ("authorization", AUTH),
        ("cookie", COOKIE),
        ("x-trace-me", "TRACEME15"),
    ]
    with capture_logs() as logs:
        async with AppClient(app) as client:
            assert (await client.get(f"/r?{QUERY}", headers=headers)).status == 200
            assert (await client.get(f"/missing?{QUERY}", headers=headers)).status == 404
    return list(sink.spans), logs, upstream


async def test_no_secret_reaches_spans_logs_or_the_access_log() -> None:
    spans, logs, upstream = await _exchange(ENV)
    assert upstream.seen, "the outbound call was made"
    secrets = [*ALL, "OUTAUTH13", "UPCOOKIE12", "RESPCOOKIE14", "TRACEME15"]
    as_json = JsonEncoder().encode(spans).decode()
    as_pb = ProtobufWireEncoder().encode(spans)
    # The protobuf bytes decode with the official schema, and hold no secret either.
    ExportTraceServiceRequest.FromString(as_pb)
    log_text = repr(logs)
    for secret in secrets:
        assert secret not in as_json, secret
        assert secret.encode() not in as_pb, secret
        assert secret not in log_text, secret
    assert any(line.get("event") == "request" for line in logs), "the access log ran"


async def test_what_is_recorded_instead() -> None:
    spans, _, _ = await _exchange(ENV)
    roots = {s.attributes.get("http.route"): s for s in spans if s.parent_span_id == 0}
    want = "&".join(f"{k}=REDACTED" for k in SECRETS) + "&page=2"
    for root in (roots["/r"], roots[None]):  # the 404 too
        a = root.attributes
        assert a["url.query"] == want
        assert a["http.target"] == f"{a['url.path']}?{want}"
        assert a["http.host"] == "example.com:8443"
        assert a["server.address"] == "example.com" and a["server.port"] == 8443
        assert a["http.request.header.authorization"] == ["[REDACTED]"]
        assert a["http.request.header.cookie"] == ["[REDACTED]"]
        assert a["http.request.header.x-trace-me"] == ["[REDACTED]"]
    r = roots["/r"].attributes
    assert r["http.response.header.set-cookie"] == ["[REDACTED]"]
    assert r["http.response.header.content-type"] == ["application/json"]
    client = next(s for s in spans if s.name.startswith("http.get"))
    c = client.attributes
    assert c["url.full"] == (
        "http://REDACTED:REDACTED@upstream.test:9000/v1/x?sig=REDACTED&Signature=REDACTED&n=REDACTED"
    )
    assert c["server.address"] == "upstream.test" and c["server.port"] == 9000
    assert c["http.request.header.authorization"] == ["[REDACTED]"]
    assert isinstance(c["http.request.header.traceparent"], list)
    assert c["http.response.header.set-cookie"] == ["[REDACTED]"]
    assert c["http.response.header.x-upstream"] == ["u1"]


async def test_no_header_is_captured_by_default() -> None:
    spans, _, _ = await _exchange({})
    for s in spans:
        assert not any(
            k.startswith(("http.request.header.", "http.response.header.")) for k in s.attributes
        )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://carol:ABSPASS16@example.com/r?sig=S", ("/r", "sig=S")),
        (b"https://carol@example.com:8443/a/b", ("/a/b", "")),
    ],
)
def test_absolute_form_targets_keep_no_userinfo(target: bytes, expected: tuple[str, str]) -> None:
    path, query = split_target(b"GET", target) or ("", "")
    assert (path, query) == expected
    assert "carol" not in path + query and "ABSPASS16" not in path + query
    assert Redaction().query(query) in ("sig=REDACTED", "")
