"""DCEP (RFC 8832) messages and the PPIDs of RFC 8831, with bytes."""

from __future__ import annotations

import pytest

from relay.rtc import dcep
from relay.rtc.dcep import ChannelOpen, DcepError


def test_open_reliable_ordered_bytes() -> None:
    data = ChannelOpen("chat").encode()
    # type 0x03, channel type 0x00, priority 256, reliability 0, label 4, protocol 0
    assert data == bytes.fromhex("03 00 0100 00000000 0004 0000") + b"chat"
    assert ChannelOpen.parse(data) == ChannelOpen("chat")


def test_open_partial_reliability_and_unordered() -> None:
    rexmit = ChannelOpen("r", "to:bob", ordered=False, max_retransmits=0)
    data = rexmit.encode()
    assert data[1] == 0x81 and data[4:8] == b"\0\0\0\0"
    assert data[12:] == b"rto:bob"
    assert ChannelOpen.parse(data) == rexmit
    timed = ChannelOpen("t", ordered=True, lifetime_ms=1500, priority=512)
    data = timed.encode()
    assert data[1] == 0x02 and int.from_bytes(data[4:8], "big") == 1500
    assert data[2:4] == (512).to_bytes(2, "big")
    assert ChannelOpen.parse(data) == timed
    assert ChannelOpen.parse(ChannelOpen("u", ordered=False).encode()).channel_type == 0x80


def test_open_utf8_label() -> None:
    opened = ChannelOpen("bavardage \u00e9t\u00e9", "from:\u00e5")
    assert ChannelOpen.parse(opened.encode()) == opened


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x03\x00",
        bytes.fromhex("02 00 0100 00000000 0000 0000"),  # an ACK is not an OPEN
        bytes.fromhex("03 07 0100 00000000 0000 0000"),  # unknown channel type
        bytes.fromhex("03 00 0100 00000000 0005 0000") + b"abc",  # label past the end
        bytes.fromhex("03 00 0100 00000000 0002 0000") + b"\xff\xfe",  # not UTF-8
    ],
)
def test_malformed_open(data: bytes) -> None:
    with pytest.raises(DcepError):
        ChannelOpen.parse(data)


def test_ack_and_message_type() -> None:
    assert dcep.encode_ack() == b"\x02"
    assert dcep.message_type(dcep.encode_ack()) == dcep.ACK
    assert dcep.message_type(ChannelOpen("x").encode()) == dcep.OPEN
    assert dcep.message_type(b"") is None


def test_ppids_and_empty_messages() -> None:
    assert (dcep.PPID_DCEP, dcep.PPID_STRING, dcep.PPID_BINARY) == (50, 51, 53)
    assert (dcep.PPID_STRING_EMPTY, dcep.PPID_BINARY_EMPTY) == (56, 57)
    assert dcep.ppid_for(b"hi", binary=False) == 51
    assert dcep.ppid_for(b"", binary=False) == 56
    assert dcep.ppid_for(b"\0", binary=True) == 53
    assert dcep.ppid_for(b"", binary=True) == 57
    # an empty message travels as one byte (SCTP has no empty DATA chunk)
    assert dcep.wire_payload(56, b"") == b"\0"
    assert dcep.payload_of(56, b"\0") == b"" and dcep.payload_of(51, b"x") == b"x"
