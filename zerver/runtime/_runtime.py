"""The runtime object: what the HTTP shell and the consumer runtime share.

An app's requests and its consumers' messages run on the same parts: one
clock, one source of ids, one broker, the interpreters, the job system and the
executor (while running), and the subscribers that receive every finished
record. :class:`Runtime` holds them, starts and stops the job system, and
hands finished records out; the :class:`~zerver.App` adds routing, the HTTP
request's facts and the trace pages on top, and the consumer runtime
(:mod:`zerver.runtime._consumers`) takes this object, not the app.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog

from zerver.core._clock import Clock
from zerver.trace._propagation import propagation_fields
from zerver.trace._records import RequestRecord, Subscriber

from ._executor import Executor
from ._jobs import JobSystem

if TYPE_CHECKING:
    from ._messaging import Broker
    from ._park import Interpreter

__all__ = ["Runtime"]

_log = structlog.get_logger("zerver")


class Runtime:
    """Clock, ids, broker, interpreters, job system, executor and subscribers.

    ``rng`` draws trace, span, request and error ids (seed it for reproducible
    ids in tests). ``otel_context`` says whether steps run inside an
    OpenTelemetry context of their span (so user spans nest).
    """

    def __init__(
        self, clock: Clock, rng: random.Random, broker: Broker, *, otel_context: bool
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.broker = broker
        self.otel_context = otel_context
        #: Interpreters by effect system (``db``, ``cache``, ...).
        self.interpreters: dict[str, Interpreter] = {}
        #: The header names the configured propagators read (lower-case bytes).
        self.prop_fields = propagation_fields()
        self.subscribers: list[Subscriber] = []
        self._subscriber_fn: list[Callable[[RequestRecord], object]] = []
        #: Subscriber calls that raised (each counted and logged, never raised on).
        self.subscriber_errors = 0
        self.jobs: JobSystem | None = None
        self.executor: Executor | None = None

    def new_record(self) -> RequestRecord:
        """A fresh record of one request or message, on this runtime's clock and ids."""
        record = RequestRecord(self.clock, self.rng)
        record.otel_context = self.otel_context
        return record

    def subscribe(self, subscriber: Subscriber) -> None:
        """Give every finished record to ``subscriber``."""
        self.subscribers.append(subscriber)
        self._subscriber_fn.append(subscriber.on_request_end)

    def notify(self, record: RequestRecord) -> None:
        """Hand a finished record to every subscriber; a subscriber that raises is
        counted and logged (rate-limited), never raised into the request."""
        for fn in self._subscriber_fn:
            try:
                fn(record)
            except Exception:
                self.subscriber_errors += 1
                if self.subscriber_errors & (self.subscriber_errors - 1) == 0:
                    _log.exception("subscriber failed", count=self.subscriber_errors)

    @contextlib.asynccontextmanager
    async def running(self, jobs: JobSystem, *, max_need_depth: int) -> AsyncIterator[Executor]:
        """Run ``jobs`` (built on this runtime's clock and interpreters) and an
        executor over it for the duration of the block."""
        async with jobs:
            self.jobs = jobs
            self.executor = Executor(self.clock, jobs, max_depth=max_need_depth)
            try:
                yield self.executor
            finally:
                self.executor = None
                self.jobs = None
