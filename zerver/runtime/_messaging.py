"""Messaging: the ``Publish`` effect, brokers, and consumers that run pipelines per message.

A step publishes with ``Need(Publish(topic=..., message=...))``; the effect's
PRODUCER span (``queue.publish <topic>``) injects its trace context into the
message headers. ``app.consumer(topic, *steps)`` runs the same step/effect
pipeline for every message on ``topic`` under a CONSUMER root span
(``queue.process <topic>``) that links to, and by default continues, the
producer's trace.

A message whose pipeline fails (a ``Fail`` with a 5xx status, a raising
step, a failed required effect) is published again with its attempt count
raised, after a back-off, until ``max_attempts``; then it goes to the
dead-letter topic. A ``Fail`` with a 4xx status says the message itself is
wrong: it goes to the dead-letter topic at once. So
every message received ends either processed or dead-lettered, and the
consumer's counters add up.

The embedded :class:`MemoryBroker` is in-process and bounded (one bounded
queue per topic); :class:`Broker` is the interface a real broker plugs into.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import anyio
import orjson

from zerver.core._effects import Effect, RetryPolicy
from zerver.core._errors import EffectError, UnsupportedEffectError, UsageError
from zerver.core._message import Message

from ._park import JobContext

if TYPE_CHECKING:
    from zerver.core._attributes import AttrValue
    from zerver.core._steps import Step

__all__ = [
    "Broker",
    "BrokerInterpreter",
    "Consumer",
    "ConsumerStats",
    "MemoryBroker",
    "Message",
    "Publish",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish(Effect):
    """Publish ``message`` (bytes, or anything JSON-serialisable) to ``topic``.

    The result is the message id. ``headers`` travel with the message; the
    trace context is added to them.
    """

    system: ClassVar[str] = "queue"
    operation: ClassVar[str] = "publish"
    span_kind: ClassVar[Literal["client", "producer"]] = "producer"
    topic: str
    message: Any
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        return self.name or self.topic

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        attrs: dict[str, AttrValue] = {
            "messaging.operation.type": "send",
            "messaging.operation.name": self.operation,
            "messaging.destination.name": self.topic,
        }
        if result is not None:
            for key in ("messaging.message.id", "messaging.message.body.size"):
                if key in result:
                    value = result[key]
                    if isinstance(value, str | int):
                        attrs[key] = value
        return attrs


class Broker(Protocol):
    """Where messages go. ``publish`` must not block on a full topic: it raises
    :class:`~zerver.EffectError` (retryable) instead."""

    system: str

    async def start(self) -> None: ...

    async def publish(
        self,
        topic: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        message_id: str | None = None,
        attempt: int = 1,
    ) -> str: ...

    async def receive(self, topic: str) -> Message: ...

    async def ack(self, message: Message) -> None:
        """``message`` (from :meth:`receive`) is finished: processed, published
        again for a retry, or dead-lettered. A broker that redelivers unfinished
        messages forgets it now; the in-process broker has nothing to do."""

    async def aclose(self) -> None: ...


class _Topic:
    __slots__ = ("delivered", "published", "queue", "waiters")

    def __init__(self) -> None:
        self.queue: deque[Message] = deque()
        self.waiters: deque[anyio.Event] = deque()
        self.published = 0
        self.delivered = 0


class MemoryBroker:
    """An in-process broker: one bounded FIFO per topic, no persistence.

    A topic holding ``capacity`` undelivered messages refuses more with a
    retryable ``EffectError`` (``kind="broker_full"``, 503): never a hang.
    """

    system = "zerver"

    def __init__(self, *, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._topics: dict[str, _Topic] = {}
        self._ids = itertools.count(1)
        self.refused = 0

    def _topic(self, name: str) -> _Topic:
        t = self._topics.get(name)
        if t is None:
            t = self._topics[name] = _Topic()
        return t

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def publish(
        self,
        topic: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        message_id: str | None = None,
        attempt: int = 1,
    ) -> str:
        t = self._topic(topic)
        if len(t.queue) >= self.capacity:
            self.refused += 1
            raise EffectError(
                f"topic {topic!r} is full ({self.capacity} messages)",
                kind="broker_full",
                status_hint=503,
                retryable=True,
            )
        mid = message_id or f"m{next(self._ids)}"
        t.queue.append(Message(mid, topic, body, headers, attempt))
        t.published += 1
        if t.waiters:
            t.waiters.popleft().set()
        return mid

    async def receive(self, topic: str) -> Message:
        t = self._topic(topic)
        while not t.queue:
            ev = anyio.Event()
            t.waiters.append(ev)
            try:
                await ev.wait()
            finally:
                if not ev.is_set():
                    t.waiters.remove(ev)
        t.delivered += 1
        return t.queue.popleft()

    async def ack(self, message: Message) -> None:
        """Nothing to do: a message leaves the in-process queue when received."""
        return None

    def depth(self, topic: str) -> int:
        """Messages waiting on ``topic``."""
        return len(self._topic(topic).queue)

    def drain(self, topic: str) -> list[Message]:
        """Take every waiting message off ``topic`` (e.g. to inspect a dead-letter topic)."""
        t = self._topic(topic)
        out = list(t.queue)
        t.queue.clear()
        t.delivered += len(out)
        return out


def encode_body(message: Any) -> bytes:
    if isinstance(message, bytes | bytearray):
        return bytes(message)
    try:
        return orjson.dumps(message)
    except TypeError as exc:
        raise EffectError(
            f"message is not JSON-serialisable: {exc}", kind="invalid_message", status_hint=500
        ) from None


class BrokerInterpreter:
    """Performs ``Publish`` effects on a :class:`Broker` (system ``queue``)."""

    system = "queue"

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.span_attributes = {"messaging.system": broker.system}

    async def start(self) -> None:
        await self.broker.start()

    async def aclose(self) -> None:
        await self.broker.aclose()

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        if not isinstance(effect, Publish):
            raise UnsupportedEffectError("BrokerInterpreter", effect)
        body = encode_body(effect.message)
        headers = dict(effect.headers)
        # The PRODUCER span becomes the parent (and link) of the consumer's work.
        headers.update(job.propagation_headers())
        with job.parked("io_wait", "broker"):
            mid = await self.broker.publish(effect.topic, body, headers)
        job.note("messaging.message.id", mid)
        job.note("messaging.message.body.size", len(body))
        return mid


@dataclass(slots=True)
class ConsumerStats:
    """What a consumer did. ``received == processed + retried + dead_lettered + lost``
    once every message in flight has finished; ``lost`` counts messages the
    dead-letter topic refused (each one is also logged)."""

    received: int = 0
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    lost: int = 0
    in_flight: int = 0


@dataclass(kw_only=True)
class Consumer:
    """Runs ``steps`` for every message on ``topic`` (see :meth:`App.consumer`)."""

    topic: str
    steps: Sequence[Step]
    max_attempts: int = 3
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(backoff_ms=50, jitter=0.1))
    dead_letter_topic: str = ""
    concurrency: int = 1
    continue_trace: bool = True
    stats: ConsumerStats = field(default_factory=ConsumerStats)

    def __post_init__(self) -> None:
        if not self.steps:
            raise UsageError(f"consumer of {self.topic!r} needs at least one step")
        if self.max_attempts < 1 or self.concurrency < 1:
            raise UsageError("max_attempts and concurrency must be >= 1")
        if not self.dead_letter_topic:
            self.dead_letter_topic = f"{self.topic}.dead"
