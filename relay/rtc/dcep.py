"""The Data Channel Establishment Protocol (RFC 8832) and the PPIDs of RFC 8831, sans-I/O.

A data channel is opened in-band: the opener sends DATA_CHANNEL_OPEN (label, protocol,
channel type, reliability parameter, priority) on the stream it chose, with PPID 50; the
peer answers DATA_CHANNEL_ACK on the same stream. Stream ids are even for the DTLS client and
odd for the DTLS server (RFC 8832 §6), so both sides can open channels without colliding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "ACK",
    "CHANNEL_RELIABLE",
    "DcepError",
    "OPEN",
    "PPID_BINARY",
    "PPID_BINARY_EMPTY",
    "PPID_DCEP",
    "PPID_STRING",
    "PPID_STRING_EMPTY",
    "ChannelOpen",
    "encode_ack",
    "payload_of",
    "ppid_for",
]

PPID_DCEP = 50
PPID_STRING = 51
PPID_BINARY_PARTIAL = 52  # deprecated (RFC 8831 §8)
PPID_BINARY = 53
PPID_STRING_PARTIAL = 54  # deprecated
PPID_STRING_EMPTY = 56
PPID_BINARY_EMPTY = 57
#: the PPIDs a user message may carry
USER_PPIDS = frozenset(
    {
        PPID_STRING,
        PPID_BINARY,
        PPID_STRING_EMPTY,
        PPID_BINARY_EMPTY,
        PPID_BINARY_PARTIAL,
        PPID_STRING_PARTIAL,
    }
)

OPEN = 0x03
ACK = 0x02

#: channel types: the high bit means unordered
CHANNEL_RELIABLE = 0x00
CHANNEL_PARTIAL_RELIABLE_REXMIT = 0x01
CHANNEL_PARTIAL_RELIABLE_TIMED = 0x02
CHANNEL_UNORDERED = 0x80
_TYPES = {0x00, 0x01, 0x02, 0x80, 0x81, 0x82}

_OPEN_HEADER = struct.Struct("!BBHIHH")


class DcepError(Exception):
    """A malformed DCEP message."""


@dataclass(frozen=True)
class ChannelOpen:
    """DATA_CHANNEL_OPEN: what a channel is. ``max_retransmits`` and ``lifetime_ms`` are
    mutually exclusive (at most one is set); neither means reliable."""

    label: str
    protocol: str = ""
    ordered: bool = True
    max_retransmits: int | None = None
    lifetime_ms: int | None = None
    priority: int = 256

    @property
    def channel_type(self) -> int:
        kind = CHANNEL_RELIABLE
        if self.max_retransmits is not None:
            kind = CHANNEL_PARTIAL_RELIABLE_REXMIT
        elif self.lifetime_ms is not None:
            kind = CHANNEL_PARTIAL_RELIABLE_TIMED
        return kind | (0 if self.ordered else CHANNEL_UNORDERED)

    def encode(self) -> bytes:
        label = self.label.encode()
        protocol = self.protocol.encode()
        if len(label) > 0xFFFF or len(protocol) > 0xFFFF:
            raise DcepError("label or protocol longer than 65535 bytes")
        if self.max_retransmits is not None:
            reliability = self.max_retransmits
        elif self.lifetime_ms is not None:
            reliability = self.lifetime_ms
        else:
            reliability = 0
        return (
            _OPEN_HEADER.pack(
                OPEN,
                self.channel_type,
                self.priority & 0xFFFF,
                reliability & 0xFFFFFFFF,
                len(label),
                len(protocol),
            )
            + label
            + protocol
        )

    @classmethod
    def parse(cls, data: bytes) -> ChannelOpen:
        if len(data) < _OPEN_HEADER.size:
            raise DcepError("DATA_CHANNEL_OPEN shorter than 12 bytes")
        message, kind, priority, reliability, label_len, protocol_len = _OPEN_HEADER.unpack_from(
            data
        )
        if message != OPEN:
            raise DcepError(f"not a DATA_CHANNEL_OPEN (message type {message:#04x})")
        if kind not in _TYPES:
            raise DcepError(f"unknown channel type {kind:#04x}")
        end = _OPEN_HEADER.size + label_len + protocol_len
        if len(data) < end:
            raise DcepError("label or protocol longer than the message")
        try:
            label = data[_OPEN_HEADER.size : _OPEN_HEADER.size + label_len].decode()
            protocol = data[_OPEN_HEADER.size + label_len : end].decode()
        except UnicodeDecodeError:
            raise DcepError("label or protocol is not UTF-8") from None
        reliable_kind = kind & 0x7F
        return cls(
            label=label,
            protocol=protocol,
            ordered=not kind & CHANNEL_UNORDERED,
            max_retransmits=reliability
            if reliable_kind == CHANNEL_PARTIAL_RELIABLE_REXMIT
            else None,
            lifetime_ms=reliability if reliable_kind == CHANNEL_PARTIAL_RELIABLE_TIMED else None,
            priority=priority,
        )


def encode_ack() -> bytes:
    """DATA_CHANNEL_ACK."""
    return bytes([ACK])


def message_type(data: bytes) -> int | None:
    """The DCEP message type of a PPID-50 payload, None when empty."""
    return data[0] if data else None


def ppid_for(data: bytes, binary: bool) -> int:
    """The PPID of a user message: empty messages use 56/57 with a one-byte body (RFC 8831
    §6.6) because SCTP cannot carry an empty DATA chunk."""
    if binary:
        return PPID_BINARY if data else PPID_BINARY_EMPTY
    return PPID_STRING if data else PPID_STRING_EMPTY


def payload_of(ppid: int, data: bytes) -> bytes:
    """The user payload of a received message: the empty PPIDs carry one ignored byte."""
    if ppid in (PPID_STRING_EMPTY, PPID_BINARY_EMPTY):
        return b""
    return data


def wire_payload(ppid: int, data: bytes) -> bytes:
    """What goes into the DATA chunk for a user message (one zero byte for an empty one)."""
    if ppid in (PPID_STRING_EMPTY, PPID_BINARY_EMPTY):
        return b"\x00"
    return data
