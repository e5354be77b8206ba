"""Loss repair: packet history, RTX wrapping (RFC 4588) and the NACK generator."""

from __future__ import annotations

import random
import struct

import pytest

from relay.rtc import rtcp
from relay.rtc.nack import NackGenerator, PacketHistory, rtx_unwrap, rtx_wrap
from relay.rtc.rtp import RtpError, parse_extensions, parse_rtp


def make_packet(
    *,
    pt: int = 96,
    seq: int = 1000,
    ts: int = 123456,
    ssrc: int = 0x11223344,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    ext: bytes | None = None,  # one-byte-form element bytes, padded to 32 bits
    payload: bytes = b"payload!",
    padding: int = 0,
) -> bytes:
    """An RTP packet written field by field from the RFC 3550 layout."""
    b0 = 0x80 | len(csrcs) | (0x20 if padding else 0) | (0x10 if ext is not None else 0)
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq, ts, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrcs)
    if ext is not None:
        out += struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
    out += payload
    if padding:
        out += b"\x00" * (padding - 1) + bytes([padding])
    return out


# --- PacketHistory ------------------------------------------------------------------------


def test_history_store_and_get() -> None:
    history = PacketHistory(100)
    assert history.capacity == 128  # rounded up to a power of two
    for seq in range(10, 20):
        history.store(seq, bytes([seq]), now=1.0)
    assert history.get(15) == bytes([15])
    assert history.get(9) is None  # never stored
    assert history.get(20) is None


def test_history_eviction_and_wrap_around() -> None:
    history = PacketHistory(16)
    seqs = [(65530 + i) & 0xFFFF for i in range(40)]  # crosses 65535 -> 0
    for seq in seqs:
        history.store(seq, seq.to_bytes(2, "big"), now=0.0)
    # only the last 16 remain
    for seq in seqs[:-16]:
        assert history.get(seq) is None
    for seq in seqs[-16:]:
        assert history.get(seq) == seq.to_bytes(2, "big")
    # a slot answers only for the exact seq stored in it: seq + capacity maps to the same slot
    last = seqs[-1]
    assert history.get((last + 16) & 0xFFFF) is None


def test_history_same_slot_other_seq_is_none() -> None:
    history = PacketHistory(8)
    history.store(3, b"three", now=0.0)
    assert history.get(3 + 8) is None
    assert history.get(3 + 65536 - 8) is None
    # after a 16-bit wrap, an old packet under the same seq is a different packet: the slot
    # has been overwritten by the packets in between when the stream is continuous
    for seq in range(4, 65536 + 4):
        history.store(seq & 0xFFFF, b"x", now=0.0)
    assert history.get(3) == b"x"


def test_history_max_age_and_clear() -> None:
    history = PacketHistory(64, max_age=1.0)
    history.store(7, b"seven", now=10.0)
    assert history.get(7, now=10.5) == b"seven"
    assert history.get(7, now=11.5) is None
    assert history.get(7) == b"seven"  # no now: no age check
    assert history.get(8, now=10.2) is None
    history.store(7, b"new seven", now=10.21)  # a new packet under the same seq (wrapped)
    assert history.get(7, now=10.22) == b"new seven"
    history.clear()
    assert history.get(7) is None


def test_history_capacity_limits() -> None:
    with pytest.raises(ValueError):
        PacketHistory(0)
    with pytest.raises(ValueError):
        PacketHistory(40000)
    assert PacketHistory(32768).capacity == 32768


# --- RTX ------------------------------------------------------------------------------------


def test_rtx_wrap_layout() -> None:
    ext = bytes([0x10, 0xAB, 0x21, 0x01, 0x02, 0, 0, 0])  # id1 len1, id2 len2, padding
    original = make_packet(
        seq=0xBEEF, ts=0xCAFEBABE, marker=True, csrcs=(7, 8), ext=ext, payload=b"frame-data"
    )
    rtx = rtx_wrap(original, rtx_ssrc=0x55667788, rtx_pt=97, rtx_seq=0x1234)
    pt, seq, ts, ssrc, marker, offset, ext_offset, ext_length = parse_rtp(rtx)
    assert (pt, seq, ts, ssrc, marker) == (97, 0x1234, 0xCAFEBABE, 0x55667788, True)
    assert rtx[0] & 0x0F == 2 and rtx[12:20] == struct.pack("!II", 7, 8)  # CSRCs kept
    assert parse_extensions(rtx, ext_offset, ext_length, 0xBEDE) == [
        (1, b"\xab"),
        (2, b"\x01\x02"),
    ]
    assert rtx[offset : offset + 2] == b"\xbe\xef"  # OSN first
    assert rtx[offset + 2 :] == b"frame-data"


def test_rtx_round_trip_drops_padding() -> None:
    original = make_packet(seq=65535, payload=b"abc", padding=5, ext=b"\x10\x01\x00\x00")
    rtx = rtx_wrap(original, 0xAAAA, 101, 9)
    assert not rtx[0] & 0x20  # RTX carries the payload without the original padding
    osn, restored = rtx_unwrap(rtx, media_ssrc=0x11223344, media_pt=96)
    assert osn == 65535
    assert restored == make_packet(seq=65535, payload=b"abc", ext=b"\x10\x01\x00\x00")


def test_rtx_unwrap_with_rtx_padding() -> None:
    rtx = make_packet(pt=97, seq=3, ssrc=0x99, payload=b"\x00\x10hello", padding=4)
    osn, original = rtx_unwrap(rtx, media_ssrc=0x42, media_pt=96)
    assert osn == 16
    assert original == make_packet(pt=96, seq=16, ssrc=0x42, payload=b"hello")


def test_rtx_random_round_trips() -> None:
    rng = random.Random(4588)
    for _ in range(200):
        csrcs = tuple(rng.getrandbits(32) for _ in range(rng.randrange(3)))
        ext = None
        if rng.random() < 0.7:
            ext = bytes([0x10 | 0, rng.getrandbits(8), 0x31, 1, 2, 3, 4, 0])
        original = make_packet(
            pt=rng.randrange(96, 128),
            seq=rng.getrandbits(16),
            ts=rng.getrandbits(32),
            marker=rng.random() < 0.5,
            csrcs=csrcs,
            ext=ext,
            payload=rng.randbytes(rng.randrange(0, 300)),
        )
        pt, seq, *_ = parse_rtp(original)
        rtx = rtx_wrap(original, rng.getrandbits(32), 99, rng.getrandbits(16))
        assert rtx_unwrap(rtx, 0x11223344, pt) == (seq, original)


def test_rtx_malformed() -> None:
    with pytest.raises(RtpError):
        rtx_wrap(b"\x80\x60\x00", 1, 2, 3)
    with pytest.raises(RtpError):
        rtx_unwrap(make_packet(payload=b"\x01"), 1, 96)  # no room for the OSN
    with pytest.raises(RtpError):  # padding-only probe packet on the RTX SSRC
        rtx_unwrap(make_packet(payload=b"", padding=200), 1, 96)
    with pytest.raises(RtpError):
        rtx_unwrap(b"\x40" + bytes(20), 1, 96)


# --- NackGenerator ----------------------------------------------------------------------


def feed(gen: NackGenerator, seqs: list[int], now: float) -> None:
    for seq in seqs:
        gen.on_packet(seq & 0xFFFF, now)


def test_in_order_stream_never_nacks() -> None:
    gen = NackGenerator(90000)
    for i in range(70000):  # crosses the 16-bit wrap
        gen.on_packet((60000 + i) & 0xFFFF, i * 0.001)
    assert gen.poll(100.0, 0.05) == []
    assert gen.missing == 0 and gen.nacks_sent == 0


def test_gap_is_nacked_after_reorder_delay_then_retried() -> None:
    gen = NackGenerator()
    feed(gen, [100, 101, 104], now=1.0)  # 102, 103 missing
    assert gen.missing == 2
    assert gen.poll(1.005, rtt=0.05) == []  # within the reorder delay
    assert gen.poll(1.016, rtt=0.05) == [102, 103]
    assert gen.poll(1.05, rtt=0.05) == []  # retry interval: max(50 ms, 20 ms) * 1.5 = 75 ms
    assert gen.poll(1.095, rtt=0.05) == [102, 103]
    # a small rtt: the 20 ms floor applies (30 ms between retries)
    assert gen.poll(1.115, rtt=0.001) == []
    assert gen.poll(1.13, rtt=0.001) == [102, 103]
    assert gen.nacks_sent == 6
    nack = rtcp.nack(1, 2, gen.poll(1.2, rtt=0.001))
    assert rtcp.parse_rtcp(nack) == [rtcp.Nack(1, 2, [102, 103])]


def test_arrivals_clear_entries() -> None:
    gen = NackGenerator()
    feed(gen, [10, 14], now=0.0)  # 11, 12, 13 missing
    gen.on_packet(11, 0.005)  # reordered: before any NACK
    assert gen.poll(0.02, 0.05) == [12, 13]
    gen.on_packet(12, 0.06)  # retransmission arrived
    assert gen.reordered == 1 and gen.recovered == 1
    assert gen.poll(0.2, 0.05) == [13]
    gen.on_packet(12, 0.21)  # duplicate: nothing to do
    gen.on_packet(13, 0.22)
    assert gen.missing == 0 and gen.recovered == 2
    assert gen.poll(0.5, 0.05) == []
    assert gen.lost_unrepaired == 0


def test_wrap_around_gap() -> None:
    gen = NackGenerator()
    feed(gen, [65533, 65534, 1, 2], now=0.0)
    assert gen.poll(0.02, 0.05) == [65535, 0]
    nack = rtcp.parse_rtcp(rtcp.nack(1, 2, [65535, 0]))
    assert nack == [rtcp.Nack(1, 2, [65535, 0])]
    gen.on_packet(0, 0.03)
    assert gen.poll(0.2, 0.05) == [65535]


def test_retries_are_bounded_then_given_up() -> None:
    gen = NackGenerator(max_retries=3, max_age=10.0)
    feed(gen, [1, 3], now=0.0)
    sent = []
    now = 0.0
    while now < 2.0:
        now += 0.01
        sent += gen.poll(now, rtt=0.02)
    assert sent == [2, 2, 2]
    assert gen.missing == 0 and gen.lost_unrepaired == 1
    # recovery gave up: the caller asks the publisher for one keyframe
    assert gen.keyframe_needed


def test_is_missing_while_recovery_is_in_flight() -> None:
    gen = NackGenerator()
    feed(gen, [65534, 1], now=0.0)  # 65535 and 0 missing, across the wrap
    assert gen.is_missing(65535) and gen.is_missing(0)
    assert not gen.is_missing(1) and not gen.is_missing(65534) and not gen.is_missing(2)
    gen.on_packet(0, 0.03)
    assert not gen.is_missing(0) and gen.is_missing(65535)


def test_max_age_forgets() -> None:
    gen = NackGenerator(max_age=0.5)
    feed(gen, [1, 3], now=0.0)
    assert gen.poll(0.02, rtt=0.4) == [2]
    assert gen.poll(0.45, rtt=0.4) == []  # retry due at 0.62, but too old by then
    assert gen.poll(0.62, rtt=0.4) == []
    assert gen.missing == 0 and gen.lost_unrepaired == 1
    assert gen.keyframe_needed


def test_too_many_missing_drops_oldest_and_asks_for_keyframe() -> None:
    gen = NackGenerator(max_missing=10)
    feed(gen, [0, 7], now=0.0)  # 6 missing
    feed(gen, [14], now=0.0)  # 6 more: 12 > 10, the two oldest go
    assert gen.keyframe_needed
    assert gen.missing == 10 and gen.lost_unrepaired == 2
    assert gen.poll(0.02, 0.05) == [3, 4, 5, 6, 8, 9, 10, 11, 12, 13]
    gen.keyframe_needed = False
    feed(gen, [100], now=0.1)  # a gap larger than the bound: nothing is NACKed
    assert gen.keyframe_needed and gen.missing == 0
    assert gen.lost_unrepaired == 2 + 10 + 85
    assert gen.poll(0.2, 0.05) == []


def test_bounded_under_random_loss() -> None:
    rng = random.Random(7)
    gen = NackGenerator(max_missing=50)
    now = 0.0
    for seq in range(20000):
        now += 0.002
        if rng.random() > 0.3:
            gen.on_packet(seq & 0xFFFF, now)
        if seq % 5 == 0:
            for nacked in gen.poll(now, 0.05):
                assert 0 <= nacked <= 0xFFFF
        assert gen.missing <= 50


def test_reset_and_clear() -> None:
    gen = NackGenerator()
    feed(gen, [1, 5], now=0.0)
    gen.clear()
    assert gen.poll(1.0, 0.05) == []
    gen.reset()
    feed(gen, [40000, 40001], now=1.0)  # a new sequence: no giant gap
    assert gen.missing == 0 and not gen.keyframe_needed


def test_round_trip_time_from_a_nack_answered_once() -> None:
    gen = NackGenerator()
    for seq in (1, 2, 4):
        gen.on_packet(seq, 0.0)
    assert gen.poll(0.05) == [3]  # NACK sent at 0.05
    gen.on_packet(3, 0.09)  # retransmission 40 ms later
    assert gen.rtt is not None and abs(gen.rtt - 0.04) < 1e-9
    # a packet recovered after two NACKs says nothing certain about the round trip
    for seq in (5, 7):
        gen.on_packet(seq, 1.0)
    assert gen.poll(1.05, gen.rtt) == [6]
    assert gen.poll(1.2, gen.rtt) == [6]
    gen.on_packet(6, 1.21)
    assert abs(gen.rtt - 0.04) < 1e-9
