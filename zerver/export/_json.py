"""OTLP/HTTP JSON encoder for :class:`~zerver.export._spans.SpanData` batches.

Written by hand because encoding is the pipeline's hot spot and no library
produces OTLP/JSON directly: the official route (build protobuf messages, then
``json_format``) costs tens of µs per span (the official protobuf encoder alone
~34 µs), while this fragment writer measures ~3.9 µs per span against ~5.5 µs
for a hand-built dict + ``orjson.dumps`` (``loadtest/bench_export.py``, same
spans, same run). The dict route would also need the same special cases
(orjson writes non-finite doubles as ``null``; int64 must become strings).

What makes it fast:

- the whole request is one list of ``str`` fragments joined once;
- the shared resource and scope are encoded once per identity and cached;
- whole key/value fragments are cached for string and integer values (route
  names, methods, status codes, ports repeat across spans), looked up by key
  then value; for doubles the ``{"key":...,"value":{"doubleValue":`` prefix is;
- one loop per scope does the spans with everything in locals (see ``_spans``);
- ids go through ``int.to_bytes(...).hex()``, several times faster than
  ``format``, once per run of spans sharing a trace or parent id.

The output follows the OTLP/JSON mapping of protobuf: hex ids, integer enums,
lowerCamelCase keys, 64-bit integers as decimal strings, non-finite doubles as
``"NaN"``/``"Infinity"``/``"-Infinity"``. Attribute values that OTLP cannot
carry are mapped, never raised: ``None`` is skipped, integers outside int64
become strings, other objects become ``str(value)``. A span that cannot be
encoded at all (an id out of range) is skipped and counted in
:attr:`JsonEncoder.invalid_spans`.
"""

# JSON templates read far better with %-formatting than with f-strings full of
# doubled braces, and are as fast; hence the file-wide exemption.
# ruff: noqa: UP031
from __future__ import annotations

import base64
import json.encoder
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Generic, TypeVar, cast

from ._spans import AttrValue, InstrumentationScope, Resource, SpanData

__all__ = ["IdentityCache", "JsonEncoder", "group_by_resource_scope", "remember"]

# The C implementation: escapes '"', '\\' and control characters, keeps non-ASCII.
_esc = json.encoder.encode_basestring
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_isfinite = math.isfinite
_NONE: Mapping[object, str] = MappingProxyType({})  # "no fragments for this key yet"
_V = TypeVar("_V", str, int, tuple[str, ...])

#: Spans encoded between two calls of an encoder's ``pause`` (~0.1 ms of work).
PAUSE_EVERY = 32

# The span head in the common case: a child span with flags and no trace state.
_SPAN_HEAD = (
    '{"traceId":"%s","spanId":"%s","parentSpanId":"%s","flags":%d,"name":%s,"kind":%d,'
    '"startTimeUnixNano":"%d","endTimeUnixNano":"%d"'
)

_Group = tuple[Resource, list[tuple[InstrumentationScope, list[SpanData]]]]
_K = TypeVar("_K")
_F = TypeVar("_F")
_H = TypeVar("_H", bound=Hashable)


class IdentityCache(Generic[_K, _F]):
    """What was made from each object (its encoded fragment, its converted copy),
    keyed by the object's identity and bounded (cleared when full).

    Keyed by ``id``: resources and scopes are shared by many spans, and hashing
    their attribute maps per span would cost more than encoding them.
    """

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: dict[int, tuple[_K, _F]] = {}
        self._max = max_entries

    def get(self, obj: _K) -> _F | None:
        hit = self._entries.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None

    def put(self, obj: _K, value: _F) -> _F:
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[id(obj)] = (obj, value)  # holding ``obj`` keeps its id from being reused
        return value


def remember(table: dict[_H, _F], key: _H, value: _F, limit: int) -> _F:
    """Store ``value`` in a cache of at most ``limit`` entries (emptied when full); return it."""
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value


def group_by_resource_scope(spans: Sequence[SpanData]) -> list[_Group]:
    """Group spans as ``resource → scope → spans``, keeping first-seen order.

    Groups by identity: Resource and InstrumentationScope objects are shared by
    the spans that belong together, and hashing their attribute dicts per span
    would cost more than the whole encoding of an id.
    """
    if not spans:
        return []
    first = spans[0]
    r0 = first.resource
    s0 = first.scope
    for s in spans:
        if s.resource is not r0 or s.scope is not s0:
            break
    else:
        return [(r0, [(s0, list(spans))])]
    by_res: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope, list[SpanData]]]]] = {}
    for s in spans:
        entry = by_res.get(id(s.resource))
        if entry is None:
            entry = by_res[id(s.resource)] = (s.resource, {})
        scopes = entry[1]
        se = scopes.get(id(s.scope))
        if se is None:
            scopes[id(s.scope)] = (s.scope, [s])
        else:
            se[1].append(s)
    return [(res, list(scopes.values())) for res, scopes in by_res.values()]


def _double(v: float) -> str:
    if math.isfinite(v):
        return repr(v)
    if math.isnan(v):
        return '"NaN"'
    return '"Infinity"' if v > 0 else '"-Infinity"'


def _any_value(v: object) -> str | None:
    """The JSON ``AnyValue`` for any attribute value; ``None`` when it has no encoding."""
    if isinstance(v, bool):
        return '{"boolValue":true}' if v else '{"boolValue":false}'
    if isinstance(v, str):
        return '{"stringValue":%s}' % _esc(v)
    if isinstance(v, int):
        if _INT64_MIN <= v <= _INT64_MAX:
            return '{"intValue":"%d"}' % v
        return '{"stringValue":"%d"}' % v
    if isinstance(v, float):
        return '{"doubleValue":%s}' % _double(v)
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        return '{"bytesValue":"%s"}' % base64.b64encode(v).decode()
    if isinstance(v, Sequence):
        items = [_any_value(x) for x in v]
        if not items:
            return '{"arrayValue":{}}'
        return '{"arrayValue":{"values":[%s]}}' % ",".join(
            x if x is not None else "{}" for x in items
        )
    if isinstance(v, Mapping):
        kvs = []
        for k, x in v.items():
            val = _any_value(x)
            if val is not None:
                kvs.append('{"key":%s,"value":%s}' % (_esc(str(k)), val))
        if not kvs:
            return '{"kvlistValue":{}}'
        return '{"kvlistValue":{"values":[%s]}}' % ",".join(kvs)
    return '{"stringValue":%s}' % _esc(str(v))


class JsonEncoder:
    """Encodes batches as an OTLP ``ExportTraceServiceRequest`` in JSON (UTF-8 bytes).

    Not thread-safe by design: each pipeline worker owns one. Caches are
    bounded (cleared when full) so unbounded attribute cardinality cannot grow
    memory.
    """

    content_type = "application/json"

    __slots__ = (
        "_cache_size",
        "_kdouble",
        "_kv",
        "_kv_size",
        "_kvbool",
        "_kvint",
        "_kvseq",
        "_names",
        "_res",
        "_scope",
        "invalid_spans",
    )

    def __init__(self, *, cache_size: int = 8192) -> None:
        self._cache_size = cache_size
        self._kv: dict[str, dict[str, str]] = {}
        self._kvint: dict[str, dict[int, str]] = {}
        self._kv_size = 0
        self._kvbool: dict[tuple[str, bool], str] = {}
        self._kvseq: dict[str, dict[tuple[str, ...], str]] = {}
        self._kdouble: dict[str, str] = {}
        self._names: dict[str, str] = {}
        self._res: IdentityCache[Resource, str] = IdentityCache()
        self._scope: IdentityCache[InstrumentationScope, str] = IdentityCache()
        self.invalid_spans = 0
        """Spans skipped because they could not be encoded (cumulative)."""

    # -- caches ---------------------------------------------------------------
    # Attribute fragments start with the comma that separates them from the
    # previous one (``_attrs`` strips it from the first): a repeated string, int
    # or bool attribute then costs one look-up and one append.

    def _str_kv(self, key: str, value: str) -> str:
        frag = ',{"key":%s,"value":{"stringValue":%s}}' % (_esc(key), _esc(value))
        return self._store_by_key(self._kv, key, value, frag)

    def _int_kv(self, key: str, value: int) -> str:
        # A table of its own: ``1`` and ``True`` are equal dict keys.
        kind = "intValue" if _INT64_MIN <= value <= _INT64_MAX else "stringValue"
        frag = ',{"key":%s,"value":{"%s":"%d"}}' % (_esc(key), kind, value)
        return self._store_by_key(self._kvint, key, value, frag)

    def _store_by_key(self, table: dict[str, dict[_V, str]], key: str, value: _V, frag: str) -> str:
        # Two levels (key, then value) rather than a (key, value) tuple: no tuple
        # to build and hash per attribute. Bounded by the number of fragments.
        self._kv_size += 1
        if self._kv_size > self._cache_size:
            self._kv.clear()
            self._kvint.clear()
            self._kvseq.clear()
            self._kv_size = 1
        by_value = table.get(key)
        if by_value is None:
            by_value = table[key] = {}
        by_value[value] = frag
        return frag

    def _bool_kv(self, key: str, value: bool) -> str:
        frag = ',{"key":%s,"value":{"boolValue":%s}}' % (_esc(key), "true" if value else "false")
        return remember(self._kvbool, (key, value), frag, self._cache_size)

    def _double_prefix(self, key: str) -> str:
        frag = ',{"key":%s,"value":{"doubleValue":' % _esc(key)
        return remember(self._kdouble, key, frag, self._cache_size)

    def _name(self, name: str) -> str:
        return remember(self._names, name, _esc(name), self._cache_size)

    # -- attributes -----------------------------------------------------------

    def _tuple_kv(self, key: str, value: tuple[object, ...]) -> str | None:
        """The fragment for a tuple value; cached when every item is a string (the
        engine's slot names): no other item type could share a cache entry, since
        ``(1,) == (True,) == (1.0,)`` but no string equals a non-string."""
        by_value = self._kvseq.get(key)
        if by_value is not None:
            try:
                hit = by_value.get(value)  # type: ignore[arg-type]
            except TypeError:  # an unhashable item: encoded below, not cached
                hit = None
            if hit is not None:
                return hit
        frag = self._other_kv(key, value)
        if frag is not None and all(type(x) is str for x in value):
            self._store_by_key(self._kvseq, key, cast("tuple[str, ...]", value), frag)
        return frag

    def _other_kv(self, key: str, value: object) -> str | None:
        """The fragment for a value that is not a str, int or finite float; None = skip."""
        if type(value) is bool:
            return self._kvbool.get((key, value)) or self._bool_kv(key, value)
        val = _any_value(value)
        return None if val is None else ',{"key":%s,"value":%s}' % (_esc(key), val)

    def _attrs(self, attrs: Mapping[str, AttrValue], out: list[str]) -> None:
        """Append ``,"attributes":[...]`` when any value has an encoding."""
        if not attrs:
            return
        app = out.append
        app(',"attributes":[')
        n = len(out)
        for k, v in attrs.items():
            t = type(v)
            if t is str:
                app((self._kv.get(k) or _NONE).get(v) or self._str_kv(k, v))  # type: ignore[arg-type]
            elif t is int:
                app((self._kvint.get(k) or _NONE).get(v) or self._int_kv(k, v))  # type: ignore[arg-type]
            elif t is float and _isfinite(v):  # type: ignore[arg-type]
                app("%s%r}}" % (self._kdouble.get(k) or self._double_prefix(k), v))
            elif t is bool:
                app(self._kvbool.get((k, v)) or self._bool_kv(k, v))  # type: ignore[arg-type]
            elif t is tuple:
                frag = self._tuple_kv(k, v)  # type: ignore[arg-type]
                if frag is not None:
                    app(frag)
            else:
                frag = self._other_kv(k, v)
                if frag is not None:
                    app(frag)
        if len(out) == n:
            del out[-1]  # every value was skipped: drop the opening
        else:
            out[n] = out[n][1:]
            app("]")

    # -- resource / scope -----------------------------------------------------

    def _resource_head(self, res: Resource) -> str:
        hit = self._res.get(res)
        if hit is not None:
            return hit
        out = ['{"resource":{']
        self._attrs(res.attributes, out)
        if len(out) > 1:
            out[1] = out[1][1:]  # no comma before the first member
        if res.dropped_attributes_count:
            out.append(
                '%s"droppedAttributesCount":%d'
                % ("," if len(out) > 1 else "", res.dropped_attributes_count)
            )
        out.append("}")
        if res.schema_url:
            out.append(',"schemaUrl":%s' % _esc(res.schema_url))
        out.append(',"scopeSpans":[')
        return self._res.put(res, "".join(out))

    def _scope_head(self, scope: InstrumentationScope) -> str:
        hit = self._scope.get(scope)
        if hit is not None:
            return hit
        out = ['{"scope":{"name":%s' % _esc(scope.name)]
        if scope.version:
            out.append(',"version":%s' % _esc(scope.version))
        self._attrs(scope.attributes, out)
        out.append("}")
        if scope.schema_url:
            out.append(',"schemaUrl":%s' % _esc(scope.schema_url))
        out.append(',"spans":[')
        return self._scope.put(scope, "".join(out))

    # -- spans ----------------------------------------------------------------

    def _span_tail(self, s: SpanData, out: list[str]) -> None:
        """What most spans lack: dropped counts, links, a status; then the close."""
        app = out.append
        if s.dropped_events_count:
            app(',"droppedEventsCount":%d' % s.dropped_events_count)
        if s.links:
            sep = ',"links":['
            for link in s.links:
                app(
                    '%s{"traceId":"%s","spanId":"%s"'
                    % (
                        sep,
                        link.trace_id.to_bytes(16, "big").hex(),
                        link.span_id.to_bytes(8, "big").hex(),
                    )
                )
                sep = ","
                if link.trace_state:
                    app(',"traceState":%s' % _esc(link.trace_state))
                self._attrs(link.attributes, out)
                if link.dropped_attributes_count:
                    app(',"droppedAttributesCount":%d' % link.dropped_attributes_count)
                if link.flags:
                    app(',"flags":%d' % link.flags)
                app("}")
            app("]")
        if s.dropped_links_count:
            app(',"droppedLinksCount":%d' % s.dropped_links_count)
        # ``status`` is always present, as in the official encoder.
        status = []
        if s.status_message:
            status.append('"message":%s' % _esc(s.status_message))
        if s.status_code:
            status.append('"code":%d' % s.status_code)
        app(',"status":{%s}},' % ",".join(status))

    def _spans(
        self, members: Sequence[SpanData], out: list[str], pause: Callable[[], object] | None
    ) -> None:
        """Append each encodable span of one scope, each followed by a comma.

        The hot loop of the encoder, written for speed: one function with what it
        calls in locals, and the trace and parent ids converted to hex once per
        run of spans that share them (batches are grouped by trace).
        """
        app = out.append
        names = self._names
        name_frag = self._name
        attrs = self._attrs
        tail = self._span_tail
        last_trace, trace_hex = -1, ""
        last_parent, parent_hex = -1, ""
        countdown = PAUSE_EVERY
        for s in members:
            if pause is not None:
                countdown -= 1
                if not countdown:
                    countdown = PAUSE_EVERY
                    pause()
            mark = len(out)
            try:
                trace_id = s.trace_id
                if trace_id != last_trace:
                    trace_hex = trace_id.to_bytes(16, "big").hex()
                    last_trace = trace_id
                parent = s.parent_span_id
                if parent and parent != last_parent:
                    parent_hex = parent.to_bytes(8, "big").hex()
                    last_parent = parent
                name = s.name
                flags = s.flags
                if parent and flags and not s.trace_state:
                    app(
                        _SPAN_HEAD
                        % (
                            trace_hex,
                            s.span_id.to_bytes(8, "big").hex(),
                            parent_hex,
                            flags,
                            names.get(name) or name_frag(name),
                            s.kind,
                            s.start_ns,
                            s.end_ns,
                        )
                    )
                else:
                    app(
                        '{"traceId":"%s","spanId":"%s"'
                        % (trace_hex, s.span_id.to_bytes(8, "big").hex())
                    )
                    if s.trace_state:
                        app(',"traceState":%s' % _esc(s.trace_state))
                    if parent:
                        app(',"parentSpanId":"%s"' % parent_hex)
                    if flags:
                        app(',"flags":%d' % flags)
                    app(
                        ',"name":%s,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d"'
                        % (names.get(name) or name_frag(name), s.kind, s.start_ns, s.end_ns)
                    )
                attrs(s.attributes, out)
                if s.dropped_attributes_count:
                    app(',"droppedAttributesCount":%d' % s.dropped_attributes_count)
                events = s.events
                if events:
                    sep = ',"events":['
                    for ename, etime, eattrs, edropped in events:
                        app(
                            '%s{"timeUnixNano":"%d","name":%s'
                            % (sep, etime, names.get(ename) or name_frag(ename))
                        )
                        sep = ","
                        attrs(eattrs, out)
                        app(',"droppedAttributesCount":%d}' % edropped if edropped else "}")
                    app("]")
                if (
                    s.status_code
                    or s.status_message
                    or s.links
                    or s.dropped_events_count
                    or s.dropped_links_count
                ):
                    tail(s, out)
                else:
                    app(',"status":{}},')
            except (OverflowError, TypeError, ValueError, AttributeError):
                del out[mark:]
                self.invalid_spans += 1

    def encode(self, spans: Sequence[SpanData], pause: Callable[[], object] | None = None) -> bytes:
        """The request body for ``spans`` (grouped by resource and scope, order kept).

        ``pause``, if given, is called between every few dozen spans: the
        OTLP/HTTP exporter uses it to let its sending thread take the GIL as
        soon as the backend's answer arrives (see ``OtlpHttpExporter``).
        """
        out: list[str] = ['{"resourceSpans":[']
        for res, scopes in group_by_resource_scope(spans):
            out.append(self._resource_head(res))
            for scope, members in scopes:
                out.append(self._scope_head(scope))
                self._spans(members, out, pause)
                if out[-1].endswith(","):
                    out[-1] = out[-1][:-1] + "]},"
                else:
                    out.append("]},")  # every span of the scope was invalid
            out[-1] = out[-1][:-1] + "]},"
        if out[-1].endswith(","):
            out[-1] = out[-1][:-1] + "]}"
        else:
            out.append("]}")
        text = "".join(out)
        try:
            return text.encode()
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8; replace them rather than lose the batch.
            return text.encode("utf-8", "replace")
