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

from zerver._config import Network, check_path, parse_networks

__all__ = ["Allow", "check_path", "parse_networks"]

_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


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
