"""Layer filtering within one RTP stream, per subscriber, with bytes: VP8 temporal layers and
VP9 spatial and temporal layers dropped above an :class:`OutboundStream`'s ``max_spatial`` /
``max_temporal``, the output sequence numbers continuous and mapped back for NACKs, the RTP
marker bit on the end of the highest forwarded layer; and what a :class:`Track` measures of its
layers (:class:`relay.sfu.svc.LayerStats`).

The streams are real :class:`OutboundStream` objects with protection a no-op and the track a
stand-in with what the stream reads of it (clock rate, codec, keyframe requests).
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

from relay.metrics import Metrics
from relay.rtc import rtcp
from relay.rtc.dependency_descriptor import (
    DecodeTargetIndication,
    FrameDescriptor,
    FrameTemplate,
    RenderResolution,
    TemplateStructure,
    write,
)
from relay.rtc.dependency_descriptor import parse as parse_dd
from relay.rtc.rtp import (
    ExtensionRewriter,
    extension_profile,
    is_rtcp,
    parse_extensions,
    parse_rtp,
)
from relay.rtc.sdp import Codec
from relay.rtc.vp8 import parse_vp8
from relay.rtc.vp9 import parse_vp9
from relay.sfu.outbound import OutboundStream
from relay.sfu.svc import LayerStats, choose_layers
from tests.unit.test_sfu import FIXTURES, Harness

ADDR = ("192.0.2.1", 5000)


class Keyframes:
    def __init__(self) -> None:
        self.requests: list[tuple[float, bool]] = []

    def request(self, now: float, force: bool = False) -> None:
        self.requests.append((now, force))


def make_stream(codec: str) -> tuple[OutboundStream, Any]:
    clock = [0.0]
    track = SimpleNamespace(
        clock_rate=90000,
        codec=Codec(payload_type=96, name=codec, clock_rate=90000, kind="video"),
        keyframes=Keyframes(),
        ctx=SimpleNamespace(clock=lambda: clock[0]),
        svc=None,
    )
    stream = OutboundStream(track, 100, Metrics(), None)  # type: ignore[arg-type]
    stream.rewriter.__init__(90000, initial_seq=1000, initial_ts=0)  # type: ignore[misc]
    stream.transport = SimpleNamespace(addr=ADDR)  # type: ignore[assignment]
    stream.protect = lambda packet: packet
    return stream, track


def rtp(seq: int, ts: int, payload: bytes, marker: bool = False) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | 96, seq, ts, 0x1234) + payload


class Sent:
    """What one stream sent: (seq, marker, payload) of each packet, in order."""

    def __init__(self, stream: OutboundStream) -> None:
        self.stream = stream
        self.packets: list[bytes] = []
        self.inputs: dict[int, bytes] = {}  # output seq -> input packet

    def feed(self, packet: bytes, now: float = 0.0) -> bytes | None:
        _pt, seq, ts, _ssrc, _m, offset, _eo, _el = parse_rtp(packet)
        batch: list[tuple[bytes, Any]] = []
        self.stream.forward(packet, offset, seq, ts, [], len(packet), now, batch)
        assert len(batch) <= 1
        if not batch:
            return None
        out = batch[0][0]
        assert batch[0][1] == ADDR
        self.packets.append(out)
        self.inputs[parse_rtp(out)[1]] = packet
        return out

    @property
    def seqs(self) -> list[int]:
        return [parse_rtp(p)[1] for p in self.packets]

    def media(self) -> list[bytes]:
        """The packets with a payload (not padding-only)."""
        return [p for p in self.packets if not p[0] & 0x20]


def continuous(seqs: list[int]) -> bool:
    return all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))


# -- VP8 -------------------------------------------------------------------------------------

#: libwebrtc's 3-temporal-layer pattern: TIDs of successive pictures, and the layer-sync bit
VP8_TIDS = (0, 2, 1, 2)


def vp8_payload(
    picture_id: int, tl0: int, tid: int, sync: bool, keyframe: bool, start: bool, body: bytes
) -> bytes:
    first = 0x80 | (0x10 if start else 0)  # X, S; PID 0
    desc = bytes(
        (first, 0xE0, 0x80 | picture_id >> 8, picture_id & 0xFF, tl0, tid << 6 | sync << 5)
    )
    header = b""
    if start:
        header = b"\x00\x00\x00\x9d\x01\x2a" if keyframe else b"\x01\x00\x00"
    return desc + header + body


def vp8_l1t3(
    pictures: int,
    *,
    first_seq: int = 100,
    first_pid: int = 500,
    keyframes: tuple[int, ...] = (0,),
    packets_per_picture: int = 2,
    sync: tuple[bool, ...] = (False, True, True, False),
) -> list[tuple[int, int, bytes]]:
    """(picture index, tid, RTP packet) of an L1T3 VP8 stream."""
    out = []
    seq = first_seq
    tl0 = 20
    for n in range(pictures):
        tid = VP8_TIDS[n % 4]
        key = n in keyframes
        if key:
            tid = 0
        if tid == 0 and n:
            tl0 += 1
        for k in range(packets_per_picture):
            payload = vp8_payload(
                (first_pid + n) & 0x7FFF,
                tl0 & 0xFF,
                tid,
                sync[n % 4] and not key,
                key,
                k == 0,
                bytes((n & 0xFF, k)) * 10,
            )
            out.append((n, tid, rtp(seq & 0xFFFF, 3000 * n, payload, k == packets_per_picture - 1)))
            seq += 1
    return out


def test_a_stream_that_filters_nothing_forwards_every_packet_unchanged() -> None:
    stream, _ = make_stream("VP8")
    assert stream.max_spatial is None and stream.max_temporal is None
    assert not stream.layered
    sent = Sent(stream)
    for _n, _tid, packet in vp8_l1t3(8):
        out = sent.feed(packet)
        assert out is not None and out[12:] == packet[12:]  # payload untouched
    assert sent.seqs == list(range(1000, 1016))


def test_vp8_max_temporal_drops_upper_layers_with_continuous_numbering() -> None:
    stream, _ = make_stream("VP8")
    stream.max_temporal = 0
    assert stream.layered
    sent = Sent(stream)
    packets = vp8_l1t3(16)
    for _n, _tid, packet in packets:
        sent.feed(packet)
    assert sent.seqs == list(range(1000, 1000 + 8))  # pictures 0, 4, 8, 12: two packets each
    descs = [parse_vp8(p, 12) for p in sent.packets]
    assert {d.tid for d in descs} == {0}
    # PictureIDs and TL0PICIDX (starting anywhere on a new stream) without gaps where
    # pictures were dropped
    pids = [d.picture_id or 0 for d in descs if d.start]
    assert pids == [(pids[0] + k) & 0x7FFF for k in range(4)]
    tl0s = [d.tl0picidx or 0 for d in descs if d.start]
    assert tl0s == [(tl0s[0] + k) & 0xFF for k in range(4)]
    # the payload after the descriptor is the publisher's
    assert [p[18:] for p in sent.packets] == [p[18:] for n, _t, p in packets if n % 4 == 0]


def test_vp8_max_temporal_1_then_all_switches_up_at_a_sync_picture() -> None:
    stream, _ = make_stream("VP8")
    stream.max_temporal = 1
    sent = Sent(stream)
    packets = vp8_l1t3(12)
    for n, _tid, packet in packets:
        if n == 6:
            stream.max_temporal = None  # everything from the next TID 2 sync picture
        sent.feed(packet)
    starts = [parse_vp8(p, 12) for p in sent.packets]
    # 0-5: pictures 0, 2, 4 (TID 0, 1); from 6: TID 2 picture 7 has no sync bit, 9 has it
    forwarded = [0, 2, 4, 6, 8, 9, 10, 11]
    assert [p[-2] for p in sent.packets if p[12] & 0x10] == forwarded  # the payloads' tags
    pids = [d.picture_id or 0 for d in starts if d.start]
    assert pids == [(pids[0] + k) & 0x7FFF for k in range(len(forwarded))]
    assert continuous(sent.seqs)


def test_vp8_nack_rebuild_gives_the_packet_as_first_sent() -> None:
    stream, _ = make_stream("VP8")
    stream.max_temporal = 0
    sent = Sent(stream)
    for _n, _tid, packet in vp8_l1t3(12):
        sent.feed(packet)
    for out in sent.packets:
        out_seq = parse_rtp(out)[1]
        in_seq = stream.rewriter.input_seq_of(out_seq)
        original = sent.inputs[out_seq]
        assert in_seq == parse_rtp(original)[1]
        _pt, _s, ts, _ss, _m, offset, _eo, _el = parse_rtp(original)
        rebuilt = stream.build(
            original, offset, out_seq, (ts + stream.rewriter.ts_offset), [], None
        )
        assert rebuilt == out


def test_vp8_filter_set_mid_stream_continues_the_numbering_without_a_keyframe() -> None:
    stream, track = make_stream("VP8")
    stream.restart(0.0)  # as the SFU starts every subscription
    sent = Sent(stream)
    packets = vp8_l1t3(16)
    for n, _tid, packet in packets:
        if n == 5:
            stream.max_temporal = 0
        sent.feed(packet)
    descs = [parse_vp8(p, 12) for p in sent.packets]
    pids = [d.picture_id or 0 for d in descs if d.start]
    # pictures 0-4 as they were; then the TID 0 ones (8, 12), their PictureIDs following on
    assert pids == [500, 501, 502, 503, 504, 505, 506]
    assert continuous(sent.seqs)
    assert track.keyframes.requests == []  # going down needs no keyframe


# -- VP9 -------------------------------------------------------------------------------------


def ss_l3(width: int = 1280, height: int = 720) -> bytes:
    body = bytes((0b010_1_1_000,))
    for k in (4, 2, 1):
        body += struct.pack("!HH", width // k, height // k)
    body += bytes((4,))  # N_G = 4: TIDs 0, 2, 1, 2
    for tid, up, diff in ((0, 0, 4), (2, 1, 1), (1, 1, 2), (2, 1, 1)):
        body += bytes((tid << 5 | up << 4 | 1 << 2, diff))
    return body


def vp9_l3t3(
    pictures: int,
    *,
    first_seq: int = 100,
    first_pid: int = 300,
    keyframes: tuple[int, ...] = (0,),
    spatial: int = 3,
) -> list[tuple[int, int, int, bytes]]:
    """(picture index, sid, tid, RTP packet) of an L3T3 VP9 stream in non-flexible mode: two
    packets per layer frame, the RTP marker on the last packet of the picture."""
    out = []
    seq = first_seq
    tl0 = 0
    for n in range(pictures):
        key = n in keyframes
        tid = 0 if key else VP8_TIDS[n % 4]
        if tid == 0 and n:
            tl0 += 1
        for sid in range(spatial):
            for k in range(2):
                begin, end = k == 0, k == 1
                first = (
                    0x80  # I
                    | (0 if key else 0x40)  # P
                    | 0x20  # L
                    | (0x08 if begin else 0)
                    | (0x04 if end else 0)
                    | (0x02 if key and begin and sid == 0 else 0)
                )
                pid = (first_pid + n) & 0x7FFF
                up = 1 if tid > 0 else 0
                payload = bytes(
                    (
                        first,
                        0x80 | pid >> 8,
                        pid & 0xFF,
                        tid << 5 | up << 4 | sid << 1 | (sid > 0),
                        tl0 & 0xFF,
                    )
                )
                if key and begin and sid == 0:
                    payload += ss_l3()
                payload += bytes((n & 0xFF, sid, k)) * 8
                marker = end and sid == spatial - 1
                out.append((n, sid, tid, rtp(seq & 0xFFFF, 3000 * n, payload, marker)))
                seq += 1
    return out


def marker(packet: bytes) -> bool:
    return packet[1] >= 0x80


def test_vp9_max_spatial_forwards_the_lower_layers_and_marks_their_end() -> None:
    stream, _ = make_stream("VP9")
    stream.max_spatial = 1
    sent = Sent(stream)
    packets = vp9_l3t3(8)
    for _n, _sid, _tid, packet in packets:
        sent.feed(packet)
    descs = [parse_vp9(p, 12) for p in sent.packets]
    assert {d.sid for d in descs} == {0, 1}
    assert len(sent.packets) == 8 * 4
    assert continuous(sent.seqs)
    # the marker on the last packet of spatial layer 1 of each picture, nowhere else
    assert [(d.sid, d.end) for p, d in zip(sent.packets, descs, strict=True) if marker(p)] == [
        (1, True)
    ] * 8
    assert sum(marker(p) for p in sent.packets) == 8
    # PictureIDs go on by one (nothing is dropped by picture here)
    pids = sorted({d.picture_id or 0 for d in descs})
    assert pids == [pids[0] + k for k in range(8)]


def test_vp9_max_temporal_and_spatial_together() -> None:
    stream, _ = make_stream("VP9")
    stream.max_spatial = 0
    stream.max_temporal = 1
    sent = Sent(stream)
    for _n, _sid, _tid, packet in vp9_l3t3(12):
        sent.feed(packet)
    descs = [parse_vp9(p, 12) for p in sent.packets]
    assert {(d.sid, d.tid) for d in descs} == {(0, 0), (0, 1)}
    assert continuous(sent.seqs)
    assert len(sent.packets) == 6 * 2  # pictures 0, 2, 4, 6, 8, 10
    assert sum(marker(p) for p in sent.packets) == 6


def test_vp9_spatial_up_waits_for_a_keyframe_and_asks_for_one() -> None:
    stream, track = make_stream("VP9")
    stream.max_spatial = 0
    sent = Sent(stream)
    packets = vp9_l3t3(12, keyframes=(0, 8))
    for n, _sid, _tid, packet in packets:
        if n == 4 and stream.max_spatial == 0:
            stream.max_spatial = None
            assert track.keyframes.requests and track.keyframes.requests[-1][1] is True
        sent.feed(packet, now=n / 15)
    by_picture: dict[int, set[int]] = {}
    for p in sent.packets:
        d = parse_vp9(p, 12)
        by_picture.setdefault(p[-3], set()).add(d.sid)  # the payload's picture tag
    assert all(by_picture[n] == {0} for n in range(8))
    assert all(by_picture[n] == {0, 1, 2} for n in range(8, 12))
    assert continuous(sent.seqs)
    # each picture ends once: at layer 0 until the keyframe, at the publisher's end after it
    assert sum(marker(p) for p in sent.packets) == 12


def test_vp9_spatial_down_at_the_next_picture_mid_stream() -> None:
    stream, track = make_stream("VP9")
    stream.restart(0.0)  # as the SFU starts every subscription
    sent = Sent(stream)
    packets = vp9_l3t3(8)
    for n, sid, _tid, packet in packets:
        if n == 3 and sid == 1:
            stream.max_spatial = 0  # in the middle of picture 3: from picture 4
        sent.feed(packet)
    descs = [parse_vp9(p, 12) for p in sent.packets]
    sids: dict[int | None, set[int]] = {}
    for d in descs:
        sids.setdefault(d.picture_id, set()).add(d.sid)
    assert [sids[300 + n] for n in range(8)] == [{0, 1, 2}] * 4 + [{0}] * 4
    assert continuous(sent.seqs)
    assert sum(marker(p) for p in sent.packets) == 8
    assert track.keyframes.requests == []


def test_vp9_nack_rebuild_keeps_the_rewritten_marker() -> None:
    stream, _ = make_stream("VP9")
    stream.max_spatial = 0
    sent = Sent(stream)
    for _n, _sid, _tid, packet in vp9_l3t3(6):
        sent.feed(packet)
    for out in sent.packets:
        out_seq = parse_rtp(out)[1]
        original = sent.inputs[out_seq]
        assert stream.rewriter.input_seq_of(out_seq) == parse_rtp(original)[1]
        _pt, _s, ts, _ss, _m, offset, _eo, _el = parse_rtp(original)
        rebuilt = stream.build(
            original, offset, out_seq, (ts + stream.rewriter.ts_offset), [], None
        )
        assert rebuilt == out


def test_vp9_late_packet_of_a_dropped_layer_fills_its_number_with_padding() -> None:
    stream, _ = make_stream("VP9")
    stream.max_spatial = 0
    sent = Sent(stream)
    packets = [p for _n, _s, _t, p in vp9_l3t3(3)]
    # picture 1: its layer 1 frame's second packet (index 6 + 3) arrives after picture 2's first
    order = list(range(len(packets)))
    late = 6 + 3
    order.remove(late)
    order.insert(12 + 1, late)
    for i in order:
        sent.feed(packets[i])
    assert continuous(sorted(sent.seqs)) and len(set(sent.seqs)) == len(sent.seqs)
    padding = [p for p in sent.packets if p[0] & 0x20]
    assert len(padding) == 1
    pad = padding[0]
    _pt, pad_seq, _ts, _ssrc, pad_marker, offset, _eo, _el = parse_rtp(pad)
    assert not pad_marker and offset + pad[-1] == len(pad)  # nothing but padding
    assert stream.rewriter.input_seq_of(pad_seq) is None  # a NACK for it resends nothing
    assert {parse_vp9(p, 12).sid for p in sent.media()} == {0}


# -- what a track measures of its layers ------------------------------------------------------


def test_layer_stats_of_vp9_count_bytes_and_frames_per_layer() -> None:
    stats = LayerStats("VP9")
    packets = vp9_l3t3(16)
    for _n, _sid, _tid, packet in packets:
        offset = parse_rtp(packet)[5]
        stats.count(packet, offset, [], len(packet))
    stats.tick(1.0)
    assert stats.spatial_layers == 3 and stats.temporal_layers == 3
    assert stats.resolutions == ((320, 180), (640, 360), (1280, 720))
    size = {(n, s): len(p) for n, s, _t, p in packets}  # noqa: F841
    expected: dict[tuple[int, int], int] = {}
    frames: dict[tuple[int, int], int] = {}
    for _n, sid, tid, packet in packets:
        expected[sid, tid] = expected.get((sid, tid), 0) + len(packet) * 8
        if parse_vp9(packet, 12).begin:
            frames[sid, tid] = frames.get((sid, tid), 0) + 1
    assert stats.bitrates == {k: float(v) for k, v in expected.items()}
    assert stats.frame_rates == {k: float(v) for k, v in frames.items()}
    # what a subscriber of S1T1 receives: layers 0-1 of temporal layers 0-1
    assert stats.bitrate(1, 1) == sum(v for (s, t), v in expected.items() if s <= 1 and t <= 1)
    assert stats.bitrate(None, None) == sum(expected.values())
    assert stats.frame_rate(1) == frames[0, 0] + frames[0, 1]
    # the next second counts afresh
    stats.tick(1.0)
    assert stats.bitrates == {} and stats.bitrate(2, 2) == 0.0


def test_layer_stats_of_vp8_count_temporal_layers() -> None:
    stats = LayerStats("VP8")
    packets = vp8_l1t3(16)
    for _n, _tid, packet in packets:
        stats.count(packet, 12, [], len(packet))
    stats.tick(2.0)
    assert stats.spatial_layers == 1 and stats.temporal_layers == 3
    assert stats.frame_rates == {(0, 0): 2.0, (0, 1): 2.0, (0, 2): 4.0}
    assert stats.temporal is True


def test_layer_stats_of_vp8_without_temporal_layers_give_up() -> None:
    stats = LayerStats("VP8")
    packet = rtp(1, 0, bytes((0x90, 0x80, 0x05)) + b"\x01\x00\x00" + b"x" * 20)
    for _ in range(LayerStats.VP8_PROBE):
        stats.count(packet, 12, [], len(packet))
    assert stats.temporal is False  # the track stops counting (Track.receive)


def test_choose_layers_from_the_wishes_and_what_the_track_measured() -> None:
    stats = LayerStats("VP9")
    for _n, _sid, _tid, packet in vp9_l3t3(16):
        stats.count(packet, 12, [], len(packet))
    stats.tick(1.0)  # 16 pictures a second: 4 of TID 0, 4 of TID 1, 8 of TID 2
    assert choose_layers(stats, None, None, None) == (None, None)
    assert choose_layers(stats, None, 360, None) == (1, None)
    assert choose_layers(stats, 320, None, None) == (0, None)
    assert choose_layers(stats, None, 100, None) == (0, None)  # the lowest when none fits
    assert choose_layers(stats, 1920, 1080, None) == (None, None)
    assert choose_layers(stats, None, None, 8) == (None, 1)
    assert choose_layers(stats, None, 180, 4) == (0, 0)
    assert choose_layers(stats, None, None, 30) == (None, None)
    assert choose_layers(None, None, 180, 4) == (None, None)
    assert choose_layers(LayerStats("VP9"), None, 180, 4) == (None, None)  # nothing known yet


def test_setting_the_same_layers_again_asks_for_nothing() -> None:
    stream, track = make_stream("VP9")
    stream.max_spatial = 0
    sent = Sent(stream)
    for _n, _sid, _tid, packet in vp9_l3t3(2):
        sent.feed(packet)
    stream.set_layers(None, None)
    assert len(track.keyframes.requests) == 1
    stream.set_layers(None, None)
    stream.max_spatial = None
    assert len(track.keyframes.requests) == 1


# -- AV1 with the dependency descriptor --------------------------------------------------------

S, R, D, N = (
    DecodeTargetIndication.SWITCH,
    DecodeTargetIndication.REQUIRED,
    DecodeTargetIndication.DISCARDABLE,
    DecodeTargetIndication.NOT_PRESENT,
)
#: L1T3: decode targets T0, T0-T1, T0-T2; one chain (the T0 frames) protecting all three
L1T3 = TemplateStructure(
    template_id_offset=0,
    decode_target_count=3,
    templates=(
        FrameTemplate(0, 0, (S, S, S), (), (0,)),  # keyframe
        FrameTemplate(0, 0, (S, S, S), (4,), (4,)),
        FrameTemplate(0, 1, (N, D, R), (2,), (2,)),
        FrameTemplate(0, 2, (N, N, D), (1,), (1,)),
        FrameTemplate(0, 2, (N, N, D), (1,), (3,)),
    ),
    chain_count=1,
    decode_target_protected_by=(0, 0, 0),
    resolutions=(RenderResolution(1280, 720),),
)
#: L2T1: decode targets S0, S0-S1
L2T1 = TemplateStructure(
    template_id_offset=0,
    decode_target_count=2,
    templates=(
        FrameTemplate(0, 0, (S, S), ()),  # keyframe
        FrameTemplate(0, 0, (S, R), (2,)),
        FrameTemplate(1, 0, (N, S), (1,)),  # on the keyframe
        FrameTemplate(1, 0, (N, R), (1, 2)),
    ),
    resolutions=(RenderResolution(640, 360), RenderResolution(1280, 720)),
)
DD_ID = 5  # the publisher's id of the dependency descriptor
DD_OUT = 7  # the subscriber's


def dd(
    structure: TemplateStructure,
    template: int,
    number: int,
    *,
    start: bool,
    end: bool,
    key: bool = False,
) -> FrameDescriptor:
    t = structure.templates[template]
    return FrameDescriptor(
        start, end, template, number & 0xFFFF, structure, key and start, None, False, False,
        False, t.spatial_id, t.temporal_id, t.dtis, t.fdiffs, t.chain_fdiffs,
    )  # fmt: skip


def av1_l1t3(
    pictures: int, keyframes: tuple[int, ...] = (0,)
) -> list[tuple[int, int, tuple[bytes, bytes]]]:
    """(picture, temporal id, (descriptor, packet)) of an L1T3 AV1 stream: two packets a
    frame, the marker on the last (each frame is its own temporal unit)."""
    out = []
    for n in range(pictures):
        key = n in keyframes
        template = 0 if key else (1, 3, 2, 4)[n % 4]
        for k in range(2):
            frame = dd(L1T3, template, 1000 + n, start=k == 0, end=k == 1, key=key)
            value = write(frame)
            out.append(
                (
                    n,
                    frame.temporal_id,
                    (value, rtp(100 + 2 * n + k, 3000 * n, bytes((n, k)) * 20, k == 1)),
                )
            )
    return out


def av1_l2t1(
    pictures: int, keyframes: tuple[int, ...] = (0,)
) -> list[tuple[int, int, tuple[bytes, bytes]]]:
    """(picture, spatial id, (descriptor, packet)) of an L2T1 AV1 stream: per temporal
    unit an S0 and an S1 frame of two packets each, the marker on the last."""
    out = []
    seq = 100
    for n in range(pictures):
        key = n in keyframes
        for sid in (0, 1):
            template = (0 if key else 1) if sid == 0 else (2 if key else 3)
            for k in range(2):
                frame = dd(
                    L2T1,
                    template,
                    1000 + 2 * n + sid,
                    start=k == 0,
                    end=k == 1,
                    key=key and sid == 0,
                )
                value = write(frame)
                marker = sid == 1 and k == 1
                out.append((n, sid, (value, rtp(seq, 3000 * n, bytes((n, sid, k)) * 20, marker))))
                seq += 1
    return out


class Av1Feed(Sent):
    """Feeds packets with their descriptor the way Track.receive does: the track's layer
    statistics first (they keep the structure), then the stream."""

    def __init__(self, stream: OutboundStream, track: Any) -> None:
        super().__init__(stream)
        self.track = track
        track.svc = LayerStats("AV1", DD_ID)
        stream.ext = ExtensionRewriter({DD_ID: DD_OUT}, None, None)
        self.values: dict[int, bytes] = {}  # output seq -> the descriptor received

    def feed_dd(self, item: tuple[bytes, bytes], now: float = 0.0) -> bytes | None:
        value, packet = item
        elements = [(DD_ID, value)]
        self.track.svc.count(packet, 12, elements, len(packet))
        _pt, seq, ts, _ssrc, _m, offset, _eo, _el = parse_rtp(packet)
        batch: list[tuple[bytes, Any]] = []
        self.stream.forward(packet, offset, seq, ts, elements, len(packet), now, batch)
        if not batch:
            return None
        out = batch[0][0]
        self.packets.append(out)
        self.inputs[parse_rtp(out)[1]] = packet
        self.values[parse_rtp(out)[1]] = value
        return out


def out_dd(packet: bytes, structure: TemplateStructure) -> FrameDescriptor:
    _pt, _seq, _ts, _ssrc, _m, _offset, ext_offset, ext_length = parse_rtp(packet)
    elements = dict(parse_extensions(packet, ext_offset, ext_length, extension_profile(packet)))
    return parse_dd(elements[DD_OUT], structure)


def test_av1_max_temporal_forwards_one_decode_target_and_says_so() -> None:
    stream, _track = make_stream("AV1")
    feed = Av1Feed(stream, _track)
    stream.max_temporal = 0
    for _n, _tid, item in av1_l1t3(12):
        feed.feed_dd(item)
    frames = [out_dd(p, L1T3) for p in feed.packets]
    assert {f.temporal_id for f in frames} == {0}
    assert len(feed.packets) == 2 * 3  # pictures 0, 4, 8
    assert continuous(feed.seqs)
    # the subscriber is told it can decode the T0 target only: with the structure, and at
    # the start of every frame
    assert all(f.active_decode_targets == 0b001 for f in frames if f.start_of_frame)
    assert all(marker(p) == f.end_of_frame for p, f in zip(feed.packets, frames, strict=True))


def test_av1_max_spatial_moves_the_marker_to_the_end_of_the_lower_layer() -> None:
    stream, _track = make_stream("AV1")
    feed = Av1Feed(stream, _track)
    stream.max_spatial = 0
    for _n, _sid, item in av1_l2t1(6):
        feed.feed_dd(item)
    frames = [out_dd(p, L2T1) for p in feed.packets]
    assert {f.spatial_id for f in frames} == {0}
    assert len(feed.packets) == 6 * 2
    assert continuous(feed.seqs)
    assert [marker(p) for p in feed.packets] == [False, True] * 6
    assert all(f.active_decode_targets == 0b01 for f in frames if f.start_of_frame)


def test_av1_going_up_waits_for_a_switch_point_and_asks_for_a_keyframe() -> None:
    stream, track = make_stream("AV1")
    feed = Av1Feed(stream, track)
    stream.max_spatial = 0
    for n, _sid, item in av1_l2t1(8, keyframes=(0, 5)):
        if n == 2 and stream.max_spatial == 0:
            stream.max_spatial = None
            assert track.keyframes.requests and track.keyframes.requests[-1][1] is True
        feed.feed_dd(item, now=n / 30)
    by_picture: dict[int, set[int]] = {}
    for p in feed.packets:
        by_picture.setdefault(p[-3], set()).add(out_dd(p, L2T1).spatial_id)
    assert [by_picture[n] for n in range(8)] == [{0}] * 5 + [{0, 1}] * 3
    assert continuous(feed.seqs)
    frames = [out_dd(p, L2T1) for p in feed.packets]
    assert frames[-2].active_decode_targets in (0b11, None)


def test_av1_filter_set_mid_stream_goes_down_without_a_keyframe() -> None:
    stream, track = make_stream("AV1")
    stream.restart(0.0)
    feed = Av1Feed(stream, track)
    for n, _tid, item in av1_l1t3(12):
        if n == 3:
            stream.max_temporal = 1
        feed.feed_dd(item)
    tids = [out_dd(p, L1T3).temporal_id for p in feed.packets]
    # 0-3 everything (mid-stream, the unit of the first packet seen may be under way: the
    # stream goes down at the next one); from 4 T0 and T1 only
    assert [p[-2] for p in feed.packets if not marker(p)] == [0, 1, 2, 3, 4, 6, 8, 10]
    assert continuous(feed.seqs)
    assert track.keyframes.requests == []
    assert max(tids) == 2


def test_av1_nack_rebuild_carries_the_rewritten_descriptor() -> None:
    stream, track = make_stream("AV1")
    feed = Av1Feed(stream, track)
    stream.max_temporal = 0
    for _n, _tid, item in av1_l1t3(8):
        feed.feed_dd(item)
    for out in feed.packets:
        out_seq = parse_rtp(out)[1]
        original = feed.inputs[out_seq]
        _pt, _s, ts, _ss, _m, offset, _eo, _el = parse_rtp(original)
        rebuilt = stream.build(
            original,
            offset,
            out_seq,
            (ts + stream.rewriter.ts_offset) & 0xFFFFFFFF,
            [(DD_ID, feed.values[out_seq])],
            None,
        )
        assert rebuilt == out


def test_layer_stats_of_av1_from_the_descriptor() -> None:
    stats = LayerStats("AV1", DD_ID)
    for _n, _sid, item in av1_l2t1(10):
        value, packet = item
        stats.count(packet, 12, [(DD_ID, value)], len(packet))
    stats.tick(1.0)
    assert stats.structure == L2T1
    assert stats.spatial_layers == 2 and stats.temporal_layers == 1
    assert stats.resolutions == ((640, 360), (1280, 720))
    assert stats.frame_rates == {(0, 0): 10.0, (1, 0): 10.0}
    assert choose_layers(stats, None, 360, None) == (0, None)


def test_layer_stats_ladder_lists_every_choice_lowest_first() -> None:
    stats = LayerStats("VP9")
    for _n, _sid, _tid, packet in vp9_l3t3(8):
        stats.count(packet, 12, [], len(packet))
    stats.tick(1.0)
    ladder = stats.ladder()
    assert [(s, t) for s, t, _ in ladder] == [(s, t) for s in range(3) for t in range(3)]
    assert all(rate == stats.bitrate(s, t) for s, t, rate in ladder)
    rates = [rate for _, _, rate in ladder]
    assert rates[-1] == stats.bitrate(None, None)
    assert stats.to_dict()["resolutions"] == [[320, 180], [640, 360], [1280, 720]]


# -- through the SFU: a VP9 publisher, a subscriber limited to layer 0, its NACKs ---------------


def test_through_the_sfu_a_limited_subscriber_gets_layer_0_and_its_nacks_are_answered() -> None:
    alice, bob = ("10.0.0.1", 4000), ("10.0.0.2", 5000)
    h = Harness()
    h.sfu.delete_room("r")
    h.sfu.create_room("r", codec_preference=["VP9"])
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.publish("alice", (FIXTURES / "chrome_offer.sdp").read_text())
    h.answer("bob", twcc=False)
    publisher_leg = h.sfu.get_participant("r", "alice").publisher_leg
    subscriber_leg = h.sfu.get_participant("r", "bob").subscriber_leg
    assert publisher_leg is not None and subscriber_leg is not None
    h.connect(publisher_leg, alice)
    h.connect(subscriber_leg, bob)
    sub = next(
        s
        for s in h.sfu.get_participant("r", "bob").subscriptions.values()
        if s.track.kind == "video"
    )
    assert sub.track.codec.name == "VP9" and sub.active
    sub.stream.max_spatial = 0  # what the layer allocation sets
    ssrc, pt = 1840449578, 98  # the offer's video SSRC and VP9 payload type

    def to_bob() -> list[bytes]:
        return [d for d, a in h.sent if a == bob and 127 < d[0] < 192 and not is_rtcp(d)]

    packets = vp9_l3t3(8)
    for _n, _sid, _tid, packet in packets:
        header = bytes((packet[0], (packet[1] & 0x80) | pt)) + packet[2:8]
        h.receive(header + ssrc.to_bytes(4, "big") + packet[12:], alice)
    out = to_bob()
    assert [parse_vp9(p, parse_rtp(p)[5]).sid for p in out] == [0] * 16
    seqs = [parse_rtp(p)[1] for p in out]
    assert continuous(seqs)
    assert [p[1] >= 0x80 for p in out] == [False, True] * 8
    # bob NACKs two of them: both resent on RTX, each the packet as first sent to him
    h.sent.clear()
    h.receive(rtcp.nack(1, sub.ssrc, [seqs[3], seqs[10]]), bob)
    resent = to_bob()
    assert len(resent) == 2 and all(parse_rtp(r)[3] == sub.rtx_ssrc for r in resent)
    for r, original in zip(resent, (out[3], out[10]), strict=True):
        offset = parse_rtp(r)[5]
        assert r[offset : offset + 2] == original[2:4]  # RTX: the original sequence number
        assert r[offset + 2 :] == original[parse_rtp(original)[5] :]


def test_av1_decode_target_changes_only_between_temporal_units() -> None:
    stream, track = make_stream("AV1")
    feed = Av1Feed(stream, track)
    stream.max_spatial = 1  # the top: a selector, forwarding everything
    for n, sid, item in av1_l2t1(6):
        if n == 2 and sid == 1:
            stream.max_spatial = 0  # between the two frames of unit 2: from unit 3
        feed.feed_dd(item)
    units: dict[int, list[tuple[int, bool]]] = {}
    for p in feed.packets:
        units.setdefault(p[-3], []).append((out_dd(p, L2T1).spatial_id, marker(p)))
    assert [sorted({s for s, _ in units[n]}) for n in range(6)] == [[0, 1]] * 3 + [[0]] * 3
    # every unit's end is marked once, on its last packet
    assert all([m for _, m in units[n]].count(True) == 1 and units[n][-1][1] for n in units)
    assert continuous(feed.seqs)


def test_av1_filter_set_in_the_middle_of_a_frame_forwards_the_rest_of_its_unit() -> None:
    stream, track = make_stream("AV1")
    stream.restart(0.0)
    feed = Av1Feed(stream, track)
    items = av1_l2t1(5)
    for index, (n, sid, item) in enumerate(items):
        if n == 2 and sid == 0 and index % 2 == 1:
            stream.max_spatial = 0  # between the two packets of unit 2's S0 frame
        feed.feed_dd(item)
    units: dict[int, list[tuple[int, bool]]] = {}
    for p in feed.packets:
        units.setdefault(p[-3], []).append((out_dd(p, L2T1).spatial_id, marker(p)))
    # unit 2 whole (its frames were under way), layer 0 alone from unit 3
    assert [len(units[n]) for n in range(5)] == [4, 4, 4, 2, 2]
    assert all([m for _, m in units[n]].count(True) == 1 and units[n][-1][1] for n in units)
    assert continuous(feed.seqs)
