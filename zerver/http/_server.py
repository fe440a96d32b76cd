"""The HTTP/1.1 server shell: listening, graceful shutdown, signals and worker processes.

One connection's protocol rules live in :mod:`zerver.http._machine`, driven by
one of two transports (``ServerConfig.transport``): anyio socket streams
(:class:`_StreamServer` here and :mod:`zerver.http._streams`, a task per
connection, any anyio backend) or an
asyncio ``Protocol`` (:mod:`zerver.http._protocol`, callbacks, the default on
asyncio because it costs far less per request). This module binds, runs the
app's lifespan around the transport and stops gracefully, the same way on both:

1. stop accepting and close the listening socket;
2. close idle keep-alive connections at once; busy ones answer their current
   request with ``connection: close`` and then close;
3. after ``shutdown_timeout_s``, cancel whatever is still running;
4. exit the app's lifespan (which drains jobs and flushes telemetry).

Accepting is bounded the same way on both: past ``max_connections`` open
connections a new one is answered 503 and closed (see
:mod:`zerver.http._machine`); an accept that fails for want of resources
(``EMFILE``, ``ENFILE``, ...) backs off for ``_ACCEPT_BACKOFF_S`` and is
logged at most once per ``_ACCEPT_LOG_INTERVAL_S`` (:class:`AcceptFailures`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Literal, Protocol, TypeGuard, get_args

import anyio
import anyio.abc
import structlog
from anyio.streams.stapled import MultiListener

from zerver.core._errors import ConfigError, UsageError
from zerver.core._http import Request, Response

from ._connection import AcceptFailures, ConnectionContext, RejectedError
from ._protocol import ProtocolServer, running_on_asyncio
from ._streams import ServerConnection

if TYPE_CHECKING:
    from zerver._config import Settings

__all__ = ["ServerApp", "ServerConfig", "run", "serve", "serve_from_settings"]

_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("zerver.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A second stop signal this soon after the first is the same request delivered twice
# (a terminal's Ctrl-C reaches the whole process group, and the supervisor forwards it
# too; systemd signals every process of the unit), not an operator's "stop at once".
_DUPLICATE_SIGNAL_S = 0.5
# Stop signals that arrived before the server could handle them (see catch_early_signals).
_EARLY_SIGNALS: list[int] = []
# Back-off after a failed accept (EMFILE and friends) so the loop cannot spin,
# and how often a run of such failures is logged.
_ACCEPT_BACKOFF_S = 0.1
_ACCEPT_LOG_INTERVAL_S = 10.0
# The streams transport checks write deadlines this many times per write timeout.
_WRITE_SWEEPS = 4
_PEER_ERRNOS = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO})
# How much longer than a worker's own shutdown deadline the parent waits before SIGKILL.
_KILL_GRACE_S = 5.0

Transport = Literal["auto", "streams", "protocol"]
_TRANSPORTS: tuple[str, ...] = get_args(Transport)


class ServerApp(Protocol):
    """What the server needs from an application (``zerver.App`` implements it)."""

    def lifespan(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Start the runtime; on exit drain jobs and flush telemetry."""
        ...

    async def dispatch(self, request: Request) -> Response:
        """Answer one request. Must not raise for app errors (it returns 500 itself)."""
        ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Listening address, limits and timeouts of the HTTP server.

    ``max_pipelined`` bounds read-ahead: the bytes read past the request being
    answered (pipelined requests) before the server stops reading the socket.
    ``body_timeout_s`` is the overall deadline of a request body (from its
    head), ``write_timeout_s`` how long one write may wait on a peer that does
    not read before the connection is dropped, and ``max_connections`` how
    many connections one process serves at once (more are answered 503).
    ``reuse_port`` sets ``SO_REUSEPORT`` so several processes can share the
    port; :func:`run` sets it for ``workers > 1``.

    ``transport`` chooses what carries h11's bytes: ``"protocol"`` (an asyncio
    ``Protocol``, callbacks, the fastest; asyncio backend only), ``"streams"``
    (anyio socket streams, any anyio backend) or ``"auto"`` (``"protocol"``
    on asyncio, else ``"streams"``). Both behave the same on the wire.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    max_connections: int = 1000
    backlog: int = 2048
    max_pipelined: int = 64 * 1024
    reuse_port: bool = False
    transport: Transport = "auto"
    #: For worker processes: the one line that describes a failure to start the app
    #: (``None``: the traceback stays). A module-level function, so that it reaches
    #: spawned workers; ``zerver run`` passes its own.
    describe_failure: Callable[[BaseException], str | None] | None = None

    def __post_init__(self) -> None:
        if self.transport not in _TRANSPORTS:
            raise ConfigError(
                f"ServerConfig.transport must be one of {', '.join(_TRANSPORTS)}, "
                f"got {self.transport!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"ServerConfig.port must be 0..65535, got {self.port}")
        for name in ("max_header_bytes", "backlog", "max_pipelined", "max_connections"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"ServerConfig.{name} must be at least 1, got {value}")
        if self.max_body_bytes < 0:
            raise ConfigError(
                f"ServerConfig.max_body_bytes must be 0 or more, got {self.max_body_bytes}"
            )
        for name in (
            "header_timeout_s",
            "keepalive_timeout_s",
            "shutdown_timeout_s",
            "body_timeout_s",
            "write_timeout_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"ServerConfig.{name} must be greater than 0, got {value}")


async def serve(
    app: ServerApp,
    config: ServerConfig,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    shutdown: anyio.Event | None = None,
) -> None:
    """Serve ``app`` over HTTP/1.1 until ``shutdown`` is set, then stop gracefully.

    Binds ``config.host:config.port`` (port 0 picks a free port; a port that
    cannot be bound raises :class:`~zerver.ConfigError`), enters
    ``app.lifespan()``, and reports the bound port through ``task_status``
    once connections are being accepted. Returns after the graceful shutdown
    described in this module's docstring, lifespan exit included.
    """
    if shutdown is None:
        shutdown = anyio.Event()
    ctx = ConnectionContext(
        app.dispatch,
        max_header_bytes=config.max_header_bytes,
        max_body_bytes=config.max_body_bytes,
        header_timeout_s=config.header_timeout_s,
        keepalive_timeout_s=config.keepalive_timeout_s,
        max_pipelined=config.max_pipelined,
        body_timeout_s=config.body_timeout_s,
        write_timeout_s=config.write_timeout_s,
        max_connections=config.max_connections,
    )
    _check_fd_limit(config.max_connections)
    use_protocol = _use_protocol(config.transport)
    try:
        listener = await anyio.create_tcp_listener(
            local_host=config.host,
            local_port=config.port,
            backlog=config.backlog,
            reuse_port=config.reuse_port,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
    server: _Listening
    if use_protocol:
        server = ProtocolServer(
            ctx,
            listener,
            host=config.host,
            shutdown_timeout_s=config.shutdown_timeout_s,
            accept_failures=AcceptFailures(_ACCEPT_LOG_INTERVAL_S),
            accept_backoff_s=_ACCEPT_BACKOFF_S,
        )
    else:
        server = _StreamServer(ctx, config, listener)
    try:
        async with app.lifespan():
            await server.run(shutdown, task_status)
    finally:
        with anyio.CancelScope(shield=True):
            await server.aclose()
    _log.info("server stopped", host=config.host, port=server.port, pid=os.getpid())


def _check_fd_limit(max_connections: int) -> None:
    """Warn when the open-file limit is reached before ``max_connections``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections:
        _log.warning(
            "open-file limit is below max_connections; accepts will fail first",
            open_file_limit=soft,
            max_connections=max_connections,
        )


def _use_protocol(transport: str) -> bool:
    """Whether ``transport`` resolves to the asyncio Protocol transport here."""
    if transport == "streams":
        return False
    on_asyncio = running_on_asyncio()
    if transport == "protocol" and not on_asyncio:
        raise ConfigError("ServerConfig.transport='protocol' needs anyio's asyncio backend")
    return on_asyncio


class _Listening(Protocol):
    """What :func:`serve` needs from a transport's server (streams or asyncio Protocol)."""

    @property
    def port(self) -> int: ...

    async def run(self, shutdown: anyio.Event, task_status: anyio.abc.TaskStatus[int]) -> None:
        """Accept until ``shutdown`` is set, then stop gracefully (lifespan excluded)."""
        ...

    async def aclose(self) -> None:
        """Close the listener and whatever connection is left."""
        ...


class _StreamServer:
    """The anyio-streams transport: accept loops and the live connections of one serve call."""

    __slots__ = (
        "_accept_failures",
        "_config",
        "_connections",
        "_ctx",
        "_drained",
        "_listener",
        "_refusing",
        "port",
    )

    def __init__(
        self,
        ctx: ConnectionContext,
        config: ServerConfig,
        listener: MultiListener[anyio.abc.SocketStream],
    ) -> None:
        self._config = config
        self._ctx = ctx
        self._listener = listener
        self.port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
        # Served connections; refused ones (over max_connections) are counted apart.
        self._connections: set[ServerConnection] = set()
        self._refusing = 0
        self._drained: anyio.Event | None = None
        self._accept_failures = AcceptFailures(_ACCEPT_LOG_INTERVAL_S)

    async def aclose(self) -> None:
        await self._listener.aclose()

    async def run(self, shutdown: anyio.Event, task_status: anyio.abc.TaskStatus[int]) -> None:
        config = self._config
        listener = self._listener
        sweeper = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as connections:
                connections.start_soon(self._sweep_writes, sweeper)
                async with anyio.create_task_group() as acceptors:
                    for sub in listener.listeners:
                        if isinstance(sub, anyio.abc.SocketListener):
                            acceptors.start_soon(self._accept_loop, sub, connections)
                    _log.info("server started", host=config.host, port=self.port, pid=os.getpid())
                    task_status.started(self.port)
                    await shutdown.wait()
                    acceptors.cancel_scope.cancel()
                await listener.aclose()
                _log.info("server shutting down", connections=len(self._connections))
                await self._drain(connections.cancel_scope)
                sweeper.cancel()
        finally:
            # A handler cancelled before its first step never closed its stream.
            with anyio.CancelScope(shield=True):
                for conn in list(self._connections):
                    await conn.stream.aclose()

    async def _drain(self, scope: anyio.CancelScope) -> None:
        self._ctx.closing = True
        drained = self._drained = anyio.Event()
        for conn in list(self._connections):
            conn.close_if_idle()
        if not self._connections:
            return
        with anyio.move_on_after(self._config.shutdown_timeout_s):
            await drained.wait()
        if self._connections:
            _log.warning(
                "shutdown timeout; cancelling requests in flight",
                connections=len(self._connections),
                timeout_s=self._config.shutdown_timeout_s,
            )
            scope.cancel()

    async def _sweep_writes(self, scope: anyio.CancelScope) -> None:
        """Drop connections whose current write has waited past the write timeout."""
        period = self._ctx.write_timeout_s / _WRITE_SWEEPS
        with scope:
            while True:
                await anyio.sleep(period)
                now = anyio.current_time()
                for conn in list(self._connections):
                    conn.drop_if_stalled(now)

    async def _accept_loop(
        self,
        listener: anyio.abc.SocketListener,
        connections: anyio.abc.TaskGroup,
    ) -> None:
        failures = self._accept_failures
        limit = self._ctx.max_connections
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _PEER_ERRNOS:
                    # The peer gave up between connecting and being accepted.
                    _log.debug("accept failed", error=str(exc))
                    continue
                # Out of file descriptors or memory (or worse): keep serving the
                # open connections and retry shortly instead of crashing or spinning.
                failures.failed(exc, _ACCEPT_BACKOFF_S)
                await anyio.sleep(_ACCEPT_BACKOFF_S)
                continue
            if failures.failing:
                failures.succeeded()
            conn = ServerConnection(self._ctx, stream)
            if len(self._connections) < limit:
                self._connections.add(conn)
                connections.start_soon(self._handle, conn)
            elif self._refusing < limit:
                self._refusing += 1
                connections.start_soon(self._refuse, conn)
            else:
                _log.debug("too many connections; closing a new one unanswered")
                await stream.aclose()

    async def _handle(self, conn: ServerConnection) -> None:
        try:
            await conn.run()
        except Exception:
            _log.exception("connection failed")
        finally:
            self._connections.discard(conn)
            if self._drained is not None and not self._connections:
                self._drained.set()

    async def _refuse(self, conn: ServerConnection) -> None:
        try:
            await conn.run(RejectedError(503, "too many connections"))
        except Exception:
            _log.exception("connection failed")
        finally:
            self._refusing -= 1


# ------------------------------------------------------------------ processes


def run(
    app: ServerApp | str,
    config: ServerConfig,
    workers: int = 1,
    *,
    on_started: Callable[[int], object] | None = None,
    worker_init: Callable[[], object] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, shut down gracefully and return the exit code.

    ``app`` is an app object or an import string ``module:attr`` (``attr`` may
    be a function returning the app). With ``workers > 1`` the app must be an
    import string: that many processes, each importing it, share the port
    through ``SO_REUSEPORT``; this process supervises them, forwards
    SIGTERM/SIGINT and returns 0 only if every worker exited with 0.

    ``on_started(port)`` is called in this process once every worker accepts
    connections (useful with port 0). ``worker_init()`` runs first in each
    worker process (for example to configure logging); it must be picklable.
    Raises :class:`~zerver.UsageError` for a bad app or worker count and
    :class:`~zerver.ConfigError` when the address cannot be bound.
    """
    if workers < 1:
        raise UsageError(f"workers must be 1 or more, got {workers}")
    catch_early_signals()
    if workers == 1:
        loaded = load_app(app) if isinstance(app, str) else app
        anyio.run(_serve_until_signalled, loaded, config, on_started, None)
        return 0
    if not isinstance(app, str):
        raise UsageError(
            "workers > 1 needs the app as an import string 'module:attr' "
            f"so that each worker process can import it, got {app!r}"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError("workers > 1 needs SO_REUSEPORT, which this platform lacks")
    with _reserve_port(config.host, config.port) as port:
        shared = dataclasses.replace(config, port=port, reuse_port=True)
        supervisor = _Supervisor(app, shared, workers, on_started, worker_init)
        return anyio.run(supervisor.run)


def serve_from_settings(
    target: str,
    settings: Settings,
    *,
    workers: int = 1,
    describe_failure: Callable[[BaseException], str | None] | None = None,
) -> int:
    """Run the app named ``target`` with the server part of ``settings`` (the CLI's entry).

    A configuration or usage error (such as a port that cannot be bound) is
    printed as one line on stderr and gives exit code 2. Logging is the
    target's business: the CLI's ``serving_app`` configures it in each worker.
    """
    try:
        config = ServerConfig(
            host=settings.host,
            port=settings.port,
            max_header_bytes=settings.max_header_bytes,
            max_body_bytes=settings.max_body_bytes,
            header_timeout_s=settings.header_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            write_timeout_s=settings.write_timeout_s,
            max_connections=settings.max_connections,
            transport=settings.transport,
            describe_failure=describe_failure,
        )
        return run(target, config, workers)
    except (ConfigError, UsageError) as exc:
        print(f"zerver: {exc}", file=sys.stderr)
        return 2


def load_app(target: str) -> ServerApp:
    """Import ``module:attr``; a callable that is not an app is called to make one."""
    obj = import_target(target)
    if not _is_app(obj) and callable(obj):
        obj = obj()
    if not _is_app(obj):
        raise UsageError(f"{target} is {obj!r}, which has no lifespan() and dispatch()")
    return obj


def import_target(target: str) -> object:
    """The object ``module:attr`` names (``attr`` may be dotted), importing from the cwd too."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"app must be given as module:attribute, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _is_app(obj: object) -> TypeGuard[ServerApp]:
    # A class has these methods too, but it is a factory, not an app.
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "dispatch", None))
        and callable(getattr(obj, "lifespan", None))
    )


class _Reporter:
    """A task status that forwards the bound port to a callback."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[int], object] | None) -> None:
        self._callback = callback

    def started(self, value: int | None = None) -> None:
        if self._callback is not None and value is not None:
            self._callback(value)


def catch_early_signals() -> None:
    """Until the server handles SIGINT/SIGTERM itself, remember them instead of dying.

    Called first thing by the CLI and in each worker process: a Ctrl-C while the app
    is being imported or its exporter process started then stops the server as soon
    as it runs, through the graceful path (telemetry drained or spooled, counts
    logged), instead of a ``KeyboardInterrupt`` traceback.
    """

    def note(signum: int, frame: object) -> None:
        _EARLY_SIGNALS.append(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            signal.signal(signum, note)


async def _serve_until_signalled(
    app: ServerApp,
    config: ServerConfig,
    on_started: Callable[[int], object] | None,
    parent_sentinel: int | None,
) -> None:
    shutdown = anyio.Event()
    with anyio.open_signal_receiver(*_SIGNALS) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_shutdown_on_signal, signals, shutdown, app)
            if parent_sentinel is not None:
                tg.start_soon(_shutdown_when_parent_exits, parent_sentinel, shutdown)
            await serve(app, config, task_status=_Reporter(on_started), shutdown=shutdown)
            tg.cancel_scope.cancel()


async def _shutdown_on_signal(
    signals: AsyncIterator[int], shutdown: anyio.Event, app: ServerApp
) -> None:
    """The first stop signal shuts down gracefully; another one (not a duplicate of
    the first) stops at once: the app abandons its telemetry (spooling what it can,
    counting the rest) and the process exits with 128 + the signal number."""
    first_at: float | None = None
    if _EARLY_SIGNALS:
        signum = _EARLY_SIGNALS[0]
        _EARLY_SIGNALS.clear()
        _log.info("signal received during start-up; shutting down", signal=_name(signum))
        first_at = time.monotonic()
        shutdown.set()
    async for signum in signals:
        if not shutdown.is_set():
            _log.info("signal received; shutting down", signal=_name(signum))
            first_at = time.monotonic()
            shutdown.set()
            continue
        if first_at is not None and time.monotonic() - first_at < _DUPLICATE_SIGNAL_S:
            _log.info("signal ignored; already shutting down", signal=_name(signum))
            continue
        _log.warning("second signal; stopping at once", signal=_name(signum))
        _exit_now(app, 128 + signum)


def _name(signum: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(signum).name
    return str(signum)


def _exit_now(app: ServerApp, code: int) -> None:
    """Let the app abandon what it holds (bounded, no network), then exit at once."""
    abandon = getattr(app, "abandon", None)
    if callable(abandon):
        try:
            abandon()
        except Exception:
            _log.exception("abandoning the app's telemetry failed")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


async def _shutdown_when_parent_exits(sentinel: int, shutdown: anyio.Event) -> None:
    await anyio.wait_readable(sentinel)
    _log.warning("parent process exited; shutting down")
    shutdown.set()


@contextlib.contextmanager
def _reserve_port(host: str, port: int) -> Iterator[int]:
    """Bind (without listening) a ``SO_REUSEPORT`` socket so that every worker gets one port.

    A bound socket that does not listen receives no connections, but it pins
    the port for the workers' reuse-port group even when ``port`` is 0.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    with sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
        yield int(sock.getsockname()[1])


def _worker_main(
    target: str, config: ServerConfig, ready: Pipe, init: Callable[[], object] | None
) -> None:
    """Entry point of a worker process (spawned, so everything arrives pickled)."""
    catch_early_signals()
    # Blocked by the supervisor while it spawned us (see _Supervisor._start_workers).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    parent = multiprocessing.parent_process()

    def report(port: int) -> None:
        ready.send(port)
        ready.close()

    try:
        if init is not None:
            init()
        app = load_app(target)
        anyio.run(_serve_until_signalled, app, config, report, parent.sentinel if parent else None)
    except Exception as exc:
        # A start-up error of the app's own (a hook that raises, a database it cannot
        # open): one line for the supervisor to print once, not a traceback per worker.
        line = config.describe_failure(exc) if config.describe_failure else None
        if line is None:
            raise
        try:
            ready.send(("failed", line))
        except (OSError, ValueError):  # already listening: say it here
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


@dataclasses.dataclass(slots=True)
class _Worker:
    process: BaseProcess
    ready: Pipe
    is_ready: bool = False


class _Supervisor:
    """Starts the worker processes, forwards signals and collects exit codes."""

    def __init__(
        self,
        target: str,
        config: ServerConfig,
        count: int,
        on_started: Callable[[int], object] | None,
        init: Callable[[], object] | None,
    ) -> None:
        self._target = target
        self._config = config
        self._count = count
        self._on_started = on_started
        self._init = init
        self._workers: list[_Worker] = []
        self._stop: anyio.Event
        self._exited: anyio.Event
        self._alive = 0
        self._failed = False
        self._failure: str | None = None
        self._signal = signal.SIGTERM

    async def run(self) -> int:
        self._stop = anyio.Event()
        self._exited = anyio.Event()
        if _EARLY_SIGNALS:
            self._signal = signal.Signals(_EARLY_SIGNALS[0])
            _EARLY_SIGNALS.clear()
            _log.info("signal received during start-up; stopping workers")
            self._stop.set()
        with anyio.open_signal_receiver(*_SIGNALS) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._forward_signals, signals)
                try:
                    self._start_workers(tg)
                    await self._stop.wait()
                    self._signal_workers()
                    with anyio.move_on_after(self._config.shutdown_timeout_s + _KILL_GRACE_S):
                        await self._exited.wait()
                    for worker in self._workers:
                        if worker.process.exitcode is None:
                            _log.error("worker did not stop; killing it", pid=worker.process.pid)
                            worker.process.kill()
                    await self._exited.wait()
                finally:
                    tg.cancel_scope.cancel()
        codes = [w.process.exitcode for w in self._workers]
        _log.info("workers stopped", exit_codes=codes)
        if self._failure is not None:
            print(self._failure, file=sys.stderr)
            return 2
        return 0 if not self._failed and all(code == 0 for code in codes) else 1

    def _start_workers(self, tg: anyio.abc.TaskGroup) -> None:
        ctx = multiprocessing.get_context("spawn")
        for index in range(self._count):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_worker_main,
                args=(self._target, self._config, sender, self._init),
                name=f"zerver-worker-{index + 1}",
            )
            # Blocked while spawning: a Ctrl-C during the worker's start-up waits until
            # it can handle it (catch_early_signals), instead of a traceback.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            try:
                process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            sender.close()
            worker = _Worker(process, receiver)
            self._workers.append(worker)
            self._alive += 1
            tg.start_soon(self._watch, worker)
        _log.info("workers started", workers=self._count, port=self._config.port)

    async def _watch(self, worker: _Worker) -> None:
        process = worker.process
        message: object = None
        try:
            await anyio.wait_readable(worker.ready)
            message = worker.ready.recv()
        except EOFError:
            pass  # it exited before listening; its exit code tells why
        finally:
            worker.ready.close()
        if isinstance(message, tuple):  # ("failed", line): it could not start
            if self._failure is None:
                self._failure = str(message[1])
        elif message is not None:
            worker.is_ready = True
            if self._stop.is_set():
                self._kill(process, self._signal)
            elif all(w.is_ready for w in self._workers):
                _log.info("all workers ready", port=self._config.port)
                if self._on_started is not None:
                    self._on_started(self._config.port)
        await anyio.wait_readable(process.sentinel)
        process.join()
        self._alive -= 1
        if not self._stop.is_set():
            _log.error("worker exited unexpectedly", pid=process.pid, exit_code=process.exitcode)
            self._failed = True
            self._stop.set()
        if self._alive == 0:
            self._exited.set()

    async def _forward_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            _log.info("signal received; stopping workers", signal=signal.Signals(signum).name)
            self._signal = signal.Signals(signum)
            if self._stop.is_set():
                self._signal_workers()
            self._stop.set()

    def _signal_workers(self) -> None:
        # Only workers that are listening have their signal handlers in place;
        # the others are signalled when they report ready (see _watch).
        for worker in self._workers:
            if worker.is_ready:
                self._kill(worker.process, self._signal)

    @staticmethod
    def _kill(process: BaseProcess, signum: signal.Signals) -> None:
        if process.pid is not None and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
