"""The addresses the relay puts in its ICE host candidates.

:func:`candidate_addresses` is the rule, a pure function of the media bind address, this
machine's interface addresses and ``media.announced_addresses``. :func:`interface_addresses`
is the thin OS-facing part: the addresses of the interfaces that are up (``getifaddrs(3)``
through ctypes, no dependency).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import socket
import sys
from collections.abc import Iterable, Sequence

from relay.config import MediaSettings

__all__ = ["candidate_addresses", "interface_addresses", "media_candidate_addresses"]

log = logging.getLogger(__name__)

IPV4_LOOPBACK = "127.0.0.1"
IPV6_LOOPBACK = "::1"


def _usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address a peer can send to (RFC 8445, section 5.1.1.1, except loopback).

    Link-local addresses (169.254/16, fe80::/10) need a scope a remote peer cannot know;
    IPv6 site-local and IPv4-mapped addresses must not be candidates."""
    if address.is_unspecified or address.is_multicast or address.is_link_local:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return not address.is_site_local and address.ipv4_mapped is None
    return True


def candidate_addresses(
    host: str, interfaces: Iterable[str], announced: Sequence[str] = ()
) -> list[str]:
    """The addresses of the relay's ICE host candidates, best first.

    ``host`` is the media socket's bind address, ``interfaces`` this machine's interface
    addresses (:func:`interface_addresses`), ``announced`` ``media.announced_addresses``.

    - ``announced`` not empty: exactly those, in their order (a public address behind NAT).
    - ``host`` a specific address: just that address.
    - ``host`` 0.0.0.0: every usable IPv4 interface address; ``host`` ``::`` (a dual-stack
      socket): the IPv4 ones, then the IPv6 ones. Loopback addresses come last, so that a
      client on this machine that pairs with loopback still can, while browsers that skip
      loopback candidates (Firefox) find another; link-local, site-local, multicast and
      IPv4-mapped addresses are skipped, duplicates dropped, interface order otherwise kept.
      With none left, the loopback address of the socket's family.
    """
    if announced:
        return list(announced)
    bound = ipaddress.ip_address(host)
    if not bound.is_unspecified:
        return [str(bound)]
    families = (4,) if bound.version == 4 else (4, 6)
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in interfaces:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if address.version in families and _usable(address) and address not in found:
            found.append(address)
    found.sort(key=lambda a: (a.is_loopback, a.version))  # stable: interface order kept
    if not found:
        return [IPV4_LOOPBACK if bound.version == 4 else IPV6_LOOPBACK]
    return [str(address) for address in found]


def media_candidate_addresses(media: MediaSettings) -> list[str]:
    """:func:`candidate_addresses` for ``media`` on this machine (lists interfaces if needed)."""
    wildcard = ipaddress.ip_address(media.host).is_unspecified
    interfaces = interface_addresses() if wildcard and not media.announced_addresses else []
    return candidate_addresses(media.host, interfaces, media.announced_addresses)


# --------------------------------------------------------------------------------------------
# This machine's interfaces


class _Ifaddrs(ctypes.Structure):
    """``struct ifaddrs`` (the same layout on Linux, the BSDs and macOS)."""


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p),
    ("ifa_netmask", ctypes.c_void_p),
    ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]

IFF_UP = 0x1
IFF_RUNNING = 0x40
#: BSD-derived systems start a sockaddr with a length byte; Linux with a 16-bit family.
_SA_LEN_BYTE = not sys.platform.startswith("linux")


def _sockaddr_ip(pointer: int) -> str | None:
    """The IP address in a ``struct sockaddr_in``/``sockaddr_in6``, else None."""
    head = ctypes.string_at(pointer, 2)
    family = head[1] if _SA_LEN_BYTE else int.from_bytes(head, sys.byteorder)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, ctypes.string_at(pointer + 4, 4))
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, ctypes.string_at(pointer + 8, 16))
    return None


def interface_addresses() -> list[str]:
    """IPv4 and IPv6 addresses of this machine's interfaces that are up and running.

    In the order the system lists them; empty (with a warning logged) when they cannot be
    listed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        getifaddrs, freeifaddrs = libc.getifaddrs, libc.freeifaddrs
    except (OSError, AttributeError) as error:
        log.warning("cannot list network interfaces: %s", error)
        return []
    getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
    getifaddrs.restype = ctypes.c_int
    freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
    freeifaddrs.restype = None
    head = ctypes.POINTER(_Ifaddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        log.warning("cannot list network interfaces: getifaddrs: errno %d", ctypes.get_errno())
        return []
    found: list[str] = []
    try:
        entry = head
        while entry:
            item = entry.contents
            running = item.ifa_flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING
            if running and item.ifa_addr:
                address = _sockaddr_ip(item.ifa_addr)
                if address is not None and address not in found:
                    found.append(address)
            entry = item.ifa_next
    finally:
        freeifaddrs(head)
    return found
