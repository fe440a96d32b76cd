"""Effects give their spans their own attributes through a protocol the built-in
effects use too; a custom effect's attributes reach the exported span, through the
exporter process to an OTLP receiver as in process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from support import NothingToOpen, receiver_env

from zerver import (
    App,
    CacheGet,
    Context,
    DbGet,
    DbQuery,
    Done,
    Effect,
    HttpGet,
    JobContext,
    Need,
    Publish,
    Response,
    Slot,
    load_settings,
    step,
)
from zerver.export import OtlpReceiver, attributes_of
from zerver.export._spans import AttrValue, SpanData, SpanKind
from zerver.testing import AppClient, InMemorySpanSink
from zerver.trace._offload import ProcessTraceSubscriber
from zerver.trace._semconv import SemConv
from zerver.trace._tracing import TraceEngine

pytestmark = pytest.mark.anyio

QUOTE: Slot[Any] = Slot("quote")
SENT: Slot[Any] = Slot("sent")


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote(Effect):
    """Ask the pricing service for a price: a custom effect with its own attributes."""

    system: ClassVar[str] = "pricing"
    operation: ClassVar[str] = "quote"
    sku: str
    quantity: int = 1

    @property
    def target(self) -> str:
        return self.name or "catalogue"

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        attrs: dict[str, AttrValue] = {
            "pricing.sku": self.sku,
            "pricing.quantity": self.quantity,
            # A stable HTTP client key: the older name follows ZER_VER_SEMCONV.
            "server.address": "pricing.internal",
            # Not the effect's to set: the engine's value stays.
            "effect.required": False,
        }
        if result and "pricing.cents" in result:
            attrs["pricing.cents"] = int(result["pricing.cents"])
            attrs["pricing.currencies"] = ["EUR", "USD"]
        return attrs


@dataclass(frozen=True, slots=True, kw_only=True)
class Notify(Effect):
    """A message sent elsewhere: a PRODUCER span, kind ``queue`` by its system."""

    system: ClassVar[str] = "queue"
    operation: ClassVar[str] = "notify"
    span_kind: ClassVar[Literal["client", "producer"]] = "producer"
    who: str

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        return {"notify.who": self.who}


@dataclass(frozen=True, slots=True, kw_only=True)
class Broken(Effect):
    """An effect whose attribute method has a bug."""

    system: ClassVar[str] = "pricing"
    operation: ClassVar[str] = "broken"

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        raise LookupError("no such attribute")


class PricingInterpreter(NothingToOpen):
    """Answers quotes at once and reports the price it found."""

    span_attributes: ClassVar[dict[str, str]] = {"pricing.system": "in_memory"}

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        if isinstance(effect, Quote):
            job.note("pricing.cents", 1250 * effect.quantity)
            return 1250 * effect.quantity
        return None


class Outbox(NothingToOpen):
    """Takes ``Notify`` effects."""

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        return "sent"


def _app(tmp_path: Path, semconv: str = "dup") -> App:
    settings = load_settings({}, db_path=str(tmp_path / "a.sqlite3"), semconv=semconv)
    app = App("pricing", settings=settings)
    app.interpreter("pricing", PricingInterpreter())
    app.interpreter("queue", Outbox())

    @step(reads=[QUOTE])
    def answer(ctx: Context) -> Done:
        return Done(Response.json({"cents": ctx.optional(QUOTE)}))

    @step(writes=[QUOTE, SENT])
    def price(ctx: Context) -> Need:
        return Need(
            [
                Quote(sku=ctx.params["sku"], quantity=3, slot=QUOTE),
                Notify(who="sales", slot=SENT, required=False),
                Broken(required=False),
            ],
            then=answer,
        )

    app.get("/price/{sku}", price)
    return app


async def test_custom_effect_attributes_reach_the_receiver_through_the_exporter_process(
    tmp_path: Path,
) -> None:
    with OtlpReceiver() as receiver:
        app = _app(tmp_path)
        sub = app.trace_in_process(receiver_env(receiver, OTEL_BSP_SCHEDULE_DELAY="20"))
        assert isinstance(sub, ProcessTraceSubscriber)
        async with AppClient(app) as c:
            r = await c.get("/price/tea-42")
            assert r.status == 200 and b"3750" in r.body
        assert sub.stats()["exporter"]["built"] == 1
        spans = {s["name"]: s for s in receiver.spans()}

    quote = spans["pricing.quote catalogue"]
    assert quote["kind"] == SpanKind.CLIENT
    attrs = attributes_of(quote)
    assert attrs["pricing.sku"] == "tea-42"
    assert attrs["pricing.quantity"] == 3
    assert attrs["pricing.cents"] == 3750
    assert attrs["pricing.currencies"] == ["EUR", "USD"]
    assert attrs["pricing.system"] == "in_memory"  # the interpreter's static attributes
    assert attrs["effect.kind"] == "other"
    assert attrs["effect.required"] is True  # the engine's, not the effect's
    assert attrs["server.address"] == attrs["net.peer.name"] == "pricing.internal"
    assert attrs["job.attempt"] == 1

    notify = spans["queue.notify"]
    assert notify["kind"] == SpanKind.PRODUCER
    assert attributes_of(notify)["notify.who"] == "sales"
    assert attributes_of(notify)["effect.kind"] == "queue"

    broken = attributes_of(spans["pricing.broken"])
    assert broken["zerver.effect.attributes_error"] == "LookupError"


async def _in_process(app: App) -> list[SpanData]:
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with AppClient(app) as c:
        assert (await c.get("/price/tea-42")).status == 200
    return sink.spans


@pytest.mark.parametrize(
    ("mode", "present", "absent"),
    [("new", "server.address", "net.peer.name"), ("old", "net.peer.name", "server.address")],
)
async def test_stable_client_keys_follow_the_semconv_mode(
    tmp_path: Path, mode: str, present: str, absent: str
) -> None:
    spans = await _in_process(_app(tmp_path, mode))
    quote = next(s for s in spans if s.name == "pricing.quote catalogue")
    assert quote.attributes[present] == "pricing.internal"
    assert absent not in quote.attributes
    assert quote.attributes["pricing.cents"] == 3750  # its own keys stay as they are


def test_the_built_in_effects_use_the_protocol() -> None:
    db = DbGet(table="post", key="k\x00" + "x" * 200)
    attrs = db.span_attributes({"db.rows": 1})
    assert list(attrs) == [
        "db.system",
        "db.operation",
        "db.namespace",
        "db.key",
        "db.response.returned_rows",
    ]
    assert attrs["db.key"] == "k?" + "x" * 126 + "…"
    assert "db.key" not in DbQuery(table="post").span_attributes(None)
    assert CacheGet(namespace="n", key="k").span_attributes({"cache.hit": 1})["cache.hit"] is True
    assert "cache.hit" not in CacheGet(namespace="n", key="k").span_attributes({})
    http = HttpGet(url="https://u:p@api.example:8443/x?token=s").span_attributes(
        {"http.response.status_code": 200, "http.response.header.x": ["1"], "other": 2}
    )
    assert http == {
        "http.request.method": "GET",
        "url.full": "https://REDACTED:REDACTED@api.example:8443/x?token=REDACTED",
        "server.address": "api.example",
        "server.port": 8443,
        "http.response.status_code": 200,
        "http.response.header.x": ["1"],
    }
    publish = Publish(topic="orders", message=b"")
    assert publish.span_kind == "producer"
    assert publish.span_attributes({"messaging.message.id": "7", "x": 1}) == {
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "orders",
        "messaging.message.id": "7",
    }
    assert (DbGet.effect_kind, HttpGet.effect_kind, Publish.effect_kind) == ("db", "http", "queue")
    assert Quote.effect_kind == "other" and Quote.span_kind == "client"


def test_the_engine_names_no_system() -> None:
    import inspect

    import zerver.trace._tracing as tracing

    source = inspect.getsource(tracing.TraceEngine._effect_span)
    for word in ('"db"', '"cache"', '"http"', '"queue"', "table", "topic", "url"):
        assert word not in source
    assert not hasattr(tracing, "_EFFECT_KINDS")
    assert isinstance(TraceEngine(InMemorySpanSink()).semconv, SemConv)
