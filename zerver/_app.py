"""The application: routes, steps, interpreters, subscribers and the request entry point."""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog

from zerver.core._attributes import Redaction, strip_userinfo
from zerver.core._clock import Clock, MonotonicClock
from zerver.core._decisions import Done, Fail
from zerver.core._effects import RetryPolicy
from zerver.core._errors import UsageError
from zerver.core._http import Request, Response
from zerver.core._slots import Context
from zerver.core._steps import Step
from zerver.http._routing import Match, NotAllowed, Route, Router
from zerver.runtime._executor import Executor, PipelineError
from zerver.runtime._jobs import JobSystem
from zerver.runtime._messaging import Broker, BrokerInterpreter, Consumer, MemoryBroker
from zerver.runtime._runtime import Runtime
from zerver.trace._propagation import extract_into
from zerver.trace._records import RequestRecord, StepRecord, Subscriber, active_span
from zerver.trace._sampling import head_sampler
from zerver.trace._semconv import KNOWN_METHODS, HeaderCaptures

from ._version import __version__

# Tracing, the exporter process and settings are imported where they are first
# used, so an app that does not trace never loads them (docs/performance.md).
if TYPE_CHECKING:
    from zerver.export._config import MetricsExportConfig
    from zerver.export._spans import Resource
    from zerver.runtime._park import Interpreter
    from zerver.trace._offload import ProcessTraceSubscriber
    from zerver.trace._tracing import SpanSink, TraceEngine

    from ._config import Settings
    from .zpages import ZPages

__all__ = ["App"]

_log = structlog.get_logger("zerver")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

_NOT_FOUND = b'{"error":"not found"}'
_JSON = ("content-type", "application/json")


class App:
    """A zerver application.

    >>> app = App("blog")
    >>> app.get("/healthz", health)            # doctest: +SKIP

    Steps run in order: the app's ``before`` steps, the route's ``before``
    steps, then the route's steps. Interpreters for ``db``, ``cache`` and
    ``http`` effects are SQLite, an in-process TTL cache and an httpx client
    unless the app registers its own with :meth:`interpreter`. The default
    SQLite database opens on the first ``db`` effect: an app whose steps
    request none never creates its file. The other interpreters start with
    the app.
    """

    def __init__(
        self,
        name: str = "zerver",
        *,
        settings: Settings | None = None,
        clock: Clock | None = None,
        version: str = "0.0.0",
        rng: random.Random | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.name = name
        self.version = version
        if settings is None:
            from ._config import load_settings

            settings = load_settings()
        self.settings = settings
        self.router = Router()
        self._before: list[Step] = []
        # The default interpreters that open themselves on first use.
        self._open_on_use: tuple[Interpreter, ...] = ()
        if broker is None and self.settings.broker_url:
            from zerver.runtime._messaging_redis import RedisStreamsBroker

            broker = RedisStreamsBroker(
                self.settings.broker_url,
                visibility_timeout_ms=self.settings.broker_visibility_timeout_ms,
                variable="ZER_VER_BROKER_URL",
            )
        #: What requests and consumers run on: clock, ids (seed ``rng`` for
        #: reproducible ids in tests), broker, interpreters, job system, subscribers.
        self.runtime = Runtime(
            clock if clock is not None else MonotonicClock(),
            rng if rng is not None else random.Random(),
            broker if broker is not None else MemoryBroker(),
            otel_context=self.settings.otel_context,
        )
        self.clock: Clock = self.runtime.clock
        # The runtime's, bound once: the request path reads them on every request.
        self._rng = self.runtime.rng
        self._notify = self.runtime.notify
        self._started = False
        # Secrets never enter a record: query values redacted, userinfo dropped, headers
        # captured only when asked for (docs/security.md).
        self._redaction = Redaction.parse(self.settings.redact_query_params)
        self._captures = HeaderCaptures.from_settings(self.settings)
        # W3C Trace Context Level 2 ``traceresponse``: which trace a caller can look up.
        self._trace_response = self.settings.trace_response_header
        self._default_interpreters()
        # The head sampling decision, made once per request in _start_record; None
        # with the default (head:1), where the flags extraction set are the decision.
        head = head_sampler(self.settings.sampler_spec)
        self._head_decide = None if head.follows_parent_or_samples else head.decide
        self._on_startup: list[Callable[[App], Awaitable[None]]] = []
        self.active_requests: dict[tuple[str, str], int] | None = None
        """Requests in flight by (method, scheme), methods outside the standard set
        as ``_OTHER``; counted only once :meth:`count_active_requests` asked for it
        (the server's metrics do)."""
        self._consumers: list[Consumer] = []
        # The trace pages (docs/tracez.md); None when off, so a request pays one test.
        self._zpages: ZPages | None = None
        if self.settings.zpages:
            from .zpages import ZPages

            self._zpages = ZPages(self.settings, self.runtime, self._resource)

    # -- building -----------------------------------------------------------------

    def before(self, *steps: Step) -> None:
        """Add steps that run before every route's steps."""
        for s in steps:
            self._check_step(s)
        self._before.extend(steps)

    def route(self, method: str, template: str, *steps: Step, before: Sequence[Step] = ()) -> Route:
        """Register ``method template`` with its steps (and per-route ``before`` steps)."""
        if not steps:
            raise UsageError(f"route {method} {template} needs at least one step")
        for s in (*before, *steps):
            self._check_step(s)
        r = Route(method.upper(), template, steps, before)
        self.router.add(r)
        return r

    def get(self, template: str, *steps: Step, before: Sequence[Step] = ()) -> Route:
        """Register a ``GET`` route (``HEAD`` falls back to it)."""
        return self.route("GET", template, *steps, before=before)

    def post(self, template: str, *steps: Step, before: Sequence[Step] = ()) -> Route:
        """Register a ``POST`` route."""
        return self.route("POST", template, *steps, before=before)

    def put(self, template: str, *steps: Step, before: Sequence[Step] = ()) -> Route:
        """Register a ``PUT`` route."""
        return self.route("PUT", template, *steps, before=before)

    def delete(self, template: str, *steps: Step, before: Sequence[Step] = ()) -> Route:
        """Register a ``DELETE`` route."""
        return self.route("DELETE", template, *steps, before=before)

    @staticmethod
    def _check_step(s: object) -> None:
        if not isinstance(s, Step):
            raise UsageError(f"expected a Step (decorate the function with @step), got {s!r}")

    def interpreter(self, system: str, interpreter: Interpreter) -> None:
        """Use ``interpreter`` for every effect whose ``system`` is ``system``."""
        if self._started:
            raise UsageError("interpreters must be registered before the app starts")
        self.runtime.interpreters[system] = interpreter

    def consumer(
        self,
        topic: str,
        *steps: Step,
        max_attempts: int = 3,
        retry: RetryPolicy | None = None,
        dead_letter_topic: str = "",
        concurrency: int = 1,
        continue_trace: bool = True,
    ) -> Consumer:
        """Run ``steps`` for every message published on ``topic``.

        A failed message is retried (``max_attempts`` in all, back-off from
        ``retry``) and then sent to ``dead_letter_topic`` (default
        ``<topic>.dead``). The consumer span continues the producer's trace
        unless ``continue_trace=False`` (then it only links to it).
        """
        for s in steps:
            self._check_step(s)
        c = Consumer(
            topic=topic,
            steps=steps,
            max_attempts=max_attempts,
            dead_letter_topic=dead_letter_topic,
            concurrency=concurrency,
            continue_trace=continue_trace,
        )
        if retry is not None:
            c.retry = retry
        self._consumers.append(c)
        return c

    @property
    def consumers(self) -> list[Consumer]:
        return list(self._consumers)

    def on_startup(self, hook: Callable[[App], Awaitable[None]]) -> None:
        """Run ``await hook(app)`` once interpreters have started, before serving."""
        self._on_startup.append(hook)

    def _resource(self) -> Resource:
        from zerver.trace._tracing import default_resource

        s = self.settings
        return default_resource(
            s.service_name or s.resource_attrs.get("service.name") or self.name,
            self.version,
            s.resource_attrs,
            sdk_version=__version__,
        )

    def trace_to(self, sink: SpanSink) -> TraceEngine:
        """Build each request's trace from the app's settings and give it to ``sink``.

        Returns the :class:`TraceEngine` (already subscribed).
        """
        from zerver.trace._tracing import engine_from_settings

        engine = engine_from_settings(
            self.settings, sink, resource=self._resource(), interpreters=self.runtime.interpreters
        )
        self.subscribe(engine)
        return engine

    def trace_in_process(
        self,
        environ: Mapping[str, str],
        *,
        default_spool_dir: str | None = None,
        metrics: MetricsExportConfig | None = None,
    ) -> ProcessTraceSubscriber:
        """Build and export traces in a separate exporter process (see ``_offload``).

        ``environ`` supplies the exporter variables (see :class:`~zerver.export.ExportConfig`);
        ``default_spool_dir`` the spool directory when ``ZER_VER_EXPORT_SPOOL_DIR`` is unset;
        ``metrics``, when given, has the exporter process record and export the
        request metrics too.
        """
        from zerver.export._config import ExportConfig
        from zerver.trace._offload import EngineSpec, ProcessTraceSubscriber

        spec = EngineSpec(
            settings=self.settings,
            export=ExportConfig.from_env(environ, default_spool_dir=default_spool_dir),
            resource=dict(self._resource().attributes),
            static_attributes={
                system: dict(attrs)
                for system, interp in self.runtime.interpreters.items()
                if isinstance(attrs := getattr(interp, "span_attributes", None), Mapping)
            },
            parent_cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
            metrics=metrics,
        )
        sub = ProcessTraceSubscriber(
            spec, active=self.count_active_requests() if metrics is not None else None
        )
        self.subscribe(sub)
        return sub

    def count_active_requests(self) -> dict[tuple[str, str], int]:
        """Count the requests in flight from now on (:attr:`active_requests`)."""
        if self.active_requests is None:
            self.active_requests = {}
        return self.active_requests

    def subscribe(self, subscriber: Subscriber) -> None:
        """Give every finished :class:`RequestRecord` to ``subscriber``."""
        self.runtime.subscribe(subscriber)

    @property
    def subscriber_errors(self) -> int:
        """Subscriber calls that raised (counted and logged, never raised into a request)."""
        return self.runtime.subscriber_errors

    @property
    def broker(self) -> Broker:
        """Where ``Publish`` effects go and consumers read from."""
        return self.runtime.broker

    @broker.setter
    def broker(self, broker: Broker) -> None:
        if self._started:
            raise UsageError("the broker must be set before the app starts")
        self.runtime.broker = broker

    @property
    def interpreters(self) -> dict[str, Interpreter]:
        return self.runtime.interpreters

    # -- running ------------------------------------------------------------------

    def _default_interpreters(self) -> None:
        from zerver.runtime.interpreters import CacheInterpreter, HttpInterpreter, SqliteInterpreter

        s = self.settings
        # The SQLite pool opens (and creates its file) with the first db effect, in
        # SqliteInterpreter._run, not when the app starts.
        db: Interpreter
        backend, target = s.db_backend  # ZER_VER_DB_URL, else ZER_VER_DB_PATH
        if backend == "postgresql":
            from zerver.runtime.interpreters import PostgresInterpreter

            db = PostgresInterpreter(
                target,
                pool_size=s.db_pool_size or PostgresInterpreter.default_pool_size,
                clock=self.clock,
            )
        else:
            db = SqliteInterpreter(
                target,
                pool_size=s.db_pool_size or SqliteInterpreter.default_pool_size,
                clock=self.clock,
            )
        self._open_on_use = (db,)
        self.runtime.interpreters.setdefault("db", db)
        cache: Interpreter
        if s.cache_url:
            from zerver.runtime.interpreters import RedisCacheInterpreter

            cache = RedisCacheInterpreter(
                s.cache_url, default_ttl_ms=s.cache_ttl_ms, variable="ZER_VER_CACHE_URL"
            )
        else:
            cache = CacheInterpreter(
                max_entries=s.cache_max_entries, default_ttl_ms=s.cache_ttl_ms, clock=self.clock
            )
        self.runtime.interpreters.setdefault("cache", cache)
        self.runtime.interpreters.setdefault(
            "http", HttpInterpreter(capture_headers=self._captures)
        )
        self.runtime.interpreters.setdefault("queue", BrokerInterpreter(self.runtime.broker))

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start interpreters and the job system; on exit drain and close them."""
        if self._started:
            raise UsageError(f"app {self.name!r} is already running")
        self._started = True
        s = self.settings
        started: list[Interpreter] = []
        try:
            for interp in self.runtime.interpreters.values():
                if not any(interp is lazy for lazy in self._open_on_use):
                    await interp.start()
                # Closed in any case: a default may have opened itself meanwhile.
                started.append(interp)
            jobs = JobSystem(
                self.clock,
                self.runtime.interpreters,
                effects_queue=s.queue_name_effects,
                cont_queue=s.queue_name_cont,
                effects_capacity=s.queue_capacity_effects,
                effects_workers=s.workers_effects,
                cont_capacity=s.queue_capacity_cont,
                cont_workers=s.workers_cont,
                rng=self._rng,
            )
            for hook in self._on_startup:
                await hook(self)
            async with self.runtime.running(jobs, max_need_depth=s.max_need_depth):
                from zerver.runtime._consumers import ConsumerRunner

                runner = ConsumerRunner(self.runtime)
                async with anyio.create_task_group() as tg:
                    stop = anyio.Event()
                    for c in self._consumers:
                        for _ in range(c.concurrency):
                            tg.start_soon(runner.consume_loop, c, stop)
                    try:
                        yield
                    finally:
                        stop.set()
                # Each process's own totals: summed over the processes of a
                # shared broker they add up (docs/messaging.md, ConsumerStats).
                for c in self._consumers:
                    st = c.stats
                    _log.info(
                        "consumer stopped",
                        topic=c.topic,
                        received=st.received,
                        processed=st.processed,
                        retried=st.retried,
                        dead_lettered=st.dead_lettered,
                        lost=st.lost,
                        in_flight=st.in_flight,
                    )
        finally:
            for interp in reversed(started):
                try:
                    await interp.aclose()
                except Exception:
                    _log.exception("interpreter close failed", interpreter=type(interp).__name__)
            for sub in self.runtime.subscribers:
                close = getattr(sub, "shutdown", None)
                if close is not None:
                    try:
                        # A drain may wait on the network: keep it off the event loop.
                        await anyio.to_thread.run_sync(close)
                    except Exception:
                        _log.exception("subscriber shutdown failed", subscriber=repr(sub))
            self._started = False

    def abandon(self) -> None:
        """Stop telemetry at once (the process is about to exit on a second signal):
        each subscriber that can spools or counts what it still holds."""
        for sub in self.runtime.subscribers:
            abandon = getattr(sub, "abandon", None)
            if abandon is not None:
                try:
                    abandon()
                except Exception:
                    _log.exception("subscriber abandon failed", subscriber=repr(sub))

    @property
    def jobs(self) -> JobSystem:
        """The running job system (only while :meth:`lifespan` is active)."""
        jobs = self.runtime.jobs
        if jobs is None:
            raise UsageError("the app is not running; use `async with app.lifespan():`")
        return jobs

    def _start_record(self, request: Request) -> RequestRecord:
        rng = self._rng
        record = self.runtime.new_record()
        record.method = request.method
        record.path = request.path
        record.query = self._redaction.query(request.query)
        record.scheme = request.scheme
        record.protocol_version = request.http_version
        record.request_body_size = len(request.body)
        if request.client is not None:
            record.client_address, record.client_port = request.client
        if request.server is not None:
            record.server_address, record.server_port = request.server
        request_id: str | None = None
        fields = self.runtime.prop_fields
        carrier: dict[str, list[str]] | None = None
        for k, v in request.headers:
            if k == b"host":
                record.host = strip_userinfo(v.decode("latin-1"))
            elif k == b"user-agent":
                record.user_agent = v.decode("latin-1")
            elif k in fields:
                if carrier is None:
                    carrier = {}
                carrier.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
            elif k == b"x-request-id":
                rid = v.decode("latin-1").strip()
                if _REQUEST_ID_OK.match(rid):
                    request_id = rid
        if carrier is not None:
            extract_into(record, carrier)
        capture = self._captures.server_request.capture
        if capture is not None:
            record.captured_headers = capture(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers
            )
        record.start_trace()
        decide = self._head_decide
        if decide is not None:
            parent = bool(record.trace_flags & 0x01) if record.parent_remote else None
            sampled = decide(record.trace_id, parent)
            record.trace_flags = (record.trace_flags & ~0x01) | sampled
        if record.parent_remote:
            request_id = f"{record.trace_id:032x}"
        record.request_id = request_id or f"{rng.getrandbits(64):016x}"
        return record

    async def dispatch(self, request: Request) -> Response:
        """Handle one request through routing and the pipeline. Never raises for app errors."""
        executor = self.runtime.executor
        if executor is None:
            raise UsageError("the app is not running; use `async with app.lifespan():`")
        zpages = self._zpages
        # The prefix test first: for the app's own requests it is all tracez costs here.
        if zpages is not None and request.path.startswith(zpages.prefix) and zpages.claims(request):
            return zpages.serve(request)  # neither traced nor counted
        record = self._start_record(request)
        in_flight = self.active_requests
        if in_flight is not None:
            method = record.method if record.method in KNOWN_METHODS else "_OTHER"
            key = (method, record.scheme)
            in_flight[key] = in_flight.get(key, 0) + 1
        if zpages is not None:
            zpages.aggregator.started(record)
        response: Response | None = None
        active = active_span.set((record, record.span_id))
        try:
            try:
                response = await self._handle(executor, request, record)
            except Exception as exc:  # the runtime itself broke: a fault, not a hang
                err = PipelineError(
                    f"runtime error: {type(exc).__name__}: {exc}", error_type=type(exc).__name__
                )
                err.__cause__ = exc
                response = self._fault(record, err)
        finally:
            if response is None:  # cancelled: the client went away
                record.finish(499, 0)
            else:
                response.headers.append(("x-request-id", record.request_id))
                if self._trace_response:
                    response.headers.append(
                        (
                            "traceresponse",
                            f"00-{record.trace_id:032x}-{record.span_id:016x}-"
                            f"{record.trace_flags & 0xFF:02x}",
                        )
                    )
                capture = self._captures.server_response.capture
                if capture is not None:
                    captured = capture(response.headers)
                    if captured:
                        record.captured_headers = {**(record.captured_headers or {}), **captured}
                size = 0 if request.method == "HEAD" else len(response.body)
                record.finish(response.status, size)
            self._notify(record)
            active_span.reset(active)
            if in_flight is not None:
                in_flight[key] -= 1
        return response

    async def _handle(
        self, executor: Executor, request: Request, record: RequestRecord
    ) -> Response:
        clock = self.clock
        sr = StepRecord(
            index=0,
            name="route_match",
            layer="route_match",
            sequence=0,
            reads=(),
            writes=(),
            start_ts=clock.now_ns(),
        )
        sr.span_id = record.new_span_id()
        record.steps.append(sr)
        found = self.router.match(request.method, request.path)
        sr.end_ts = clock.now_ns()
        if type(found) is Match:
            sr.decision = "Continue"
            route = found.route
            record.route = route.template
            record.params = found.params
            steps = [(s, "before") for s in self._before]
            steps.extend((s, "before") for s in route.before)
            steps.extend((s, "route") for s in route.steps)
            ctx = Context(request, found.params, record)
            outcome = await executor.run(ctx, record, steps, 0)
            if type(outcome) is Done:
                return outcome.response
            if type(outcome) is Fail:
                return self._fail_response(outcome)
            assert isinstance(outcome, PipelineError)
            return self._fault(record, outcome)
        sr.decision = "Fail"
        if isinstance(found, NotAllowed):
            record.route = found.template
            return Response(
                405,
                b'{"error":"method not allowed"}',
                [_JSON, ("allow", ", ".join(found.allow))],
            )
        return Response(404, _NOT_FOUND, [_JSON])

    @staticmethod
    def _fail_response(fail: Fail) -> Response:
        body: dict[str, Any] = {"error": fail.what or "request failed"}
        if fail.key is not None:
            body["key"] = fail.key
        headers: list[tuple[str, str]] = []
        if fail.status in (429, 503):
            headers.append(("retry-after", "1"))
        return Response.json(body, fail.status, headers)

    def _fault(self, record: RequestRecord, err: PipelineError) -> Response:
        error_id = f"{self._rng.getrandbits(64):016x}"
        record.system_fault = True
        record.error_type = err.error_type
        record.error_message = str(err)
        record.error_id = error_id
        _log.error(
            "request failed",
            error_id=error_id,
            request_id=record.request_id,
            method=record.method,
            route=record.route,
            exc_info=err.__cause__ or err,
        )
        return Response.json({"error": "internal server error", "error_id": error_id}, 500)

    def __repr__(self) -> str:
        return f"<App {self.name!r} {len(self.router.routes)} routes>"
