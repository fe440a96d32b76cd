"""The asyncio ``Protocol`` transport: a connection machine driven by transport callbacks.

The default transport when anyio runs on asyncio (see ``ServerConfig.transport``).
The rules of a connection are :mod:`zerver.http._machine`'s; this module
feeds it from asyncio's callbacks, which costs far less per request than the
reader task, anyio events and cancel scopes of the streams transport. It is
the only module that touches the asyncio loop directly. What is particular
to callbacks:

* ``data_received`` feeds the machine and, when it waits for bytes, parses at
  once. A complete request starts a *busy period*: one asyncio task that
  awaits ``dispatch``, writes the response, and goes on with the next
  pipelined request already buffered; a connection that is not busy has no
  task at all. A client gone or the shutdown timeout cancels that task
  itself (an anyio cancel scope around each busy period cost ~7 µs a
  request); a cancellation it did not ask for passes through.
* The read-ahead budget is ``pause_reading``/``resume_reading``;
  ``pause_writing`` (more than the transport's high-water mark of output is
  buffered) is the machine's output paused, which ends the busy period after
  the current response; ``resume_writing`` goes on parsing.
* At most one timer per connection, re-armed lazily: the timer fires at the
  machine's deadline, and when the deadline has moved meanwhile it only
  re-arms itself.
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
import math
import os
import socket
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import structlog

from ._connection import (
    COALESCE_MAX,
    AcceptFailures,
    ConnectionContext,
    RejectedError,
    host_port,
    internal_error,
)
from ._machine import CLOSED, DISPATCHING, LINGERING, STALLED, ConnectionMachine, Expiry

if TYPE_CHECKING:
    from anyio.streams.stapled import MultiListener

    from zerver.core._http import Request, Response

__all__ = ["ProtocolConnection", "ProtocolServer", "running_on_asyncio"]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("zerver.server")

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
        "_busy",
        "_client",
        "_ctx",
        "_loop",
        "_lost",
        "_machine",
        "_read_paused",
        "_server",
        "_serving",
        "_stopping",
        "_task",
        "_timer",
        "_timer_at",
        "_transport",
        "_write_paused",
    )

    def __init__(self, server: ProtocolServer) -> None:
        ctx = server.ctx
        self._server = server
        self._ctx = ctx
        self._loop = server.loop
        self._machine: ConnectionMachine | None = None
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._admission = _DROP
        # Flow.
        self._busy = False
        # Whether the busy period's task has started, and whether this connection
        # cancelled it (see `_stop`).
        self._serving = False
        self._stopping = False
        # asyncio keeps only weak references to tasks.
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._lost = False
        # The timer (see the module rules).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------- server's handles

    def close_if_idle(self) -> None:
        """Close now if waiting for a new request with nothing buffered (server shutdown)."""
        machine = self._machine
        if machine is not None and machine.shutdown():
            self._close()

    def cancel(self) -> None:
        """Shutdown timeout: cancel the dispatch in flight and close."""
        self._stop()
        transport = self._transport
        if transport is not None and not self._lost:
            if transport.get_write_buffer_size():
                transport.abort()  # a peer that does not read cannot hold up shutdown
            else:
                transport.close()

    def _stop(self) -> None:
        """Cancel the busy period's dispatch, if one runs (``_serve`` then closes).
        A task not started yet is left to start: it finds the connection lost, or
        dispatches and sees the client's EOF, as it would have a moment later."""
        task = self._task
        if task is not None and self._serving and not self._stopping:
            self._stopping = True
            task.cancel()

    def abort(self) -> None:
        self._stop()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    # ------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # pragma: no cover - TCP servers only
            transport.close()
            return
        self._transport = transport
        client = self._client = host_port(transport.get_extra_info("peername"))
        machine = self._machine = ConnectionMachine(
            self._ctx, client, host_port(transport.get_extra_info("sockname"))
        )
        admission = self._admission = self._server.admit(self)
        if admission == _SERVE:
            self._advance()
        elif admission == _REFUSE:
            _log.debug("too many connections; refusing one", client=client)
            machine.refuse(_TOO_MANY)
            self._follow()
        else:
            _log.debug("too many connections; closing one unanswered", client=client)
            transport.abort()

    def data_received(self, data: bytes) -> None:
        machine = self._machine
        assert machine is not None
        if machine.state is LINGERING:
            if not machine.discard(data):
                self._close()
            return
        if machine.receive(data):
            self._advance()
        if not self._read_paused and machine.read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        machine = self._machine
        assert machine is not None
        state = machine.receive_eof()
        if state is DISPATCHING:
            _log.debug("client disconnected during dispatch", client=self._client)
            self._stop()
        elif machine.waiting:
            self._advance()
        return False  # the transport closes once our writes are flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._machine is not None:
            self._machine.close()
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if self._busy:
            self._stop()
        else:
            self._server.discard(self, self._admission)

    def pause_writing(self) -> None:
        self._write_paused = True
        machine = self._machine
        if machine is not None:
            machine.output_paused(self._loop.time())
            self._arm()

    def resume_writing(self) -> None:
        self._write_paused = False
        machine = self._machine
        if machine is not None and machine.output_resumed() and not self._lost:
            self._advance()

    # ---------------------------------------------------------------- parsing

    def _advance(self) -> None:
        """Parse what is buffered; start a busy period for a complete request."""
        machine = self._machine
        assert machine is not None
        request = machine.next_request(self._loop.time())
        if request is None:
            self._follow()
        else:
            self._busy = True
            self._task = self._loop.create_task(self._serve(request))

    def _follow(self) -> None:
        """Do what the machine asks when it has no request: write, wait, linger or close."""
        machine = self._machine
        assert machine is not None
        transport = self._transport
        if transport is None or self._lost:
            return
        if machine.output:
            transport.write(machine.take_output())
        state = machine.state
        if state is LINGERING:
            self._linger()
        elif state is CLOSED:
            self._close()
        else:
            # A waiting state: parsing ran dry.
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._arm()

    # ----------------------------------------------------------------- timer

    def _arm(self) -> None:
        """Make sure the timer fires by the machine's deadline."""
        machine = self._machine
        assert machine is not None
        deadline = machine.deadline
        timer = self._timer
        if deadline != math.inf and (timer is None or deadline < self._timer_at):
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        machine = self._machine
        if machine is None or self._lost:
            return
        expiry = machine.expire(self._loop.time() + _TIMER_SLACK_S)
        if expiry is Expiry.NOTHING:
            self._arm()
        elif expiry is Expiry.REFUSE:
            self._follow()
        elif expiry is Expiry.DROP:
            self.abort()
        else:
            self._close()

    # ------------------------------------------------------------- answering

    async def _serve(self, request: Request) -> None:
        """A busy period: answer ``request`` and whatever complete ones follow it."""
        dispatch = self._ctx.dispatch
        machine = self._machine
        assert machine is not None
        try:
            if self._lost:
                return
            self._serving = True
            try:
                while True:
                    try:
                        response = await dispatch(request)
                    except Exception:
                        response = internal_error("app dispatch raised", request)
                    if machine.eof or self._lost or self._stopping:
                        break
                    if not self._respond(request, response):
                        break
                    if machine.state is STALLED:
                        break
                    next_request = machine.next_request(self._loop.time())
                    if next_request is None:
                        self._follow()
                        break
                    request = next_request
            except asyncio.CancelledError:
                if not self._stopping:
                    raise  # not ours (the loop is going away): let it through
            if self._stopping:
                self._close()
        except Exception:
            _log.exception("connection failed", client=self._client)
            self.abort()
        finally:
            self._serving = self._stopping = False
            self._task = None
            self._busy = False
            if self._lost:
                self._server.discard(self, self._admission)

    def _respond(self, request: Request, response: Response) -> bool:
        """Write the response; ``False`` if the connection closes after it."""
        machine = self._machine
        assert machine is not None
        head, body = machine.respond(request, response)
        transport = self._transport
        assert transport is not None
        if body and len(body) <= COALESCE_MAX:
            transport.write(head + body)
        else:
            transport.write(head)
            if body:
                transport.write(body)
        state = machine.state
        if state is LINGERING:
            self._linger()
            return False
        if state is CLOSED:
            self._close()
            return False
        return True

    # -------------------------------------------------------------- closing

    def _linger(self) -> None:
        """Half-close, then discard input until the peer's EOF (bounded)."""
        machine = self._machine
        assert machine is not None
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            self._close()
            return
        transport.write_eof()
        machine.lingering(self._loop.time())
        self._arm()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _close(self) -> None:
        machine = self._machine
        assert machine is not None
        machine.close()
        transport = self._transport
        if transport is not None and not self._lost:
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits for the output to be flushed; a peer that does
                # not read must not keep the connection for ever.
                machine.flushing(self._loop.time())
                self._arm()
