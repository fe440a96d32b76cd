"""The floor: a minimal HTTP/1.1 server on h11 that answers every request with
the same small JSON body, keep-alive, no routing, no tracing.

Two transports, to show what the transport under h11 costs:

* ``--transport anyio``: anyio TCP streams (a task per connection), the model
  zerver's server shell uses;
* ``--transport protocol``: an ``asyncio.Protocol`` (callbacks, no task per
  request).

Run with ``python -m loadtest.apps.h11_floor --transport anyio --port P``;
SIGTERM or SIGINT stops it (exit code 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

import anyio
import anyio.abc
import h11

__all__ = ["BODY", "main", "serve_anyio", "serve_protocol"]

BODY = b'{"id":"42","name":"item 42"}'
_HEADERS = [("content-type", "application/json"), ("content-length", str(len(BODY)))]
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _answer(conn: h11.Connection) -> bytes:
    out = conn.send(h11.Response(status_code=200, headers=_HEADERS)) or b""
    out += conn.send(h11.Data(data=BODY)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


def _next_output(conn: h11.Connection) -> tuple[bytes, bool]:
    """Process buffered events: (bytes to send, whether the connection must close).

    Stops at NEED_DATA (or PAUSED, which ``start_next_cycle`` resolves).
    """
    out = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return out, False
        if isinstance(event, h11.ConnectionClosed):
            return out, True
        if isinstance(event, h11.EndOfMessage):
            out += _answer(conn)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return out, True
            conn.start_next_cycle()
        elif event is h11.PAUSED:  # pragma: no cover - start_next_cycle above avoids it
            return out, True


# -- anyio streams ------------------------------------------------------------------


async def _handle_stream(stream: anyio.abc.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    return
                conn.receive_data(data)
                out, close = _next_output(conn)
                if out:
                    await stream.send(out)
                if close:
                    return
        except (h11.RemoteProtocolError, anyio.BrokenResourceError, OSError):
            return


async def serve_anyio(port: int, host: str = "127.0.0.1") -> None:
    """Serve on anyio TCP streams until SIGTERM/SIGINT."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _handle_stream)
        with anyio.open_signal_receiver(*_SIGNALS) as signals:
            async for _ in signals:
                break
        tg.cancel_scope.cancel()


# -- asyncio.Protocol ---------------------------------------------------------------


class _FloorProtocol(asyncio.Protocol):
    __slots__ = ("_conn", "_transport")

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # create_server gives stream transports
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            self._conn.receive_data(data)
            out, close = _next_output(self._conn)
        except h11.RemoteProtocolError:
            transport.close()
            return
        if out:
            transport.write(out)
        if close:
            transport.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve_protocol(port: int, host: str = "127.0.0.1") -> None:
    """Serve with an asyncio Protocol until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(_FloorProtocol, host, port, reuse_address=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.apps.h11_floor")
    parser.add_argument("--transport", choices=["anyio", "protocol"], default="anyio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.transport == "anyio":
        anyio.run(serve_anyio, args.port, args.host)
    else:
        asyncio.run(serve_protocol(args.port, args.host))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
