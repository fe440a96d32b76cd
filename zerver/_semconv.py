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

from urllib.parse import urlsplit, urlunsplit

from ._records import RequestRecord
from ._spans import AttrValue

__all__ = ["CLIENT_ROWS", "SERVER_ROWS", "ClientFacts", "SemConv"]

# fact name -> (new key, old key or None)
SERVER_ROWS: dict[str, tuple[str, str | None]] = {
    "method": ("http.request.method", "http.method"),
    "route": ("http.route", "http.route"),
    "scheme": ("url.scheme", "http.scheme"),
    "path": ("url.path", None),
    "query": ("url.query", None),
    "target": ("", "http.target"),
    "host": ("", "http.host"),
    "server_address": ("server.address", "net.host.name"),
    "server_port": ("server.port", "net.host.port"),
    "client_address": ("client.address", "http.client_ip"),
    "client_port": ("client.port", "net.peer.port"),
    "user_agent": ("user_agent.original", "http.user_agent"),
    "transport": ("network.transport", None),
    "protocol_version": ("network.protocol.version", "http.flavor"),
    "status": ("http.response.status_code", "http.status_code"),
    "request_size": ("http.request.body.size", "http.request_content_length"),
    "response_size": ("http.response.body.size", "http.response_content_length"),
    "error_type": ("error.type", None),
}

CLIENT_ROWS: dict[str, tuple[str, str | None]] = {
    "method": ("http.request.method", "http.method"),
    "url": ("url.full", "http.url"),
    "server_address": ("server.address", "net.peer.name"),
    "server_port": ("server.port", "net.peer.port"),
    "status": ("http.response.status_code", "http.status_code"),
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


def _split_host(host: str) -> tuple[str, int | None]:
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        addr = host[1:end] if end > 0 else host
        rest = host[end + 1 :] if end > 0 else ""
        port = rest[1:] if rest.startswith(":") else ""
    else:
        addr, _, port = host.partition(":")
    return addr, int(port) if port.isdigit() else None


def redact_url(url: str) -> str:
    """``url.full`` without credentials and with query values redacted."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "REDACTED"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = "REDACTED:REDACTED@" + netloc
    query = "&".join(
        f"{p.partition('=')[0]}=REDACTED" if "=" in p else p for p in parts.query.split("&") if p
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class ClientFacts:
    """What an outbound HTTP effect span reports."""

    __slots__ = ("method", "server_address", "server_port", "status", "url")

    def __init__(self, method: str, url: str, status: int | None) -> None:
        self.method = method
        self.url = redact_url(url)
        try:
            parts = urlsplit(url)
            self.server_address = parts.hostname or ""
            port = parts.port
        except ValueError:
            self.server_address, port = "", None
        if port is None:
            port = 443 if url.startswith("https:") else 80
        self.server_port = port
        self.status = status


class SemConv:
    """Writes semantic-convention attributes for one mode, chosen once."""

    __slots__ = (
        "_client",
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
            facts.append(("host", rec.host))
            host_addr, host_port = _split_host(rec.host)
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
