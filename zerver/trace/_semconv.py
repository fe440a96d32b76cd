"""HTTP semantic conventions: one table drives the ``old``, ``new`` and ``dup`` modes.

Each row names a fact about the request and the attribute key it has in the
stable (v1.21+) conventions and in the pre-1.21 ones. ``new`` emits the first
key, ``old`` the second, ``dup`` both. A row with no old key exists only in
the new conventions (``network.transport``, ``error.type``), one with the
same key in both (``http.route``) is emitted once.

Migration: this release emits ``dup`` by default; the next major release
emits ``new`` only. Set ``ZER_VER_SEMCONV=new`` (or the standard
``OTEL_SEMCONV_STABILITY_OPT_IN=http``) to move early.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

# The keys, from the semantic conventions package: the stable attributes, and the
# incubating module for those not yet stable (the body sizes) and for the pre-1.21
# names the ``old`` and ``dup`` modes emit (deprecated there, which is the point).
import opentelemetry.semconv._incubating.attributes.http_attributes as incubating_http
import opentelemetry.semconv._incubating.attributes.net_attributes as incubating_net
from opentelemetry.semconv.attributes import (
    client_attributes,
    error_attributes,
    http_attributes,
    network_attributes,
    server_attributes,
    url_attributes,
    user_agent_attributes,
)

from zerver.core._attributes import client_url, strip_userinfo

if TYPE_CHECKING:
    from zerver._config import Settings
    from zerver.core._attributes import AttrValue

    from ._records import RequestRecord

__all__ = [
    "CLIENT_ROWS",
    "SERVER_ROWS",
    "ClientFacts",
    "HeaderCapture",
    "HeaderCaptures",
    "SemConv",
]

#: The request methods the semantic conventions name; metrics report any other as
#: ``_OTHER`` (a client inventing methods must not grow a metric's series).
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)

#: Headers whose values are always ``[REDACTED]`` when captured, whatever is configured.
ALWAYS_SANITIZED = ("authorization", "cookie", "set-cookie", "proxy-authorization")
SANITIZED = "[REDACTED]"


class HeaderCapture:
    """Which headers of one kind (server request, client response, ...) become attributes.

    As OpenTelemetry Python's instrumentations read
    ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*``: comma-separated names, each a
    regular expression matched against the whole header name ignoring case; a
    header becomes ``<prefix><lowercase name>`` (``http.request.header.x-request-id``)
    with all its values as a string array. A header matched anywhere in its name by
    one of the ``..._SANITIZE_FIELDS`` expressions, or named in
    :data:`ALWAYS_SANITIZED`, keeps its key and loses its values (``[REDACTED]``).

    ``capture`` is None when nothing is configured, so callers skip the header walk.
    """

    __slots__ = ("_match", "_sanitize", "capture", "prefix")

    def __init__(self, names: str, sanitize: str, prefix: str) -> None:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        fields = [n.strip() for n in sanitize.split(",") if n.strip()]
        always = "^(?:" + "|".join(re.escape(h) for h in ALWAYS_SANITIZED) + ")$"
        self.prefix = prefix
        self._match = re.compile("|".join(wanted), re.IGNORECASE).fullmatch if wanted else None
        self._sanitize = re.compile("|".join([always, *fields]), re.IGNORECASE).search
        self.capture = self._capture if wanted else None

    def _capture(self, headers: Iterable[tuple[str, str]]) -> dict[str, list[str]] | None:
        match = self._match
        assert match is not None
        out: dict[str, list[str]] | None = None
        for name, value in headers:
            if match(name) is None:
                continue
            if out is None:
                out = {}
            out.setdefault(self.prefix + name.lower(), []).append(
                SANITIZED if self._sanitize(name) else value
            )
        return out


class HeaderCaptures:
    """The four header captures (server and client, request and response), from settings."""

    __slots__ = ("client_request", "client_response", "server_request", "server_response")

    def __init__(
        self,
        *,
        server_request: str = "",
        server_response: str = "",
        client_request: str = "",
        client_response: str = "",
        sanitize: str = "",
    ) -> None:
        req, resp = "http.request.header.", "http.response.header."
        self.server_request = HeaderCapture(server_request, sanitize, req)
        self.server_response = HeaderCapture(server_response, sanitize, resp)
        self.client_request = HeaderCapture(client_request, sanitize, req)
        self.client_response = HeaderCapture(client_response, sanitize, resp)

    @classmethod
    def from_settings(cls, settings: Settings) -> HeaderCaptures:
        """The captures the ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`` settings name."""
        return cls(
            server_request=settings.capture_headers_server_request,
            server_response=settings.capture_headers_server_response,
            client_request=settings.capture_headers_client_request,
            client_response=settings.capture_headers_client_response,
            sanitize=settings.capture_headers_sanitize_fields,
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HeaderCaptures:
        """The captures the environment names (what an instrumentation without settings reads)."""
        env = os.environ if environ is None else environ
        var = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_"
        return cls(
            server_request=env.get(var + "SERVER_REQUEST", ""),
            server_response=env.get(var + "SERVER_RESPONSE", ""),
            client_request=env.get(var + "CLIENT_REQUEST", ""),
            client_response=env.get(var + "CLIENT_RESPONSE", ""),
            sanitize=env.get(var + "SANITIZE_FIELDS", ""),
        )


# fact name -> (new key, old key or None)
SERVER_ROWS: dict[str, tuple[str, str | None]] = {
    "method": (http_attributes.HTTP_REQUEST_METHOD, incubating_http.HTTP_METHOD),
    "route": (http_attributes.HTTP_ROUTE, http_attributes.HTTP_ROUTE),
    "scheme": (url_attributes.URL_SCHEME, incubating_http.HTTP_SCHEME),
    "path": (url_attributes.URL_PATH, None),
    "query": (url_attributes.URL_QUERY, None),
    "target": ("", incubating_http.HTTP_TARGET),
    "host": ("", incubating_http.HTTP_HOST),
    "server_address": (server_attributes.SERVER_ADDRESS, incubating_net.NET_HOST_NAME),
    "server_port": (server_attributes.SERVER_PORT, incubating_net.NET_HOST_PORT),
    "client_address": (client_attributes.CLIENT_ADDRESS, incubating_http.HTTP_CLIENT_IP),
    "client_port": (client_attributes.CLIENT_PORT, incubating_net.NET_PEER_PORT),
    "user_agent": (user_agent_attributes.USER_AGENT_ORIGINAL, incubating_http.HTTP_USER_AGENT),
    "transport": (network_attributes.NETWORK_TRANSPORT, None),
    "protocol_version": (network_attributes.NETWORK_PROTOCOL_VERSION, incubating_http.HTTP_FLAVOR),
    "status": (http_attributes.HTTP_RESPONSE_STATUS_CODE, incubating_http.HTTP_STATUS_CODE),
    "request_size": (
        incubating_http.HTTP_REQUEST_BODY_SIZE,
        incubating_http.HTTP_REQUEST_CONTENT_LENGTH,
    ),
    "response_size": (
        incubating_http.HTTP_RESPONSE_BODY_SIZE,
        incubating_http.HTTP_RESPONSE_CONTENT_LENGTH,
    ),
    "error_type": (error_attributes.ERROR_TYPE, None),
}
CLIENT_ROWS: dict[str, tuple[str, str | None]] = {
    "method": (http_attributes.HTTP_REQUEST_METHOD, incubating_http.HTTP_METHOD),
    "url": (url_attributes.URL_FULL, incubating_http.HTTP_URL),
    "server_address": (server_attributes.SERVER_ADDRESS, incubating_net.NET_PEER_NAME),
    "server_port": (server_attributes.SERVER_PORT, incubating_net.NET_PEER_PORT),
    "status": (http_attributes.HTTP_RESPONSE_STATUS_CODE, incubating_http.HTTP_STATUS_CODE),
}

MODES = ("old", "new", "dup")
# Root-attribute templates kept per SemConv (one per route, client and user agent).
_MAX_TEMPLATES = 512


def _keys(rows: dict[str, tuple[str, str | None]], mode: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for fact, (new, old) in rows.items():
        keys: list[str] = []
        if mode in ("new", "dup") and new:
            keys.append(new)
        if mode in ("old", "dup") and old and old not in keys:
            keys.append(old)
        out[fact] = tuple(keys)
    return out


def _keys_for(new: str, mode: str) -> tuple[str, ...]:
    for row_new, old in CLIENT_ROWS.values():
        if row_new == new:
            return _keys({new: (row_new, old)}, mode)[new]
    return (new,)


def _split_host(host: str) -> tuple[str, int | None]:
    host = strip_userinfo(host)
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        addr = host[1:end] if end > 0 else host
        rest = host[end + 1 :] if end > 0 else ""
        port = rest[1:] if rest.startswith(":") else ""
    else:
        addr, _, port = host.partition(":")
    return addr, int(port) if port.isdigit() else None


class ClientFacts:
    """What an outbound HTTP effect span reports."""

    __slots__ = ("method", "server_address", "server_port", "status", "url")

    def __init__(self, method: str, url: str, status: int | None) -> None:
        self.method = method
        self.url, self.server_address, self.server_port = client_url(url)
        self.status = status


class SemConv:
    """Writes semantic-convention attributes for one mode, chosen once."""

    __slots__ = (
        "_client",
        "_client_names",
        "_client_port_keys",
        "_path_keys",
        "_query_keys",
        "_response_size_keys",
        "_server",
        "_target_keys",
        "_templates",
        "mode",
    )

    def __init__(self, mode: str = "dup") -> None:
        if mode not in MODES:
            raise ValueError(f"semconv mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._server = _keys(SERVER_ROWS, mode)
        self._client = _keys(CLIENT_ROWS, mode)
        # A client span's stable key -> the keys this mode writes, where they differ.
        self._client_names = {
            new: keys for new, _ in CLIENT_ROWS.values() if (keys := _keys_for(new, mode)) != (new,)
        }
        self._templates: dict[tuple[object, ...], dict[str, AttrValue]] = {}
        server = self._server
        self._path_keys = server["path"]
        self._query_keys = server["query"]
        self._target_keys = server["target"]
        self._client_port_keys = server["client_port"]
        self._response_size_keys = server["response_size"]

    def server_attributes(self, rec: RequestRecord) -> dict[str, AttrValue]:
        """The root span's HTTP attributes for ``rec``, as a new dict.

        Requests of one shape (route, client, user agent, status, request size
        and so on) share all attributes but path, query and client port and the
        response size: the first one's attributes become a template that later
        ones copy, writing only those. The cache is bounded; errors skip it.
        ``rec.query`` is recorded already redacted (``App`` redacts it once, where
        a request's query enters its record), so it is written as it is.
        """
        status = rec.status
        if rec.system_fault or status >= 500:
            return self._server_facts(rec)
        query = rec.query
        shape = (
            rec.method,
            rec.route,
            rec.scheme,
            rec.host,
            rec.server_address,
            rec.server_port,
            rec.protocol_version,
            rec.user_agent,
            rec.client_address,
            status,
            rec.request_body_size,
            not query,
            rec.client_port is None,
        )
        template = self._templates.get(shape)
        if template is None:
            template = self._server_facts(rec)
            if len(self._templates) >= _MAX_TEMPLATES:
                del self._templates[next(iter(self._templates))]
            self._templates[shape] = template
            return template.copy()
        attrs = template.copy()
        path = rec.path
        for key in self._path_keys:
            attrs[key] = path
        if query:
            target = f"{path}?{query}"
            for key in self._query_keys:
                attrs[key] = query
        else:
            target = path
        for key in self._target_keys:
            attrs[key] = target
        port = rec.client_port
        if port is not None:
            for key in self._client_port_keys:
                attrs[key] = port
        size = rec.response_body_size
        for key in self._response_size_keys:
            attrs[key] = size
        return attrs

    def _server_facts(self, rec: RequestRecord) -> dict[str, AttrValue]:
        """All of the root span's HTTP attributes, from the table."""
        query = rec.query
        facts: list[tuple[str, AttrValue]] = [
            ("method", rec.method),
            ("scheme", rec.scheme),
            ("path", rec.path),
            ("target", f"{rec.path}?{query}" if query else rec.path),
            ("transport", "tcp"),
            ("protocol_version", rec.protocol_version),
            ("request_size", rec.request_body_size),
            ("response_size", rec.response_body_size),
        ]
        if rec.route is not None:
            facts.append(("route", rec.route))
        if query:
            facts.append(("query", query))
        host_addr: str | None = None
        host_port: int | None = None
        if rec.host:
            host = strip_userinfo(rec.host)  # credentials are never recorded
            facts.append(("host", host))
            host_addr, host_port = _split_host(host)
        addr = host_addr or rec.server_address
        if addr:
            facts.append(("server_address", addr))
        port = host_port if host_addr else rec.server_port
        if port is None and host_addr:
            port = 443 if rec.scheme == "https" else 80
        if port is not None:
            facts.append(("server_port", port))
        if rec.client_address:
            facts.append(("client_address", rec.client_address))
        if rec.client_port is not None:
            facts.append(("client_port", rec.client_port))
        if rec.user_agent:
            facts.append(("user_agent", rec.user_agent))
        if rec.status:
            facts.append(("status", rec.status))
        if rec.system_fault or rec.status >= 500:
            facts.append(("error_type", rec.error_type or str(rec.status)))
        keys = self._server
        attrs: dict[str, AttrValue] = {}
        for fact, value in facts:
            for key in keys[fact]:
                attrs[key] = value
        return attrs

    def add_client_attributes(
        self, attributes: Mapping[str, AttrValue], attrs: dict[str, AttrValue]
    ) -> None:
        """Add a client span's ``attributes`` (stable keys) to ``attrs``, under the
        names this mode writes (:data:`CLIENT_ROWS`); a key already in ``attrs`` is kept."""
        names = self._client_names
        for key, value in attributes.items():
            keys = names.get(key)
            if keys is None:
                if key not in attrs:
                    attrs[key] = value
                continue
            for name in keys:
                if name not in attrs:
                    attrs[name] = value

    def client_attributes(self, facts: ClientFacts, attrs: dict[str, AttrValue]) -> None:
        """Add an HTTP client span's attributes to ``attrs``."""
        k = self._client
        for key in k["method"]:
            attrs[key] = facts.method
        for key in k["url"]:
            attrs[key] = facts.url
        if facts.server_address:
            for key in k["server_address"]:
                attrs[key] = facts.server_address
        for key in k["server_port"]:
            attrs[key] = facts.server_port
        if facts.status is not None:
            for key in k["status"]:
                attrs[key] = facts.status
