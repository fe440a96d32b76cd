"""One HTTP/1.1 connection: h11 on an anyio socket stream, with limits and timeouts.

h11 parses requests; this module adds what a server needs on top of it and
writes response heads itself (see :func:`encode_response`). The rules below
hold for both transports; the sans-I/O helpers (limits, request building,
response encoding) are shared with the asyncio Protocol transport in
:mod:`zerver.http._protocol`, which implements the same rules with callbacks
instead of the reader task described here. The rules of a connection:

* Requests are answered strictly in order, one at a time (pipelined requests
  wait in h11's receive buffer until the previous response has been sent).
  HTTP/1.1 connections stay open unless either side says ``connection: close``;
  HTTP/1.0 connections close after one response (h11 has no 1.0 keep-alive).
* One **reader task** per connection is the only caller of ``stream.receive``.
  It feeds every byte to h11 and wakes the handler. It keeps reading while the
  handler waits for bytes, and otherwise only until ``max_pipelined`` bytes have
  been read ahead since the handler last ran dry; then it parks. So h11's buffer
  never holds more than ``max_pipelined`` + ``max_header_bytes`` + one read.
* Reading ahead is also how a disconnect is noticed. The peer's EOF means it is
  gone (a half-close is treated as a close, as most servers do): EOF while the
  app's ``dispatch`` is awaited cancels the connection's cancel scope, hence the
  dispatch and whatever jobs the app ties to it; a request that was complete
  before the EOF is not dispatched. A reader parked on the read-ahead budget
  notices nothing until the current response has been written.
* Waiting for a new request with nothing buffered is *idle*: after
  ``keepalive_timeout_s``, or at once when the server shuts down, the
  connection closes silently.
* Once a request head has started it must be complete within
  ``header_timeout_s``; each wait for more body bytes is bounded by the same
  value, and the whole body must arrive within ``body_timeout_s`` of the head
  (an overall deadline: a trickle of bytes does not extend it). Running out of
  time answers 408 and closes.
* Writing waits on the peer: each write of a response (bodies are written in
  slices of ``WRITE_SLICE`` bytes) must be taken by the peer within
  ``write_timeout_s``, else the connection is dropped without a word. While a
  response waits, no further pipelined request is parsed, and the reader stops
  at its read-ahead budget, so a peer that never reads holds at most one
  response and ``max_pipelined`` bytes of input.
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
* A connection accepted while ``max_connections`` are open is answered 503
  and closed (with a lingering close, counted apart); one accepted while as
  many such refusals are still lingering is closed at once.
* Every server-side close after a response is a *lingering close*: half-close,
  then discard what the peer still sends (bounded in time and bytes) until its
  EOF, so that a TCP reset cannot destroy the response in flight.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import orjson
import structlog

from zerver.core._http import Request, Response

__all__ = [
    "AcceptFailures",
    "ConnectionContext",
    "DateHeader",
    "RejectedError",
    "ServerConnection",
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

_READ_SIZE = 64 * 1024
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


class ServerConnection:
    """Serves the requests of one accepted socket stream; see the module rules."""

    __slots__ = (
        "_ahead",
        "_client",
        "_ctx",
        "_data_ready",
        "_discard",
        "_dispatching",
        "_eof",
        "_h11",
        "_idle_scope",
        "_local",
        "_reader_done",
        "_reader_wakeup",
        "_scope",
        "_write_since",
        "stream",
    )

    def __init__(self, ctx: ConnectionContext, stream: anyio.abc.SocketStream) -> None:
        self._ctx = ctx
        self.stream = stream
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.max_header_bytes)
        # anyio leaves remote_address out when the peer already reset the connection.
        self._client = host_port(stream.extra(anyio.abc.SocketAttribute.remote_address, None))
        self._local = host_port(stream.extra(anyio.abc.SocketAttribute.local_address, None))
        self._scope: anyio.CancelScope | None = None
        self._dispatching = False
        self._eof = False
        self._discard = False
        self._reader_done = False
        self._ahead = 0
        self._data_ready: anyio.Event | None = None
        self._reader_wakeup: anyio.Event | None = None
        self._idle_scope: anyio.CancelScope | None = None
        self._write_since = 0.0

    def close_if_idle(self) -> None:
        """Close the connection now if it is waiting for a new request (server shutdown)."""
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    def drop_if_stalled(self, now: float) -> None:
        """Drop the connection if one write has waited on the peer past the write timeout."""
        since = self._write_since
        if since and now - since >= self._ctx.write_timeout_s and self._scope is not None:
            _log.debug("write timed out; dropping the connection", client=self._client)
            self._scope.cancel()

    async def run(self, refuse: RejectedError | None = None) -> None:
        """Serve requests until the connection is done, then close the stream.

        With ``refuse``, answer that error at once instead (over ``max_connections``).
        """
        # Why a per-connection reader task instead of a watcher per request: it
        # keeps the hot path free of task and task-group creation. A request
        # costs one wake-up of this task by the reader; the only per-request
        # objects are h11's events, the Request, the response headers and one
        # timeout scope while waiting for the next request.
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._read_loop)
                try:
                    if refuse is None:
                        await self._serve()
                    else:
                        await self._reject(refuse)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await self.stream.aclose()

    # ---------------------------------------------------------------- handler

    async def _serve(self) -> None:
        dispatch = self._ctx.dispatch
        while True:
            try:
                request = await self._read_request()
            except RejectedError as reject:
                await self._reject(reject)
                return
            if request is None:
                return
            if self._eof:
                # The peer's EOF means it is gone (see the module rules); a
                # request that was complete before it is dropped, not dispatched.
                _log.debug("client disconnected before dispatch", client=self._client)
                return
            self._dispatching = True
            try:
                response = await dispatch(request)
            except Exception:
                response = internal_error("app dispatch raised", request)
            finally:
                self._dispatching = False
            keep_alive = await self._respond(request, response)
            if keep_alive is None:
                return
            if not keep_alive:
                await self._linger()
                return
            self._h11 = next_cycle(self._h11, self._ctx.max_header_bytes)

    async def _read_request(self) -> Request | None:
        """The next complete request, or ``None`` when the connection should close."""
        conn = self._h11
        ctx = self._ctx
        head: h11.Request | None = None
        headers: list[tuple[bytes, bytes]] = []
        target = ("", "")
        parts: list[bytes] = []
        body_size = 0
        head_deadline: float | None = None
        body_deadline = 0.0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise reject_for(exc) from None
            if event is h11.NEED_DATA:
                if head is None:
                    if head_deadline is None:
                        if not conn.trailing_data[0]:
                            if ctx.closing or not await self._wait_for_bytes(
                                ctx.keepalive_timeout_s, idle=True
                            ):
                                return None
                            continue
                        head_deadline = anyio.current_time() + ctx.header_timeout_s
                    timeout = head_deadline - anyio.current_time()
                else:
                    if conn.they_are_waiting_for_100_continue and not await self._continue():
                        return None
                    timeout = min(ctx.header_timeout_s, body_deadline - anyio.current_time())
                if not await self._wait_for_bytes(timeout):
                    if self._reader_done:
                        return None
                    raise RejectedError(408, "request timeout")
                continue
            if type(event) is h11.Data:
                body_size += len(event.data)
                if body_size > ctx.max_body_bytes:
                    raise RejectedError(413, "request body too large", limit=ctx.max_body_bytes)
                parts.append(event.data)
            elif type(event) is h11.Request:
                head = event
                headers = list(event.headers)
                target = check_head(ctx, event, headers)
                body_deadline = anyio.current_time() + ctx.body_timeout_s
            elif type(event) is h11.EndOfMessage:
                if head is None:  # pragma: no cover - h11 never ends a message it did not start
                    return None
                return make_request(head, headers, target, parts, self._client, self._local)
            else:
                # ConnectionClosed. PAUSED cannot happen: a cycle starts after its response.
                return None

    async def _wait_for_bytes(self, timeout: float, *, idle: bool = False) -> bool:
        """Wait until the reader has fed h11 more bytes; ``False`` on timeout or shutdown."""
        if self._reader_done:
            return False
        self._ahead = 0
        ready = self._data_ready = anyio.Event()
        wakeup = self._reader_wakeup
        if wakeup is not None:
            wakeup.set()
        with anyio.move_on_after(timeout) as scope:
            if idle:
                self._idle_scope = scope
            try:
                await ready.wait()
            finally:
                self._idle_scope = None
        self._data_ready = None
        return ready.is_set()

    async def _send(self, data: bytes) -> bool:
        """Write ``data``; ``False`` if the peer is gone.

        The write deadline is kept by the server's sweeper (see
        :meth:`drop_if_stalled`): a cancel scope per write would cost more
        than the rest of sending a small response.
        """
        self._write_since = anyio.current_time()
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        finally:
            self._write_since = 0.0
        return True

    async def _continue(self) -> bool:
        """Send ``100 Continue``; ``False`` if the peer is gone."""
        event = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        return await self._send(self._h11.send(event) or b"")

    async def _respond(self, request: Request, response: Response) -> bool | None:
        """Send the response; ``None`` if the peer is gone, else whether to keep alive."""
        head, body, keep_alive = encode_response(self._ctx, request, response)
        if body and len(body) <= COALESCE_MAX:
            sent = await self._send(head + body)
        else:
            sent = await self._send(head)
            if len(body) <= WRITE_SLICE:
                sent = sent and (not body or await self._send(body))
            else:
                for start in range(0, len(body), WRITE_SLICE):
                    if not sent:
                        break
                    sent = await self._send(body[start : start + WRITE_SLICE])
        return keep_alive if sent else None

    async def _reject(self, reject: RejectedError) -> None:
        if await self._send(rejection(self._ctx, reject, self._client)):
            await self._linger()

    async def _linger(self) -> None:
        """Half-close, then discard input until the peer's EOF (bounded)."""
        self._discard = True
        wakeup = self._reader_wakeup
        if wakeup is not None:
            wakeup.set()
        if self._reader_done:
            return
        try:
            await self.stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        # In discard mode the reader sets this event only when it stops.
        ready = self._data_ready = anyio.Event()
        if not self._reader_done:
            with anyio.move_on_after(LINGER_TIMEOUT_S):
                await ready.wait()

    # ----------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        receive = self.stream.receive
        limit = self._ctx.max_pipelined
        discarded = 0
        try:
            while True:
                if not self._discard and self._ahead >= limit and self._data_ready is None:
                    wakeup = self._reader_wakeup = anyio.Event()
                    await wakeup.wait()
                    self._reader_wakeup = None
                    continue
                try:
                    data = await receive(_READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                if self._discard:
                    discarded += len(data)
                    if data and discarded <= LINGER_MAX_BYTES:
                        continue
                    return
                if not data:
                    self._eof = True
                    self._h11.receive_data(b"")
                    if self._dispatching and self._scope is not None:
                        _log.debug("client disconnected during dispatch", client=self._client)
                        self._scope.cancel()
                    return
                self._ahead += len(data)
                # Not bound once: the handler moves to a fresh h11 connection per request.
                self._h11.receive_data(data)
                ready = self._data_ready
                if ready is not None:
                    ready.set()
        except anyio.ClosedResourceError:
            return
        finally:
            self._reader_done = True
            ready = self._data_ready
            if ready is not None:
                ready.set()


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
