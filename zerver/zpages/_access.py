"""Who may see the trace pages, and where they live.

Loopback here means exactly ``127.0.0.1`` and ``::1`` (and ``::ffff:127.0.0.1``,
the same address as an IPv6 socket reports it): the addresses a browser on the
same machine connects from. Other ``127.0.0.0/8`` addresses are often given to
containers or local proxies, so they are treated as any other network and must
be named in ``ZER_VER_ZPAGES_ALLOW``. A client that is not allowed is answered
as if the pages did not exist.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["Allow", "check_path", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def check_path(text: str) -> str:
    """The pages' path prefix (``/debug``); raises ``ValueError`` saying what is accepted."""
    if not _PATH.match(text):
        raise ValueError(
            "accepted: a path such as /debug (segments of letters, digits, '.', '_', '~' "
            "or '-', no trailing slash)"
        )
    return text


def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8, 192.168.1.7, fd00::/8`` parsed; raises ``ValueError`` on a bad entry."""
    nets: list[Network] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"accepted: comma-separated addresses or networks such as 10.0.0.0/8 (not {item!r})"
            ) from None
    return tuple(nets)


class Allow:
    """Decides whether a client address may see the pages: loopback, or a named network."""

    __slots__ = ("networks",)

    def __init__(self, networks: tuple[Network, ...] = ()) -> None:
        self.networks = networks

    @classmethod
    def parse(cls, text: str) -> Allow:
        return cls(parse_networks(text))

    def __call__(self, address: str | None) -> bool:
        if address is None:
            return False  # no peer address (not a socket): nothing says it is local
        if address in _LOOPBACK:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)
