"""VP8 payload descriptors (RFC 7741 §4.2) and the per-subscriber rewriter, with bytes.

Descriptors are written bit by bit: ``b("1001 0000")`` is one octet, its bits in the order of
the RFC's figure (most significant first), the comment beside it naming them::

         0 1 2 3 4 5 6 7
        +-+-+-+-+-+-+-+-+
        |X|R|N|S|R| PID | (REQUIRED)
   X:   |I|L|T|K| RSV   | (OPTIONAL)
   I:   |M| PictureID   | (OPTIONAL)
        |   PictureID   | (M=1)
   L:   |   TL0PICIDX   | (OPTIONAL)
   T/K: |TID|Y| KEYIDX  | (OPTIONAL)
"""

from __future__ import annotations

import random
import struct

import pytest

from relay.rtc.vp8 import (
    PictureIdMap,
    Vp8Descriptor,
    Vp8Error,
    Vp8Rewriter,
    pack_vp8,
    parse_vp8,
)


def b(bits: str) -> bytes:
    """One octet from its 8 bits, written most significant first (spaces ignored)."""
    bits = bits.replace(" ", "")
    assert len(bits) == 8
    return bytes((int(bits, 2),))


def packet(payload: bytes, padding: int = 0) -> tuple[bytes, int]:
    """A plain RTP packet around ``payload`` and the offset of its payload."""
    first = 0xA0 if padding else 0x80
    header = struct.pack("!BBHII", first, 96, 1, 1, 1)
    tail = (b"\x00" * (padding - 1) + bytes([padding])) if padding else b""
    return header + payload + tail, len(header)


def parse(payload: bytes) -> Vp8Descriptor:
    return parse_vp8(*packet(payload))


# VP8 payload header, first octet (RFC 7741 §4.3): |Size0|H| VER |P|, P=0 on a keyframe
KEY_HEADER = b("0000 0000") + b"\x00\x00\x9d\x01\x2a"
INTER_HEADER = b("0000 0001") + b"\x00\x00"


# -- the examples of RFC 7741 §4.6 ----------------------------------------------------------


def test_rfc_example_keyframe_in_one_packet() -> None:
    # §4.6.1: a keyframe in a single RTP packet, PictureID 17
    desc = parse(
        b("1 0 0 1 0 000")  # X=1 R=0 N=0 S=1 R=0 PID=0
        + b("1 0 0 0 0000")  # I=1 L=0 T=0 K=0 RSV
        + b("0 0010001")  # M=0 PictureID=17
        + KEY_HEADER  # P=0
    )
    assert desc == Vp8Descriptor(
        size=3,
        extended=True,
        non_reference=False,
        start=True,
        partition=0,
        picture_id=17,
        long_picture_id=False,
        tl0picidx=None,
        tid=None,
        layer_sync=False,
        keyidx=None,
        keyframe=True,
    )


def test_rfc_example_interframe_without_picture_id() -> None:
    # §4.6.2: a non-discardable interframe in one packet, no PictureID
    desc = parse(b("0 0 0 1 0 000") + INTER_HEADER)  # X=0 R=0 N=0 S=1 R=0 PID=0; P=1
    assert desc.size == 1
    assert not desc.extended and not desc.non_reference
    assert desc.start and desc.partition == 0 and desc.frame_start
    assert desc.picture_id is None and desc.tl0picidx is None and desc.tid is None
    assert not desc.keyframe


def test_rfc_example_partitions_in_separate_packets() -> None:
    # §4.6.3: the second packet starts partition 1 (S=1, PID=1): not a frame start, and what
    # follows the descriptor is partition data, not a payload header
    desc = parse(
        b("1 0 0 1 0 001")  # X=1 R=0 N=0 S=1 R=0 PID=1
        + b("1 0 0 0 0000")  # I=1
        + b("0 0010001")  # M=0 PictureID=17
        + b"\x00"  # partition data whose low bit would read "keyframe"
    )
    assert desc.start and desc.partition == 1 and not desc.frame_start
    assert desc.picture_id == 17 and not desc.keyframe


def test_rfc_example_fragmented_frame_continuation() -> None:
    # §4.6.4: a frame fragmented over packets; a continuation packet has S=0, 15-bit PictureID
    desc = parse(
        b("1 0 0 0 0 000")  # X=1 R=0 N=0 S=0 R=0 PID=0
        + b("1 0 0 0 0000")  # I=1
        + b("1 0010010")  # M=1, PictureID high 7 bits
        + b("0110 0111")  # PictureID low 8 bits: 0x1267 = 4711
    )
    assert desc.size == 4 and not desc.start and not desc.keyframe
    assert desc.picture_id == 4711 and desc.long_picture_id


# -- every field ----------------------------------------------------------------------------


def test_all_fields() -> None:
    desc = parse(
        b("1 0 1 1 0 000")  # X=1 R=0 N=1 S=1 R=0 PID=0
        + b("1 1 1 1 0000")  # I=1 L=1 T=1 K=1
        + b("1 1010101")  # M=1, PictureID high bits 0x55
        + b("1010 1010")  # PictureID low bits 0xAA: 0x55AA
        + b("1100 1000")  # TL0PICIDX = 200
        + b("10 1 10110")  # TID=2 Y=1 KEYIDX=22
        + INTER_HEADER
    )
    assert desc == Vp8Descriptor(
        size=6,
        extended=True,
        non_reference=True,
        start=True,
        partition=0,
        picture_id=0x55AA,
        long_picture_id=True,
        tl0picidx=200,
        tid=2,
        layer_sync=True,
        keyidx=22,
        keyframe=False,
    )


def test_partition_index_and_non_start() -> None:
    desc = parse(b("0 0 1 0 0 111") + b"")  # X=0 N=1 S=0 PID=7, nothing after
    assert desc.size == 1 and desc.partition == 7 and desc.non_reference and not desc.start


def test_tid_without_k_ignores_keyidx_bits_and_k_without_t_ignores_tid() -> None:
    only_t = parse(
        b("1 0 0 0 0 000")  # X=1 S=0
        + b("0 0 1 0 0000")  # T=1 K=0
        + b("01 0 11111")  # TID=1 Y=0 KEYIDX bits set, to be ignored
    )
    assert only_t.tid == 1 and not only_t.layer_sync and only_t.keyidx is None
    only_k = parse(
        b("1 0 0 0 0 000")  # X=1 S=0
        + b("0 0 0 1 0000")  # T=0 K=1
        + b("11 1 00101")  # TID/Y bits set, to be ignored; KEYIDX=5
    )
    assert only_k.tid is None and not only_k.layer_sync and only_k.keyidx == 5


def test_tl0picidx_without_picture_id() -> None:
    desc = parse(b("1 0 0 0 0 000") + b("0 1 1 0 0000") + b("0000 0111") + b("00 0 00000"))
    assert desc.picture_id is None and desc.tl0picidx == 7 and desc.tid == 0 and desc.size == 4


def test_reserved_bits_are_ignored() -> None:
    desc = parse(b("0 1 0 1 1 000") + KEY_HEADER)  # both R bits set
    assert desc.size == 1 and desc.keyframe
    desc = parse(b("1 0 0 1 0 000") + b("1 0 0 0 1111") + b("0 0000001") + KEY_HEADER)  # RSV
    assert desc.picture_id == 1 and desc.keyframe


def test_padding_is_not_payload() -> None:
    data, offset = packet(b("0 0 0 1 0 000"), padding=4)  # the payload header would be padding
    with pytest.raises(Vp8Error):
        parse_vp8(data, offset)
    data, offset = packet(b("0 0 0 1 0 000") + KEY_HEADER[:1], padding=4)
    assert parse_vp8(data, offset).keyframe
    bad = bytearray(packet(b("0 0 0 1 0 000") + KEY_HEADER, padding=4)[0])
    bad[-1] = 200  # more padding than packet
    with pytest.raises(Vp8Error):
        parse_vp8(bytes(bad), 12)


FULL = [
    # X, I with M, L, T/K, then the payload header (S=1, PID=0)
    b("1 0 0 1 0 000")
    + b("1 1 1 1 0000")
    + b("1 0000001")
    + b("0000 0010")
    + b("0000 0011")
    + b("01 1 00001")
    + KEY_HEADER[:1],
    # 7-bit PictureID, T only, frame start
    b("1 0 0 1 0 000") + b("1 0 1 0 0000") + b("0 1111111") + b("10 0 00000") + INTER_HEADER[:1],
    # no extension, frame start
    b("0 0 0 1 0 000") + KEY_HEADER[:1],
]


@pytest.mark.parametrize("payload", FULL)
def test_every_truncation_raises(payload: bytes) -> None:
    full = parse(payload)
    assert full.size == len(payload) - 1  # one payload header octet follows
    for length in range(len(payload)):
        data, offset = packet(payload[:length])
        with pytest.raises(Vp8Error):
            parse_vp8(data, offset)
    for length in range(12):  # the payload offset lies beyond the packet
        with pytest.raises(Vp8Error):
            parse_vp8(packet(payload)[0][:length], 12)
    with pytest.raises(Vp8Error):
        parse_vp8(b"", 0)


def test_continuation_needs_no_payload_header() -> None:
    payload = b("1 0 0 0 0 000") + b("1 1 1 1 0000") + b("1 0000001") + b("00000010")
    payload += b("00000011") + b("01100001")
    assert parse(payload).size == len(payload)
    for length in range(len(payload)):
        with pytest.raises(Vp8Error):
            parse(payload[:length])


def test_random_bytes_raise_only_vp8_error() -> None:
    rng = random.Random(7741)
    for _ in range(3000):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 9)))
        try:
            desc = parse(payload)
        except Vp8Error:
            continue
        assert 1 <= desc.size <= 6 and desc.size <= len(payload)


@pytest.mark.parametrize("payload", FULL)
def test_pack_round_trip(payload: bytes) -> None:
    desc = parse(payload)
    assert pack_vp8(desc) == payload[: desc.size]


# -- the rewriter -----------------------------------------------------------------------------


def descriptor(
    picture_id: int | None,
    *,
    long: bool = True,
    tl0: int | None = None,
    tid: int | None = None,
    sync: bool = False,
    start: bool = True,
    keyframe: bool = False,
) -> bytes:
    """A descriptor and payload-header octet written field by field (RFC 7741 §4.2)."""
    x = picture_id is not None or tl0 is not None or tid is not None
    first = (x << 7) | (start << 4)  # X . N=0 S . PID=0
    out = bytearray((first,))
    if x:
        out.append(
            ((picture_id is not None) << 7) | ((tl0 is not None) << 6) | ((tid is not None) << 5)
        )  # I L T K=0
        if picture_id is not None:
            if long:
                out += bytes((0x80 | picture_id >> 8, picture_id & 0xFF))  # M=1, 15 bits
            else:
                out.append(picture_id)  # M=0, 7 bits
        if tl0 is not None:
            out.append(tl0)
        if tid is not None:
            out.append((tid << 6) | (sync << 5))  # TID Y KEYIDX=0
    out.append(0 if keyframe else 1)  # payload header: P
    return bytes(out)


PATTERN = (0, 2, 1, 2)  # the TIDs of an L1T3 stream, as libwebrtc sends them


def stream(
    first_id: int,
    first_tl0: int,
    pictures: int,
    *,
    long: bool = True,
    keyframes: tuple[int, ...] = (0,),
    packets: int = 2,
) -> list[tuple[int, bytes]]:
    """A simulcast layer: (picture index, payload) per packet, ``packets`` per picture, TIDs
    by :data:`PATTERN` (each TID 1/2 picture right after a TID 0 one is a sync point, Y=1)."""
    modulus = 0x8000 if long else 0x80
    out = []
    tl0 = first_tl0 - 1
    for n in range(pictures):
        tid = PATTERN[n % 4]
        if n in keyframes:
            tid = 0
        if tid == 0:
            tl0 = (tl0 + 1) & 0xFF
        sync = tid > 0 and n % 4 in (1, 2)
        for k in range(packets):
            payload = descriptor(
                (first_id + n) % modulus,
                long=long,
                tl0=tl0,
                tid=tid,
                sync=sync,
                start=k == 0,
                keyframe=n in keyframes,
            )
            out.append((n, payload + b"frame"))
    return out


def run(
    rewriter: Vp8Rewriter, packets: list[tuple[int, bytes]], new_source_at: int | None = None
) -> list[tuple[int, Vp8Descriptor]]:
    """Feed packets; (picture index, parsed output descriptor) of each forwarded one, checking
    the rest of the payload would follow the output descriptor unchanged."""
    out = []
    for i, (n, payload) in enumerate(packets):
        desc = parse(payload)
        rewritten = rewriter.rewrite(desc, new_source=i == new_source_at)
        if rewritten is None:
            continue
        result = parse(rewritten + payload[desc.size :])
        assert result.size == len(rewritten)
        assert result.tid == desc.tid and result.start == desc.start
        out.append((n, result))
    return out


def picture_ids(forwarded: list[tuple[int, Vp8Descriptor]]) -> list[int]:
    """Output PictureID of each forwarded picture (its first packet)."""
    return [d.picture_id for _, d in forwarded if d.start and d.picture_id is not None]


def tl0s(forwarded: list[tuple[int, Vp8Descriptor]]) -> list[int]:
    """Output TL0PICIDX of each forwarded TID 0 picture."""
    return [d.tl0picidx for _, d in forwarded if d.start and d.tid == 0 and d.tl0picidx is not None]


def consecutive(values: list[int], modulus: int) -> bool:
    return all((b - a) % modulus == 1 for a, b in zip(values, values[1:], strict=False))


def test_starts_on_a_keyframe_with_the_initial_values() -> None:
    rewriter = Vp8Rewriter(picture_id=1000, tl0picidx=50)
    layer = stream(300, 9, 8, keyframes=(2,))
    out = run(rewriter, layer)
    assert out[0][0] == 2  # pictures 0-1 (after the keyframe 0 not seen) are waited out
    assert picture_ids(out) == list(range(1000, 1006))
    assert tl0s(out) == [50, 51]
    assert all(d.long_picture_id for _, d in out)


def test_layer_switch_keeps_picture_id_and_tl0picidx_continuous() -> None:
    # two simulcast layers with independent numbering: A is 15-bit and wraps at 0x7FFF, B
    # starts elsewhere; the subscriber goes from A to B at B's keyframe (picture 6)
    a = stream(0x7FFA, 254, 12)
    b_ = stream(1234, 17, 12, keyframes=(0, 6))
    rewriter = Vp8Rewriter(picture_id=0x7FFC, tl0picidx=255)
    first = run(rewriter, a[:12])  # A's pictures 0-5
    assert picture_ids(first) == [0x7FFC, 0x7FFD, 0x7FFE, 0x7FFF, 0, 1]
    assert tl0s(first) == [255, 0]  # TL0PICIDX wraps at 8 bits
    rewriter.switch_source()
    # B from its picture 4: 4 and 5 are not keyframes and are dropped; 6 is where it starts
    second = run(rewriter, b_[8:])
    assert second[0][0] == 6 and second[0][1].keyframe
    ids = picture_ids(first) + picture_ids(second)
    assert consecutive(ids, 0x8000)
    assert consecutive(tl0s(first) + tl0s(second), 0x100)
    # and back to A, at a keyframe A sends later
    a2 = stream(0x7FFA, 254, 20, keyframes=(0, 16))
    third = run(rewriter, a2[28:], new_source_at=0)
    assert third[0][0] == 16
    ids += picture_ids(third)
    assert consecutive(ids, 0x8000)
    tl0_all = tl0s(first) + tl0s(second) + tl0s(third)
    assert consecutive(tl0_all, 0x100)


def test_seven_bit_input_widens_once_the_output_is_fifteen_bits() -> None:
    short = stream(120, 0, 8, long=False)  # 7-bit PictureIDs wrapping at 0x7F
    long_ = stream(20000, 100, 8, keyframes=(0, 4))
    rewriter = Vp8Rewriter(picture_id=0x100 + 125, tl0picidx=0)
    first = run(rewriter, short)
    # all inputs so far are 7 bits: so is the output, same length as the input, wrapping
    assert [(d.picture_id, d.long_picture_id) for _, d in first if d.start] == [
        (125, False),
        (126, False),
        (127, False),
        (0, False),
        (1, False),
        (2, False),
        (3, False),
        (4, False),
    ]
    assert all(d.size == 5 for _, d in first)  # X, I, PictureID, L, T/K: as the input
    rewriter.switch_source()
    second = run(rewriter, long_[8:])  # from its keyframe at picture 4
    ids = picture_ids(second)
    # 15 bits from here; the low 7 bits go on from the last 7-bit value (4)
    assert ids[0] & 0x7F == 5 and consecutive(ids, 0x8000)
    assert all(d.long_picture_id for _, d in second)
    rewriter.switch_source()
    third = run(rewriter, stream(10, 5, 4, long=False))  # 7-bit input again
    assert all(d.long_picture_id and d.size == 6 for _, d in third)  # one byte longer
    assert consecutive(ids + picture_ids(third), 0x8000)


def test_long_picture_id_from_the_start() -> None:
    out = run(Vp8Rewriter(picture_id=0x7FFF, long_picture_id=True), stream(3, 0, 3, long=False))
    assert picture_ids(out) == [0x7FFF, 0, 1]
    assert all(d.long_picture_id for _, d in out)


def test_dropping_temporal_layers_closes_picture_id_gaps() -> None:
    rewriter = Vp8Rewriter(picture_id=500, tl0picidx=10, tid=1)
    out = run(rewriter, stream(7000, 40, 12))
    assert [n for n, d in out if d.start] == [0, 2, 4, 6, 8, 10]  # the TID 2 pictures go
    assert {d.tid for _, d in out} == {0, 1}
    assert picture_ids(out) == list(range(500, 506))  # no gap for them
    assert tl0s(out) == [10, 11, 12]
    rewriter.forward(0)
    out = run(rewriter, stream(7012, 43, 8, keyframes=()))
    assert [n for n, d in out if d.start] == [0, 4]
    assert picture_ids(out) == [506, 507]
    assert tl0s(out) == [13, 14]


def test_temporal_switch_up_waits_for_sync_frames() -> None:
    rewriter = Vp8Rewriter(picture_id=0, tl0picidx=0, tid=0)
    pictures = stream(0, 0, 16)
    out = run(rewriter, pictures[:8])  # pictures 0-3 at TID 0 only
    assert [n for n, d in out if d.start] == [0]
    rewriter.forward(2)
    # picture 4 (TID 0), 5 (TID 2 with Y: not the next layer up), 6 (TID 1 with Y: up to 1),
    # 7 (TID 2, no Y), 8 (TID 0), 9 (TID 2 with Y: up to 2), then everything
    out = run(rewriter, pictures[8:])
    assert [n for n, d in out if d.start] == [4, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    assert picture_ids(out) == list(range(1, 11))


def test_keyframe_switches_temporal_layers_up_at_once() -> None:
    rewriter = Vp8Rewriter(tid=0)
    run(rewriter, stream(0, 0, 4))
    rewriter.forward(2)
    out = run(rewriter, stream(4, 1, 4, keyframes=(0,)))  # a keyframe: all layers from it
    assert [n for n, d in out if d.start] == [0, 1, 2, 3]


def test_packets_of_one_picture_map_alike_when_interleaved() -> None:
    rewriter = Vp8Rewriter(picture_id=100, tid=1)
    packets = stream(50, 0, 6, packets=3)
    # picture 1 (TID 2, dropped) arrives interleaved with picture 2's packets, and a late
    # packet of picture 0 after both
    order = [0, 1, 3, 4, 6, 7, 5, 8, 2] + list(range(9, 18))
    out = run(rewriter, [packets[i] for i in order])
    by_picture: dict[int, set[int | None]] = {}
    for n, d in out:
        by_picture.setdefault(n, set()).add(d.picture_id)
    # pictures 1, 3 and 5 are TID 2: dropped, and without a gap for them
    assert by_picture == {0: {100}, 2: {101}, 4: {102}}


def test_stale_packets_of_the_new_source_are_dropped() -> None:
    rewriter = Vp8Rewriter()
    packets = stream(10, 0, 4, keyframes=(2,))
    assert rewriter.rewrite(parse(packets[4][1])) is not None  # keyframe 2 starts it
    assert rewriter.rewrite(parse(packets[2][1])) is None  # picture 1: before the start
    assert rewriter.rewrite(parse(packets[5][1])) is not None


def test_new_source_flag_waits_for_a_keyframe() -> None:
    rewriter = Vp8Rewriter(picture_id=10)
    run(rewriter, stream(0, 0, 2))
    inter = parse(stream(900, 0, 2, keyframes=())[0][1])
    assert rewriter.rewrite(inter, new_source=True) is None
    assert rewriter.starting  # still waiting
    key = parse(stream(900, 0, 2, keyframes=(1,))[2][1])
    rewritten = rewriter.rewrite(key)
    assert rewritten is not None and parse(rewritten + b"\x00").picture_id == 12


def test_packets_without_i_or_l() -> None:
    rewriter = Vp8Rewriter()
    plain_key = b("0 0 0 1 0 000") + KEY_HEADER  # X=0 S=1 PID=0
    assert rewriter.rewrite(parse(plain_key)) == plain_key[:1]
    continuation = b("0 0 0 0 0 010")  # S=0 PID=2
    assert rewriter.rewrite(parse(continuation)) == continuation
    tid_only = b("1 0 0 1 0 000") + b("0 0 1 0 0000") + b("01 1 00000") + INTER_HEADER
    assert rewriter.rewrite(parse(tid_only)) == tid_only[:3]
    rewriter.forward(0)
    assert rewriter.rewrite(parse(tid_only)) is None  # TID 1 dropped
    # a stream that starts carrying PictureIDs later numbers from the initial value
    keyed = Vp8Rewriter(picture_id=77)
    assert keyed.rewrite(parse(plain_key)) is not None
    later = parse(descriptor(5000, tl0=3, tid=0) + b"x")
    out = keyed.rewrite(later)
    assert out is not None and parse(out + b"\x00").picture_id == 77


def test_picture_id_map_alone() -> None:
    ids = PictureIdMap(initial=0x7FFF, long=True)
    ids.start(40, True)
    assert ids.output(40) == 0x7FFF
    ext = ids.unwrap(41, True)
    assert ext == 41 and ids.drop(41)
    ext = ids.unwrap(42, True)
    assert ext == 42 and ids.output(42) == 0
    assert ids.unwrap(39, True) is None  # before the source's first picture
    assert ids.output(40) == 0x7FFF and ids.last == 0


def test_switch_to_a_source_whose_keyframe_has_no_picture_id() -> None:
    rewriter = Vp8Rewriter(picture_id=200, tl0picidx=9)
    run(rewriter, stream(5000, 0, 3))  # output 200-202, TL0PICIDX 9
    rewriter.switch_source()
    plain_key = b("0 0 0 1 0 000") + KEY_HEADER  # X=0: no PictureID, no TL0PICIDX
    assert rewriter.rewrite(parse(plain_key)) == plain_key[:1]
    # the new source's numbering starts later, unrelated to the old one's (5000s): it
    # continues the output, and is not taken for stale
    later = rewriter.rewrite(parse(descriptor(17, tl0=80, tid=0) + b"x"))
    assert later is not None
    out = parse(later + b"\x00")
    assert out.picture_id == 203 and out.tl0picidx == 10
