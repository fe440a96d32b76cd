"""Attribute values: their type, the longest key kept, and what never reaches
telemetry (credentials in URLs and hosts, sensitive query parameters).

Pure functions every layer applies to the values it records; the attribute
*keys* and their dual emission live in :mod:`zerver.trace._semconv`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote_plus, urlsplit, urlunsplit

__all__ = [
    "DEFAULT_REDACTED_PARAMS",
    "MAX_KEY",
    "AttrValue",
    "Redaction",
    "client_url",
    "printable",
    "redact_url",
    "strip_userinfo",
]

#: An attribute's value, as OTLP carries it.
AttrValue = (
    str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]
)

#: Query parameters whose values the semantic conventions redact by default
#: (``url.query``, ``url.full``): signed-URL credentials.
DEFAULT_REDACTED_PARAMS = ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")
REDACTED = "REDACTED"
_SEPARATORS = re.compile(r"([&;])")
# What a parameter name may not contain (ZER_VER_REDACT_QUERY_PARAMS is checked with it).
BAD_PARAM_NAME = re.compile(r"[&;=#?\s]")


class Redaction:
    """Which query parameters' values never reach telemetry, and how they are replaced.

    The semantic conventions' defaults (:data:`DEFAULT_REDACTED_PARAMS`) plus the
    operator's names (``ZER_VER_REDACT_QUERY_PARAMS``). Names match after
    percent-decoding and ignoring case (a client may spell ``SIG`` or ``%73ig``);
    the value becomes ``REDACTED``, everything else of the query stays as sent.
    ``&`` and ``;`` both separate parameters here, so a server that splits on
    either never sees a value this missed.

    Cheap in the common case: a query with none of the names (and no ``%``) is
    returned as it is after one compiled search.
    """

    __slots__ = ("_lower", "_probe", "names")

    def __init__(self, extra: Iterable[str] = ()) -> None:
        names: dict[str, None] = dict.fromkeys(DEFAULT_REDACTED_PARAMS)
        for raw in extra:
            name = raw.strip()
            if name:
                if BAD_PARAM_NAME.search(name):
                    raise ValueError(f"not a query parameter name: {name!r}")
                names[name] = None
        self.names = tuple(names)
        self._lower = frozenset(n.lower() for n in names)
        pattern = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        self._probe = re.compile(pattern + "|%", re.IGNORECASE).search

    @classmethod
    def parse(cls, text: str) -> Redaction:
        """From a comma-separated list of extra names (``ZER_VER_REDACT_QUERY_PARAMS``)."""
        return cls(text.split(","))

    def query(self, query: str) -> str:
        """``query`` with the values of the sensitive parameters replaced."""
        if not query or self._probe(query) is None:
            return query
        parts = _SEPARATORS.split(query)
        changed = False
        lower = self._lower
        for i in range(0, len(parts), 2):
            name, eq, value = parts[i].partition("=")
            if not eq or value == REDACTED:
                continue
            key = unquote_plus(name) if "%" in name or "+" in name else name
            if key.lower() in lower:
                parts[i] = f"{name}={REDACTED}"
                changed = True
        return "".join(parts) if changed else query


def strip_userinfo(host: str) -> str:
    """A ``Host`` value (or URL authority) without ``user:password@``."""
    return host.rpartition("@")[2] if "@" in host else host


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


#: The longest key (``db.key``) an attribute keeps; longer ones are cut and marked.
MAX_KEY = 128


def printable(key: str) -> str:
    """``key`` fit for an attribute: at most :data:`MAX_KEY` characters (then ``…``),
    unprintable characters replaced by ``?``."""
    if len(key) <= MAX_KEY and key.isprintable():
        return key
    if len(key) > MAX_KEY:
        key = key[:MAX_KEY] + "…"
    if key.isprintable():
        return key
    return "".join(c if c.isprintable() else "?" for c in key)


@functools.lru_cache(maxsize=1024)
def client_url(url: str) -> tuple[str, str, int]:
    """What an outbound request's span reports of its URL: ``url.full`` (no
    credentials, query values redacted), ``server.address`` (``""`` when there is
    none) and ``server.port`` (the scheme's default when the URL names none).

    Cached (bounded): an app calls the same few services over and over."""
    try:
        parts = urlsplit(url)
        address = parts.hostname or ""
        port = parts.port
    except ValueError:
        address, port = "", None
    if port is None:
        port = 443 if url.startswith("https:") else 80
    return redact_url(url), address, port
