"""Consumers: the runtime that runs an app's pipelines for messages (see ``_messaging``).

For each consumed message a :class:`~zerver.trace.RequestRecord` of kind
``consumer`` is recorded exactly as for a request, so subscribers (the trace
engine, logs) see consumers and requests alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import structlog

from zerver.core._decisions import Done, Fail
from zerver.core._http import Request
from zerver.core._slots import Context
from zerver.trace._propagation import link_message_context
from zerver.trace._records import active_span

from ._executor import PipelineError
from ._messaging import Consumer, Message

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["ConsumerRunner"]

_log = structlog.get_logger("zerver")


class ConsumerRunner:
    """Receives, processes, retries and dead-letters the messages of one app, on
    the app's :class:`~zerver.runtime._runtime.Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Message headers are str: the propagators' header names, decoded once.
        self._fields = [f.decode("latin-1") for f in runtime.prop_fields]

    async def consume_loop(self, consumer: Consumer, stop: anyio.Event) -> None:
        """Take messages until the app stops; a message in hand is always finished."""
        broker = self.runtime.broker
        while not stop.is_set():
            msg: Message | None = None
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    nonlocal msg
                    msg = await broker.receive(consumer.topic)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(receive)
                tg.start_soon(watch)
            if msg is None:
                return
            with anyio.CancelScope(shield=True):
                await self._consume(consumer, msg)

    async def _consume(self, consumer: Consumer, msg: Message) -> None:
        executor = self.runtime.executor
        assert executor is not None
        stats = consumer.stats
        stats.received += 1
        stats.in_flight += 1
        record = self.runtime.new_record()
        record.kind = "consumer"
        record.method = "PROCESS"
        record.route = consumer.topic
        record.path = consumer.topic
        record.message_id = msg.id
        record.message_size = len(msg.body)
        record.message_attempt = msg.attempt
        record.request_body_size = len(msg.body)
        carrier = {k.lower(): [v] for k, v in msg.headers.items()}
        if any(f in carrier for f in self._fields):
            link_message_context(record, carrier, continue_trace=consumer.continue_trace)
        record.start_trace()
        record.request_id = msg.id
        request = Request(
            method="PROCESS",
            path=consumer.topic,
            headers=[
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in msg.headers.items()
            ],
            body=msg.body,
        )
        ctx = Context(request, {}, record, msg)
        steps = [(st, "route") for st in consumer.steps]
        active = active_span.set((record, record.span_id))
        failure: str | None = None
        try:
            try:
                outcome = await executor.run(ctx, record, steps, 0)
            except Exception as exc:
                outcome = PipelineError(f"runtime error: {exc}", error_type=type(exc).__name__)
            permanent = False
            if type(outcome) is Done or (
                isinstance(outcome, PipelineError) and outcome.error_type == "NoResponse"
            ):
                # For a consumer, steps that all Continue have handled the message.
                record.finish(200, 0)
            elif type(outcome) is Fail:
                failure = f"Fail {outcome.status}: {outcome.what}"
                # A 4xx says the message itself is wrong: retrying cannot help.
                permanent = outcome.status < 500
                record.error_type = f"fail_{outcome.status}"
                record.error_message = failure
                record.finish(outcome.status, 0)
            else:
                assert isinstance(outcome, PipelineError)
                failure = str(outcome)
                record.system_fault = True
                record.error_type = outcome.error_type
                record.error_message = failure
                _log.error(
                    "message handler failed",
                    topic=consumer.topic,
                    message_id=msg.id,
                    attempt=msg.attempt,
                    exc_info=outcome.__cause__ or outcome,
                )
                record.finish(500, 0)
            self.runtime.notify(record)
        finally:
            active_span.reset(active)
        if failure is None:
            stats.processed += 1
        else:
            await self._retry_or_dead_letter(consumer, msg, failure, permanent=permanent)
        # A broker written before ``ack`` joined the protocol has none: it acknowledges
        # in ``receive``, as the protocol then said.
        ack = getattr(self.runtime.broker, "ack", None)
        if ack is not None:
            try:
                await ack(msg)
            except Exception:  # the broker redelivers it later: at least once, never lost
                _log.exception("acknowledging failed", topic=consumer.topic, message_id=msg.id)
        stats.in_flight -= 1

    async def _retry_or_dead_letter(
        self, consumer: Consumer, msg: Message, reason: str, *, permanent: bool
    ) -> None:
        stats = consumer.stats
        if not permanent and msg.attempt < consumer.max_attempts:
            await self.runtime.clock.sleep(
                consumer.retry.backoff_for(msg.attempt, self.runtime.rng) / 1000.0
            )
            try:
                await self.runtime.broker.publish(
                    consumer.topic,
                    msg.body,
                    msg.headers,
                    message_id=msg.id,
                    attempt=msg.attempt + 1,
                )
                stats.retried += 1
                return
            except Exception as exc:
                reason = f"{reason}; could not retry: {exc}"
        headers = {
            **msg.headers,
            "x-zerver-dead-reason": reason[:500],
            "x-zerver-original-topic": consumer.topic,
        }
        try:
            await self.runtime.broker.publish(
                consumer.dead_letter_topic,
                msg.body,
                headers,
                message_id=msg.id,
                attempt=msg.attempt,
            )
        except Exception:
            _log.exception("dead-lettering failed", topic=consumer.topic, message_id=msg.id)
            stats.lost += 1
            return
        stats.dead_lettered += 1
