"""A Redis Streams broker: the :class:`~zerver.Broker` for consumers in many processes.

Rules of the broker (``ZER_VER_BROKER_URL=redis://...``):

* A topic is the stream ``<key_prefix><topic>``. ``publish`` appends an entry
  (``XADD``) holding the body, the headers (the trace context among them), the
  message id and its attempt. The result is the message id: the entry's id for
  a new message, the original id when a consumer publishes a retry.
* Consumers read through one consumer group (``group``, default ``zerver``)
  per stream, so each entry goes to one consumer of any process; each process
  is a consumer of its own name. The group starts at the stream's first entry,
  so messages published before any consumer started are not lost.
* A message stays pending until the consumer runtime acknowledges it after
  processing (``ack``: ``XACK`` and ``XDEL`` in one round trip), whether it was
  processed, published again for a retry, or dead-lettered.
* A message pending longer than ``visibility_timeout_ms`` belongs to a consumer
  that died (or is still at work: keep the timeout above the slowest handler).
  Any consumer claims it (``XAUTOCLAIM``, at most every quarter of the timeout)
  and receives it again with its attempt raised by each lost delivery. One
  delivered more than ``max_deliveries`` times (its consumers keep dying) goes
  to ``<topic>.dead`` unprocessed instead, logged. Delivery is at least once.
* Bounded: a stream holds only messages not yet acknowledged (acknowledged
  entries are deleted), at most ``capacity`` of them. A publish to a full
  stream is refused with a retryable ``EffectError`` (``broker_full``, 503),
  checked and appended atomically on the server, as the in-process broker
  refuses. No entry is ever trimmed unread. A dead-letter topic has no
  consumer: it fills to ``capacity``, then dead letters are counted ``lost``.
* A lost server: ``publish`` fails with ``broker_unavailable`` or
  ``broker_timeout`` (retryable, 503); ``receive`` waits and tries again, with
  a back-off capped at one second, and logs (rate-limited). The password is
  masked in every message.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.lowlevel
import orjson
import structlog

from zerver.core._errors import EffectError
from zerver.runtime.interpreters._redis import RedisTarget, redis_client, redis_failure

from ._messaging import Message

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStreamsBroker"]

#: A stream entry as redis-py parses it: its id and its fields.
_Entry = tuple[bytes, dict[bytes, bytes]]

_log = structlog.get_logger("zerver")

# Append unless the stream already holds ARGV[1] entries (atomic on the server).
_PUBLISH = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'attempt', ARGV[3],
                  'headers', ARGV[4], 'body', ARGV[5])
"""


class _StreamMessage(Message):
    """A message and the stream entry it came from (what ``ack`` needs)."""

    __slots__ = ("entry_id", "stream")

    def __init__(
        self,
        id: str,
        topic: str,
        body: bytes,
        headers: Mapping[str, str],
        attempt: int,
        *,
        stream: str,
        entry_id: bytes,
    ) -> None:
        super().__init__(id, topic, body, headers, attempt)
        self.stream = stream
        self.entry_id = entry_id


class RedisStreamsBroker:
    """Messages on Redis Streams, shared by every process of a service (see the module rules).

    ``visibility_timeout_ms`` is how long a received message may stay
    unacknowledged before another consumer takes it over; ``capacity`` bounds
    each stream; ``block_ms`` is how long one read waits for a message before
    looking for abandoned ones; ``timeout_ms`` bounds connecting and each
    command; ``pool_size`` bounds the connections that publish and acknowledge
    (each consumer task holds one more for its blocking reads);
    ``max_deliveries`` bounds how often a message whose consumers die is handed
    out again before it is moved to ``<topic>.dead`` unprocessed.
    """

    system = "redis"

    def __init__(
        self,
        url: str,
        *,
        visibility_timeout_ms: int = 30_000,
        capacity: int = 10_000,
        group: str = "zerver",
        consumer_name: str | None = None,
        key_prefix: str = "zerver:stream:",
        block_ms: int = 1000,
        timeout_ms: int = 1000,
        pool_size: int = 16,
        max_deliveries: int = 10,
        variable: str = "url",
    ) -> None:
        for name, value in (
            ("visibility_timeout_ms", visibility_timeout_ms),
            ("max_deliveries", max_deliveries),
            ("capacity", capacity),
            ("block_ms", block_ms),
            ("timeout_ms", timeout_ms),
            ("pool_size", pool_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.target = RedisTarget.parse(url, variable=variable)
        self.visibility_timeout_ms = visibility_timeout_ms
        self.capacity = capacity
        self.group = group
        self.consumer_name = consumer_name or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.key_prefix = key_prefix
        self.block_ms = block_ms
        self.timeout_ms = timeout_ms
        self.pool_size = pool_size
        self.max_deliveries = max_deliveries
        #: Publishes refused because the stream was full.
        self.refused = 0
        #: Messages taken over from a consumer that did not acknowledge them in time.
        self.claimed = 0
        #: Messages moved to ``<topic>.dead`` after ``max_deliveries`` lost deliveries.
        self.buried = 0
        self._client: Redis | None = None
        self._reader: Redis | None = None
        self._groups: set[str] = set()
        self._next_claim: dict[str, float] = {}
        self._last_log = 0.0

    def __repr__(self) -> str:
        return f"<RedisStreamsBroker {self.target.masked} consumer {self.consumer_name!r}>"

    def stream(self, topic: str) -> str:
        """The Redis key of ``topic``'s stream."""
        return self.key_prefix + topic

    def _clients(self) -> tuple[Redis, Redis]:
        if self._client is None or self._reader is None:
            self._client, _ = redis_client(
                self.target, max_connections=self.pool_size, timeout_ms=self.timeout_ms
            )
            # Blocking reads hold their connection for up to block_ms: a pool of
            # their own (one connection per consumer task), whose reads may last
            # that long on top of the command timeout.
            self._reader, _ = redis_client(
                self.target, max_connections=10_000, timeout_ms=self.timeout_ms + self.block_ms
            )
        return self._client, self._reader

    def _failure(self, exc: Exception, what: str) -> EffectError:
        return redis_failure(exc, what, self.target, prefix="broker")

    async def start(self) -> None:
        """Check that the server answers; raises ``EffectError`` naming the masked URL if not."""
        client, _ = self._clients()
        try:
            await client.ping()
        except Exception as exc:
            raise self._failure(exc, "connecting") from None

    async def aclose(self) -> None:
        """Leave the consumer groups (nothing of ours is pending after a clean stop)
        and close the connections."""
        client, reader = self._client, self._reader
        self._client = self._reader = None
        if client is not None:
            with anyio.move_on_after(self.timeout_ms / 1000.0):
                for stream in self._groups:
                    try:
                        pending = await client.xpending_range(
                            stream, self.group, "-", "+", 1, consumername=self.consumer_name
                        )
                        if not pending:
                            await client.xgroup_delconsumer(stream, self.group, self.consumer_name)
                    except Exception:
                        break  # the server is gone: nothing to tidy
        self._groups.clear()
        for c in (client, reader):
            if c is not None:
                await c.aclose(close_connection_pool=True)

    async def publish(
        self,
        topic: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        message_id: str | None = None,
        attempt: int = 1,
    ) -> str:
        client, _ = self._clients()
        stream = self.stream(topic)
        try:
            entry = await client.eval(
                _PUBLISH,
                1,
                stream,
                self.capacity,
                message_id or "",
                attempt,
                orjson.dumps(dict(headers)),
                body,
            )
        except Exception as exc:
            raise self._failure(exc, f"publishing to {topic!r}") from None
        if entry is None:
            self.refused += 1
            raise EffectError(
                f"topic {topic!r} is full ({self.capacity} messages)",
                kind="broker_full",
                status_hint=503,
                retryable=True,
            )
        return message_id or _text(entry)

    async def receive(self, topic: str) -> Message:
        """The next message on ``topic`` for this consumer: an abandoned one first,
        else a new one; waits (and rides out a lost server) until there is one."""
        _, reader = self._clients()
        stream = self.stream(topic)
        failures = 0
        while True:
            try:
                # Never cancelled mid-command (a connection cancelled there is left
                # half-read); each command ends within block_ms + timeout_ms. A
                # message read as the consumer stops is still returned: the
                # consumer finishes a message in hand.
                with anyio.CancelScope(shield=True):
                    if stream not in self._groups:
                        await self._create_group(reader, stream)
                    msg = await self._claim(reader, topic, stream)
                    if msg is None:
                        msg = await self._read(reader, topic, stream)
                if msg is not None:
                    return msg
                failures = 0
                await anyio.lowlevel.checkpoint()  # where a stopping consumer leaves
            except Exception as exc:
                if "NOGROUP" in str(exc):  # the server lost the stream (restarted empty)
                    self._groups.discard(stream)
                failures += 1
                self._log_failure(self._failure(exc, f"receiving from {topic!r}"))
                await anyio.sleep(min(0.05 * 2 ** min(failures - 1, 5), 1.0))

    async def ack(self, message: Message) -> None:
        """Forget ``message``: acknowledge and delete its entry."""
        if not isinstance(message, _StreamMessage):
            return
        client, _ = self._clients()
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xack(message.stream, self.group, message.entry_id)
                pipe.xdel(message.stream, message.entry_id)
                await pipe.execute()
        except Exception as exc:
            raise self._failure(exc, f"acknowledging {message.id!r}") from None

    async def backlog(self, topic: str) -> int:
        """Messages on ``topic`` not yet acknowledged (waiting or in hand)."""
        client, _ = self._clients()
        try:
            return int(await client.xlen(self.stream(topic)))
        except Exception as exc:
            raise self._failure(exc, f"reading the length of {topic!r}") from None

    async def drain(self, topic: str) -> list[Message]:
        """Take every message off ``topic`` (e.g. to inspect a dead-letter topic)."""
        client, _ = self._clients()
        stream = self.stream(topic)
        try:
            entries = cast("list[_Entry]", await client.xrange(stream, "-", "+"))
            if entries:
                await client.xdel(stream, *[entry_id for entry_id, _ in entries])
        except Exception as exc:
            raise self._failure(exc, f"draining {topic!r}") from None
        return [_message(topic, stream, entry_id, fields, 0) for entry_id, fields in entries]

    # -- reading ---------------------------------------------------------------

    async def _create_group(self, reader: Redis, stream: str) -> None:
        from redis.exceptions import ResponseError

        try:
            await reader.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def _claim(self, reader: Redis, topic: str, stream: str) -> Message | None:
        now = time.monotonic()
        if now < self._next_claim.get(stream, 0.0):
            return None
        self._next_claim[stream] = now + self.visibility_timeout_ms / 4000.0
        _, claimed, *_ = await reader.xautoclaim(
            stream, self.group, self.consumer_name, self.visibility_timeout_ms, "0-0", count=1
        )
        if not claimed:
            return None
        entry_id, fields = claimed[0]
        # Look again soon: a dead consumer may have left more than one behind.
        self._next_claim[stream] = now
        info = await reader.xpending_range(stream, self.group, entry_id, entry_id, 1)
        delivered = int(info[0]["times_delivered"]) if info else 2
        self.claimed += 1
        if delivered > self.max_deliveries:
            await self._bury(reader, topic, stream, entry_id, fields, delivered)
            return None
        return _message(topic, stream, entry_id, fields, delivered - 1)

    async def _bury(
        self,
        reader: Redis,
        topic: str,
        stream: str,
        entry_id: bytes,
        fields: Mapping[bytes, bytes],
        delivered: int,
    ) -> None:
        """Move an entry whose consumers keep dying to ``<topic>.dead`` (then forget it)."""
        msg = _message(topic, stream, entry_id, fields, 0)
        reason = f"abandoned by {delivered - 1} consumers (max_deliveries={self.max_deliveries})"
        headers = {
            **msg.headers,
            "x-zerver-dead-reason": reason,
            "x-zerver-original-topic": topic,
        }
        await reader.eval(
            _PUBLISH,
            1,
            self.stream(topic + ".dead"),
            self.capacity,
            msg.id,
            msg.attempt,
            orjson.dumps(headers),
            msg.body,
        )
        await reader.xack(stream, self.group, entry_id)
        await reader.xdel(stream, entry_id)
        self.buried += 1
        _log.error("message dead-lettered", topic=topic, message_id=msg.id, reason=reason)

    async def _read(self, reader: Redis, topic: str, stream: str) -> Message | None:
        # RESP2 reply: [[stream, [(entry_id, fields)]]], or nothing after block_ms.
        got = cast(
            "list[tuple[bytes, list[_Entry]]] | None",
            await reader.xreadgroup(
                self.group, self.consumer_name, {stream: ">"}, count=1, block=self.block_ms
            ),
        )
        if not got:
            return None
        entry_id, fields = got[0][1][0]
        return _message(topic, stream, entry_id, fields, 0)

    def _log_failure(self, error: EffectError) -> None:
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            _log.warning("broker unavailable; retrying", error=str(error), kind=error.kind)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _message(
    topic: str, stream: str, entry_id: bytes, fields: Mapping[bytes, bytes], lost: int
) -> _StreamMessage:
    """The message an entry holds; ``lost`` deliveries (to consumers that died) count
    as attempts."""
    headers = orjson.loads(fields.get(b"headers", b"{}"))
    attempt = int(fields.get(b"attempt", b"1")) + lost
    mid = _text(fields.get(b"id", b"")) or _text(entry_id)
    return _StreamMessage(
        mid,
        topic,
        fields.get(b"body", b""),
        {str(k): str(v) for k, v in headers.items()},
        attempt,
        stream=stream,
        entry_id=entry_id,
    )
