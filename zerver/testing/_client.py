"""In-process helpers for testing zerver apps: a client, record capture, fake interpreters."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import orjson

from zerver._app import App
from zerver.core._clock import Clock, VirtualClock
from zerver.core._effects import Effect
from zerver.core._errors import EffectError
from zerver.core._http import Request, Response
from zerver.runtime._park import JobContext
from zerver.trace._records import ParkCause, RequestRecord

__all__ = ["AppClient", "FakeInterpreter", "FakeRule", "RecordCapture", "capture_logs"]


class RecordCapture:
    """A subscriber that keeps the last ``maxlen`` finished request records."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.records: deque[RequestRecord] = deque(maxlen=maxlen)

    def on_request_end(self, record: RequestRecord) -> None:
        self.records.append(record)

    @property
    def last(self) -> RequestRecord:
        if not self.records:
            raise LookupError("no request has finished yet")
        return self.records[-1]


class AppClient:
    """Drive an :class:`~zerver.App` in-process, without sockets.

    ``async with AppClient(app) as client: resp = await client.get("/healthz")``
    starts the app's lifespan, dispatches requests through routing and the
    job system exactly as the server does, and stops the app on exit.
    """

    def __init__(self, app: App, *, client: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self.app = app
        self.client = client
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> AppClient:
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(self.app.lifespan())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        await self._stack.aclose()
        self._stack = None

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        json: Any = None,
    ) -> Response:
        """Dispatch one request and return the response."""
        hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if json is not None:
            body = orjson.dumps(json)
            hdrs.append((b"content-type", b"application/json"))
        if not any(k == b"host" for k, _ in hdrs):
            hdrs.insert(0, (b"host", b"testserver"))
        req = Request.from_target(
            method.upper(),
            target,
            headers=hdrs,
            body=body,
            client=self.client,
            server=("127.0.0.1", 8080),
        )
        return await self.app.dispatch(req)

    async def get(self, target: str, **kw: Any) -> Response:
        return await self.request("GET", target, **kw)

    async def post(self, target: str, **kw: Any) -> Response:
        return await self.request("POST", target, **kw)


@dataclass(kw_only=True)
class FakeRule:
    """What a :class:`FakeInterpreter` does for matching effects.

    ``work_ms`` advances the virtual clock while the job works; each
    ``parks`` entry ``(cause, ms, token)`` — or ``(cause, ms, token,
    limit_current, limit_max)`` — records a park episode of that length
    (other tasks run first, then the clock moves); ``gate`` makes the job
    wait for an event (to hold a worker).
    """

    result: Any = None
    error: EffectError | None = None
    fail_times: int = 0
    work_ms: float = 0.0
    parks: Sequence[
        tuple[ParkCause, float, str | None]
        | tuple[ParkCause, float, str | None, int | None, int | None]
    ] = ()
    gate: anyio.Event | None = None
    note: dict[str, Any] = field(default_factory=dict)
    calls: int = 0


class FakeInterpreter:
    """An interpreter that answers from rules and moves a virtual clock.

    Rules are matched by the effect's span name (``db.get blog_post``) or by a
    predicate. With ``error`` set and ``fail_times=n`` the first *n* attempts
    fail and later ones succeed (``fail_times=0``: always fail).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        default: FakeRule | None = None,
        span_attributes: dict[str, str] | None = None,
    ) -> None:
        self.clock = clock
        #: Static span attributes, as real interpreters declare them (``db.system``).
        self.span_attributes = dict(span_attributes or {})
        self.default = default
        self.rules: list[tuple[Callable[[Effect], bool], FakeRule]] = []
        self.performed: list[Effect] = []

    def on(self, match: str | Callable[[Effect], bool], **rule: Any) -> FakeRule:
        """Add a rule; ``match`` is a span name or a predicate on the effect."""
        pred = (lambda e, n=match: e.span_name == n) if isinstance(match, str) else match
        r = FakeRule(**rule)
        self.rules.append((pred, r))
        return r

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _advance(self, ms: float) -> None:
        if ms and isinstance(self.clock, VirtualClock):
            self.clock.advance_ms(ms)

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        self.performed.append(effect)
        rule = next((r for p, r in self.rules if p(effect)), self.default)
        if rule is None:
            raise EffectError(f"no fake rule for {effect.span_name!r}", kind="no_rule")
        rule.calls += 1
        for park in rule.parks:
            cause, ms, token = park[0], park[1], park[2]
            current, limit = (park[3], park[4]) if len(park) == 5 else (None, None)
            with job.parked(cause, token, limit_current=current, limit_max=limit):
                await anyio.lowlevel.checkpoint()
                self._advance(ms)
        if rule.gate is not None:
            with job.parked("io_wait", "gate"):
                await rule.gate.wait()
        self._advance(rule.work_ms)
        for k, v in rule.note.items():
            job.note(k, v)
        if rule.error is not None and (rule.fail_times == 0 or rule.calls <= rule.fail_times):
            raise rule.error
        return rule.result


@contextlib.asynccontextmanager
async def running(app: App) -> AsyncIterator[AppClient]:
    """``async with running(app) as client:`` — shorthand for :class:`AppClient`."""
    async with AppClient(app) as client:
        yield client


@contextlib.contextmanager
def capture_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture structlog lines as dicts, with ``trace_id``/``span_id``/``request_id``.

    Like ``structlog.testing.capture_logs`` plus zerver's trace-context
    processor, so tests can check which span a line was logged under.
    """
    import structlog
    from structlog.testing import LogCapture

    from zerver.trace._logging import add_trace_context

    capture = LogCapture()
    old = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_context,
            structlog.processors.add_log_level,
            capture,
        ],
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**old)
