"""The asyncio ``Protocol`` transport: h11 fed from ``data_received`` callbacks.

The default transport when anyio runs on asyncio (see ``ServerConfig.transport``).
It keeps every rule of :mod:`zerver.http._connection` (ordering, limits, timeouts,
read-ahead bound, disconnect cancels dispatch, lingering close, graceful
shutdown) but replaces the per-connection reader task, anyio events and
cancel scopes of the streams transport with callbacks, which costs far less
per request. This module is the only one that touches the asyncio loop directly.

The rules of one connection's state machine:

* ``data_received`` feeds h11 and, unless a request is being answered, parses
  at once. A complete request starts a *busy period*: one asyncio task that
  awaits ``dispatch`` inside an anyio cancel scope, writes the response, and
  goes on with the next pipelined request already buffered. So requests are
  answered strictly in order, one at a time, and a connection that is not
  busy has no task at all.
* While busy (or while the transport has paused writing), received bytes are
  only fed to h11; once ``max_pipelined`` bytes have been read since parsing
  last ran dry, reading pauses. It resumes when parsing runs dry again.
* ``pause_writing`` from the transport (a slow reader: more than its
  high-water mark of output is buffered) ends the busy period after the
  current response and starts the write deadline; ``resume_writing`` stops
  it and goes on parsing. So a peer that does not read holds one response
  and ``max_pipelined`` bytes of input, for at most ``write_timeout_s``.
* The peer's EOF (or a lost connection) while busy cancels the dispatch's
  scope; a request complete before the EOF is not dispatched.
* At most one timer per connection, re-armed lazily: a wait records its
  deadline and mode (idle, head, body, write, linger, drain); the timer, when
  it fires, acts only if the deadline has passed and otherwise re-arms
  itself. Idle closes silently; head/body answer 408 (the body's deadline is
  the earlier of ``header_timeout_s`` from its last bytes and
  ``body_timeout_s`` from its head); write (output stalled) drops the
  connection; linger closes, and a close with output still buffered (drain)
  drops the connection if the peer has not taken it within ``write_timeout_s``.
* A connection leaves the server's set once its transport is lost *and* no
  busy period is running, so shutdown waits for both.

The server accepts on its listening sockets itself (rather than through
``loop.create_server``): asyncio's own accept loop logs a traceback per failed
``accept`` when file descriptors run out, thousands a second. Here a failure
removes the socket's reader for ``accept_backoff_s`` and is logged through
:class:`~zerver.http._connection.AcceptFailures`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import h11
import structlog

from ._connection import (
    COALESCE_MAX,
    LINGER_MAX_BYTES,
    LINGER_TIMEOUT_S,
    AcceptFailures,
    ConnectionContext,
    RejectedError,
    check_head,
    encode_response,
    host_port,
    internal_error,
    make_request,
    next_cycle,
    reject_for,
    rejection,
)

if TYPE_CHECKING:
    from anyio.streams.stapled import MultiListener

    from zerver.core._http import Request, Response

__all__ = ["ProtocolConnection", "ProtocolServer", "running_on_asyncio"]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("zerver.server")

# What a connection is waiting for; decides what its timer does.
_NONE = 0  # nothing (busy, stalled on writing, or closed): the timer does nothing
_IDLE = 1  # a new request with nothing buffered: close silently
_HEAD = 2  # the rest of a started request head: 408
_BODY = 3  # more body bytes: 408
_LINGER = 4  # the peer's EOF after our half-close: close
_WRITE = 5  # the peer to take buffered output (writing paused): drop
_DRAIN = 6  # closed with output still buffered: drop

# Accepts per readiness event, as asyncio's own loop does with its backlog.
_ACCEPT_BATCH = 128
# The peer gave up between connecting and being accepted: not the server's problem.
_PEER_ERRNOS = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO})

# A timer may fire this much before its deadline (the loop's clock resolution).
_TIMER_SLACK_S = 0.001


def running_on_asyncio() -> bool:
    """Whether the current anyio backend is asyncio (so this transport can run)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ProtocolServer:
    """The listening sockets and live connections of one ``serve`` call on asyncio."""

    __slots__ = (
        "_accept_backoff_s",
        "_accept_failures",
        "_accepting",
        "_connecting",
        "_connections",
        "_drained",
        "_host",
        "_listener",
        "_refusing",
        "_retries",
        "_shutdown_timeout_s",
        "_sockets",
        "ctx",
        "loop",
        "port",
    )

    def __init__(
        self,
        ctx: ConnectionContext,
        listener: MultiListener[anyio.abc.SocketStream],
        *,
        host: str,
        shutdown_timeout_s: float,
        accept_failures: AcceptFailures,
        accept_backoff_s: float,
    ) -> None:
        self.ctx = ctx
        self._host = host
        self.loop = asyncio.get_running_loop()
        self._shutdown_timeout_s = shutdown_timeout_s
        self._listener = listener
        self._sockets: list[socket.socket] = [
            sub.extra(anyio.abc.SocketAttribute.raw_socket) for sub in listener.listeners
        ]
        self._accept_failures = accept_failures
        self._accept_backoff_s = accept_backoff_s
        self._accepting = False
        # The pending retry of each listening socket (by file descriptor) that backs off.
        self._retries: dict[int, asyncio.TimerHandle] = {}
        # Tasks that set up a transport for an accepted socket (asyncio keeps
        # only weak references to tasks).
        self._connecting: set[asyncio.Task[None]] = set()
        # Served connections; refused ones (over max_connections) are counted apart.
        self._connections: set[ProtocolConnection] = set()
        self._refusing: set[ProtocolConnection] = set()
        self._drained: anyio.Event | None = None
        self.port: int = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def aclose(self) -> None:
        """Stop listening; close whatever connection is still open (normally none)."""
        self._stop_accepting()
        for conn in [*self._connections, *self._refusing]:
            conn.abort()
        await self._listener.aclose()

    async def run(self, shutdown: anyio.Event, task_status: anyio.abc.TaskStatus[int]) -> None:
        """Accept until ``shutdown`` is set, then stop as ``zerver.http._server`` describes."""
        self._accepting = True
        for sock in self._sockets:
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        _log.info("server started", host=self._host, port=self.port, pid=os.getpid())
        task_status.started(self.port)
        await shutdown.wait()
        self._stop_accepting()
        await self._listener.aclose()
        _log.info("server shutting down", connections=len(self._connections))
        await self._drain()

    # ------------------------------------------------------------ accepting

    def _stop_accepting(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        failures = self._accept_failures
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PEER_ERRNOS:
                    continue
                # Out of file descriptors or memory: keep serving the open
                # connections; listen again after the back-off.
                failures.failed(exc, self._accept_backoff_s)
                fd = sock.fileno()
                self.loop.remove_reader(fd)
                self._retries[fd] = self.loop.call_later(
                    self._accept_backoff_s, self._retry_accept, sock
                )
                return
            if failures.failing:
                failures.succeeded()
            task = self.loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _retry_accept(self, sock: socket.socket) -> None:
        self._retries.pop(sock.fileno(), None)
        if self._accepting:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self._protocol, sock)
        except OSError as exc:
            # The peer left before its transport was set up.
            _log.debug("accept failed", error=str(exc))
            sock.close()

    def _protocol(self) -> ProtocolConnection:
        return ProtocolConnection(self)

    # ------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        self.ctx.closing = True
        drained = self._drained = anyio.Event()
        for conn in list(self._connections):
            conn.close_if_idle()
        if not self._connections:
            return
        with anyio.move_on_after(self._shutdown_timeout_s):
            await drained.wait()
        if self._connections:
            _log.warning(
                "shutdown timeout; cancelling requests in flight",
                connections=len(self._connections),
                timeout_s=self._shutdown_timeout_s,
            )
            for conn in list(self._connections):
                conn.cancel()
            await drained.wait()

    # ----------------------------------------------------- connections' handles

    def admit(self, conn: ProtocolConnection) -> int:
        """``_SERVE`` ``conn``; ``_REFUSE`` it (503) past ``max_connections``;
        ``_DROP`` it when as many refusals are still lingering."""
        limit = self.ctx.max_connections
        if len(self._connections) < limit:
            self._connections.add(conn)
            return _SERVE
        if len(self._refusing) >= limit:
            return _DROP
        self._refusing.add(conn)
        return _REFUSE

    def discard(self, conn: ProtocolConnection, admission: int) -> None:
        if admission == _REFUSE:
            self._refusing.discard(conn)
        elif admission == _SERVE:
            connections = self._connections
            connections.discard(conn)
            if not connections and self._drained is not None:
                self._drained.set()


# What the server made of a new connection (see ProtocolServer.admit).
_SERVE = 0
_REFUSE = 1
_DROP = 2
_TOO_MANY = RejectedError(503, "too many connections")


class ProtocolConnection(asyncio.Protocol):
    """One HTTP/1.1 connection driven by transport callbacks; see the module rules."""

    __slots__ = (
        "_admission",
        "_ahead",
        "_body_deadline",
        "_body_size",
        "_busy",
        "_client",
        "_ctx",
        "_deadline",
        "_discarded",
        "_eof",
        "_h11",
        "_head",
        "_headers",
        "_local",
        "_loop",
        "_lost",
        "_parts",
        "_read_paused",
        "_scope",
        "_server",
        "_stalled",
        "_target",
        "_task",
        "_timer",
        "_timer_at",
        "_transport",
        "_wait",
        "_write_paused",
    )

    def __init__(self, server: ProtocolServer) -> None:
        ctx = server.ctx
        self._server = server
        self._ctx = ctx
        self._loop = server.loop
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.max_header_bytes)
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._local: tuple[str, int] | None = None
        # The request being read.
        self._head: h11.Request | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._target = ("", "")
        self._parts: list[bytes] = []
        self._body_size = 0
        self._body_deadline = 0.0
        self._admission = _DROP
        # Flow.
        self._busy = False
        self._scope: anyio.CancelScope | None = None
        # asyncio keeps only weak references to tasks.
        self._task: asyncio.Task[None] | None = None
        self._stalled = False
        self._write_paused = False
        self._read_paused = False
        self._ahead = 0
        self._eof = False
        self._lost = False
        self._discarded = 0
        # The timer (see the module rules).
        self._wait = _NONE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------- server's handles

    def close_if_idle(self) -> None:
        """Close now if waiting for a new request with nothing buffered (server shutdown)."""
        if self._wait == _IDLE:
            self._close()

    def cancel(self) -> None:
        """Shutdown timeout: cancel the dispatch in flight and close."""
        if self._scope is not None:
            self._scope.cancel()
        transport = self._transport
        if transport is not None and not self._lost:
            if transport.get_write_buffer_size():
                transport.abort()  # a peer that does not read cannot hold up shutdown
            else:
                transport.close()

    def abort(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    # ------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - TCP servers only
            transport.close()
            return
        self._transport = transport
        self._client = host_port(transport.get_extra_info("peername"))
        self._local = host_port(transport.get_extra_info("sockname"))
        admission = self._admission = self._server.admit(self)
        if admission == _SERVE:
            self._advance()
        elif admission == _REFUSE:
            _log.debug("too many connections; refusing one", client=self._client)
            self._reject(_TOO_MANY)
        else:
            _log.debug("too many connections; closing one unanswered", client=self._client)
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._wait == _LINGER:
            self._discarded += len(data)
            if self._discarded > LINGER_MAX_BYTES:
                self._close()
            return
        self._ahead += len(data)
        self._h11.receive_data(data)
        if not (self._busy or self._stalled):
            self._advance()
        if (
            (self._busy or self._stalled)
            and self._ahead >= self._ctx.max_pipelined
            and not self._read_paused
            and self._transport is not None
        ):
            self._read_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        # The peer's EOF means it is gone (a half-close is treated as a close).
        if self._wait == _LINGER:
            return False
        self._eof = True
        if self._busy:
            _log.debug("client disconnected during dispatch", client=self._client)
            if self._scope is not None:
                self._scope.cancel()
            return False
        if not self._stalled:
            self._h11.receive_data(b"")
            self._advance()
        return False  # the transport closes once our writes are flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wait = _NONE
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if self._busy:
            if self._scope is not None:
                self._scope.cancel()
        else:
            self._server.discard(self, self._admission)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._wait == _NONE:
            self._arm(_WRITE, self._loop.time() + self._ctx.write_timeout_s)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._wait == _WRITE:
            self._wait = _NONE
        if self._stalled and not self._lost:
            self._stalled = False
            self._advance()

    # ---------------------------------------------------------------- parsing

    def _advance(self) -> None:
        """Parse what h11 holds; start a busy period for a complete request."""
        request = self._next_request()
        if request is not None:
            self._busy = True
            self._task = self._loop.create_task(self._serve(request))

    def _next_request(self) -> Request | None:
        """The next complete request; else arrange the wait, reject or close and ``None``."""
        conn = self._h11
        ctx = self._ctx
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(reject_for(exc))
                return None
            if event is h11.NEED_DATA:
                self._need_data()
                return None
            if type(event) is h11.Request:
                headers = list(event.headers)
                try:
                    self._target = check_head(ctx, event, headers)
                except RejectedError as reject:
                    self._reject(reject)
                    return None
                self._head = event
                self._headers = headers
                self._body_deadline = self._loop.time() + ctx.body_timeout_s
            elif type(event) is h11.Data:
                self._body_size += len(event.data)
                if self._body_size > ctx.max_body_bytes:
                    self._reject(
                        RejectedError(413, "request body too large", limit=ctx.max_body_bytes)
                    )
                    return None
                self._parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                head = self._head
                if head is None:  # pragma: no cover - h11 never ends a message it did not start
                    self._close()
                    return None
                request = make_request(
                    head, self._headers, self._target, self._parts, self._client, self._local
                )
                self._head = None
                self._parts = []
                self._body_size = 0
                self._wait = _NONE
                if self._eof:
                    # A request complete before the peer's EOF is dropped, not dispatched.
                    _log.debug("client disconnected before dispatch", client=self._client)
                    self._close()
                    return None
                return request
            else:
                # ConnectionClosed. PAUSED cannot happen: a cycle starts after its response.
                self._close()
                return None

    def _need_data(self) -> None:
        self._ahead = 0
        transport = self._transport
        if transport is None or self._lost:
            return
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        ctx = self._ctx
        conn = self._h11
        if self._head is None:
            if not conn.trailing_data[0]:
                if ctx.closing:
                    self._close()
                else:
                    self._arm(_IDLE, self._loop.time() + ctx.keepalive_timeout_s)
            elif self._wait != _HEAD:
                self._arm(_HEAD, self._loop.time() + ctx.header_timeout_s)
            return
        if conn.they_are_waiting_for_100_continue:
            event = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            transport.write(conn.send(event) or b"")
        self._arm(_BODY, min(self._loop.time() + ctx.header_timeout_s, self._body_deadline))

    # ----------------------------------------------------------------- timer

    def _arm(self, wait: int, deadline: float) -> None:
        self._wait = wait
        self._deadline = deadline
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        wait = self._wait
        if wait == _NONE:
            return
        if self._deadline > self._loop.time() + _TIMER_SLACK_S:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            self._timer_at = self._deadline
            return
        if wait in (_HEAD, _BODY):
            self._reject(RejectedError(408, "request timeout"))
        elif wait in (_WRITE, _DRAIN):
            _log.debug("write timed out; dropping the connection", client=self._client)
            self.abort()
        else:
            self._close()

    # ------------------------------------------------------------- answering

    async def _serve(self, request: Request) -> None:
        """A busy period: answer ``request`` and whatever complete ones follow it."""
        dispatch = self._ctx.dispatch
        try:
            if self._lost:
                return
            with anyio.CancelScope() as scope:
                self._scope = scope
                while True:
                    try:
                        response = await dispatch(request)
                    except Exception:
                        response = internal_error("app dispatch raised", request)
                    if self._eof or self._lost or scope.cancel_called:
                        break
                    if not self._respond(request, response):
                        break
                    if self._write_paused:
                        self._stalled = True
                        break
                    next_request = self._next_request()
                    if next_request is None:
                        break
                    request = next_request
            if scope.cancel_called:
                self._close()
        except Exception:
            _log.exception("connection failed", client=self._client)
            self.abort()
        finally:
            self._scope = None
            self._task = None
            self._busy = False
            if self._lost:
                self._server.discard(self, self._admission)

    def _respond(self, request: Request, response: Response) -> bool:
        """Write the response; ``False`` if the connection closes after it."""
        head, body, keep_alive = encode_response(self._ctx, request, response)
        transport = self._transport
        assert transport is not None
        if body and len(body) <= COALESCE_MAX:
            transport.write(head + body)
        else:
            transport.write(head)
            if body:
                transport.write(body)
        if keep_alive:
            self._h11 = next_cycle(self._h11, self._ctx.max_header_bytes)
            return True
        self._linger()
        return False

    def _reject(self, reject: RejectedError) -> None:
        data = rejection(self._ctx, reject, self._client)
        transport = self._transport
        if transport is not None and not self._lost:
            transport.write(data)
        self._linger()

    # -------------------------------------------------------------- closing

    def _linger(self) -> None:
        """Half-close, then discard input until the peer's EOF (bounded)."""
        transport = self._transport
        if transport is None or self._lost or self._eof or transport.is_closing():
            self._close()
            return
        transport.write_eof()
        self._discarded = 0
        self._arm(_LINGER, self._loop.time() + LINGER_TIMEOUT_S)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _close(self) -> None:
        self._wait = _NONE
        transport = self._transport
        if transport is not None and not self._lost:
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits for the output to be flushed; a peer that does
                # not read must not keep the connection for ever.
                self._arm(_DRAIN, self._loop.time() + self._ctx.write_timeout_s)
