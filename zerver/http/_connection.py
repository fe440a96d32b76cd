"""What one HTTP/1.1 connection needs besides h11: limits, requests, responses.

The sans-I/O helpers of :mod:`zerver.http._machine`, which states the rules of
a connection: the server's checks of a request head (:func:`check_head`),
building the :class:`Request` (:func:`make_request`), the refusal of a peer
error (:func:`rejection`, :func:`reject_for`), encoding a response
(:func:`encode_response`) and the next cycle of a kept-alive connection
(:func:`next_cycle`), with the :class:`ConnectionContext` every connection of
one server shares and the accept-failure log both transports keep.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import h11
import orjson
import structlog

from zerver.core._http import Request, Response

__all__ = [
    "AcceptFailures",
    "ConnectionContext",
    "DateHeader",
    "RejectedError",
    "check_head",
    "encode_response",
    "host_port",
    "internal_error",
    "make_request",
    "next_cycle",
    "reject_for",
    "rejection",
    "split_target",
]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("zerver.server")

# Large bodies are written in slices, so the write deadline measures the
# peer's progress rather than the size of the response.
WRITE_SLICE = 64 * 1024
# Coalescing head and body into one write saves a syscall; above this size the
# copy costs more than the syscall.
COALESCE_MAX = 16 * 1024
LINGER_TIMEOUT_S = 1.0
LINGER_MAX_BYTES = 256 * 1024
# h11 checks the size of an *incomplete* head only; a complete head that arrived
# in one read is measured here. Each header line costs its name, value, ": " and CRLF.
_HEADER_LINE_OVERHEAD = 4
_REQUEST_LINE_OVERHEAD = 12
# What h11 accepts in a response: a three-digit status, token header names,
# field-values (no NUL, no CR/LF, no surrounding whitespace), 1..20 digit lengths.
_STATUS_MAX = 999
_FIELD_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,20}")
# Header names already validated (apps use few); bounded so odd apps cannot grow it.
_VALID_NAMES: dict[str, bytes] = {}
_VALID_NAMES_MAX = 256
# RFC 9110 §7.2: Host = uri-host [ ":" port ], uri-host an IP literal or a
# reg-name (no space, no "/", no "@" userinfo). Empty is allowed.
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z\-._~%!$&'()*+,;=:]+\]|[0-9A-Za-z\-._~%!$&'()*+,;=]*)(?::[0-9]*)?"
)
# Host values already validated (a server sees few); bounded like _VALID_NAMES.
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_MAX = 256

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}
_VERSIONS: dict[bytes, str] = {b"1.1": "1.1", b"1.0": "1.0"}

Dispatch = Callable[[Request], Awaitable[Response]]


class DateHeader:
    """The ``date`` header value, formatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def current(self) -> bytes:
        """The IMF-fixdate of the current second, as bytes."""
        now = int(time.time())
        if now != self._second:
            self._value = email.utils.formatdate(now, usegmt=True).encode("ascii")
            self._second = now
        return self._value


class ConnectionContext:
    """What every connection of one server shares: the app, limits and shutdown state."""

    __slots__ = (
        "body_timeout_s",
        "closing",
        "dates",
        "dispatch",
        "header_timeout_s",
        "keepalive_timeout_s",
        "max_body_bytes",
        "max_body_digits",
        "max_connections",
        "max_header_bytes",
        "max_pipelined",
        "write_timeout_s",
    )

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        max_header_bytes: int,
        max_body_bytes: int,
        header_timeout_s: float,
        keepalive_timeout_s: float,
        max_pipelined: int,
        body_timeout_s: float = 60.0,
        write_timeout_s: float = 30.0,
        max_connections: int = 1000,
    ) -> None:
        self.dispatch = dispatch
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_body_digits = len(str(max_body_bytes))
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_pipelined = max_pipelined
        self.body_timeout_s = body_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_connections = max_connections
        self.dates = DateHeader()
        self.closing = False


def split_target(method: bytes, target: bytes) -> tuple[str, str] | None:
    """Split a request target into (path, query); ``None`` if its form is not served.

    Origin-form (``/a?b``) keeps the raw path; absolute-form
    (``http://host/a?b``) is reduced to its path and query; asterisk-form
    (``*``) is accepted for ``OPTIONS`` only. Authority-form (``CONNECT``) is not served.
    """
    if target[:1] == b"/":
        path, _, query = target.partition(b"?")
        return path.decode("latin-1"), query.decode("latin-1")
    if target == b"*":
        return ("*", "") if method == b"OPTIONS" else None
    scheme = target[:8].lower()
    if scheme.startswith((b"http://", b"https://")):
        parts = urlsplit(target.decode("latin-1"))
        if not parts.netloc:
            return None
        return parts.path or "/", parts.query
    return None


class RejectedError(Exception):
    """The peer's request is refused with ``status`` and the connection closes."""

    def __init__(self, status: int, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def rejection(
    ctx: ConnectionContext, reject: RejectedError, client: tuple[str, int] | None
) -> bytes:
    """Log the refusal; the complete ``connection: close`` error response, with a small JSON body.

    Written without h11: the connection closes right after the response, so
    h11's state (which may already be ERROR) does not matter.
    """
    _log.debug("request rejected", status=reject.status, reason=reject.message, client=client)
    status = reject.status
    body = orjson.dumps({"error": reject.message, **reject.extra})
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"connection: close\r\ndate: %s\r\n\r\n" % ctx.dates.current(),
            body,
        )
    )


def check_head(
    ctx: ConnectionContext, event: h11.Request, headers: list[tuple[bytes, bytes]]
) -> tuple[str, str]:
    """Apply the server's limits to a request head; its (path, query) if it is served.

    Raises :class:`RejectedError` (505, 431, 400, 417 or 413) otherwise.
    """
    # h11 accepts any HTTP/<digit>.<digit>; only 1.0 and 1.1 are served.
    if event.http_version not in _VERSIONS:
        raise RejectedError(505, "http version not supported")
    size = len(event.method) + len(event.target) + _REQUEST_LINE_OVERHEAD
    length: bytes | None = None
    expect: bytes | None = None
    chunked = False
    for name, value in headers:
        size += len(name) + len(value) + _HEADER_LINE_OVERHEAD
        if name == b"content-length":
            length = value
        elif name == b"host":
            if value not in _VALID_HOSTS:
                if _HOST.fullmatch(value) is None:
                    raise RejectedError(400, "invalid host header")
                if len(_VALID_HOSTS) < _VALID_HOSTS_MAX:
                    _VALID_HOSTS.add(value)
        elif name == b"transfer-encoding":
            # h11 lets only "chunked" through (anything else is a 501 already).
            chunked = True
        elif name == b"expect":
            expect = value
    if size > ctx.max_header_bytes:
        raise RejectedError(431, "request header block too large", limit=ctx.max_header_bytes)
    if chunked and (length is not None or event.http_version == b"1.0"):
        # RFC 9112 §6.1: such a message may be served only if the connection
        # closes after it; refusing it is the safe reading (no smuggled request).
        raise RejectedError(400, "ambiguous message framing")
    split = split_target(event.method, event.target)
    if split is None:
        raise RejectedError(400, "invalid request target")
    # h11 handles 100-continue (and ignores it in HTTP/1.0, as RFC 9110 asks).
    if expect is not None and expect.lower() != b"100-continue":
        raise RejectedError(417, "unsupported expectation")
    # h11 has validated the digits; comparing the length first avoids
    # converting an absurdly long number.
    if length is not None and (
        len(length) > ctx.max_body_digits or int(length) > ctx.max_body_bytes
    ):
        raise RejectedError(413, "request body too large", limit=ctx.max_body_bytes)
    return split


def make_request(
    head: h11.Request,
    headers: list[tuple[bytes, bytes]],
    target: tuple[str, str],
    parts: list[bytes],
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
) -> Request:
    """The :class:`Request` of a complete message (``parts`` are its body's pieces)."""
    return Request(
        method=_METHODS.get(head.method) or head.method.decode("ascii"),
        path=target[0],
        query=target[1],
        headers=headers,
        body=b"".join(parts) if len(parts) != 1 else parts[0],
        http_version=_VERSIONS.get(head.http_version) or head.http_version.decode("ascii"),
        scheme="http",
        client=client,
        server=server,
    )


def encode_response(
    ctx: ConnectionContext, request: Request, response: Response
) -> tuple[bytes, bytes, bool]:
    """The response's head bytes, the body to send and whether the connection stays open.

    The head is written here rather than by h11 (whose send path costs as
    much as parsing the request), with h11's rules: header names must be
    tokens and values field-values; the connection closes when the client
    asked (``connection: close`` or HTTP/1.0), the app said so, or the server
    shuts down, and then the head says ``connection: close``. A response that
    cannot be sent (a 1xx status, a header that is not latin-1, ...) is
    replaced by a logged 500. h11 never sees the response: a kept-alive
    connection continues on a fresh ``h11.Connection`` (see :func:`next_cycle`).
    """
    try:
        return _encode(ctx, request, response)
    except (UnicodeError, ValueError, TypeError) as exc:
        fallback = internal_error("app response cannot be sent", request, error=str(exc))
        return _encode(ctx, request, fallback)


def next_cycle(conn: h11.Connection, max_header_bytes: int) -> h11.Connection:
    """A fresh h11 connection holding ``conn``'s unparsed bytes, for the next request.

    Equivalent to ``start_next_cycle`` once the response is out; the
    response itself bypassed h11 (see :func:`encode_response`).
    """
    data, closed = conn.trailing_data
    fresh = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
    if data:
        fresh.receive_data(data)
    if closed:
        fresh.receive_data(b"")
    return fresh


def _encode(
    ctx: ConnectionContext, request: Request, response: Response
) -> tuple[bytes, bytes, bool]:
    status = response.status
    if not 200 <= status <= _STATUS_MAX:
        raise ValueError(f"the app returned status {status}; a final response needs 200..599")
    body = response.body
    declared: bytes | None = None
    date = ctx.dates.current()
    lines: list[bytes] = [b"", b""]  # the status line and the date go first
    tokens: list[bytes] = []
    for name, value in response.headers:
        lname = name.lower()
        raw = value.encode("latin-1")
        if _FIELD_VALUE.fullmatch(raw) is None:
            raise ValueError(f"illegal value {value!r} of header {name!r}")
        # The server frames every body itself; an app-given length is kept
        # only where no body follows (HEAD, 304).
        if lname == "content-length":
            if _CONTENT_LENGTH.fullmatch(raw) is None:
                raise ValueError(f"bad content-length {value!r}")
            declared = raw
        elif lname == "date":
            date = raw
        elif lname == "connection":
            tokens.extend(t.strip() for t in raw.lower().split(b","))
        elif lname != "transfer-encoding":
            encoded = _VALID_NAMES.get(name)
            if encoded is None:
                if _FIELD_NAME.fullmatch(name) is None:
                    raise ValueError(f"illegal header name {name!r}")
                encoded = name.encode("ascii")
                if len(_VALID_NAMES) < _VALID_NAMES_MAX:
                    _VALID_NAMES[name] = encoded
            lines.append(b"%s: %s\r\n" % (encoded, raw))
    if status == 204:
        body = b""
    elif status == 304:
        body = b""
        if declared is not None:
            lines.append(b"content-length: %s\r\n" % declared)
    elif request.method == "HEAD":
        length = b"%d" % len(body) if body or declared is None else declared
        lines.append(b"content-length: %s\r\n" % length)
        body = b""
    else:
        lines.append(b"content-length: %d\r\n" % len(body))
    keep_alive = not ctx.closing and b"close" not in tokens and _client_keeps_alive(request)
    if not keep_alive:
        kept = {t for t in tokens if t and t != b"keep-alive"}
        kept.add(b"close")
        lines.append(b"connection: %s\r\n" % b", ".join(sorted(kept)))
    elif tokens:
        lines.append(b"connection: %s\r\n" % b", ".join(t for t in tokens if t))
    lines[0] = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
    lines[1] = b"date: %s\r\n" % date
    lines.append(b"\r\n")
    return b"".join(lines), body, keep_alive


def _client_keeps_alive(request: Request) -> bool:
    """h11's rule: HTTP/1.1 without a ``close`` token in ``Connection``."""
    if request.http_version < "1.1":
        return False
    for name, value in request.headers:
        if name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
            return False
    return True


class AcceptFailures:
    """Failed accepts (out of file descriptors, say), logged once per interval.

    An accept that fails for want of resources fails again at once, so each
    transport backs off; this says what to log: the first failure, then at
    most one line per ``interval_s`` with how many failed since, and one line
    when accepting works again. ``clock`` is injected for tests.
    """

    __slots__ = ("_clock", "_interval_s", "_next_log", "_since_log", "_total")

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_log = 0.0
        self._since_log = 0
        self._total = 0

    @property
    def failing(self) -> bool:
        """Whether accepting failed and has not worked since."""
        return self._total > 0

    def failed(self, exc: OSError, backoff_s: float) -> None:
        """Count one failure; log it if the interval since the last line has passed."""
        self._total += 1
        self._since_log += 1
        now = self._clock()
        if now >= self._next_log:
            _log.error(
                "accept failed; backing off",
                error=exc.strerror or str(exc),
                errno=exc.errno,
                failures=self._since_log,
                backoff_s=backoff_s,
                next_report_s=self._interval_s,
            )
            self._since_log = 0
            self._next_log = now + self._interval_s

    def succeeded(self) -> None:
        """Accepting works again (call only while :attr:`failing`)."""
        _log.warning("accepting connections again", failures=self._total)
        self._total = 0
        self._since_log = 0
        self._next_log = 0.0


def host_port(address: object) -> tuple[str, int] | None:
    # IPv6 socket addresses carry flow info and scope id after (host, port).
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


def reject_for(exc: h11.RemoteProtocolError) -> RejectedError:
    """The refusal of input h11 could not parse.

    h11's message may quote the offending bytes (a header value, say), so it
    goes to the debug log only; the peer gets the generic reason.
    """
    status = exc.error_status_hint
    if status == 431:
        return RejectedError(431, "request header block too large")
    if status == 501:
        return RejectedError(501, "unsupported transfer coding")
    return RejectedError(status, "malformed request")


def internal_error(what: str, request: Request, *, error: str | None = None) -> Response:
    """A 500 whose ``error_id`` is logged with ``what`` (and the exception being handled)."""
    error_id = secrets.token_hex(8)
    if error is None:
        _log.exception(what, error_id=error_id, method=request.method, path=request.path)
    else:
        _log.error(what, error_id=error_id, method=request.method, path=request.path, error=error)
    return Response.json({"error": "internal server error", "error_id": error_id}, status=500)
