"""The addresses of the relay's ICE host candidates (relay.addresses)."""

from __future__ import annotations

import ipaddress

import pytest

from relay.addresses import candidate_addresses, interface_addresses, media_candidate_addresses
from relay.config import MediaSettings, Settings, load_settings

#: What a machine with Ethernet, Wi-Fi, a link-local fallback and IPv6 lists, in its order.
MACHINE = [
    "127.0.0.1",
    "192.168.1.20",
    "169.254.12.7",
    "10.200.0.1",
    "::1",
    "2001:db8::20",
    "fe80::1%eth0",
    "fe80::2",
    "fd00::2",
]


def test_wildcard_ipv4_announces_interface_addresses_loopback_last() -> None:
    assert candidate_addresses("0.0.0.0", MACHINE) == ["192.168.1.20", "10.200.0.1", "127.0.0.1"]


def test_wildcard_ipv6_announces_ipv4_first_then_ipv6_loopbacks_last() -> None:
    assert candidate_addresses("::", MACHINE) == [
        "192.168.1.20",
        "10.200.0.1",
        "2001:db8::20",
        "fd00::2",
        "127.0.0.1",
        "::1",
    ]


def test_interface_order_is_kept_within_a_family() -> None:
    addresses = ["10.0.0.9", "127.0.0.1", "10.0.0.1", "172.16.0.5"]
    assert candidate_addresses("0.0.0.0", addresses) == [
        "10.0.0.9",
        "10.0.0.1",
        "172.16.0.5",
        "127.0.0.1",
    ]


def test_link_local_addresses_are_skipped() -> None:
    addresses = ["169.254.1.1", "169.254.200.3", "fe80::1", "fe80::abcd%rtc0", "10.0.0.1"]
    assert candidate_addresses("::", addresses) == ["10.0.0.1"]


def test_unusable_addresses_are_skipped() -> None:
    addresses = ["0.0.0.0", "224.0.0.251", "::", "ff02::fb", "fec0::1", "::ffff:10.0.0.7", "x"]
    assert candidate_addresses("::", [*addresses, "10.0.0.1"]) == ["10.0.0.1"]


def test_duplicates_are_dropped() -> None:
    addresses = ["10.0.0.1", "127.0.0.1", "10.0.0.1", "2001:db8::1", "2001:db8:0::1"]
    assert candidate_addresses("::", addresses) == ["10.0.0.1", "2001:db8::1", "127.0.0.1"]


@pytest.mark.parametrize(
    ("host", "expected"), [("0.0.0.0", ["127.0.0.1"]), ("::", ["127.0.0.1", "::1"])]
)
def test_a_machine_with_only_loopback_announces_loopback(host: str, expected: list[str]) -> None:
    assert candidate_addresses(host, ["127.0.0.1", "::1", "fe80::1"]) == expected


@pytest.mark.parametrize(("host", "expected"), [("0.0.0.0", "127.0.0.1"), ("::", "::1")])
def test_no_interface_addresses_falls_back_to_loopback(host: str, expected: str) -> None:
    assert candidate_addresses(host, []) == [expected]


@pytest.mark.parametrize("host", ["127.0.0.1", "10.200.0.1", "2001:db8::20", "::1"])
def test_specific_host_announces_just_itself(host: str) -> None:
    assert candidate_addresses(host, MACHINE) == [host]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.200.0.1"])
def test_announced_addresses_override_everything(host: str) -> None:
    announced = ("203.0.113.10", "2001:db8::10")
    assert candidate_addresses(host, MACHINE, announced) == list(announced)


def test_embedded_default_binds_every_interface_and_never_announces_only_loopback() -> None:
    media = load_settings(None, {}).media
    assert media == MediaSettings() and media.host == "0.0.0.0"
    candidates = candidate_addresses(media.host, MACHINE, media.announced_addresses)
    assert candidates[-1] == "127.0.0.1"
    assert not ipaddress.ip_address(candidates[0]).is_loopback


# -- this machine --------------------------------------------------------------------------------


def test_interface_addresses_lists_this_machines_loopback() -> None:
    addresses = interface_addresses()
    assert "127.0.0.1" in addresses
    for address in addresses:
        ipaddress.ip_address(address)  # every entry is a plain IP address
    assert len(set(addresses)) == len(addresses)


def test_media_candidate_addresses_uses_interfaces_only_for_a_wildcard_host() -> None:
    default = media_candidate_addresses(Settings().media)
    assert default[-1] == "127.0.0.1"
    assert default == candidate_addresses("0.0.0.0", interface_addresses())
    assert media_candidate_addresses(MediaSettings(host="127.0.0.1")) == ["127.0.0.1"]
    announced = MediaSettings(host="0.0.0.0", announced_addresses=("198.51.100.4",))
    assert media_candidate_addresses(announced) == ["198.51.100.4"]
