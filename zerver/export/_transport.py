"""OTLP/HTTP transport: one POST per attempt, status classified, nothing raised.

Built on stdlib ``http.client`` over one keep-alive connection, run on the
pipeline's worker thread. Chosen over httpx for two reasons: it costs less
per request (``loadtest/bench_export.py`` measures both), and no OpenTelemetry
instrumentation patches it, so the exporter's own requests can never be traced
and loop back into the pipeline. The OTel "suppress instrumentation" context
key is set around each request as well, for instrumentations that honour it.

Classification follows the OTLP/HTTP spec: 429, 502, 503 and 504 and
connection errors are retryable (with the server's ``Retry-After`` passed up);
every other non-2xx status is permanent. A 2xx answer may carry
``partialSuccess`` (JSON or protobuf); its ``rejectedSpans`` is reported and its
message logged, rate-limited.

Encoding ahead: :meth:`OtlpHttpExporter.encode_ahead` builds (and compresses)
a batch's body on the pipeline's encoder thread and returns an
:class:`EncodedBatch`, the same spans carrying their body. When that batch
reaches :meth:`~OtlpHttpExporter.export` (through retry, breaker and rate
limit, which pass it on unchanged) only the POST is left, so the pipeline can
encode batch N+1 while batch N is on the wire.

Handing the GIL over (:mod:`zerver.export._handover`): the sender waits for
the backend's answer with ``poll`` before reading it, and the encoder, which
checks every few dozen spans, steps aside while the sender has work, so the
backend's work and the next batch's encoding overlap instead of queueing
behind each other for the GIL.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import math
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence

import orjson
from opentelemetry import context as otel_context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from ._base import (
    ExportContext,
    ExportResult,
    ExportStatus,
    SpanEncoder,
)
from ._config import DEFAULT_ENDPOINT, ExportConfig
from ._handover import Handover
from ._json import JsonEncoder
from ._log import RateLimitedLog
from ._protobuf import ProtobufEncoder
from ._protowire import ProtobufWireEncoder
from ._spans import SpanData

__all__ = [
    "RETRYABLE_STATUSES",
    "EncodedBatch",
    "OtlpHttpExporter",
    "parse_partial_success",
    "parse_retry_after",
]

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_HAVE_POLL = hasattr(select, "poll")  # not on Windows
_MAX_RESPONSE = 1 << 20
_USER_AGENT = "zerver-otlp-exporter/0.1"


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    ``None`` when absent or unparseable; a date in the past gives ``0.0``.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT by definition
        return None
    delay = when.timestamp() - now()
    return max(0.0, delay) if math.isfinite(delay) else None


def parse_partial_success(body: bytes, content_type: str) -> tuple[int, str]:
    """``(rejectedSpans, errorMessage)`` from an export response; ``(0, "")`` if none.

    Bodies that do not parse are treated as a full success: the status code
    already said the batch was accepted.
    """
    if not body:
        return 0, ""
    try:
        if "protobuf" in content_type:
            ps = ExportTraceServiceResponse.FromString(body).partial_success
            return int(ps.rejected_spans), ps.error_message
        doc = orjson.loads(body)
        if not isinstance(doc, dict):
            return 0, ""
        ps_doc = doc.get("partialSuccess") or doc.get("partial_success")
        if not isinstance(ps_doc, dict):
            return 0, ""
        rejected = ps_doc.get("rejectedSpans", ps_doc.get("rejected_spans", 0))
        message = ps_doc.get("errorMessage", ps_doc.get("error_message", ""))
        return int(rejected or 0), str(message or "")
    except Exception:
        return 0, ""


class EncodedBatch(list[SpanData]):
    """A batch whose request body is already built: the spans, plus ``body``
    (compressed if configured), the spans the encoder skipped and the exporter
    that built it (only that exporter uses the body)."""

    __slots__ = ("body", "encoded_by", "invalid_spans")

    def __init__(
        self, spans: Iterable[SpanData], body: bytes, invalid_spans: int, encoded_by: object
    ) -> None:
        super().__init__(spans)
        self.body = body
        self.invalid_spans = invalid_spans
        self.encoded_by = encoded_by


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # http.client sends headers and a large body in two writes; without
        # TCP_NODELAY the body can wait for the peer's delayed ACK.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class OtlpHttpExporter:
    """POSTs batches to an OTLP/HTTP traces endpoint; one attempt per ``export``.

    Wrap it with :class:`ResilienceBuilder` for retries, a circuit breaker and
    rate limits. Thread-safe (a lock serialises the connection).

    ``ssl_context`` applies to ``https`` endpoints (CA bundle, client certificate;
    see :func:`zerver.export.tls_context`); ``None`` uses the system's CAs.
    A TLS failure (unknown CA, refused client certificate) is a connection
    error like any other: retried, then counted, never raised.

    Example::

        exporter = OtlpHttpExporter("http://localhost:4318/v1/traces", compression="gzip")
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        protocol: str = "http/json",
        encoder: SpanEncoder | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        timeout_s: float = 10.0,
        compression: str = "none",
        log: RateLimitedLog | None = None,
        wall_clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {endpoint!r} is not an http:// or https:// URL")
        if compression not in ("gzip", "none"):
            raise ValueError(f"compression {compression!r} is not 'gzip' or 'none'")
        if encoder is None:
            if protocol == "http/json":
                encoder = JsonEncoder()
            elif protocol == "http/protobuf":
                # The official opentelemetry-proto messages. ProtobufWireEncoder writes
                # the same bytes ~5x faster (property-tested against these messages)
                # and can be chosen with ``encoder=``.
                encoder = ProtobufEncoder()
            else:
                raise ValueError(f"protocol {protocol!r} is not 'http/json' or 'http/protobuf'")
        self.endpoint = endpoint
        self._https = parts.scheme == "https"
        # None: http.client's default (system CAs, hostname checked). Unused for http://.
        self._ssl_context = ssl_context
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._encoder = encoder
        self._timeout_s = timeout_s
        self._gzip = compression == "gzip"
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        self._headers = {k: v for k, v in pairs}
        self._headers["Content-Type"] = encoder.content_type
        self._headers.setdefault("User-Agent", _USER_AGENT)
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._log = log or RateLimitedLog()
        self._wall_clock = wall_clock
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._last_spans: Sequence[SpanData] | None = None
        self._last_body = b""
        self._last_invalid = 0
        # Exact types: a subclass may override ``encode`` without ``pause``.
        self._pausable = type(encoder) in (JsonEncoder, ProtobufWireEncoder)
        self.handover = Handover()
        """Shared with the pipeline's two threads (see ``zerver.export._handover``)."""

    @classmethod
    def from_config(cls, config: ExportConfig, **kwargs: object) -> OtlpHttpExporter:
        """An exporter for ``config``'s endpoint, protocol, headers, timeout, compression
        and TLS files."""
        return cls(
            config.endpoint,
            protocol=config.protocol,
            headers=config.headers,
            timeout_s=config.timeout_s,
            compression=config.compression,
            ssl_context=config.ssl_context(),
            **kwargs,  # type: ignore[arg-type]
        )

    def _encode(self, spans: Sequence[SpanData], *, ahead: bool = False) -> tuple[bytes, int]:
        # The encoder keeps caches and is not thread-safe; encode_ahead (encoder
        # thread) and export (sending thread) may both get here.
        with self._encode_lock:
            before = getattr(self._encoder, "invalid_spans", 0)
            if ahead and self._pausable:
                body = self._encoder.encode(spans, pause=self.handover.pause)  # type: ignore[call-arg]
            else:
                body = self._encoder.encode(spans)
            invalid = getattr(self._encoder, "invalid_spans", 0) - before
        if self._gzip:
            body = gzip.compress(body, compresslevel=1)
        return body, invalid

    def encode_ahead(self, spans: Sequence[SpanData]) -> EncodedBatch:
        """Build ``spans``' request body now; :meth:`export` of the result only sends it.

        Raises what the encoder raises (the pipeline counts it as an exporter error).
        """
        body, invalid = self._encode(spans, ahead=True)
        return EncodedBatch(spans, body, invalid, self)

    def _wait_for_answer(self, sock: socket.socket, timeout: float) -> None:
        """Block (GIL released) until the answer can be read, leaving it in the socket."""
        if not _HAVE_POLL or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return  # getresponse() waits instead; the encoder then never steps aside
        self.handover.awaiting(sock)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(max(1, math.ceil(timeout * 1000))):
            raise TimeoutError(f"no answer within {timeout:g} s")

    def _body(self, spans: Sequence[SpanData]) -> tuple[bytes, int]:
        if type(spans) is EncodedBatch and spans.encoded_by is self:
            return spans.body, spans.invalid_spans
        # A retried batch is the same list object: encode (and compress) it once.
        if spans is self._last_spans:
            return self._last_body, self._last_invalid
        body, invalid = self._encode(spans)
        self._last_spans, self._last_body, self._last_invalid = spans, body, invalid
        return body, invalid

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            if self._https:
                conn = _HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._ssl_context
                )
            else:
                conn = _HTTPConnection(self._host, self._port, timeout=timeout)
            self._conn = conn
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _post(
        self, body: bytes, timeout: float, headers: Mapping[str, str]
    ) -> tuple[int, str, str | None, bytes]:
        for attempt in (0, 1):
            conn = self._connection(timeout)
            reused = conn.sock is not None
            try:
                conn.request("POST", self._path, body, dict(headers))
                if conn.sock is not None:
                    self._wait_for_answer(conn.sock, timeout)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.handover.answered()
                self._close()
                # A keep-alive connection the server closed while idle: one
                # immediate reconnect is safe (export requests are idempotent).
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                self.handover.answered()
                raise
            try:
                data = resp.read(_MAX_RESPONSE)
            finally:
                self.handover.answered()
            if not resp.isclosed():
                self._close()  # oversized answer: do not reuse a half-read connection
            return (
                resp.status,
                resp.getheader("Content-Type", ""),
                resp.getheader("Retry-After"),
                data,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def export(self, spans: Sequence[SpanData], ctx: ExportContext) -> ExportResult:
        """One POST of ``spans``, bounded by ``ctx``'s deadline and the request timeout."""
        if ctx.remaining() <= 0:
            return ExportResult(ExportStatus.RETRYABLE, detail="deadline passed before sending")
        with self._lock:
            body, invalid = self._body(spans)
            result = self._send(body, invalid, len(spans), self._headers, ctx)
        if result.status is not ExportStatus.RETRYABLE:
            self._last_spans = None
        return result

    def spool_body(self, spans: Sequence[SpanData]) -> tuple[bytes, dict[str, str], int]:
        """The body :meth:`export` sends for ``spans``, with what :meth:`send_body` needs
        to send it again (content type and encoding), and the spans left out as invalid."""
        if type(spans) is EncodedBatch and spans.encoded_by is self:
            body, invalid = spans.body, spans.invalid_spans
        else:
            body, invalid = self._encode(spans)
        meta = {"content_type": self._headers["Content-Type"]}
        if self._gzip:
            meta["content_encoding"] = "gzip"
        return body, meta, invalid

    def send_body(
        self, body: bytes, meta: Mapping[str, str], spans: int, ctx: ExportContext
    ) -> ExportResult:
        """One POST of a body :meth:`spool_body` made (here or in an earlier process)."""
        if ctx.remaining() <= 0:
            return ExportResult(ExportStatus.RETRYABLE, detail="deadline passed before sending")
        headers = dict(self._headers)
        headers["Content-Type"] = meta.get("content_type", headers["Content-Type"])
        headers.pop("Content-Encoding", None)
        if meta.get("content_encoding"):
            headers["Content-Encoding"] = meta["content_encoding"]
        with self._lock:
            return self._send(body, 0, spans, headers, ctx)

    def _send(
        self,
        body: bytes,
        invalid: int,
        spans: int,
        headers: Mapping[str, str],
        ctx: ExportContext,
    ) -> ExportResult:
        """POST ``body`` (holding ``spans`` spans) and classify the answer; under ``_lock``."""
        token = otel_context.attach(
            otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True)
        )
        try:
            status, ctype, retry_after, data = self._post(
                body, min(self._timeout_s, ctx.remaining()), headers
            )
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            return ExportResult(
                ExportStatus.RETRYABLE,
                invalid_spans=invalid,
                detail=f"connection error: {exc!r}",
            )
        finally:
            otel_context.detach(token)
        if 200 <= status < 300:
            rejected, message = parse_partial_success(data, ctype)
            if rejected or message:
                self._log.warning(
                    "partial_success",
                    "otlp export partially rejected",
                    endpoint=self.endpoint,
                    rejected_spans=rejected,
                    error_message=message,
                )
            return ExportResult(
                ExportStatus.SUCCESS,
                rejected_spans=min(rejected, spans),
                invalid_spans=invalid,
                bytes_sent=len(body),
            )
        detail = f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}"
        if status in RETRYABLE_STATUSES:
            return ExportResult(
                ExportStatus.RETRYABLE,
                invalid_spans=invalid,
                bytes_sent=len(body),
                retry_after_s=parse_retry_after(retry_after, now=self._wall_clock),
                detail=detail,
            )
        self._log.warning(
            f"permanent_{status}",
            "otlp export refused; batch dropped",
            endpoint=self.endpoint,
            status=status,
            detail=detail,
        )
        return ExportResult(
            ExportStatus.PERMANENT, invalid_spans=invalid, bytes_sent=len(body), detail=detail
        )

    def shutdown(self) -> None:
        """Close the connection."""
        with self._lock:
            self._close()
            self._last_spans = None
            self._last_body = b""
