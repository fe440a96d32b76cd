"""The record schema is declared once; packing for the exporter process is derived
from it and loses nothing: records built from the schema survive pack → marshal →
unpack field for field."""

from __future__ import annotations

import hashlib
import marshal
import random
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerver import CacheGet, DbGet, DbPut, DbQuery, Effect, HttpGet, HttpPost, Publish, VirtualClock
from zerver.export._spans import AttrValue
from zerver.trace import RequestRecord
from zerver.trace._offload import PACK_SCHEMA, codec_source, pack_record, unpack_record
from zerver.trace._records import RECORD_CLASSES, JobState, Record


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup(Effect):
    """A custom effect with attributes of every kind."""

    system: ClassVar[str] = "directory"
    operation: ClassVar[str] = "lookup"
    who: str

    def span_attributes(self, result: Mapping[str, Any] | None) -> dict[str, AttrValue]:
        return {"directory.who": self.who, "directory.n": 2, "directory.ok": True,
                "directory.tags": ["a", "b"], "directory.ratio": 0.5}  # fmt: skip


EFFECTS: list[Effect] = [
    DbGet(table="post", key="1"),
    DbPut(table="post", key="1", value={"secret": "never packed"}),
    DbQuery(table="post", where={"a": 1}, required=False),
    CacheGet(namespace="author", key="ada", timeout_ms=5),
    HttpGet(url="https://user:pw@api.example/x?sig=abc"),
    HttpPost(url="http://api.example:8080/y", body=b"payload"),
    Publish(topic="orders", message={"id": 7}),
    Lookup(who="ada"),
]

# -- strategies derived from the declared types -------------------------------------------

_text = st.text(max_size=6)
_int = st.integers(min_value=-(2**63), max_value=2**64)
_attr = st.one_of(_int, _text, st.booleans(), st.lists(_text, max_size=3))


def _strategy(t: Any) -> st.SearchStrategy[Any]:
    if t is Effect:
        return st.sampled_from(EFFECTS)
    if isinstance(t, type) and hasattr(t, "SCHEMA"):
        return _record(t)
    if t is int:
        return _int
    if t is str:
        return _text
    if t is bool:
        return st.booleans()
    if t is float:
        return st.floats(allow_nan=False)
    if t is Any:
        return _attr
    origin, args = typing.get_origin(t), typing.get_args(t)
    if isinstance(t, types.UnionType):
        return st.one_of(*(_strategy(a) for a in args))
    if t is type(None):
        return st.none()
    if origin is list:
        return st.lists(_strategy(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(_strategy(args[0]), _strategy(args[1]), max_size=3)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(_strategy(args[0]), max_size=3).map(tuple)
    if origin is tuple:
        return st.tuples(*(_strategy(a) for a in args))
    raise AssertionError(f"no strategy for the schema type {t!r}: add one")


def _record(cls: type[Record]) -> st.SearchStrategy[Any]:
    fields = {name: _strategy(t) for name, t in cls.SCHEMA}

    def build(values: dict[str, Any]) -> Any:
        obj = RequestRecord(VirtualClock()) if cls is RequestRecord else object.__new__(cls)
        for name, value in values.items():
            setattr(obj, name, value)
        return obj

    return st.fixed_dictionaries(fields).map(build)


# -- an equality that does not use the packer -----------------------------------------------


def _assert_same(original: Any, unpacked: Any, where: str) -> None:
    assert type(unpacked) is type(original), where
    for name, _ in type(original).SCHEMA:
        a, b = getattr(original, name), getattr(unpacked, name)
        at = f"{where}.{name}"
        if name == "effect" and a is not None:
            # The exporter process gets what the span needs of the effect, never the effect.
            assert isinstance(original, JobState)
            assert (b.system, b.operation, b.required, b.timeout_ms) == (
                a.system, a.operation, a.required, a.timeout_ms), at  # fmt: skip
            assert (b.effect_kind, b.span_kind) == (a.effect_kind, a.span_kind), at
            assert b.span_attributes(None) == a.span_attributes(original.result_meta), at
        elif hasattr(a, "SCHEMA"):
            _assert_same(a, b, at)
        elif isinstance(a, list) and a and hasattr(a[0], "SCHEMA"):
            assert len(a) == len(b), at
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                _assert_same(x, y, f"{at}[{i}]")
        else:
            assert b == a, at
            assert type(b) is type(a), at


@settings(max_examples=60, deadline=None)
@given(_record(RequestRecord))
def test_pack_marshal_unpack_keeps_every_field(record: RequestRecord) -> None:
    packed = marshal.loads(marshal.dumps(pack_record(record)))
    again = unpack_record(packed, random.Random(0))
    _assert_same(record, again, "record")
    # What stays in the process is set afresh, so the engine can read it.
    assert again.current_step is None and again.current_job is None
    assert again.otel_context is False and again.clock.now_ns() == 0


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: c.__name__)
def test_the_schema_names_every_slot_once(cls: type[Record]) -> None:
    names = [name for name, _ in cls.SCHEMA]
    assert len(names) == len(set(names))
    assert not set(names) & set(cls.LOCAL)
    assert set(names) | set(cls.LOCAL) == set(vars(cls)["__slots__"])


def test_no_effect_value_or_raw_url_leaves_the_process() -> None:
    record = RequestRecord(VirtualClock())
    for i, effect in enumerate(EFFECTS):
        record.jobs.append(
            JobState(
                index=i,
                kind="effect",
                name=effect.span_name,
                queue="q",
                step_index=0,
                effect=effect,
            )
        )
    blob = marshal.dumps(pack_record(record))
    assert b"never packed" not in blob and b"payload" not in blob
    assert b"pw" not in blob and b"abc" not in blob


def test_the_layout_and_its_version_change_together() -> None:
    """Changing a schema changes the packed layout: bump PACK_SCHEMA (spooled records
    of the old layout are then reported, not misread) and update this fingerprint."""
    fingerprint = hashlib.sha256(codec_source().encode()).hexdigest()[:16]
    assert (PACK_SCHEMA, fingerprint) == ("3", FINGERPRINT)


FINGERPRINT = "398753e6eadd027d"
