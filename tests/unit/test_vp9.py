"""VP9 payload descriptors (RFC 9628 §4.2), the SVC selector's tests and the per-subscriber
rewriter, with bytes.

Descriptors are written bit by bit: ``b("1010 1100")`` is one octet, its bits in the order of
the RFC's figure (most significant first), the comment beside it naming them::

        0 1 2 3 4 5 6 7
       +-+-+-+-+-+-+-+-+
       |I|P|L|F|B|E|V|Z| (REQUIRED)
  I:   |M| PICTURE ID  |
  M:   | EXTENDED PID  |
  L:   | TID |U| SID |D|
       |   TL0PICIDX   | (F=0)
  P,F: | P_DIFF      |N| (F=1, P=1; up to 3)
  V:   | SS            |

and the SS (§4.2.1): |N_S|Y|G|-|-|-|, (WIDTH, HEIGHT) 16 bits each N_S+1 times when Y, then
when G: N_G and N_G entries |TID|U|R|-|-| each followed by R P_DIFF octets.
"""

from __future__ import annotations

import random
import struct

import pytest

from relay.rtc.vp9 import (
    Vp9Descriptor,
    Vp9Error,
    Vp9GroupPicture,
    Vp9Rewriter,
    Vp9Scalability,
    parse_vp9,
    vp9_frame_start,
    vp9_picture_end,
    vp9_usable,
)
from tests.unit.test_vp8 import b


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def packet(payload: bytes, padding: int = 0) -> tuple[bytes, int]:
    """A plain RTP packet around ``payload`` and the offset of its payload."""
    first = 0xA0 if padding else 0x80
    header = struct.pack("!BBHII", first, 98, 1, 1, 1)
    tail = (b"\x00" * (padding - 1) + bytes([padding])) if padding else b""
    return header + payload + tail, len(header)


def parse(payload: bytes) -> Vp9Descriptor:
    return parse_vp9(*packet(payload))


# the SS of a 3-spatial-layer, 3-temporal-layer stream: resolutions, and the picture group of
# libwebrtc's 3-temporal-layer pattern (TIDs 0, 2, 1, 2)
SS_L3T3 = (
    b("010 1 1 000")  # N_S=2 (3 layers) Y=1 G=1
    + u16(320)
    + u16(180)  # layer 0
    + u16(640)
    + u16(360)  # layer 1
    + u16(1280)
    + u16(720)  # layer 2
    + b("0000 0100")  # N_G = 4
    + b("000 0 01 00")  # TID=0 U=0 R=1
    + b("0000 0100")  # P_DIFF = 4
    + b("010 1 01 00")  # TID=2 U=1 R=1
    + b("0000 0001")  # P_DIFF = 1
    + b("001 1 01 00")  # TID=1 U=1 R=1
    + b("0000 0010")  # P_DIFF = 2
    + b("010 1 01 00")  # TID=2 U=1 R=1
    + b("0000 0001")  # P_DIFF = 1
)
SS_L3T3_PARSED = Vp9Scalability(
    spatial_layers=3,
    resolutions=((320, 180), (640, 360), (1280, 720)),
    group=(
        Vp9GroupPicture(0, False, (4,)),
        Vp9GroupPicture(2, True, (1,)),
        Vp9GroupPicture(1, True, (2,)),
        Vp9GroupPicture(2, True, (1,)),
    ),
)


# -- parsing ----------------------------------------------------------------------------------


def test_minimal_descriptor() -> None:
    desc = parse(b("0 0 0 0 1 1 0 0") + b"frame")  # I=0 P=0 L=0 F=0 B=1 E=1 V=0 Z=0
    assert desc == Vp9Descriptor(
        size=1,
        picture_id=None,
        long_picture_id=False,
        inter_predicted=False,
        layer_indices=False,
        flexible=False,
        begin=True,
        end=True,
        not_reference_upper=False,
        tid=0,
        switching_up=False,
        sid=0,
        inter_layer=False,
        tl0picidx=None,
        p_diffs=(),
        ss=None,
        rest=b"",
    )
    assert desc.keyframe


def test_non_flexible_keyframe_with_ss() -> None:
    payload = (
        b("1 0 1 0 1 0 1 0")  # I=1 P=0 L=1 F=0 B=1 E=0 V=1 Z=0
        + b("1 0010010")  # M=1, PictureID high 7 bits
        + b("0110 0111")  # PictureID low 8 bits: 0x1267
        + b("000 1 000 0")  # TID=0 U=1 SID=0 D=0
        + b("1111 1110")  # TL0PICIDX = 254
        + SS_L3T3
    )
    desc = parse(payload + b"frame")
    assert desc.size == len(payload)
    assert desc.picture_id == 0x1267 and desc.long_picture_id
    assert desc.layer_indices and not desc.flexible and desc.begin and not desc.end
    assert (desc.tid, desc.switching_up, desc.sid, desc.inter_layer) == (0, True, 0, False)
    assert desc.tl0picidx == 254 and desc.p_diffs == ()
    assert desc.ss == SS_L3T3_PARSED
    assert desc.rest == SS_L3T3
    assert desc.keyframe


def test_every_first_octet_bit() -> None:
    desc = parse(b("0 1 0 0 0 1 0 1"))  # P=1, E=1, Z=1
    assert desc.inter_predicted and desc.end and desc.not_reference_upper
    assert not (desc.begin or desc.layer_indices or desc.flexible or desc.keyframe)
    desc = parse(b("0 0 0 1 0 0 0 0"))  # F=1 alone: flexible, P=0 so no P_DIFF
    assert desc.flexible and desc.p_diffs == () and desc.size == 1


def test_seven_bit_picture_id_and_layer_indices() -> None:
    desc = parse(
        b("1 1 1 0 1 1 0 0")  # I=1 P=1 L=1 F=0 B=1 E=1
        + b("0 1111111")  # M=0 PictureID=127
        + b("101 0 011 1")  # TID=5 U=0 SID=3 D=1
        + b("0000 0000")  # TL0PICIDX=0
    )
    assert desc.picture_id == 127 and not desc.long_picture_id
    assert (desc.tid, desc.switching_up, desc.sid, desc.inter_layer) == (5, False, 3, True)
    assert desc.tl0picidx == 0 and desc.size == 4 and not desc.keyframe


def test_flexible_mode_p_diffs() -> None:
    head = b("1 1 1 1 1 0 0 0") + b("1 0000000") + b("0000 0101")  # I P L F B; PictureID 5
    layer = b("001 0 001 1")  # TID=1 U=0 SID=1 D=1; no TL0PICIDX in flexible mode
    one = parse(head + layer + b("0000001 0"))  # P_DIFF=1 N=0
    assert one.p_diffs == (1,) and one.tl0picidx is None and one.size == 5
    two = parse(head + layer + b("0000010 1") + b("0000100 0"))  # 2, N=1; 4, N=0
    assert two.p_diffs == (2, 4)
    three = parse(head + layer + b("0000001 1") + b("0000010 1") + b("1111111 0"))
    assert three.p_diffs == (1, 2, 127) and three.size == 7
    assert three.rest == b("0000001 1") + b("0000010 1") + b("1111111 0")
    with pytest.raises(Vp9Error, match="P_DIFF"):  # a fourth announced
        parse(head + layer + b("0000001 1") + b("0000010 1") + b("0000011 1") + b"\x08")
    # flexible without layer indices: P_DIFFs follow the PictureID
    bare = parse(b("1 1 0 1 1 0 0 0") + b("0 0000011") + b("0000011 0"))
    assert bare.p_diffs == (3,) and bare.sid == 0 and bare.tid == 0


def test_ss_variants() -> None:
    no_y_no_g = parse(b("0 0 0 0 1 0 1 0") + b("001 0 0 000"))  # B V; N_S=1 Y=0 G=0
    assert no_y_no_g.ss == Vp9Scalability(2, (), None) and no_y_no_g.size == 2
    empty_group = parse(b("0 0 0 0 1 0 1 0") + b("000 0 1 000") + b("0000 0000"))  # G, N_G=0
    assert empty_group.ss == Vp9Scalability(1, (), ())
    one_layer = parse(b("0 0 0 0 1 0 1 0") + b("000 1 0 000") + u16(1920) + u16(1080))
    assert one_layer.ss == Vp9Scalability(1, ((1920, 1080),), None)
    refs = parse(
        b("0 0 0 0 1 0 1 0")  # B V
        + b("000 0 1 000")  # N_S=0 Y=0 G=1
        + b("0000 0010")  # N_G=2
        + b("000 0 00 00")  # TID=0 U=0 R=0
        + b("001 1 11 00")  # TID=1 U=1 R=3
        + b("0000 0001")
        + b("0000 0010")
        + b("0000 0011")
    )
    assert refs.ss is not None
    assert refs.ss.group == (Vp9GroupPicture(0, False, ()), Vp9GroupPicture(1, True, (1, 2, 3)))


FULL = [
    b("1 0 1 0 1 0 1 0")
    + b("1 0010010")
    + b("0110 0111")
    + b("000 1 000 0")
    + b("1111 1110")
    # ^ I L B V; 15-bit PictureID; layer indices; TL0PICIDX; then the SS
    + SS_L3T3,
    b("1 1 1 1 1 0 0 0") + b("0 0000101") + b("001 0 001 1") + b("0000001 1") + b("0000010 0"),
    b("0 0 0 0 1 0 1 0") + b("000 1 0 000") + u16(1920) + u16(1080),
]


@pytest.mark.parametrize("payload", FULL)
def test_every_truncation_raises(payload: bytes) -> None:
    assert parse(payload).size == len(payload)
    for length in range(len(payload)):
        data, offset = packet(payload[:length])
        with pytest.raises(Vp9Error):
            parse_vp9(data, offset)
    for length in range(12):
        with pytest.raises(Vp9Error):
            parse_vp9(packet(payload)[0][:length], 12)


def test_padding_is_not_payload() -> None:
    data, offset = packet(b("1 0 0 0 1 0 0 0") + b("1 0000000"), padding=1)
    with pytest.raises(Vp9Error):  # the second PictureID octet would be padding
        parse_vp9(data, offset)
    data, offset = packet(b("1 0 0 0 1 0 0 0") + b("1 0000000") + b"\x01", padding=3)
    assert parse_vp9(data, offset).picture_id == 1


def test_random_bytes_raise_only_vp9_error() -> None:
    rng = random.Random(9628)
    for _ in range(3000):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 24)))
        try:
            desc = parse(payload)
        except Vp9Error:
            continue
        assert 1 <= desc.size <= len(payload)


# -- selector helpers -------------------------------------------------------------------------


def layer_frame_packet(sid: int, tid: int, *, begin: bool, end: bool) -> Vp9Descriptor:
    return parse(
        bytes(((0x20 | (0x08 if begin else 0) | (0x04 if end else 0)),))  # L B E
        + bytes(((tid << 5) | (sid << 1) | (1 if sid else 0),))  # TID U=0 SID D
        + b"\x00"  # TL0PICIDX
    )


def test_frame_start_picture_end_and_usable() -> None:
    start1 = layer_frame_packet(1, 0, begin=True, end=False)
    assert vp9_frame_start(start1, 1) and not vp9_frame_start(start1, 0)
    assert not vp9_frame_start(layer_frame_packet(1, 0, begin=False, end=True), 1)
    end1 = layer_frame_packet(1, 2, begin=False, end=True)
    assert vp9_picture_end(end1, False, 1)  # E of the target layer
    assert not vp9_picture_end(end1, False, 2)  # layer 2 still to come
    assert vp9_picture_end(end1, True, 2)  # ... unless the marker says there is none
    assert not vp9_picture_end(end1, True, 0)  # not this subscriber's packet at all
    assert not vp9_picture_end(layer_frame_packet(1, 2, begin=True, end=False), False, 1)
    assert vp9_usable(end1, 1, 2) and vp9_usable(end1, 2, 7)
    assert not vp9_usable(end1, 0, 2) and not vp9_usable(end1, 1, 1)


# -- the rewriter on an L3T3 stream -----------------------------------------------------------

PATTERN = (0, 2, 1, 2)  # TIDs of the picture group
UP = (False, True, True, True)  # U of each picture of the group, as libwebrtc marks them


def l3t3(
    first_id: int,
    first_tl0: int,
    pictures: int,
    *,
    keyframes: tuple[int, ...] = (0,),
    up: tuple[bool, ...] = UP,
    inter_predicted_keyframe_layers: tuple[int, ...] = (),
) -> list[tuple[int, bool, bytes]]:
    """A full-SVC L3T3 stream in non-flexible mode: (picture index, marker, payload) per
    packet; 3 spatial layer frames per picture (D=1 above layer 0), 2 packets each (B on
    the first, E on the second), the marker on the last packet of layer 2; the SS on the first
    packet of each keyframe."""
    out = []
    tl0 = first_tl0 - 1
    for n in range(pictures):
        key = n in keyframes
        tid = 0 if key else PATTERN[n % 4]
        if tid == 0:
            tl0 = (tl0 + 1) & 0xFF
        pid = (first_id + n) & 0x7FFF
        for sid in range(3):
            predicted = not key or (sid in inter_predicted_keyframe_layers)
            for k in range(2):
                begin, end = k == 0, k == 1
                ss = key and sid == 0 and begin
                first = (
                    0x80  # I
                    | (0x40 if predicted else 0)  # P
                    | 0x20  # L; F=0
                    | (0x08 if begin else 0)  # B
                    | (0x04 if end else 0)  # E
                    | (0x02 if ss else 0)  # V
                )
                payload = bytes(
                    (
                        first,
                        0x80 | pid >> 8,  # M=1, PictureID high bits
                        pid & 0xFF,
                        (tid << 5) | (up[n % 4] << 4) | (sid << 1) | (sid > 0),  # TID U SID D
                        tl0,
                    )
                )
                if ss:
                    payload += SS_L3T3
                out.append((n, end and sid == 2, payload + b"frame"))
    return out


def run(
    rewriter: Vp9Rewriter,
    packets: list[tuple[int, bool, bytes]],
    new_source_at: int | None = None,
) -> list[tuple[int, bool, Vp9Descriptor]]:
    """Feed packets; (picture index, output marker, parsed output descriptor) of each
    forwarded one, checking the rest of the payload would follow the descriptor unchanged."""
    out = []
    for i, (n, marker, payload) in enumerate(packets):
        desc = parse(payload)
        result = rewriter.rewrite(desc, marker, new_source=i == new_source_at)
        if result is None:
            continue
        rewritten, out_marker = result
        parsed = parse(rewritten + payload[desc.size :])
        assert parsed.size == len(rewritten)
        assert parsed._replace(picture_id=0, tl0picidx=0, long_picture_id=True) == desc._replace(
            picture_id=0, tl0picidx=0, long_picture_id=True
        )  # everything else as received, SS included
        out.append((n, out_marker, parsed))
    return out


def test_s1t1_subscriber_of_l3t3() -> None:
    packets = l3t3(0x7FFD, 250, 8)
    rewriter = Vp9Rewriter(spatial=1, temporal=1, picture_id=300, tl0picidx=7)
    out = run(rewriter, packets)
    # pictures 0, 2, 4, 6 (TID 0 and 1), spatial layers 0 and 1, both packets of each
    assert [(n, d.sid, d.begin) for n, _, d in out] == [
        (n, sid, begin) for n in (0, 2, 4, 6) for sid in (0, 1) for begin in (True, False)
    ]
    # the marker on the end of layer 1, the last forwarded layer of each picture, only
    assert [(n, d.sid) for n, marker, d in out if marker] == [(0, 1), (2, 1), (4, 1), (6, 1)]
    assert all(d.end and d.sid == 1 for _, marker, d in out if marker)
    # PictureIDs continue from the initial value with the input's gaps (TID 2 pictures), and
    # the input's wrap at 0x7FFF
    assert sorted({(n, d.picture_id) for n, _, d in out}) == [
        (0, 300),
        (2, 302),
        (4, 304),
        (6, 306),
    ]
    assert [d.tl0picidx for n, _, d in out if d.begin and d.sid == 0] == [7, 7, 8, 8]
    # the stateless test agrees with the rewriter once it is on its layers
    usable = [n for n, _, p in packets if vp9_usable(parse(p), 1, 1)]
    assert usable == [n for n, _, _ in out]


def test_full_subscriber_gets_everything_unmarked_but_the_publisher_marker() -> None:
    packets = l3t3(10, 0, 8)
    out = run(Vp9Rewriter(picture_id=10, tl0picidx=0), packets)
    assert len(out) == len(packets)
    assert [m for _, m, _ in out] == [m for _, m, _ in packets]


def test_spatial_layers_go_up_only_at_a_keyframe() -> None:
    rewriter = Vp9Rewriter(spatial=0, temporal=2, picture_id=0, tl0picidx=0)
    first = run(rewriter, l3t3(0, 0, 4))
    assert {d.sid for _, _, d in first} == {0}
    assert [n for n, m, d in first if m] == [0, 1, 2, 3]  # layer 0 ends each picture
    rewriter.forward(2, 2)
    second = run(rewriter, l3t3(4, 1, 8, keyframes=(4,)))  # a keyframe at picture 4
    assert {(n, d.sid) for n, _, d in second if n < 4} == {(0, 0), (1, 0), (2, 0), (3, 0)}
    assert {d.sid for n, _, d in second if n >= 4} == {0, 1, 2}
    assert [(n, d.sid) for n, m, d in second if m] == [(n, 0) for n in range(4)] + [
        (n, 2) for n in range(4, 8)
    ]
    rewriter.forward(1, 2)  # down at the next picture
    third = run(rewriter, l3t3(12, 3, 2, keyframes=()))
    assert {d.sid for _, _, d in third} == {0, 1}
    assert [(n, d.sid) for n, m, d in third if m] == [(0, 1), (1, 1)]


def test_keyframe_upper_layer_that_is_inter_predicted_caps_the_switch() -> None:
    # a keyframe picture whose layer 2 frame has P=1 cannot be decoded from the keyframe alone
    rewriter = Vp9Rewriter(spatial=2, temporal=2)
    out = run(rewriter, l3t3(0, 0, 4, inter_predicted_keyframe_layers=(2,)))
    assert {d.sid for _, _, d in out} == {0, 1}
    assert rewriter.current_sid == 1 and rewriter.target_sid == 2


def test_temporal_switch_up_at_u_frames() -> None:
    rewriter = Vp9Rewriter(spatial=0, temporal=0, picture_id=0, tl0picidx=0)
    packets = l3t3(0, 0, 12)
    out = run(rewriter, packets[:24])  # pictures 0-3: TID 0 only
    assert sorted({n for n, _, _ in out}) == [0]
    rewriter.forward(0, 2)
    # 4 (TID 0), 5 (TID 2, U, two layers up: no), 6 (TID 1, U: up to 1), 7 (TID 2, U: up
    # to 2), then everything
    out = run(rewriter, packets[24:])
    assert sorted({n for n, _, _ in out}) == [4, 6, 7, 8, 9, 10, 11]


def test_temporal_switch_up_after_a_u_picture_of_a_forwarded_layer() -> None:
    # RFC 9628 §4.2: U on a TID 0 picture: later pictures of higher layers do not reference
    # any before it, so all layers can follow from the next picture
    up = (True, False, False, False)
    rewriter = Vp9Rewriter(spatial=0, temporal=0)
    packets = l3t3(0, 0, 8, up=up)
    run(rewriter, packets[:24])
    rewriter.forward(0, 2)
    out = run(rewriter, packets[24:])
    assert sorted({n for n, _, _ in out}) == [4, 5, 6, 7]


def test_publisher_restart_keeps_numbering_continuous() -> None:
    rewriter = Vp9Rewriter(spatial=2, temporal=2, picture_id=0x7FFE, tl0picidx=255)
    first = run(rewriter, l3t3(5000, 90, 4))
    assert sorted({d.picture_id or 0 for _, _, d in first}) == [0, 1, 0x7FFE, 0x7FFF]
    rewriter.switch_source()
    restarted = l3t3(17, 3, 6, keyframes=(2,))
    second = run(rewriter, restarted)
    assert min(n for n, _, _ in second) == 2  # waits for the keyframe
    assert sorted({(n, d.picture_id) for n, _, d in second}) == [(2, 2), (3, 3), (4, 4), (5, 5)]
    assert [d.tl0picidx for n, _, d in first + second if d.begin and d.sid == 0 and d.tid == 0] == [
        255,
        0,
        1,
    ]


def test_new_source_flag_and_stale_packets() -> None:
    rewriter = Vp9Rewriter(picture_id=100)
    packets = l3t3(40, 0, 3, keyframes=(1,))
    assert rewriter.rewrite(parse(packets[0][2]), False, new_source=True) is None  # not a key
    results = [rewriter.rewrite(parse(p), m) for _, m, p in packets[6:]]
    assert all(r is not None for r in results)
    assert rewriter.rewrite(parse(packets[0][2]), False) is None  # picture 0: before the start


def test_flexible_mode_rewrite_keeps_p_diffs() -> None:
    rewriter = Vp9Rewriter(picture_id=1000, long_picture_id=True)
    key = b("1 0 1 1 1 1 0 0") + b("0 0000011") + b("000 0 000 0") + b"k"  # I L F B E; 7-bit
    inter = b("1 1 1 1 1 1 0 0") + b("0 0000100") + b("000 0 000 0") + b("0000001 0") + b"p"
    out_key = rewriter.rewrite(parse(key), True)
    assert out_key is not None
    assert out_key[0] == b("1 0 1 1 1 1 0 0") + b("1 0000011") + b("1110 1000") + b(
        "000 0 000 0"
    )  # widened to 15 bits: 1000
    out_inter = rewriter.rewrite(parse(inter), True)
    assert out_inter is not None
    desc = parse(out_inter[0])
    assert desc.picture_id == 1001 and desc.p_diffs == (1,) and out_inter[1]


def test_descriptor_without_picture_id_or_layers_passes() -> None:
    rewriter = Vp9Rewriter(spatial=0, temporal=0)
    key = b("0 0 0 0 1 1 0 0")  # B E
    inter = b("0 1 0 0 1 1 0 0")  # P B E
    assert rewriter.rewrite(parse(key), True) == (key, True)
    assert rewriter.rewrite(parse(inter), False) == (inter, True)  # E of layer 0: marked


def test_restart_whose_keyframe_has_no_picture_id() -> None:
    rewriter = Vp9Rewriter(picture_id=50, tl0picidx=3)
    run(rewriter, l3t3(20000, 0, 2))  # output 50-51
    rewriter.switch_source()
    assert rewriter.rewrite(parse(b("0 0 0 0 1 1 0 0")), True) is not None  # B E, no I/L
    result = rewriter.rewrite(parse(l3t3(9, 40, 1, keyframes=())[0][2]), False)
    assert result is not None
    desc = parse(result[0])
    assert desc.picture_id == 52 and desc.tl0picidx == 4


def test_restart_continues_from_the_last_forwarded_picture() -> None:
    rewriter = Vp9Rewriter(spatial=2, temporal=1, picture_id=10)
    out = run(rewriter, l3t3(600, 0, 4))  # pictures 1 and 3 (TID 2) are not forwarded
    assert sorted({d.picture_id or 0 for _, _, d in out}) == [10, 12]
    rewriter.switch_source()
    out = run(rewriter, l3t3(4000, 0, 1))
    assert {d.picture_id for _, _, d in out} == {13}
