"""Request and response values as steps see them.

A :class:`Request` is built by the server shell from the parsed h11 events;
a :class:`Response` is what a step hands back in ``Done``. Both are plain
slotted classes: they sit on the hot path of every request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

__all__ = ["Request", "Response"]

Headers = list[tuple[bytes, bytes]]


class Request:
    """One HTTP request: method, target, headers, body and connection facts.

    ``headers`` keeps h11's form (lower-cased ``bytes`` names, ``bytes``
    values); :meth:`header` is the convenient accessor.
    """

    __slots__ = (
        "_query_params",
        "body",
        "client",
        "headers",
        "http_version",
        "method",
        "path",
        "query",
        "scheme",
        "server",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query: str = "",
        headers: Headers | None = None,
        body: bytes = b"",
        http_version: str = "1.1",
        scheme: str = "http",
        client: tuple[str, int] | None = None,
        server: tuple[str, int] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers: Headers = headers if headers is not None else []
        self.body = body
        self.http_version = http_version
        self.scheme = scheme
        self.client = client
        self.server = server
        self._query_params: dict[str, str] | None = None

    @classmethod
    def from_target(cls, method: str, target: str, **kwargs: Any) -> Request:
        """Build a request from a request-target such as ``/a/b?x=1``."""
        path, _, query = target.partition("?")
        return cls(method=method, path=path, query=query, **kwargs)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as latin-1."""
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return default

    @property
    def query_params(self) -> Mapping[str, str]:
        """Query parameters (the last value wins for repeated names)."""
        if self._query_params is None:
            self._query_params = dict(parse_qsl(self.query, keep_blank_values=True))
        return self._query_params

    def json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` on invalid JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON body: {exc}") from None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}>"


class Response:
    """An HTTP response. Build one with :meth:`json`, :meth:`text`, :meth:`html` or :meth:`bytes`.

    ``render_phase`` names how the body was produced (``json_encode``,
    ``template``, ``markdown``, ``other``) and is exported as ``render.phase``.
    """

    __slots__ = ("body", "headers", "render_phase", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        render_phase: str | None = None,
    ) -> None:
        if not 100 <= status <= 599:
            raise ValueError(f"HTTP status must be 100..599, got {status}")
        self.status = status
        self.body = body
        self.headers: list[tuple[str, str]] = list(headers)
        self.render_phase = render_phase

    @classmethod
    def json(
        cls, data: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()
    ) -> Response:
        """A JSON response (``application/json``), encoded with orjson."""
        return cls(
            status,
            orjson.dumps(data),
            [("content-type", "application/json"), *headers],
            render_phase="json_encode",
        )

    @classmethod
    def text(
        cls, text: str, status: int = 200, headers: Iterable[tuple[str, str]] = ()
    ) -> Response:
        """A plain-text response (UTF-8)."""
        return cls(
            status,
            text.encode(),
            [("content-type", "text/plain; charset=utf-8"), *headers],
            render_phase="other",
        )

    @classmethod
    def html(
        cls,
        html: str,
        status: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        *,
        render_phase: str = "template",
    ) -> Response:
        """An HTML response (UTF-8)."""
        return cls(
            status,
            html.encode(),
            [("content-type", "text/html; charset=utf-8"), *headers],
            render_phase=render_phase,
        )

    @classmethod
    def bytes(
        cls,
        body: bytes,
        status: int = 200,
        content_type: str = "application/octet-stream",
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        """A raw-bytes response with the given content type."""
        return cls(status, body, [("content-type", content_type), *headers])

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"
