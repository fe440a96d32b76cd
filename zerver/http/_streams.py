"""The anyio-streams transport: a connection machine driven by a reader task.

The rules of a connection are :mod:`zerver.http._machine`'s; this module
feeds it from an anyio socket stream, so it runs on any anyio backend (the
asyncio ``Protocol`` transport, :mod:`zerver.http._protocol`, is the default
on asyncio because it costs far less per request). What is particular to
streams:

* One **reader task** per connection is the only caller of ``stream.receive``.
  It feeds every byte to the machine and wakes the handler. It keeps reading
  while the handler waits for bytes, and otherwise only until the machine's
  read-ahead budget is spent; then it parks. A reader parked on its budget
  notices the peer's EOF only once the current response has been written.
* The handler task parses, awaits ``dispatch`` and writes. The peer's EOF
  while dispatching cancels the connection's cancel scope, hence the dispatch
  and whatever jobs the app ties to it.
* Writes block: each write of a response (bodies are written in slices of
  ``WRITE_SLICE`` bytes) must be taken by the peer by the machine's write
  deadline, which the server's sweeper checks (:meth:`ServerConnection.drop_if_stalled`).
"""

from __future__ import annotations

import anyio
import anyio.abc
import structlog

from zerver.core._http import Request, Response

from ._connection import (
    COALESCE_MAX,
    LINGER_TIMEOUT_S,
    WRITE_SLICE,
    ConnectionContext,
    RejectedError,
    host_port,
    internal_error,
)
from ._machine import CLOSED, DISPATCHING, IDLE, LINGERING, ConnectionMachine, Expiry

__all__ = ["ServerConnection"]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("zerver.server")

_READ_SIZE = 64 * 1024


class ServerConnection:
    """Serves the requests of one accepted socket stream; see the module rules."""

    __slots__ = (
        "_client",
        "_ctx",
        "_data_ready",
        "_discard",
        "_idle_scope",
        "_machine",
        "_reader_done",
        "_reader_wakeup",
        "_scope",
        "stream",
    )

    def __init__(self, ctx: ConnectionContext, stream: anyio.abc.SocketStream) -> None:
        self._ctx = ctx
        self.stream = stream
        # anyio leaves remote_address out when the peer already reset the connection.
        self._client = host_port(stream.extra(anyio.abc.SocketAttribute.remote_address, None))
        self._machine = ConnectionMachine(
            ctx,
            self._client,
            host_port(stream.extra(anyio.abc.SocketAttribute.local_address, None)),
        )
        self._scope: anyio.CancelScope | None = None
        self._discard = False
        self._reader_done = False
        self._data_ready: anyio.Event | None = None
        self._reader_wakeup: anyio.Event | None = None
        self._idle_scope: anyio.CancelScope | None = None

    def close_if_idle(self) -> None:
        """Close the connection now if it is waiting for a new request (server shutdown)."""
        # Only a handler waiting for bytes: one writing a response in IDLE goes
        # on with what is buffered, and the machine closes once that runs dry.
        if self._idle_scope is not None and self._machine.shutdown():
            self._idle_scope.cancel()

    def drop_if_stalled(self, now: float) -> None:
        """Drop the connection if one write has waited on the peer past the write timeout."""
        if self._machine.write_expired(now) and self._scope is not None:
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
                    if refuse is not None:
                        self._machine.refuse(refuse)
                    await self._serve()
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await self.stream.aclose()

    # ---------------------------------------------------------------- handler

    async def _serve(self) -> None:
        dispatch = self._ctx.dispatch
        machine = self._machine
        while True:
            request = await self._next_request()
            if request is None:
                return
            if machine.eof:
                # The peer's EOF means it is gone (see the machine's rules); a
                # request that was complete before it is dropped, not dispatched.
                _log.debug("client disconnected before dispatch", client=self._client)
                return
            try:
                response = await dispatch(request)
            except Exception:
                response = internal_error("app dispatch raised", request)
            if not await self._respond(request, response):
                return

    async def _next_request(self) -> Request | None:
        """The next complete request, or ``None`` when the connection should close."""
        machine = self._machine
        while True:
            if machine.waiting:
                request = machine.next_request(anyio.current_time())
                if request is not None:
                    return request
            output = machine.take_output()
            if output:
                if not await self._send(output):
                    return None
                if machine.waiting:
                    # The peer may have answered a 100 Continue while it was written.
                    continue
            state = machine.state
            if state is LINGERING:
                await self._linger()
                return None
            if state is CLOSED:
                return None
            timeout = machine.deadline - anyio.current_time()
            if await self._wait_for_bytes(timeout, idle=state is IDLE):
                continue
            if self._reader_done or machine.state is CLOSED:
                return None
            if machine.expire(anyio.current_time()) is Expiry.CLOSE:
                return None

    async def _wait_for_bytes(self, timeout: float, *, idle: bool = False) -> bool:
        """Wait until the reader has fed the machine more bytes; ``False`` on timeout
        or shutdown."""
        if self._reader_done:
            return False
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
        machine = self._machine
        machine.sending(anyio.current_time())
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        finally:
            machine.sent()
        return True

    async def _respond(self, request: Request, response: Response) -> bool:
        """Send the response; whether the connection goes on with the next request."""
        machine = self._machine
        head, body = machine.respond(request, response)
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
        if not sent:
            return False
        if machine.state is LINGERING:
            await self._linger()
            return False
        return machine.state is IDLE

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
            self._machine.lingering(anyio.current_time())
            with anyio.move_on_after(LINGER_TIMEOUT_S):
                await ready.wait()

    # ----------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        receive = self.stream.receive
        machine = self._machine
        try:
            while True:
                if not self._discard and self._data_ready is None and machine.read_paused:
                    wakeup = self._reader_wakeup = anyio.Event()
                    await wakeup.wait()
                    self._reader_wakeup = None
                    continue
                try:
                    data = await receive(_READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                if self._discard:
                    if data and machine.state is LINGERING and machine.discard(data):
                        continue
                    return
                if not data:
                    if machine.receive_eof() is DISPATCHING and self._scope is not None:
                        _log.debug("client disconnected during dispatch", client=self._client)
                        self._scope.cancel()
                    return
                machine.receive(data)  # parsed by the handler
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
