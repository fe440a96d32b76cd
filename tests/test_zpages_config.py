"""The trace pages' switches: defaults, accepted values, one-line errors, who may see them."""

from __future__ import annotations

import ipaddress

import pytest

from zerver import ConfigError, load_settings
from zerver.zpages import Allow, parse_networks


def test_off_by_default_at_debug_loopback_only() -> None:
    s = load_settings({})
    assert (s.zpages, s.zpages_path, s.zpages_allow) == (False, "/debug", "")


@pytest.mark.parametrize(
    ("text", "value"),
    [("on", True), ("ON", True), ("1", True), ("true", True), ("off", False), ("0", False)],
)
def test_switch_values(text: str, value: bool) -> None:
    assert load_settings({"ZER_VER_ZPAGES": text}).zpages is value


@pytest.mark.parametrize("path", ["/debug", "/_zerver", "/ops/debug", "/a.b~c-d"])
def test_paths_accepted(path: str) -> None:
    assert load_settings({"ZER_VER_ZPAGES_PATH": path}).zpages_path == path


@pytest.mark.parametrize(
    ("var", "bad"),
    [
        ("ZER_VER_ZPAGES", "yes"),
        ("ZER_VER_ZPAGES", "2"),
        ("ZER_VER_ZPAGES_PATH", "/"),
        ("ZER_VER_ZPAGES_PATH", "/debug/"),
        ("ZER_VER_ZPAGES_PATH", "debug"),
        ("ZER_VER_ZPAGES_PATH", "/de bug"),
        ("ZER_VER_ZPAGES_PATH", "/a//b"),
        ("ZER_VER_ZPAGES_PATH", '/"><script>'),
        ("ZER_VER_ZPAGES_ALLOW", "10.0.0.0/33"),
        ("ZER_VER_ZPAGES_ALLOW", "localhost"),
        ("ZER_VER_ZPAGES_ALLOW", "10.0.0.1,,nope"),
    ],
)
def test_a_bad_value_is_one_line_naming_variable_value_and_accepted(var: str, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({var: bad})
    msg = str(err.value)
    assert msg.startswith(f"{var}={bad!r} is invalid: accepted: ")
    assert "\n" not in msg


def test_allow_list_parses_addresses_and_networks_of_both_families() -> None:
    nets = parse_networks(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8,")
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert parse_networks("") == ()


@pytest.mark.parametrize(
    ("allow", "address", "admitted"),
    [
        # Loopback means exactly the addresses a local browser connects from.
        ("", "127.0.0.1", True),
        ("", "::1", True),
        ("", "::ffff:127.0.0.1", True),
        ("", "127.0.0.2", False),
        ("", "10.1.2.3", False),
        ("", None, False),
        ("", "not an address", False),
        ("127.0.0.2", "127.0.0.2", True),
        ("127.0.0.2", "127.0.0.3", False),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "::ffff:10.1.2.3", True),  # as an IPv6 socket reports it
        ("10.0.0.0/8", "11.0.0.1", False),
        ("fd00::/8", "fd12::1", True),
        ("fd00::/8", "fe80::1%eth0", False),
        ("fe80::/10", "fe80::1%eth0", True),
    ],
)
def test_who_is_admitted(allow: str, address: str | None, admitted: bool) -> None:
    assert Allow.parse(allow)(address) is admitted
