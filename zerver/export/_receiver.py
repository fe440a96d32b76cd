"""A small real OTLP/HTTP receiver, for tests and load tests.

Decodes JSON and protobuf (gzip too), counts spans, and answers what a
``responder`` says, so tests can script 503s with ``Retry-After``, 400s,
partial successes and slow answers. Runs a stdlib threaded HTTP server on
127.0.0.1 (an ephemeral port by default), over TLS when given an
``ssl.SSLContext``; :meth:`stop` closes open keep-alive connections too, so
every thread ends. It receives traces on ``/v1/traces`` by default; given
``path="/v1/metrics"`` it receives metrics (protobuf bodies decode as
``ExportMetricsServiceRequest``; no spans to count).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import orjson
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["OtlpReceiver", "ReceivedRequest", "Reply", "attributes_of"]


@dataclass(frozen=True, slots=True)
class Reply:
    """What the receiver answers to one request."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    """``None``: an empty ``ExportTraceServiceResponse`` in the request's encoding."""


@dataclass(slots=True)
class ReceivedRequest:
    """One request as the receiver saw it."""

    index: int
    path: str
    content_type: str
    content_encoding: str
    headers: dict[str, str]
    body: bytes
    """Decompressed body (empty unless the receiver keeps bodies)."""
    span_count: int = 0
    document: Any = None
    """The decoded request (a JSON dict or an ``ExportTraceServiceRequest``), set only
    while the ``responder`` runs, so a responder need not decode the body again."""
    error: str = ""
    status: int = 0
    received_at: float = 0.0
    metrics: bool = False
    """Received on a metrics path: a protobuf body is an ``ExportMetricsServiceRequest``."""

    def decode(self) -> Any:
        """The request decoded again from :attr:`body`: a JSON dict or an
        ``ExportTraceServiceRequest``; ``None`` if the body was not kept or is invalid.

        Decoded on demand so a receiver holding many requests keeps bytes, not
        millions of small objects for the garbage collector to walk.
        """
        if not self.body:
            return None
        try:
            if "protobuf" in self.content_type:
                if self.metrics:
                    return ExportMetricsServiceRequest.FromString(self.body)
                return ExportTraceServiceRequest.FromString(self.body)
            return orjson.loads(self.body)
        except Exception:
            return None

    def spans(self) -> list[dict[str, Any]]:
        """The request's spans in OTLP/JSON form (hex ids), whatever the encoding."""
        payload = self.decode()
        if isinstance(payload, ExportTraceServiceRequest):
            doc = json_format.MessageToDict(payload)
            out = list(_iter_spans(doc))
            for span in out:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
            return out
        if isinstance(payload, dict):
            return list(_iter_spans(payload))
        return []


def _iter_spans(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            yield from ss.get("spans", ())


def _count_spans(doc: dict[str, Any]) -> int:
    return sum(
        len(ss.get("spans", ()))
        for rs in doc.get("resourceSpans", ())
        for ss in rs.get("scopeSpans", ())
    )


def _decode_json(body: bytes) -> tuple[Any, int]:
    # The whole document is parsed (as a collector would); counting then needs
    # only the length of each ``spans`` list.
    doc = orjson.loads(body)
    return doc, _count_spans(doc)


def _value(v: dict[str, Any]) -> object:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "boolValue" in v:
        return v["boolValue"]
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", ())]
    return None


def attributes_of(item: dict[str, Any]) -> dict[str, object]:
    """An OTLP/JSON ``attributes`` list as a plain dict."""
    return {a["key"]: _value(a.get("value", {})) for a in item.get("attributes", ())}


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    ssl_context: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake runs on the connection's own thread (Handler.setup), so
            # a client that never completes it cannot stall the accept loop.
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, addr


class OtlpReceiver:
    """A threaded OTLP/HTTP receiver on 127.0.0.1.

    Example::

        with OtlpReceiver() as receiver:
            pipeline = ExportPipeline(OtlpHttpExporter(receiver.endpoint))
            ...
            assert receiver.wait_for_spans(100, timeout=5)
    """

    def __init__(
        self,
        *,
        port: int = 0,
        path: str = "/v1/traces",
        responder: Callable[[ReceivedRequest], Reply | None] | None = None,
        delay_s: float = 0.0,
        keep_bodies: bool = True,
        clock: Callable[[], float] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        decode_json: Callable[[bytes], tuple[Any, int]] | None = None,
    ) -> None:
        self.path = path
        self.decode_json = decode_json or _decode_json
        """What a JSON traces body becomes: (``document``, its span count). The default
        parses the whole document, as a collector would."""
        self.ssl_context = ssl_context
        """Serve HTTPS with this server-side context (its ``verify_mode`` decides
        whether client certificates are required)."""
        self.tls_failures = 0
        """Connections whose TLS handshake failed (no request was read from them)."""
        self.responder = responder
        self.delay_s = delay_s
        self.keep_bodies = keep_bodies
        self._clock = clock or time.monotonic
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self.requests: list[ReceivedRequest] = []
        self.span_count = 0
        """Spans in requests answered with 2xx (before any partial rejection)."""

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        """Bind (the same port again after :meth:`stop`) and serve on a thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), self._handler_class())
        server.ssl_context = self.ssl_context
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection (the port can be reused by start)."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._port}{self.path}"

    # -- observations -------------------------------------------------------------

    def wait_for_spans(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` spans were accepted; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.span_count >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def wait_for_tls_failures(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` TLS handshakes failed; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.tls_failures >= n, timeout)

    def spans(self) -> list[dict[str, Any]]:
        """Every accepted span in OTLP/JSON form, in arrival order."""
        with self._cond:
            accepted = [r for r in self.requests if 200 <= r.status < 300]
        return [s for r in accepted for s in r.spans()]

    # -- serving ------------------------------------------------------------------

    def _record(self, req: ReceivedRequest) -> None:
        with self._cond:
            req.index = len(self.requests)
            self.requests.append(req)

    def _accept(self, req: ReceivedRequest) -> None:
        with self._cond:
            if 200 <= req.status < 300:
                self.span_count += req.span_count
            self._cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5.0
            # Without TCP_NODELAY a write can wait for the client's delayed ACK
            # (~40 ms per request).
            disable_nagle_algorithm = True
            # Buffered: status line, headers and body leave in one send when the
            # request is done (handle_one_request flushes), not two.
            wbufsize = -1

            tls_failed = False

            def setup(self) -> None:
                sock = self.request
                if isinstance(sock, ssl.SSLSocket):
                    sock.settimeout(self.timeout)
                    try:
                        sock.do_handshake()
                    except (OSError, ValueError):
                        self.tls_failed = True
                        with receiver._cond:
                            receiver.tls_failures += 1
                            receiver._cond.notify_all()
                super().setup()
                with receiver._cond:
                    receiver._conns.add(self.connection)

            def handle(self) -> None:
                if not self.tls_failed:
                    super().handle()

            def finish(self) -> None:
                with receiver._cond:
                    receiver._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                receiver._handle(self)

        return Handler

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        ctype = h.headers.get("Content-Type", "")
        encoding = h.headers.get("Content-Encoding", "")
        req = ReceivedRequest(
            index=0,
            path=h.path,
            content_type=ctype,
            content_encoding=encoding,
            headers=dict(h.headers.items()),
            body=b"",
            received_at=self._clock(),
            metrics=self.path.endswith("/v1/metrics"),
        )
        try:
            body = gzip.decompress(raw) if encoding == "gzip" else raw
            if req.metrics:
                req.document = (
                    ExportMetricsServiceRequest.FromString(body)
                    if "protobuf" in ctype
                    else orjson.loads(body)
                )
            elif "protobuf" in ctype:
                message = ExportTraceServiceRequest.FromString(body)
                req.document = message
                req.span_count = sum(
                    len(ss.spans) for rs in message.resource_spans for ss in rs.scope_spans
                )
            else:
                req.document, req.span_count = self.decode_json(body)
            if self.keep_bodies:
                req.body = body
        except Exception as exc:
            req.error = repr(exc)
        self._record(req)
        if self.delay_s:
            self._stopping.wait(self.delay_s)
        reply: Reply | None = None
        if h.path.split("?")[0] != self.path:
            reply = Reply(404, body=b"not found")
        elif req.error:
            reply = Reply(400, body=req.error.encode())
        elif self.responder is not None:
            reply = self.responder(req)
        req.document = None  # a long run keeps requests, not decoded documents
        if reply is None:
            reply = Reply()
        req.status = reply.status
        # Counted before answering, so a client that saw the 200 sees the count.
        self._accept(req)
        body_out = reply.body
        out_type = "application/x-protobuf" if "protobuf" in ctype else "application/json"
        if body_out is None:
            body_out = b"" if out_type == "application/x-protobuf" else b"{}"
        h.send_response(reply.status)
        headers = dict(reply.headers)
        headers.setdefault("Content-Type", out_type)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body_out)))
        h.end_headers()
        h.wfile.write(body_out)
