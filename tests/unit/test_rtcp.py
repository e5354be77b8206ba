"""RTCP parsing and building."""

from __future__ import annotations

import random

import pytest

from relay.rtc import rtcp
from relay.rtc.rtcp import (
    Bye,
    Fir,
    Nack,
    Pli,
    ReceiverReport,
    Remb,
    ReportBlock,
    RtcpError,
    Sdes,
    SenderReport,
    TransportFeedback,
    UnknownRtcp,
    parse_rtcp,
    serialize,
)

# RFC 3550 §6.4.1 SR with one report block, written out by hand.
SR_BYTES = bytes.fromhex(
    "81c8000c"  # V=2 P=0 RC=1, PT=200, length 12 words
    "01020304"  # SSRC of sender
    "e1234567"  # NTP timestamp, most significant word
    "89abcdef"  # NTP timestamp, least significant word
    "11111111"  # RTP timestamp
    "0000000a"  # sender's packet count
    "000007d0"  # sender's octet count (2000)
    "0a0b0c0d"  # SSRC_1
    "40000005"  # fraction lost 0x40, cumulative lost 5
    "00010005"  # extended highest sequence number
    "0000000c"  # jitter 12
    "45678989"  # LSR
    "00008000"  # DLSR (0.5 s)
)

# RFC 4585 §6.3.1 PLI: V=2 P=0 FMT=1, PT=206, length 2.
PLI_BYTES = bytes.fromhex("81ce0002aabbccdd11223344")


def test_sr_known_bytes() -> None:
    block = ReportBlock(0x0A0B0C0D, 0x40, 5, 0x00010005, 12, 0x45678989, 0x8000)
    built = rtcp.sender_report(0x01020304, 0xE123456789ABCDEF, 0x11111111, 10, 2000, [block])
    assert built == SR_BYTES
    assert parse_rtcp(SR_BYTES) == [
        SenderReport(0x01020304, 0xE123456789ABCDEF, 0x11111111, 10, 2000, [block])
    ]


def test_pli_known_bytes() -> None:
    assert rtcp.pli(0xAABBCCDD, 0x11223344) == PLI_BYTES
    assert Pli(0xAABBCCDD, 0x11223344).to_bytes() == PLI_BYTES
    assert parse_rtcp(PLI_BYTES) == [Pli(0xAABBCCDD, 0x11223344)]


def test_rr_round_trip_and_negative_loss() -> None:
    blocks = [
        ReportBlock(1, 255, -3, 0xFFFFFFFF, 0, 0, 0),
        ReportBlock(2, 0, 0x7FFFFF, 7, 99, 1, 2),
    ]
    data = rtcp.receiver_report(0x99, blocks)
    assert len(data) == 8 + 48
    assert data[:4] == bytes([0x82, 201, 0, 13])
    assert parse_rtcp(data) == [ReceiverReport(0x99, blocks)]
    # out-of-range cumulative loss is clamped to 24-bit signed
    data = rtcp.receiver_report(1, [ReportBlock(5, packets_lost=10**9)])
    (rr,) = parse_rtcp(data)
    assert isinstance(rr, ReceiverReport) and rr.reports[0].packets_lost == 0x7FFFFF
    data = rtcp.receiver_report(1, [ReportBlock(5, packets_lost=-(10**9))])
    assert parse_rtcp(data)[0].reports[0].packets_lost == -0x800000  # type: ignore[union-attr]


def test_empty_rr() -> None:
    data = rtcp.receiver_report(0x1234, [])
    assert data == bytes.fromhex("80c9000100001234")
    assert parse_rtcp(data) == [ReceiverReport(0x1234, [])]


def test_too_many_report_blocks() -> None:
    with pytest.raises(RtcpError):
        rtcp.receiver_report(1, [ReportBlock(i) for i in range(32)])


def test_fir_round_trip() -> None:
    data = rtcp.fir(0x01, 0x02, 0x1FF)
    assert data == bytes.fromhex("84ce0004000000010000000000000002ff000000")
    assert parse_rtcp(data) == [Fir(1, [(2, 0xFF)])]
    multi = Fir(7, [(1, 2), (3, 4)])
    assert parse_rtcp(multi.to_bytes()) == [multi]


def test_nack_known_bytes_and_round_trip() -> None:
    data = rtcp.nack(0x10, 0x20, [100, 101, 103, 116])
    # PID 100, BLP bits for 101 (bit 0), 103 (bit 2), 116 (bit 15)
    assert data == bytes.fromhex("81cd0003000000100000002000648005")
    assert parse_rtcp(data) == [Nack(0x10, 0x20, [100, 101, 103, 116])]


def test_nack_across_sequence_wrap() -> None:
    lost = [65530, 65534, 65535, 0, 1, 10, 11, 30]
    data = rtcp.nack(1, 2, lost)
    fci = data[12:]
    # PID 65530 covers up to 65530+16 = 10 (wrapped); 11 and 30 need new pairs
    assert fci == bytes.fromhex("fffa8078000b0000001e0000")
    assert parse_rtcp(data) == [Nack(1, 2, lost)]


def test_nack_dedup_and_many() -> None:
    data = rtcp.nack(1, 2, [5, 5, 6])
    assert parse_rtcp(data) == [Nack(1, 2, [5, 6])]
    lost = [(60000 + 3 * i) & 0xFFFF for i in range(2000)]
    (packet,) = parse_rtcp(rtcp.nack(1, 2, lost))
    assert isinstance(packet, Nack) and packet.lost == lost


def test_remb_known_bytes() -> None:
    data = rtcp.remb(0x01020304, 1_000_000, [0xAAAAAAAA, 0xBBBBBBBB])
    # 1_000_000 = 250000 << 2: exponent 2, mantissa 250000 (0x3D090)
    assert data == bytes.fromhex("8fce0006010203040000000052454d42020bd090aaaaaaaabbbbbbbb")
    assert parse_rtcp(data) == [Remb(0x01020304, 1_000_000, [0xAAAAAAAA, 0xBBBBBBBB])]


@pytest.mark.parametrize("bitrate", [0, 1, 0x3FFFF, 0x40000, 2_500_000, 123_456_789, 10**12])
def test_remb_mantissa_exponent_round_trip(bitrate: int) -> None:
    (packet,) = parse_rtcp(rtcp.remb(9, bitrate, [1]))
    assert isinstance(packet, Remb)
    assert packet.ssrcs == [1]
    # rounded down to 18 significant bits
    assert packet.bitrate <= bitrate
    assert bitrate - packet.bitrate < max(1, bitrate >> 17)
    if bitrate <= 0x3FFFF:
        assert packet.bitrate == bitrate
    # encoding the decoded value is exact
    assert parse_rtcp(rtcp.remb(9, packet.bitrate, [1]))[0].bitrate == packet.bitrate  # type: ignore[union-attr]


def test_remb_out_of_range() -> None:
    with pytest.raises(RtcpError):
        rtcp.remb(1, 1 << 90, [])
    with pytest.raises(RtcpError):
        rtcp.remb(1, -1, [])


def test_sdes_cname() -> None:
    data = rtcp.sdes_cname(0x11223344, "abc")
    # chunk: SSRC, CNAME item (type 1, len 3, "abc"), null terminator, padded to 32 bits
    assert data == bytes.fromhex("81ca0003112233440103616263000000")
    assert parse_rtcp(data) == [Sdes([(0x11223344, [(1, b"abc")])])]
    # aligned item: still needs a full word of nulls
    data = rtcp.sdes_cname(1, "ab")
    assert len(data) % 4 == 0
    assert parse_rtcp(data) == [Sdes([(1, [(1, b"ab")])])]


def test_sdes_multiple_chunks() -> None:
    sdes = Sdes([(1, [(1, b"cname-one"), (6, b"tool")]), (2, []), (3, [(1, b"x" * 255)])])
    assert parse_rtcp(sdes.to_bytes()) == [sdes]


def test_bye() -> None:
    data = rtcp.bye([1, 2])
    assert data == bytes.fromhex("82cb00020000000100000002")
    assert parse_rtcp(data) == [Bye([1, 2])]
    with_reason = Bye([5], b"bye now")
    assert parse_rtcp(with_reason.to_bytes()) == [with_reason]


def test_transport_feedback_raw_and_padding() -> None:
    fci = bytes.fromhex("0001000a00000100200104")  # 11 bytes: needs 1 byte padding
    data = rtcp.transport_feedback(0xA, 0xB, fci)
    assert len(data) % 4 == 0
    assert data[0] == 0x80 | 0x20 | 15 and data[1] == 205
    assert data[-1] == 1
    (packet,) = parse_rtcp(data)
    assert isinstance(packet, TransportFeedback)
    assert (packet.sender_ssrc, packet.media_ssrc) == (0xA, 0xB)
    assert packet.raw == data
    assert packet.fci == fci
    assert packet.to_bytes() == data
    aligned = rtcp.transport_feedback(1, 2, b"\x00\x01\x02\x03")
    assert parse_rtcp(aligned)[0].fci == b"\x00\x01\x02\x03"  # type: ignore[union-attr]


def test_unknown_packets_are_kept_raw() -> None:
    app = bytes.fromhex("81cc0003000000014e414d45deadbeef")  # APP
    xr = bytes.fromhex("80cf00020000000100000000")  # XR
    psfb_other = bytes.fromhex("82ce00020000000100000002")  # SLI
    afb_other = bytes.fromhex("8fce0003000000010000000041424344")
    packets = parse_rtcp(app + xr + psfb_other + afb_other)
    assert packets == [
        UnknownRtcp(204, 1, app),
        UnknownRtcp(207, 0, xr),
        UnknownRtcp(206, 2, psfb_other),
        UnknownRtcp(206, 15, afb_other),
    ]
    assert serialize(packets) == app + xr + psfb_other + afb_other


def test_compound_sr_sdes_pli() -> None:
    block = ReportBlock(0x0A0B0C0D, 0x40, 5, 0x00010005, 12, 0x45678989, 0x8000)
    packets = [
        SenderReport(0x01020304, 0xE123456789ABCDEF, 0x11111111, 10, 2000, [block]),
        Sdes([(0x01020304, [(1, b"relay")])]),
        Pli(0xAABBCCDD, 0x11223344),
    ]
    data = serialize(packets)
    assert data == SR_BYTES + rtcp.sdes_cname(0x01020304, "relay") + PLI_BYTES
    assert parse_rtcp(data) == packets


def test_padding_on_last_packet() -> None:
    # RR with 4 bytes of padding (P bit set, count in the last byte)
    data = bytes.fromhex("a0c900020000123400000004")
    assert parse_rtcp(rtcp.pli(1, 2) + data) == [Pli(1, 2), ReceiverReport(0x1234, [])]


def test_every_builder_parses_back() -> None:
    block = ReportBlock(3, 1, 2, 3, 4, 5, 6)
    cases = [
        (rtcp.sender_report(1, 2, 3, 4, 5), SenderReport(1, 2, 3, 4, 5, [])),
        (rtcp.sender_report(1, 2, 3, 4, 5, [block]), SenderReport(1, 2, 3, 4, 5, [block])),
        (rtcp.receiver_report(1, [block]), ReceiverReport(1, [block])),
        (rtcp.pli(1, 2), Pli(1, 2)),
        (rtcp.fir(1, 2, 3), Fir(1, [(2, 3)])),
        (rtcp.nack(1, 2, [7]), Nack(1, 2, [7])),
        (rtcp.remb(1, 300_000, [2]), Remb(1, 300_000, [2])),
        (rtcp.bye([1]), Bye([1])),
        (rtcp.sdes_cname(1, "c"), Sdes([(1, [(1, b"c")])])),
    ]
    for data, expected in cases:
        assert len(data) % 4 == 0
        assert parse_rtcp(data) == [expected]
        assert expected.to_bytes() == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\xc9\x00",
        bytes.fromhex("00c9000100001234"),  # version 0
        bytes.fromhex("c0c9000100001234"),  # version 3
        bytes.fromhex("80c9000200001234"),  # length overruns the datagram
        bytes.fromhex("81c9000100001234"),  # RC=1 but no report block
        bytes.fromhex("80c8000100001234"),  # SR without sender info
        bytes.fromhex("80c90000"),  # RR without SSRC
        bytes.fromhex("a0c9000100001200"),  # padding count 0
        bytes.fromhex("a0c9000100001209"),  # padding larger than the packet
        bytes.fromhex("81ce000100000001"),  # PLI too short
        bytes.fromhex("81ca000100000001"),  # SDES chunk without terminator
        bytes.fromhex("81ca0002000000010109abcd"),  # SDES item overruns
        bytes.fromhex("82cb000100000001"),  # BYE count overruns
        bytes.fromhex("81cb00020000000105616263"),  # BYE reason overruns
        bytes.fromhex("8fce0004000000010000000052454d4202000001"),  # REMB ssrcs
        rtcp.pli(1, 2) + b"\x80\xc9",  # trailing garbage
    ],
)
def test_malformed_raises(data: bytes) -> None:
    with pytest.raises(RtcpError):
        parse_rtcp(data)


def test_rtcp_error_is_value_error() -> None:
    assert issubclass(RtcpError, ValueError)


def _valid_compound() -> bytes:
    block = ReportBlock(1, 2, 3, 4, 5, 6, 7)
    return b"".join(
        [
            rtcp.sender_report(1, 2, 3, 4, 5, [block, block]),
            rtcp.sdes_cname(1, "someone@example"),
            rtcp.nack(1, 2, [1, 2, 40]),
            rtcp.remb(1, 1_000_000, [2, 3]),
            rtcp.fir(1, 2, 3),
            rtcp.bye([1], b"done"),
            rtcp.transport_feedback(1, 2, b"\x01\x02\x03"),
        ]
    )


def test_fuzz_random_bytes_only_rtcp_error() -> None:
    rng = random.Random(42)
    for _ in range(20000):
        data = bytearray(rng.randbytes(rng.randrange(0, 64)))
        if data and rng.random() < 0.7:
            data[0] = 0x80 | (data[0] & 0x3F)
            if len(data) > 1 and rng.random() < 0.8:
                data[1] = rng.randrange(200, 208)
            if len(data) > 3 and rng.random() < 0.8:
                data[2] = 0
                data[3] = rng.randrange(0, len(data) // 4 + 1)
        try:
            packets = parse_rtcp(bytes(data))
        except RtcpError:
            continue
        serialize(packets)


def test_fuzz_mutated_compound_only_rtcp_error() -> None:
    rng = random.Random(7)
    valid = _valid_compound()
    assert len(parse_rtcp(valid)) == 7
    accepted = 0
    for _ in range(20000):
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        try:
            packets = parse_rtcp(bytes(data))
        except RtcpError:
            continue
        accepted += 1
        for packet in packets:
            try:
                packet.to_bytes()
            except RtcpError:
                pass  # e.g. a REMB whose decoded bitrate no longer fits
    assert accepted > 100


def test_ntp_from_unix() -> None:
    assert rtcp.ntp_from_unix(0.0) == 2_208_988_800 << 32
    assert rtcp.ntp_from_unix(1.5) == ((2_208_988_800 + 1) << 32) | 0x80000000
    t = 1_700_000_000.25
    ntp = rtcp.ntp_from_unix(t)
    assert ntp >> 32 == 1_700_000_000 + 2_208_988_800
    assert ntp & 0xFFFFFFFF == 0x40000000
    assert rtcp.unix_from_ntp(ntp) == pytest.approx(t, abs=1e-6)
    assert rtcp.ntp_middle32(0x0123456789ABCDEF) == 0x456789AB
