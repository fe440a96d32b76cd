"""The outbound HTTP interpreter: one pooled ``httpx.AsyncClient`` for every effect.

Rules this module keeps:

* A job first takes a slot from a :class:`~zerver.runtime._park.ConcurrencyLimiter`
  named ``http_pool`` sized like the client's connection pool, so waiting for
  a connection is recorded as ``backpressure`` rather than hidden in httpx.
* The request, including reading the body, runs inside an ``io_wait`` park
  episode with token ``http``, under one overall deadline of
  ``effect.timeout_ms`` (httpx's own timeouts are per phase).
* A 5xx answer, a connection failure or a timeout raises a retryable
  :class:`~zerver.EffectError`; any other status is a result for the step to
  judge. Error messages name the URL without credentials or query string.
* Response bodies are read up to ``max_response_bytes``; a larger body fails
  the effect rather than growing an unbounded buffer.
* Headers named by ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST`` /
  ``_CLIENT_RESPONSE`` are reported as ``http.request.header.<name>`` /
  ``http.response.header.<name>`` (sanitised values ``[REDACTED]``, see
  :class:`~zerver.trace._semconv.HeaderCapture`); nothing is captured by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import orjson

from zerver.core._effects import Effect, HttpDelete, HttpGet, HttpPost, HttpPut, HttpResult
from zerver.core._errors import EffectError, UnsupportedEffectError
from zerver.runtime._park import ConcurrencyLimiter, JobContext
from zerver.trace._semconv import HeaderCaptures

# httpx loads with the first client (start or first effect), not with zerver.
if TYPE_CHECKING:
    import httpx

__all__ = ["HeadersHook", "HttpInterpreter"]

HeadersHook = Callable[[Effect, JobContext], Iterable[tuple[str, str]]]
"""Returns extra request headers for an effect (e.g. trace propagation)."""

_HttpEffect = HttpGet | HttpPost | HttpPut | HttpDelete

_METHODS: dict[type[Effect], str] = {
    HttpGet: "GET",
    HttpPost: "POST",
    HttpPut: "PUT",
    HttpDelete: "DELETE",
}


def _redact_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else host + parts.path


def _error(exc: Exception, method: str, url: str) -> EffectError:
    import httpx

    where = f"{method} {_redact_url(url)}"
    kind, status, retryable = "http_error", 502, False
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        kind, status, retryable = "timeout", 504, True
    elif isinstance(exc, httpx.ConnectError | httpx.ProxyError):
        kind, retryable = "connect_error", True
    elif isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        kind, status = "invalid_url", 500
    elif isinstance(exc, httpx.RemoteProtocolError | httpx.NetworkError):
        # Typically a pooled keep-alive connection the server had already closed.
        kind, retryable = "network_error", True
    elif isinstance(exc, httpx.DecodingError):
        kind = "decoding_error"
    elif isinstance(exc, httpx.TooManyRedirects):
        kind = "too_many_redirects"
    detail = str(exc) or type(exc).__name__
    if url and url in detail:  # the query and credentials stay out of messages
        detail = detail.replace(url, _redact_url(url))
    return EffectError(
        f"{where} failed ({kind}): {detail}", kind=kind, status_hint=status, retryable=retryable
    )


class HttpInterpreter:
    """Performs ``http`` effects (``HttpGet``, ``HttpPost``, ``HttpPut``, ``HttpDelete``).

    ``max_connections`` bounds concurrent requests (and the client's pool);
    ``headers_hook`` adds headers to every request; ``trust_env`` lets httpx
    read proxy and certificate settings from the environment; ``transport``
    replaces httpx's network transport (for proxies or custom TLS).

    The client is created by :meth:`start` (or on first use) and closed by
    :meth:`aclose`.
    """

    system = "http"

    def __init__(
        self,
        *,
        headers_hook: HeadersHook | None = None,
        propagate: bool = True,
        max_connections: int = 100,
        max_keepalive_connections: int = 20,
        max_response_bytes: int = 10 * 1024 * 1024,
        follow_redirects: bool = False,
        trust_env: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        capture_headers: HeaderCaptures | None = None,
    ) -> None:
        if max_response_bytes < 0:
            raise ValueError(f"max_response_bytes must be >= 0, got {max_response_bytes}")
        self.headers_hook = headers_hook
        self.propagate = propagate
        self.max_response_bytes = max_response_bytes
        self.limiter = ConcurrencyLimiter("http_pool", max_connections)
        self._max_connections = max_connections
        self._max_keepalive = min(max_keepalive_connections, max_connections)
        self._follow_redirects = follow_redirects
        self._trust_env = trust_env
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        captures = capture_headers if capture_headers is not None else HeaderCaptures.from_environ()
        self._capture_request = captures.client_request.capture
        self._capture_response = captures.client_response.capture

    def __repr__(self) -> str:
        return f"<HttpInterpreter max_connections={self.limiter.limit}>"

    async def start(self) -> None:
        """Create the HTTP client (idempotent)."""
        if self._client is None:
            await self._new_client()

    async def _new_client(self) -> httpx.AsyncClient:
        import httpx

        limits = httpx.Limits(
            max_connections=self._max_connections, max_keepalive_connections=self._max_keepalive
        )
        client = self._client = httpx.AsyncClient(
            limits=limits,
            follow_redirects=self._follow_redirects,
            trust_env=self._trust_env,
            transport=self._transport,
            timeout=None,
        )
        return client

    async def aclose(self) -> None:
        """Close the client and its connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def perform(self, effect: Effect, job: JobContext) -> Any:
        """Send the request ``effect`` describes; the result is an :class:`HttpResult`."""
        if not isinstance(effect, _HttpEffect):
            raise UnsupportedEffectError("HttpInterpreter", effect)
        method = _METHODS[type(effect)]
        headers = list(effect.headers)
        content: bytes | None = None
        if isinstance(effect, HttpPost | HttpPut):
            content = self._body(effect, method, headers)
        if self.propagate:
            # The effect's span becomes the parent of the downstream server's work. Its
            # trace headers replace any the effect set itself: two ``traceparent``
            # fields are one invalid header, and the receiver would start a new trace.
            carrier = job.propagation_headers()
            if carrier:
                if headers:
                    names = {name.lower() for name in carrier}
                    headers = [h for h in headers if h[0].lower() not in names]
                headers.extend(carrier.items())
        if self.headers_hook is not None:
            headers.extend(self.headers_hook(effect, job))
        client = self._client or await self._new_client()
        import httpx

        timeout_s = effect.timeout_ms / 1000
        async with self.limiter.slot(job):
            with job.parked("io_wait", "http"):
                try:
                    with anyio.fail_after(timeout_s):
                        result = await self._send(
                            client,
                            method,
                            effect.url,
                            headers=headers,
                            content=content,
                            timeout_s=timeout_s,
                        )
                except (httpx.HTTPError, httpx.InvalidURL, TimeoutError) as exc:
                    raise _error(exc, method, effect.url) from exc

        job.note("http.response.status_code", result.status)
        job.note("http.response.body.size", len(result.body))
        if self._capture_request is not None:
            self._note_headers(job, self._capture_request(headers))
        if self._capture_response is not None:
            self._note_headers(job, self._capture_response(result.headers))
        if result.status >= 500:
            raise EffectError(
                f"{method} {_redact_url(effect.url)} answered {result.status}",
                kind="http_5xx",
                status_hint=502,
                retryable=True,
            )
        return result

    @staticmethod
    def _note_headers(job: JobContext, captured: dict[str, list[str]] | None) -> None:
        if captured:
            for key, values in captured.items():
                job.note(key, values)

    @staticmethod
    def _body(
        effect: HttpPost | HttpPut, method: str, headers: list[tuple[str, str]]
    ) -> bytes | None:
        if effect.json is None:
            return effect.body
        if effect.body is not None:
            raise EffectError(
                f"{method} {_redact_url(effect.url)} sets both body and json; choose one",
                kind="invalid_request",
                status_hint=500,
            )
        try:
            content = orjson.dumps(effect.json)
        except TypeError as exc:
            raise EffectError(
                f"json for {method} {_redact_url(effect.url)} is not JSON-serialisable: {exc}",
                kind="invalid_request",
                status_hint=500,
            ) from exc
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("content-type", "application/json"))
        return content

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        headers: list[tuple[str, str]],
        content: bytes | None,
        timeout_s: float,
    ) -> HttpResult:
        async with client.stream(
            method, url, headers=headers, content=content, timeout=timeout_s
        ) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise EffectError(
                        f"{method} {_redact_url(url)}: response body exceeds "
                        f"{self.max_response_bytes} bytes",
                        kind="response_too_large",
                        status_hint=502,
                    )
                chunks.append(chunk)
            return HttpResult(
                status=response.status_code,
                headers=tuple(response.headers.multi_items()),
                body=b"".join(chunks),
            )
