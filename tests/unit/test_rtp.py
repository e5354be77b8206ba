"""RTP primitives: parsing, header extensions, rewriting, seq/ts continuity, receive stats."""

from __future__ import annotations

import random
import struct

import pytest

from relay.rtc.rtp import (
    ONE_BYTE_PROFILE,
    TWO_BYTE_PROFILE,
    ExtensionRewriter,
    ReceiveStatistics,
    RtpError,
    SequenceRewriter,
    build_extension_block,
    extension_profile,
    is_rtcp,
    padding_length,
    parse_extensions,
    parse_rtp,
    rewrite_packet,
)
from relay.rtc.twcc import write_transport_seq


def make_packet(
    *,
    pt: int = 96,
    seq: int = 1000,
    ts: int = 123456,
    ssrc: int = 0x11223344,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    ext: tuple[int, bytes] | None = None,  # (profile, element bytes incl. padding)
    payload: bytes = b"payload!",
    padding: int = 0,
) -> bytes:
    """An RTP packet written field by field from the RFC 3550 layout."""
    b0 = 0x80 | len(csrcs)
    if padding:
        b0 |= 0x20
    if ext is not None:
        b0 |= 0x10
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq, ts, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrcs)
    if ext is not None:
        profile, body = ext
        assert len(body) % 4 == 0
        out += struct.pack("!HH", profile, len(body) // 4) + body
    out += payload
    if padding:
        out += b"\x00" * (padding - 1) + bytes([padding])
    return out


# --- is_rtcp / parse_rtp ----------------------------------------------------------------------


def test_is_rtcp() -> None:
    assert is_rtcp(bytes([0x80, 200, 0, 6]))  # SR
    assert is_rtcp(bytes([0x81, 206, 0, 2]))  # PSFB
    assert is_rtcp(bytes([0x80, 223]))
    assert not is_rtcp(bytes([0x80, 224]))
    assert not is_rtcp(make_packet(pt=96))
    assert not is_rtcp(make_packet(pt=111, marker=True))
    assert not is_rtcp(make_packet(pt=0))
    assert not is_rtcp(b"\x80")


def test_parse_minimal() -> None:
    data = make_packet(pt=111, seq=65535, ts=0xFFFFFFFF, ssrc=0xDEADBEEF, marker=True)
    pt, seq, ts, ssrc, marker, off, ext_off, ext_len = parse_rtp(data)
    assert (pt, seq, ts, ssrc, marker) == (111, 65535, 0xFFFFFFFF, 0xDEADBEEF, True)
    assert off == 12 and data[off:] == b"payload!"
    assert (ext_off, ext_len) == (0, 0)
    assert extension_profile(data) == 0
    assert padding_length(data) == 0


def test_parse_accepts_bytearray_and_memoryview() -> None:
    data = make_packet(csrcs=(1,))
    assert parse_rtp(bytearray(data)) == parse_rtp(data) == parse_rtp(memoryview(data))


def test_parse_with_csrcs() -> None:
    data = make_packet(csrcs=(1, 2, 3), marker=False)
    pt, seq, ts, ssrc, marker, off, ext_off, ext_len = parse_rtp(data)
    assert (pt, seq, ts, ssrc, marker) == (96, 1000, 123456, 0x11223344, False)
    assert off == 12 + 12
    assert data[off:] == b"payload!"
    assert (ext_off, ext_len) == (0, 0)


def test_parse_one_byte_extension() -> None:
    # id 1 len 1 (audio level), id 3 len 3 (abs-send-time), padding byte, id 4 len 1
    body = bytes([0x10, 0x85, 0x32, 1, 2, 3, 0x00, 0x40, 0x07]) + b"\x00" * 3
    data = make_packet(csrcs=(9,), ext=(ONE_BYTE_PROFILE, body))
    *_, off, ext_off, ext_len = parse_rtp(data)
    assert ext_off == 12 + 4 + 4
    assert ext_len == 12
    assert off == ext_off + 12
    assert data[off:] == b"payload!"
    assert extension_profile(data) == ONE_BYTE_PROFILE
    assert parse_extensions(data, ext_off, ext_len, ONE_BYTE_PROFILE) == [
        (1, b"\x85"),
        (3, b"\x01\x02\x03"),
        (4, b"\x07"),
    ]


def test_parse_two_byte_extension() -> None:
    # id 1 len 0, id 200 len 3, padding, id 15 len 17
    body = bytes([1, 0, 200, 3, 7, 8, 9, 0, 15, 17]) + bytes(range(17))
    body += b"\x00" * (-len(body) % 4)
    for profile in (0x1000, 0x100F):
        data = make_packet(ext=(profile, body), payload=b"xyz")
        *_, off, ext_off, ext_len = parse_rtp(data)
        assert extension_profile(data) == TWO_BYTE_PROFILE
        assert data[off:] == b"xyz"
        assert parse_extensions(data, ext_off, ext_len, TWO_BYTE_PROFILE) == [
            (1, b""),
            (200, b"\x07\x08\x09"),
            (15, bytes(range(17))),
        ]


def test_unknown_extension_profile() -> None:
    data = make_packet(ext=(0xABCD, b"\x12\x34\x56\x78"))
    *_, off, ext_off, ext_len = parse_rtp(data)
    assert (ext_off, ext_len) == (16, 4)
    assert off == 20
    assert extension_profile(data) == 0
    assert parse_extensions(data, ext_off, ext_len, 0) == []


def test_parse_empty_extension() -> None:
    data = make_packet(ext=(ONE_BYTE_PROFILE, b""))
    *_, off, ext_off, ext_len = parse_rtp(data)
    assert (off, ext_off, ext_len) == (16, 16, 0)
    assert parse_extensions(data, ext_off, ext_len, ONE_BYTE_PROFILE) == []


def test_parse_padding() -> None:
    data = make_packet(payload=b"abcd", padding=5)
    *_, off, _, _ = parse_rtp(data)
    assert padding_length(data) == 5
    assert data[off : len(data) - padding_length(data)] == b"abcd"
    # padding-only packet (as used for bandwidth probing)
    data = make_packet(payload=b"", padding=255)
    *_, off, _, _ = parse_rtp(data)
    assert off == 12 and padding_length(data) == 255


def test_one_byte_id_15_stops_processing() -> None:
    body = bytes([0x10, 0xAA, 0xF3, 0x20, 0xBB, 0x00])
    body += b"\x00" * (-len(body) % 4)
    data = make_packet(ext=(ONE_BYTE_PROFILE, body))
    *_, ext_off, ext_len = parse_rtp(data)
    assert parse_extensions(data, ext_off, ext_len, ONE_BYTE_PROFILE) == [(1, b"\xaa")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x60\x00",
        bytes(11),
        make_packet()[:11],
        b"\x00" + make_packet()[1:],  # version 0
        b"\x40" + make_packet()[1:],  # version 1
        b"\xc0" + make_packet()[1:],  # version 3
        b"\x8f" + make_packet(payload=b"")[1:] + bytes(56),  # 15 CSRCs, 56 bytes present
        b"\x90" + make_packet(payload=b"")[1:] + b"\xbe\xde",  # extension header cut
        b"\x90" + make_packet(payload=b"")[1:] + b"\xbe\xde\x00\x02" + bytes(7),
        make_packet(payload=b"ab", padding=3)[:-1] + b"\x00",  # padding count 0
        make_packet(payload=b"ab", padding=3)[:-1] + b"\x06",  # padding beyond the payload
        make_packet(csrcs=(1,), payload=b"", padding=1)[:-1] + b"\x02",  # padding into header
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(RtpError):
        parse_rtp(data)


def test_rtp_error_is_value_error() -> None:
    assert issubclass(RtpError, ValueError)


def test_truncations_raise_only_rtp_error() -> None:
    body = bytes([0x10, 0x85, 0x32, 1, 2, 3, 0x00, 0x40, 0x07]) + b"\x00" * 3
    full = make_packet(csrcs=(7, 8), ext=(ONE_BYTE_PROFILE, body), payload=b"p" * 20, padding=4)
    for cut in range(len(full)):
        data = full[:cut]
        try:
            result = parse_rtp(data)
        except RtpError:
            continue
        *_, off, ext_off, ext_len = result
        assert off <= len(data)
        parse_extensions(data, ext_off, ext_len, extension_profile(data))


def test_fuzz_only_rtp_error() -> None:
    rng = random.Random(1234)
    accepted = 0
    for _ in range(20000):
        n = rng.randrange(0, 80)
        data = bytearray(rng.randbytes(n))
        if n and rng.random() < 0.7:
            data[0] = 0x80 | (data[0] & 0x3F)  # mostly version 2 to get past the first check
        data = bytes(data)
        try:
            result = parse_rtp(data)
        except RtpError:
            continue
        accepted += 1
        *_, off, ext_off, ext_len = result
        assert 12 <= off <= len(data)
        try:
            parse_extensions(data, ext_off, ext_len, extension_profile(data))
            for profile in (ONE_BYTE_PROFILE, TWO_BYTE_PROFILE):
                parse_extensions(data, ext_off, ext_len, profile)
        except RtpError:
            pass
    assert accepted > 100


def test_fuzz_extension_blocks_only_rtp_error() -> None:
    rng = random.Random(99)
    for _ in range(20000):
        block = rng.randbytes(rng.randrange(0, 24))
        profile = rng.choice((ONE_BYTE_PROFILE, TWO_BYTE_PROFILE))
        try:
            elements = parse_extensions(block, 0, len(block), profile)
        except RtpError:
            continue
        assert sum(len(v) for _, v in elements) <= len(block)


def test_parse_extensions_overrun() -> None:
    with pytest.raises(RtpError):
        parse_extensions(bytes([0x13, 1, 2, 0]), 0, 4, ONE_BYTE_PROFILE)  # needs 4 value bytes
    with pytest.raises(RtpError):
        parse_extensions(bytes([5, 3, 1, 2]), 0, 4, TWO_BYTE_PROFILE)
    with pytest.raises(RtpError):
        parse_extensions(bytes([0, 0, 0, 5]), 0, 4, TWO_BYTE_PROFILE)  # header cut at the end
    with pytest.raises(RtpError):
        parse_extensions(bytes(4), 2, 4, ONE_BYTE_PROFILE)  # block beyond the data


# --- build_extension_block ---------------------------------------------------------------------


def test_build_one_byte_block_bytes() -> None:
    block = build_extension_block([(1, b"\x85"), (3, b"\x01\x02\x03")])
    assert block == bytes([0xBE, 0xDE, 0x00, 0x02, 0x10, 0x85, 0x32, 1, 2, 3, 0, 0])
    block = build_extension_block([(14, bytes(16))])
    assert block[:4] == bytes([0xBE, 0xDE, 0x00, 0x05]) and block[4] == 0xEF
    assert len(block) == 4 + 20


@pytest.mark.parametrize(
    "elements",
    [
        [(15, b"x")],  # id needs the two-byte form
        [(1, b"")],  # empty value
        [(2, bytes(17))],  # value longer than 16
        [(1, b"a"), (255, b"bc")],
    ],
)
def test_build_two_byte_block(elements: list[tuple[int, bytes]]) -> None:
    block = build_extension_block(elements)
    assert block[:2] == b"\x10\x00"
    assert len(block) % 4 == 0
    assert struct.unpack("!H", block[2:4])[0] * 4 == len(block) - 4
    assert parse_extensions(block, 4, len(block) - 4, TWO_BYTE_PROFILE) == elements


def test_build_two_byte_block_bytes() -> None:
    assert build_extension_block([(20, b"\x07")]) == bytes([0x10, 0x00, 0x00, 0x01, 20, 1, 7, 0])


def test_build_empty_and_invalid() -> None:
    assert build_extension_block([]) == b""
    with pytest.raises(RtpError):
        build_extension_block([(256, b"x")])
    with pytest.raises(RtpError):
        build_extension_block([(0, b"x")])
    with pytest.raises(RtpError):
        build_extension_block([(3, bytes(256))])


def test_build_parse_round_trip_random() -> None:
    rng = random.Random(5)
    for _ in range(500):
        elements = [
            (rng.randrange(1, 15), rng.randbytes(rng.randrange(1, 17)))
            for _ in range(rng.randrange(1, 6))
        ]
        if rng.random() < 0.3:
            elements.append((rng.randrange(1, 256), rng.randbytes(rng.randrange(0, 40))))
        block = build_extension_block(elements)
        profile = struct.unpack("!H", block[:2])[0]
        assert parse_extensions(block, 4, len(block) - 4, profile) == elements


# --- rewrite_packet ----------------------------------------------------------------------------


def test_rewrite_keeps_payload_and_bits() -> None:
    body = bytes([0x10, 0x85, 0x32, 1, 2, 3, 0x00, 0x40, 0x07]) + b"\x00" * 3
    payload = bytes(range(256)) * 4
    src = make_packet(
        pt=100, marker=True, csrcs=(5, 6), ext=(ONE_BYTE_PROFILE, body), payload=payload, padding=3
    )
    *_, off, ext_off, ext_len = parse_rtp(src)
    new_block = build_extension_block([(2, b"\x99")])
    out = rewrite_packet(src, off, 0xCAFEBABE, 111, 7, 0xFFFFFFFF, new_block)
    assert isinstance(out, bytes)
    pt, seq, ts, ssrc, marker, out_off, out_ext_off, out_ext_len = parse_rtp(out)
    assert (pt, seq, ts, ssrc, marker) == (111, 7, 0xFFFFFFFF, 0xCAFEBABE, True)
    assert out[0] & 0x0F == 0  # CSRCs dropped
    assert out[0] & 0x20  # padding kept
    assert out[out_off:] == src[off:]  # payload and padding byte for byte
    assert padding_length(out) == 3
    assert out_ext_off == 16 and out_ext_len == len(new_block) - 4
    assert parse_extensions(out, out_ext_off, out_ext_len, extension_profile(out)) == [(2, b"\x99")]


def test_rewrite_without_extension_clears_x() -> None:
    src = make_packet(ext=(ONE_BYTE_PROFILE, bytes([0x10, 1, 0, 0])), marker=False)
    *_, off, _, _ = parse_rtp(src)
    out = rewrite_packet(src, off, 1, 96, 2, 3, b"")
    assert out == struct.pack("!BBHII", 0x80, 96, 2, 3, 1) + b"payload!"
    assert parse_rtp(out)[5:] == (12, 0, 0)


def test_rewrite_identity_when_nothing_changes() -> None:
    src = make_packet(pt=96, seq=5, ts=6, ssrc=7, marker=True)
    assert rewrite_packet(src, 12, 7, 96, 5, 6, b"") == src


# --- ExtensionRewriter -------------------------------------------------------------------------


def test_extension_rewriter_remaps_and_replaces_mid() -> None:
    # Publisher: 1 audio-level, 3 abs-send-time, 4 mid, 9 something the subscriber lacks.
    elements = [(1, b"\x85"), (4, b"0"), (3, b"\x01\x02\x03"), (9, b"zz")]
    body = build_extension_block(elements)
    src = make_packet(ext=(ONE_BYTE_PROFILE, body[4:]), payload=b"opus" * 10)
    *_, off, ext_off, ext_len = parse_rtp(src)
    parsed = parse_extensions(src, ext_off, ext_len, extension_profile(src))
    assert parsed == elements

    # Subscriber: audio-level at 5, abs-send-time at 2, mid at 7 (publisher's mid mapped too).
    rewriter = ExtensionRewriter({1: 5, 3: 2, 4: 7}, mid_id=7, mid="audio-sub-42")
    block = rewriter.block(parsed)
    out = rewrite_packet(src, off, 42, 111, 1, 2, block)
    *_, out_off, out_ext_off, out_ext_len = parse_rtp(out)
    assert out[out_off:] == b"opus" * 10
    assert parse_extensions(out, out_ext_off, out_ext_len, extension_profile(out)) == [
        (5, b"\x85"),
        (2, b"\x01\x02\x03"),
        (7, b"audio-sub-42"),
    ]


def test_extension_rewriter_publisher_mid_id() -> None:
    rewriter = ExtensionRewriter({1: 1, 4: 4}, mid_id=3, mid="1", publisher_mid_id=4)
    block = rewriter.block([(4, b"video0"), (1, b"\x10")])
    assert parse_extensions(block, 4, len(block) - 4, ONE_BYTE_PROFILE) == [(1, b"\x10"), (3, b"1")]


def test_extension_rewriter_long_mid_uses_two_byte_form() -> None:
    rewriter = ExtensionRewriter({2: 2}, mid_id=1, mid="a-mid-longer-than-16")
    block = rewriter.block([(2, b"\x01\x02\x03")])
    assert block[:2] == b"\x10\x00"
    assert parse_extensions(block, 4, len(block) - 4, TWO_BYTE_PROFILE) == [
        (2, b"\x01\x02\x03"),
        (1, b"a-mid-longer-than-16"),
    ]


def test_extension_rewriter_without_mid_and_extra() -> None:
    rewriter = ExtensionRewriter({1: 1}, mid_id=None, mid=None)
    assert rewriter.block([(9, b"x")]) == b""
    assert rewriter.block([]) == b""
    block = rewriter.block([(1, b"\x05")], extra=[(6, b"\x00\x07")])
    assert parse_extensions(block, 4, len(block) - 4, ONE_BYTE_PROFILE) == [
        (1, b"\x05"),
        (6, b"\x00\x07"),
    ]
    only_mid = ExtensionRewriter({}, mid_id=2, mid="v")
    assert only_mid.block([(1, b"x")]) == build_extension_block([(2, b"v")])


# --- SequenceRewriter --------------------------------------------------------------------------


def test_sequence_first_packet_uses_initial_values() -> None:
    rw = SequenceRewriter(90000, initial_seq=100, initial_ts=5000)
    assert rw.rewrite(40000, 1_000_000, 0.0) == (100, 5000)
    assert rw.rewrite(40001, 1_003_000, 0.033) == (101, 8000)


def test_sequence_random_initial_values() -> None:
    rw = SequenceRewriter(48000)
    seq, ts = rw.rewrite(1, 2, 0.0)  # type: ignore[misc]
    assert 0 <= seq <= 0xFFFF and 0 <= ts <= 0xFFFFFFFF


def test_sequence_input_wraparound() -> None:
    rw = SequenceRewriter(90000, initial_seq=10, initial_ts=0)
    outs = [rw.rewrite(s, 1000 * i, 0.0) for i, s in enumerate((65534, 65535, 0, 1))]
    assert outs == [(10, 0), (11, 1000), (12, 2000), (13, 3000)]


def test_sequence_output_wraparound() -> None:
    rw = SequenceRewriter(90000, initial_seq=65534, initial_ts=0xFFFFFFFF - 1500)
    outs = [rw.rewrite(s, 3000 * s, 0.0) for s in (100, 101, 102, 103)]
    assert [o[0] for o in outs] == [65534, 65535, 0, 1]  # type: ignore[index]
    assert [o[1] for o in outs] == [  # type: ignore[index]
        0xFFFFFFFF - 1500,
        1499,
        4499,
        7499,
    ]


def test_sequence_reorder_maps_consistently() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=0)
    assert rw.rewrite(500, 0, 0.0) == (0, 0)
    assert rw.rewrite(502, 200, 0.0) == (2, 200)
    assert rw.rewrite(501, 100, 0.0) == (1, 100)  # late, same offset
    assert rw.rewrite(503, 300, 0.0) == (3, 300)
    assert rw.rewrite(502, 200, 0.0) == (2, 200)  # duplicate
    assert rw.last_seq == 3 and rw.last_ts == 300


def test_sequence_switch_is_continuous() -> None:
    rw = SequenceRewriter(90000, initial_seq=65533, initial_ts=1000)
    assert rw.rewrite(10, 50, 1.0) == (65533, 1000)
    assert rw.rewrite(11, 3050, 1.033) == (65534, 4000)
    rw.switch_source()
    # New SSRC, unrelated seq/ts; 0.5 s after the last forwarded packet.
    assert rw.rewrite(30000, 777, 1.533) == (65535, 4000 + 45000)
    assert rw.rewrite(30001, 3777, 1.566) == (0, 4000 + 48000)
    assert rw.map_timestamp(3777) == 52000


def test_sequence_map_timestamp() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=100)
    assert rw.map_timestamp(5) is None  # nothing forwarded yet
    rw.rewrite(1, 1000, 0.0)
    assert rw.map_timestamp(4000) == 3100
    assert rw.map_timestamp(999) == 99
    assert rw.map_timestamp(0) == (100 - 1000) & 0xFFFFFFFF
    rw.switch_source()
    assert rw.map_timestamp(4000) is None  # the new stream's offset is not known yet


def test_sequence_switch_minimum_ts_step() -> None:
    rw = SequenceRewriter(48000, initial_seq=1, initial_ts=0)
    rw.rewrite(1, 0, 5.0)
    rw.switch_source()
    assert rw.rewrite(9000, 123, 5.0) == (2, 1)  # no time elapsed: ts still advances by 1


def test_sequence_drops_packets_from_before_switch() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=0)
    for s in range(100, 110):
        rw.rewrite(s, 0, 0.0)
    rw.switch_source()  # same SSRC, seq jump
    assert rw.rewrite(5000, 90000, 1.0) == (10, 90000)
    assert rw.rewrite(4999, 87000, 1.0) is None  # older than the switch point
    assert rw.rewrite(4990, 87000, 1.0) is None
    assert rw.rewrite(5001, 93000, 1.0) == (11, 93000)


def test_sequence_switch_across_input_wrap() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=0)
    rw.rewrite(7, 0, 0.0)
    rw.switch_source()
    assert rw.rewrite(65535, 10, 0.0) == (1, 1)
    assert rw.rewrite(65534, 0, 0.0) is None
    assert rw.rewrite(0, 13, 0.0) == (2, 4)
    assert rw.rewrite(65535, 10, 0.0) == (1, 1)  # late but not before the switch point


def test_sequence_many_switches_stay_continuous() -> None:
    rng = random.Random(3)
    rw = SequenceRewriter(90000, initial_seq=65000, initial_ts=0xFFFF0000)
    expected = 65000
    now = 0.0
    for _ in range(50):
        base = rng.randrange(0x10000)
        for k in range(rng.randrange(1, 40)):
            now += 0.01
            out = rw.rewrite((base + k) & 0xFFFF, rng.getrandbits(32), now)
            assert out is not None and out[0] == expected
            expected = (expected + 1) & 0xFFFF
        rw.switch_source()


# --- ReceiveStatistics -------------------------------------------------------------------------


def test_stats_in_order() -> None:
    st = ReceiveStatistics(0x1234, 90000)
    for i in range(100):
        st.update(1000 + i, 3000 * i, i / 30, 1000)
    assert st.packets_received == 100
    assert st.bytes_received == 100_000
    assert st.packets_lost == 0
    rb = st.report_block(4.0)
    assert rb.ssrc == 0x1234
    assert rb.fraction_lost == 0 and rb.packets_lost == 0
    assert rb.highest_sequence == 1099
    assert rb.lsr == 0 and rb.dlsr == 0


def test_stats_loss_and_fraction() -> None:
    st = ReceiveStatistics(1, 48000)
    for s in range(0, 101):
        if s % 4 != 3:
            st.update(s, 960 * s, s * 0.02, 100)
    # 0..100 expected (101), 3, 7, ..., 99 lost (25)
    assert st.packets_lost == 25
    rb = st.report_block(2.0)
    assert rb.packets_lost == 25
    assert rb.fraction_lost == (25 * 256) // 101
    assert st.fraction_lost == rb.fraction_lost
    # next interval: no loss
    for s in range(101, 200):
        st.update(s, 960 * s, s * 0.02, 100)
    rb = st.report_block(4.0)
    assert rb.fraction_lost == 0
    assert rb.packets_lost == 25  # cumulative
    assert rb.highest_sequence == 199
    # an interval with nothing received
    assert st.report_block(5.0).fraction_lost == 0


def test_stats_full_loss_interval_saturates() -> None:
    st = ReceiveStatistics(1, 90000)
    st.update(0, 0, 0.0, 10)
    st.report_block(0.0)
    st.update(10, 0, 1.0, 10)  # 1..9 lost, 10 received: 9 of 10
    assert st.report_block(1.0).fraction_lost == (9 * 256) // 10


def test_stats_reorder() -> None:
    st = ReceiveStatistics(1, 90000)
    for s in (10, 11, 13, 12, 14, 16, 15):
        st.update(s, 0, 0.0, 1)
    assert st.packets_lost == 0
    assert st.extended_highest_sequence == 16
    # a packet from before the first one received
    st.update(9, 0, 0.0, 1)
    assert st.packets_lost == 0
    assert st.packets_expected == 8


def test_stats_wraparound() -> None:
    st = ReceiveStatistics(1, 90000)
    for s in (65533, 65534, 65535, 0, 2, 1, 3):
        st.update(s, 0, 0.0, 1)
    assert st.extended_highest_sequence == 65536 + 3
    assert st.packets_lost == 0
    rb = st.report_block(0.0)
    assert rb.highest_sequence == 0x10003
    # several cycles
    st = ReceiveStatistics(1, 90000)
    for i in range(3 * 65536 + 10):
        st.update(i & 0xFFFF, 0, 0.0, 1)
    assert st.extended_highest_sequence == 3 * 65536 + 9
    assert st.packets_lost == 0


def test_stats_duplicates() -> None:
    st = ReceiveStatistics(1, 90000)
    for s in (1, 2, 2, 3, 3, 3, 4):
        st.update(s, 0, 0.0, 1)
    assert st.packets_received == 7
    assert st.packets_lost == -3  # RFC 3550: duplicates count as received
    rb = st.report_block(1.0)
    assert rb.packets_lost == 0  # clamped for reporting
    assert rb.fraction_lost == 0


def test_stats_large_jump_needs_two_sequential_packets() -> None:
    st = ReceiveStatistics(1, 90000)
    for s in range(100, 110):
        st.update(s, 0, 0.0, 1)
    st.update(40000, 0, 0.0, 1)  # ignored: could be a stray packet
    assert st.extended_highest_sequence == 109
    assert st.packets_received == 10
    st.update(110, 0, 0.0, 1)
    st.update(40000, 0, 0.0, 1)
    st.update(40001, 0, 0.0, 1)  # sequential to the last jump: the source restarted
    assert st.extended_highest_sequence == 40001
    assert st.packets_lost == 0
    assert st.packets_received == 12  # the first packet after each jump is not counted
    st.update(40002, 0, 0.0, 1)
    assert st.packets_expected == 2 and st.packets_lost == 0


def test_stats_jitter_matches_direct_computation() -> None:
    rate = 90000
    rng = random.Random(7)
    seqs = list(range(65500, 65500 + 200))
    timestamps = [(0xFFFFF000 + 3000 * i) & 0xFFFFFFFF for i in range(200)]  # ts wraps too
    arrivals = [i / 30 + rng.uniform(0, 0.02) for i in range(200)]
    st = ReceiveStatistics(1, rate)
    for s, t, a in zip(seqs, timestamps, arrivals, strict=True):
        st.update(s & 0xFFFF, t, a, 500)
    # Direct RFC 3550 A.8 with unwrapped timestamps.
    jitter = 0.0
    for i in range(1, 200):
        d = (arrivals[i] - arrivals[i - 1]) * rate - 3000
        jitter += (abs(d) - jitter) / 16
    assert st.jitter == pytest.approx(jitter, rel=1e-9)
    assert st.report_block(10.0).jitter == int(jitter)
    assert jitter > 10  # the pattern really has jitter


def test_stats_jitter_zero_for_perfect_pacing() -> None:
    st = ReceiveStatistics(1, 8000)
    for i in range(50):
        st.update(i, 160 * i, i * 0.02, 172)
    assert st.jitter == pytest.approx(0.0, abs=1e-6)


def test_stats_lsr_dlsr() -> None:
    st = ReceiveStatistics(1, 90000)
    st.update(1, 0, 0.0, 1)
    st.on_sender_report(0xAABBCCDD, 10.0)
    rb = st.report_block(10.5)
    assert rb.lsr == 0xAABBCCDD
    assert rb.dlsr == 32768


def test_stats_report_before_any_packet() -> None:
    rb = ReceiveStatistics(77, 90000).report_block(1.0)
    assert (rb.ssrc, rb.fraction_lost, rb.packets_lost, rb.highest_sequence) == (77, 0, 0, 0)


def test_extension_rewriter_matches_reference_random() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        src_ids = rng.sample(range(1, 15), rng.randrange(0, 6))
        id_map = {s: rng.choice((rng.randrange(1, 15), rng.randrange(1, 40))) for s in src_ids}
        mid_id = rng.choice((None, rng.randrange(1, 15), rng.randrange(15, 30)))
        mid = rng.choice((None, "0", "video-1", "m" * 16, "m" * 17))
        rewriter = ExtensionRewriter(id_map, mid_id, mid)
        elements = [
            (rng.randrange(1, 15), rng.randbytes(rng.choice((1, 2, 3, 16, 0, 17))))
            for _ in range(rng.randrange(0, 5))
        ]
        extra = rng.choice((None, [(rng.randrange(1, 30), b"\x00\x01")]))
        expected = [(id_map[i], v) for i, v in elements if i in id_map and id_map[i] != mid_id]
        if mid_id is not None and mid is not None:
            expected.append((mid_id, mid.encode()))
        if extra:
            expected += extra
        block = rewriter.block(elements, extra)
        assert block == build_extension_block(expected)
        if block:
            profile = struct.unpack("!H", block[:2])[0]
            assert parse_extensions(block, 4, len(block) - 4, profile) == expected


def test_extension_rewriter_extra_elements_match_the_generic_encoding() -> None:
    rewriter = ExtensionRewriter({2: 1, 14: 14}, 4, "12")
    elements = [(1, b"0"), (2, b"\x85"), (14, b"\x00\x10")]
    stamp = [(3, (1234).to_bytes(2, "big"))]
    expected = build_extension_block([(1, b"\x85"), (14, b"\x00\x10"), (4, b"12"), stamp[0]])
    assert rewriter.block(elements, stamp) == expected
    assert rewriter.block([], stamp) == build_extension_block([(4, b"12"), stamp[0]])
    # an extra element that needs the two-byte form takes the generic path
    wide = [(20, b"\x01\x02")]
    assert rewriter.block(elements, wide) == build_extension_block(
        [(1, b"\x85"), (14, b"\x00\x10"), (4, b"12"), wide[0]]
    )


# --- two-byte header extensions (RFC 8285 §4.3) through the forwarding path --------------------

#: A publisher packet in the two-byte form, as libwebrtc sends it once an extension id above 14
#: is negotiated with a=extmap-allow-mixed: audio level (id 1), mid "0" (id 16), transport-wide
#: sequence number 0x0102 (id 17), two bytes of padding.
TWO_BYTE_BODY = bytes([1, 1, 0x85, 16, 1, 0x30, 17, 2, 0x01, 0x02, 0, 0])


def two_byte_publisher_packet() -> tuple[bytes, int, list[tuple[int, bytes]]]:
    """(packet, payload offset, parsed elements) of a packet with :data:`TWO_BYTE_BODY`."""
    data = make_packet(pt=111, seq=7, ts=960, ssrc=0x01020304, ext=(0x1000, TWO_BYTE_BODY))
    *_, off, ext_off, ext_len = parse_rtp(data)
    assert data[12:16] == b"\x10\x00\x00\x03"
    assert extension_profile(data) == TWO_BYTE_PROFILE
    elements = parse_extensions(data, ext_off, ext_len, TWO_BYTE_PROFILE)
    return data, off, elements


def test_two_byte_publisher_elements_parsed() -> None:
    _, off, elements = two_byte_publisher_packet()
    assert off == 12 + 4 + 12
    assert elements == [(1, b"\x85"), (16, b"0"), (17, b"\x01\x02")]


def test_two_byte_elements_mixed_down_to_one_byte_with_twcc_stamp() -> None:
    data, off, elements = two_byte_publisher_packet()
    # subscriber: audio level at 1, mid "a1" at 4, transport-wide sequence number at 3
    rewriter = ExtensionRewriter({1: 1}, mid_id=4, mid="a1", publisher_mid_id=16)
    block = rewriter.block(elements, [(3, b"\x00\x07")])
    assert block == bytes.fromhex("bede0002 1085 416131 310007")
    out = rewrite_packet(data, off, 0xAABBCCDD, 96, 1, 2, block)
    # X set, the one-byte block, payload unchanged
    assert out == bytes.fromhex("9060 0001 00000002 aabbccdd") + block + data[off:]


def test_two_byte_elements_remapped_to_ids_above_14() -> None:
    data, off, elements = two_byte_publisher_packet()
    # a subscriber that negotiated audio level at 21 (and a=extmap-allow-mixed)
    rewriter = ExtensionRewriter({1: 21}, mid_id=4, mid="a1", publisher_mid_id=16)
    block = rewriter.block(elements, [(3, b"\x00\x07")])
    assert block == bytes.fromhex("10000003 150185 04026131 03020007 00")
    out = rewrite_packet(data, off, 0xAABBCCDD, 96, 1, 2, block)
    *_, out_off, ext_off, ext_len = parse_rtp(out)
    assert extension_profile(out) == TWO_BYTE_PROFILE and out[out_off:] == data[off:]
    assert parse_extensions(out, ext_off, ext_len, TWO_BYTE_PROFILE) == [
        (21, b"\x85"),
        (4, b"a1"),
        (3, b"\x00\x07"),
    ]


def test_two_byte_element_value_kept_when_it_cannot_be_one_byte() -> None:
    # an empty value (valid only in the two-byte form) keeps the output in the two-byte form
    rewriter = ExtensionRewriter({1: 1, 20: 2}, mid_id=4, mid="a1")
    block = rewriter.block([(1, b"\x85"), (20, b"")], [(3, b"\x00\x07")])
    assert block == bytes.fromhex("10000004 010185 0200 04026131 03020007 000000")


def test_twcc_stamp_written_into_a_two_byte_packet() -> None:
    data, off, elements = two_byte_publisher_packet()
    # the subscriber's transport-wide sequence number at 18: the two-byte form is needed
    rewriter = ExtensionRewriter({1: 1}, mid_id=4, mid="a1", publisher_mid_id=16)
    block = rewriter.block(elements, [(18, b"\xbe\xef")])
    assert block == bytes.fromhex("10000003 010185 04026131 1202beef 00")
    out = rewrite_packet(data, off, 0xAABBCCDD, 96, 1, 2, block)
    # a retransmission from the history gets a fresh transport-wide sequence number
    again = write_transport_seq(out, 18, 0x1234)
    assert len(again) == len(out)
    assert again == out.replace(b"\x12\x02\xbe\xef", b"\x12\x02\x12\x34")
    *_, again_off, ext_off, ext_len = parse_rtp(again)
    assert again[again_off:] == data[off:]
    assert parse_extensions(again, ext_off, ext_len, extension_profile(again)) == [
        (1, b"\x85"),
        (4, b"a1"),
        (18, b"\x12\x34"),
    ]
    # and into the publisher's own two-byte packet, at its id 17
    assert write_transport_seq(data, 17, 0xFFFF) == data.replace(
        b"\x11\x02\x01\x02", b"\x11\x02\xff\xff"
    )


# --- the transport-wide stamp fast path ----------------------------------------------------------
@pytest.mark.parametrize(
    "elements",
    [
        [],
        [(1, b"\x85")],
        [(1, b"\x85"), (2, b"\x01\x02\x03"), (9, b"x")],  # 9 is not mapped
        [(2, bytes(16)), (1, b"\x7f")],
        [(1, bytes(17))],  # too long for the one-byte form: the two-byte form
        [(1, b"")],  # empty: the two-byte form
    ],
)
def test_stamped_is_the_block_with_the_stamp_appended(elements: list) -> None:
    for mid, stamp in (("0", 0), ("17", 0xFFFF), ("a-long-mid-value", 1234)):
        rewriter = ExtensionRewriter({1: 1, 2: 14}, 4, mid, stamp_id=3)
        expected = ExtensionRewriter({1: 1, 2: 14}, 4, mid).block(
            elements, [(3, stamp.to_bytes(2, "big"))]
        )
        assert rewriter.stamped(elements, stamp) == expected
        # the same list again (the next copy of the same packet) maps from the shared memo
        assert rewriter.stamped(elements, stamp) == expected


def test_rewriters_with_the_same_map_share_the_mapping_but_keep_their_own_mid() -> None:
    elements = [(1, b"\x85"), (2, b"\x01\x02")]
    a = ExtensionRewriter({1: 1, 2: 14}, 4, "0", stamp_id=3)
    b = ExtensionRewriter({1: 1, 2: 14}, 4, "1", stamp_id=3)
    c = ExtensionRewriter({1: 5, 2: 14}, 4, "1", stamp_id=3)
    block_a, block_b, block_c = (r.stamped(elements, 7) for r in (a, b, c))
    assert block_a != block_b  # the mid differs
    parsed = [dict(parse_extensions(x, 4, len(x) - 4, 0xBEDE)) for x in (block_a, block_b, block_c)]
    assert parsed[0] == {1: b"\x85", 14: b"\x01\x02", 4: b"0", 3: b"\x00\x07"}
    assert parsed[1] == {1: b"\x85", 14: b"\x01\x02", 4: b"1", 3: b"\x00\x07"}
    assert parsed[2] == {5: b"\x85", 14: b"\x01\x02", 4: b"1", 3: b"\x00\x07"}
    # a new packet whose list has the same contents is mapped anew, not taken from the memo
    assert a.stamped([(1, b"\x01")], 8) != a.stamped(elements, 8)


def test_stamped_without_a_stamp_id_adds_nothing() -> None:
    rewriter = ExtensionRewriter({1: 1}, 4, "0")
    assert rewriter.stamped([(1, b"\x85")], 9) == rewriter.block([(1, b"\x85")])


# --- SequenceRewriter: packets not forwarded (layer filtering) --------------------------------


def test_sequence_drop_of_the_newest_closes_up_the_numbering() -> None:
    rw = SequenceRewriter(90000, initial_seq=100, initial_ts=0)
    assert rw.rewrite(1000, 0, 0.0) == (100, 0)
    assert rw.drop(1001) is None  # nothing to send, no output number used
    assert rw.drop(1002) is None
    assert rw.rewrite(1003, 3000, 0.0) == (101, 3000)
    assert rw.drop(1004) is None
    assert rw.rewrite(1005, 6000, 0.0) == (102, 6000)
    assert rw.last_seq == 102
    # NACK lookups: every output number stands for the packet that had it
    assert [rw.input_seq_of(s) for s in (100, 101, 102)] == [1000, 1003, 1005]
    assert [rw.input_seq(s) for s in (100, 101, 102)] == [1000, 1003, 1005]
    assert rw.input_seq_of(103) is None  # not sent yet
    assert rw.input_seq_of(99) is None  # before the stream's first packet


def test_sequence_without_drops_is_unchanged() -> None:
    rw = SequenceRewriter(90000, initial_seq=7, initial_ts=0)
    for k in range(10):
        assert rw.rewrite(500 + k, k, 0.0) == (7 + k, k)
    assert [rw.input_seq_of(7 + k) for k in range(10)] == [500 + k for k in range(10)]


def test_sequence_late_packet_before_a_drop_keeps_its_number() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=0)
    assert rw.rewrite(10, 0, 0.0) == (0, 0)
    # 11 is late; 12 is dropped (the newest: the numbering closes up over it)
    assert rw.drop(12) is None
    assert rw.rewrite(13, 0, 0.0) == (2, 0)  # output 1 is kept for 11
    assert rw.rewrite(11, 0, 0.0) == (1, 0)  # arrives: its own number, before the drop
    assert rw.rewrite(14, 0, 0.0) == (3, 0)
    assert rw.rewrite(13, 0, 0.0) == (2, 0)  # a duplicate after the drop
    assert rw.rewrite(12, 0, 0.0) is None  # the dropped one is never numbered
    assert [rw.input_seq_of(s) for s in range(4)] == [10, 11, 13, 14]


def test_sequence_late_packet_dropped_gives_back_its_reserved_number() -> None:
    rw = SequenceRewriter(90000, initial_seq=50, initial_ts=0)
    assert rw.rewrite(10, 0, 0.0) == (50, 0)
    assert rw.rewrite(12, 0, 0.0) == (52, 0)  # 11 missing: 51 stays for it
    # 11 arrives late and is not to be forwarded: 51 was skipped over already, the caller
    # fills it (a padding packet), and a NACK for it resends nothing
    assert rw.drop(11) == 51
    assert rw.input_seq_of(51) is None
    assert rw.input_seq(51) == 11
    assert rw.input_seq_of(52) == 12
    assert rw.drop(11) is None  # a duplicate: already given
    assert rw.rewrite(13, 0, 0.0) == (53, 0)


def test_sequence_drop_of_a_stale_or_starting_packet_changes_nothing() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=0)
    assert rw.drop(5) is None  # nothing forwarded yet: the first forwarded packet is output 0
    assert rw.rewrite(7, 0, 0.0) == (0, 0)
    assert rw.drop(6) is None  # before the stream's first packet
    assert rw.rewrite(8, 0, 0.0) == (1, 0)
    rw.switch_source()
    assert rw.drop(9) is None  # starting again
    assert rw.rewrite(100, 0, 1.0)[0] == 2  # type: ignore[index]


def test_sequence_drops_across_input_and_output_wrap() -> None:
    rw = SequenceRewriter(90000, initial_seq=65533, initial_ts=0)
    sent = []
    for k, seq in enumerate([65530 + i & 0xFFFF for i in range(12)]):
        if k % 3 == 1:
            assert rw.drop(seq) is None
        else:
            out = rw.rewrite(seq, 0, 0.0)
            assert out is not None
            sent.append((out[0], seq))
    outs = [o for o, _ in sent]
    assert outs == [(65533 + i) & 0xFFFF for i in range(len(sent))]
    assert all(rw.input_seq_of(o) == s for o, s in sent)
    # late packets of the wrapped stream, around the drops
    assert rw.rewrite(sent[2][1], 0, 0.0) == (sent[2][0], 0)


def test_sequence_switch_after_a_drop_continues_past_reserved_numbers() -> None:
    rw = SequenceRewriter(90000, initial_seq=0, initial_ts=0)
    assert rw.rewrite(10, 0, 0.0) == (0, 0)
    assert rw.drop(12) is None  # 11 missing: output 1 is kept for it
    rw.switch_source()
    assert rw.rewrite(900, 0, 1.0)[0] == 2  # type: ignore[index]
    assert rw.input_seq_of(2) == 900
    assert rw.input_seq_of(0) is None  # the previous stream's


def test_sequence_drops_match_a_reference_numbering_under_reordering() -> None:
    """Random drops and reordering: every forwarded packet gets the number it would have got
    in order, the numbers are continuous, and each maps back to its packet."""
    rng = random.Random(11)
    for trial in range(40):
        start = rng.randrange(0x10000)
        count = 300
        keep = [rng.random() < 0.6 for _ in range(count)]
        keep[0] = True
        order = list(range(count))
        for i in range(1, count - 1):  # local reordering
            if rng.random() < 0.15:
                j = min(count - 1, i + rng.randrange(1, 4))
                order[i], order[j] = order[j], order[i]
        order.remove(0)
        order.insert(0, 0)
        rw = SequenceRewriter(90000, initial_seq=rng.randrange(0x10000), initial_ts=0)
        got: dict[int, int] = {}
        filled: dict[int, int] = {}
        newest = -1
        for i in order:
            seq = (start + i) & 0xFFFF
            if keep[i]:
                out = rw.rewrite(seq, 0, 0.0)
                assert out is not None
                got[i] = out[0]
            else:
                reserved = rw.drop(seq)
                if i < newest:
                    if reserved is not None:
                        filled[i] = reserved
                else:
                    assert reserved is None
            newest = max(newest, i)
        first = got[0]
        numbers = sorted(((o - first) & 0xFFFF) for o in list(got.values()) + list(filled.values()))
        assert numbers == list(range(len(numbers))), trial  # no gap, no duplicate
        by_order = [got[i] for i in sorted(got)]
        assert all(
            ((b - a) & 0xFFFF) < 0x8000 for a, b in zip(by_order, by_order[1:], strict=False)
        )
        for i, o in got.items():
            assert rw.input_seq_of(o) == (start + i) & 0xFFFF, trial
        for o in filled.values():
            assert rw.input_seq_of(o) is None
