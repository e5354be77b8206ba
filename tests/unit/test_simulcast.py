"""Simulcast from a publisher, with bytes over real handshakes: the answer lets Chromium send its
three RID layers, each layer's packets are routed by rid (and their retransmissions by
repaired rid), a subscriber gets one layer at a time (the best one, or the best within its
size limits) and moves between layers only at a keyframe of the target, its numbering
continuous; NACKs and sender reports follow the layer it is on."""

from __future__ import annotations

import struct

from relay.rtc import rtcp
from relay.rtc.rtp import is_rtcp, parse_rtp
from relay.rtc.sdp import parse_sdp
from relay.rtc.vp8 import parse_vp8
from relay.sfu.sfu import _ranked_layers
from tests.unit.test_sfu import FIXTURES, Harness, rtp

ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)
MID_ID, RID_ID, RRID_ID = 4, 10, 11
VP8_PT, RTX_PT = 96, 97
#: (rid, SSRC, picture size) of the three layers Chromium sends for sendEncodings q, h, f
LAYERS = [("q", 0x1111, (320, 180)), ("h", 0x2222, (640, 360)), ("f", 0x3333, (1280, 720))]


def vp8(keyframe: bool, size: tuple[int, int], tag: int) -> bytes:
    """A VP8 payload: descriptor (X=1, S=1, PID=0; 15-bit PictureID), then for a keyframe
    the frame tag, start code and picture size (RFC 6386 §9.1)."""
    descriptor = bytes([0x90, 0x80, 0x80 | (tag >> 8 & 0x7F), tag & 0xFF])
    if not keyframe:
        return descriptor + b"\x01\x00\x00delta"
    width, height = size
    return descriptor + b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"key"


class Call:
    """Alice publishes Chromium's three layers; bob subscribes without transport-cc (no
    bandwidth estimate: layers are chosen by his size wishes alone; test_allocation.py has
    the estimate's part)."""

    def __init__(self, twcc: bool = False) -> None:
        self.h = h = Harness()
        h.sfu.add_participant("r", "alice")
        h.sfu.add_participant("r", "bob")
        self.answer = parse_sdp(
            h.publish("alice", (FIXTURES / "chrome_simulcast_offer.sdp").read_text())
        )
        h.answer("bob", twcc=twcc)
        self.alice, self.bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
        h.connect(self.alice.publisher_leg, ALICE)
        h.connect(self.bob.subscriber_leg, BOB)
        self.video = next(s for s in self.bob.subscriptions.values() if s.track.kind == "video")
        self.track = self.video.track
        self.seq = {ssrc: 1000 * i for i, (_rid, ssrc, _size) in enumerate(LAYERS)}
        self.sent_seq: dict[int, list[int]] = {ssrc: [] for _r, ssrc, _s in LAYERS}

    def send(
        self, layer: int, keyframe: bool = False, first: bool = False, padding: int = 0
    ) -> int:
        """One packet of a layer (its first carries mid and rid, as Chromium's do), its payload
        ``padding`` bytes longer than the bare descriptor and frame header."""
        rid, ssrc, size = LAYERS[layer]
        self.seq[ssrc] += 1
        seq = self.seq[ssrc]
        elements = [(MID_ID, b"1"), (RID_ID, rid.encode())] if first else []
        payload = vp8(keyframe, size, seq) + bytes(padding)
        self.h.receive(rtp(ssrc, VP8_PT, seq, seq * 3000, elements, payload), ALICE)
        self.sent_seq[ssrc].append(seq)
        return seq

    def start_all(self) -> None:
        for layer in range(3):
            self.send(layer, keyframe=True, first=True)

    def to_bob(self) -> list[bytes]:
        return [
            d
            for d, a in self.h.sent
            if a == BOB
            and 127 < d[0] < 192
            and not is_rtcp(d)
            and parse_rtp(d)[3] == self.video.ssrc
        ]


def test_the_answer_receives_every_rid_layer() -> None:
    call = Call()
    video = next(m for m in call.answer.media if m.kind == "video")
    assert [(rid, direction) for rid, direction in video.rids] == [
        ("q", "recv"),
        ("h", "recv"),
        ("f", "recv"),
    ]
    assert video.simulcast is not None and "recv" in video.simulcast
    assert [layer.rid for layer in call.track.layers] == ["q", "h", "f"]
    assert call.track.to_dict()["simulcast_layers"][0]["rid"] == "q"


def test_each_layer_is_routed_by_rid_and_the_subscriber_gets_the_best_one() -> None:
    call = Call()
    call.start_all()
    leg = call.alice.publisher_leg
    by_ssrc = {ssrc: leg.ssrc_map[ssrc] for _r, ssrc, _s in LAYERS}
    assert [by_ssrc[ssrc].rid for _r, ssrc, _s in LAYERS] == ["q", "h", "f"]
    assert [(t.width, t.height) for t in call.track.layers] == [s for _r, _x, s in LAYERS]
    call.h.sent.clear()
    for _ in range(3):
        for layer in range(3):
            call.send(layer)
    out = call.to_bob()
    # only the top layer's packets, in its own order, numbered continuously for bob
    assert len(out) == 3
    seqs = [parse_rtp(d)[1] for d in out]
    assert seqs == [seqs[0], (seqs[0] + 1) & 0xFFFF, (seqs[0] + 2) & 0xFFFF]
    assert call.video.stream.track is call.track.layers[2]
    stats = call.h.sfu.participant_stats("r", "alice")["inbound"]
    video = next(e for e in stats if e["kind"] == "video")
    assert [x["rid"] for x in video["layers"]] == ["q", "h", "f"]
    assert all(x["packets"] == 4 for x in video["layers"])


def _plis_for(call: Call, ssrc: int) -> int:
    return sum(
        isinstance(p, rtcp.Pli) and p.media_ssrc == ssrc
        for d, a in call.h.sent
        if a == ALICE and 127 < d[0] < 192 and is_rtcp(d)
        for p in rtcp.parse_rtcp(d)
    )


def test_a_size_limit_moves_the_subscriber_at_the_target_layers_keyframe() -> None:
    call = Call()
    call.start_all()
    for layer in range(3):
        call.send(layer)
    call.h.sent.clear()
    call.h.now += 1.0
    call.h.sfu.set_subscription_preferences("r", "bob", call.track.track_id, {"max_height": 180})
    q = call.track.layers[0]
    assert call.video.stream.target is q
    assert _plis_for(call, LAYERS[0][1]) == 1  # the lowest layer is asked for a keyframe
    call.h.sent.clear()
    # until q's keyframe, bob stays on the top layer
    call.send(0)
    call.send(2)
    assert len(call.to_bob()) == 1
    last_top = parse_rtp(call.to_bob()[0])[1]
    call.send(0, keyframe=True)  # the switch
    call.send(2)  # no longer bob's
    call.send(0)
    out = call.to_bob()
    assert len(out) == 3
    seqs = [parse_rtp(d)[1] for d in out]
    assert seqs == [last_top, (last_top + 1) & 0xFFFF, (last_top + 2) & 0xFFFF]
    # the keyframe's payload as q sent it, behind a descriptor renumbered for bob: its
    # PictureIDs go on from the top layer's, one per picture, across the switch
    q_keyframe = vp8(True, LAYERS[0][2], call.seq[0x1111] - 1)
    assert out[1][parse_rtp(out[1])[5] + 4 :] == q_keyframe[4:]
    picture_ids = [parse_vp8(d, parse_rtp(d)[5]).picture_id for d in out]
    assert picture_ids == [picture_ids[0], picture_ids[0] + 1, picture_ids[0] + 2]
    assert call.video.stream.track is q


def test_nacks_and_sender_reports_follow_the_layer_the_subscriber_is_on() -> None:
    call = Call()
    call.start_all()
    for _ in range(4):
        for layer in range(3):
            call.send(layer)
    call.h.sent.clear()
    # a NACK for bob's last packet is answered from the top layer's history, on RTX
    call.send(2)
    (latest,) = call.to_bob()
    call.h.sent.clear()
    call.h.receive(rtcp.nack(1, call.video.ssrc, [parse_rtp(latest)[1]]), BOB)
    resent = [d for d, a in call.h.sent if a == BOB and 127 < d[0] < 192 and not is_rtcp(d)]
    assert len(resent) == 1 and parse_rtp(resent[0])[3] == call.video.rtx_ssrc
    # a sender report of the top layer is translated for bob; one of another layer is not
    call.h.sent.clear()
    f_ssrc, q_ssrc = LAYERS[2][1], LAYERS[0][1]
    call.h.receive(rtcp.sender_report(q_ssrc, 0xE000000000000000, 5000, 9, 99), ALICE)
    call.h.receive(rtcp.sender_report(f_ssrc, 0xE000000100000000, 9000, 9, 99), ALICE)
    reports = [
        p
        for d, a in call.h.sent
        if a == BOB and 127 < d[0] < 192 and is_rtcp(d)
        for p in rtcp.parse_rtcp(d)
        if isinstance(p, rtcp.SenderReport)
    ]
    assert [r.ntp_timestamp for r in reports] == [0xE000000100000000]


def test_a_retransmission_is_routed_to_its_layer_by_repaired_rid() -> None:
    call = Call()
    call.start_all()
    call.send(2)
    call.seq[LAYERS[2][1]] += 1  # this one is lost on the way
    lost = call.seq[LAYERS[2][1]]
    call.send(2)
    call.h.sent.clear()
    # f's lost packet repaired on an RTX SSRC first seen now: bound to f's RTX slot by rrid
    rtx = rtp(0x9999, RTX_PT, 1, lost * 3000, [(MID_ID, b"1"), (RRID_ID, b"f")])
    repair = vp8(False, LAYERS[2][2], lost)
    call.h.receive(rtx[: -len(b"\x90\x10payload-bytes")] + lost.to_bytes(2, "big") + repair, ALICE)
    f = call.track.layers[2]
    assert f.rtx_ssrc == 0x9999 and call.alice.publisher_leg.rtx_map[0x9999] is f
    assert f.rtx_received == 1
    (repaired,) = call.to_bob()  # and bob gets it, in its place in his numbering
    assert repaired[parse_rtp(repaired)[5] + 4 :] == repair[4:]


def test_layers_nobody_receives_are_announced_as_unused() -> None:
    call = Call()
    call.start_all()
    call.h.now += 1.0
    call.h.sfu.tick(call.h.now)
    (first,) = call.h.events_of("publisher.layers")
    assert first["track_id"] == call.track.track_id and first["participant_id"] == "alice"
    assert (first["wanted"], first["unused"]) == (["f"], ["q", "h"])
    call.h.sfu.tick(call.h.now + 0.5)
    assert len(call.h.events_of("publisher.layers")) == 1  # only changes are announced
    call.h.sfu.set_subscription_preferences("r", "bob", call.track.track_id, {"max_height": 360})
    call.send(1, keyframe=True)  # bob moves to h
    call.h.sfu.tick(call.h.now + 1.0)
    last = call.h.events_of("publisher.layers")[-1]
    assert (last["wanted"], last["unused"]) == (["h"], ["q", "f"])


def test_a_layer_that_stops_is_left_and_still_wanted_and_taken_again_when_it_returns() -> None:
    call = Call()
    call.start_all()
    for layer in range(3):
        call.send(layer)
    f, h = call.track.layers[2], call.track.layers[1]
    assert call.video.stream.track is f
    # the publisher stops f (its bandwidth estimate fell, say): q and h go on for 3 s
    for _ in range(3):
        call.h.now += 1.0
        call.send(0)
        call.send(1)
        call.h.sfu.tick(call.h.now)
    assert call.video.stream.target is h and call.video.stream.wanted is f
    call.send(1, keyframe=True)
    assert call.video.stream.track is h  # moved at h's keyframe
    announced = call.h.events_of("publisher.layers")[-1]
    assert set(announced["wanted"]) == {"h", "f"}  # f stays wanted: the publisher may resume it
    # f comes back: bob returns to it at its keyframe
    call.send(2, keyframe=True)
    call.h.now += 1.0
    call.h.sfu.tick(call.h.now)
    assert call.video.stream.target is f
    call.send(2, keyframe=True)
    assert call.video.stream.track is f
    seqs = [parse_rtp(d)[1] for d in call.to_bob()]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))


def test_a_switch_still_waiting_for_its_keyframe_asks_again_every_second() -> None:
    call = Call()
    call.start_all()
    for layer in range(3):
        call.send(layer)
    call.h.now += 1.0
    call.h.sfu.set_subscription_preferences("r", "bob", call.track.track_id, {"max_height": 180})
    q = call.track.layers[0]
    assert call.video.stream.target is q and call.video.stream.track is not q
    assert _plis_for(call, LAYERS[0][1]) == 1
    # the publisher does not answer (its PLI lost, say): each second asks again
    for second in range(1, 4):
        call.h.now += 1.0
        call.h.sfu.tick(call.h.now)
        assert _plis_for(call, LAYERS[0][1]) == 1 + second
    call.send(0, keyframe=True)
    assert call.video.stream.track is q
    call.h.now += 1.0
    call.h.sfu.tick(call.h.now)
    assert _plis_for(call, LAYERS[0][1]) == 4  # switched: no more asking


def test_h264_layers_are_ranked_by_the_picture_size_of_their_sps() -> None:
    """An H.264 simulcast publisher listing its layers top first: the subscriber still gets
    the top one, and max_height 360 the middle one, ranked by their SPS sizes."""
    h = Harness()
    del h.sfu.rooms["r"]
    h.sfu.create_room("r", codec_preference=["H264"])
    h.sfu.add_participant("r", "alice")
    answer = parse_sdp(h.publish("alice", (FIXTURES / "chrome_simulcast_offer.sdp").read_text()))
    video = next(m for m in answer.media if m.kind == "video")
    assert video.codecs[0].name == "H264"
    pt = video.codecs[0].payload_type
    alice = h.sfu.get_participant("r", "alice")
    h.connect(alice.publisher_leg, ALICE)
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    # each layer's first packet: a keyframe's STAP-A with the SPS of its picture size
    sizes = {"q": (1280, 720), "h": (640, 360), "f": (320, 180)}  # named the other way round
    for rid, ssrc, _size in LAYERS:
        sps = h264_sps(*sizes[rid])
        payload = b"\x18" + struct.pack("!H", len(sps)) + sps + b"\x00\x02\x65\x88"
        elements = [(MID_ID, b"1"), (RID_ID, rid.encode())]
        h.receive(rtp(ssrc, pt, 1, 0, elements, payload), ALICE)
    assert {t.rid: (t.width, t.height) for t in track.layers} == sizes
    assert [t.rid for t in _ranked_layers(track)] == ["f", "h", "q"]


def h264_sps(width: int, height: int) -> bytes:
    """A Constrained Baseline SPS for a picture of this size (multiples of 16 wide; the
    height cropped from whole macroblock rows)."""
    bits = "".join(
        [
            f"{66:08b}",  # profile_idc
            "11000000",  # constraint flags
            f"{31:08b}",  # level_idc
            _ue(0),  # seq_parameter_set_id
            _ue(0),  # log2_max_frame_num_minus4
            _ue(2),  # pic_order_cnt_type
            _ue(1),  # max_num_ref_frames
            "0",  # gaps_in_frame_num_value_allowed_flag
            _ue(width // 16 - 1),
            _ue((height + 15) // 16 - 1),
            "1",  # frame_mbs_only_flag
            "1",  # direct_8x8_inference_flag
        ]
    )
    crop = ((height + 15) // 16 * 16 - height) // 2
    bits += ("1" + _ue(0) + _ue(0) + _ue(0) + _ue(crop)) if crop else "0"
    bits += "0"  # vui_parameters_present_flag
    bits += "1"  # rbsp stop bit
    bits += "0" * (-len(bits) % 8)
    return b"\x67" + int(bits, 2).to_bytes(len(bits) // 8, "big")


def _ue(value: int) -> str:
    code = f"{value + 1:b}"
    return "0" * (len(code) - 1) + code


def test_a_resumed_subscriber_is_asked_a_keyframe_again_until_one_comes() -> None:
    """Chromium ignores a keyframe request that comes less than 300 ms after the one before
    (any layer's: libwebrtc's EncoderRtcpFeedback), so a request can go unanswered: here the
    relay's, when bob resumes (his paused browser's own request, after 3 s without frames,
    is not passed on). A resumed VP8 simulcast stream starts only at a keyframe of the
    layer it is on (never on a delta frame after KEYFRAME_WAIT): the relay asks again while
    it waits, and bob gets the layer from the keyframe that answers."""
    call = Call()
    call.start_all()
    for layer in range(3):
        call.send(layer)
    track_id, q_ssrc = call.track.track_id, LAYERS[0][1]
    prefs = call.h.sfu.set_subscription_preferences
    call.h.now += 1.0
    prefs("r", "bob", track_id, {"max_height": 180})
    call.send(0, keyframe=True)
    assert call.video.stream.track is call.track.layers[0]
    call.h.now += 1.0
    prefs("r", "bob", track_id, {"paused": True})
    call.h.now += 3.0
    call.h.receive(rtcp.pli(1, call.video.ssrc), BOB)  # bob's decoder: nothing for 3 s
    call.h.now += 0.1
    call.send(0, keyframe=True)  # a keyframe for others, while bob is paused
    call.h.now += 0.1
    call.h.sent.clear()
    prefs("r", "bob", track_id, {"paused": False})
    assert _plis_for(call, q_ssrc) == 1  # asked at once (the publisher ignores this one)
    # q goes on with delta frames, 15 a second, the relay's timers running
    for _ in range(15):
        call.h.now += 1 / 15
        call.send(0)
        call.h.sfu.timers.run(call.h.now)
    assert call.to_bob() == []  # no keyframe yet: nothing forwarded
    assert _plis_for(call, q_ssrc) >= 2  # asked again within the second
    call.send(0, keyframe=True)
    call.send(0)
    assert len(call.to_bob()) == 2  # bob goes on from the keyframe
    asked = _plis_for(call, q_ssrc)
    for _ in range(30):
        call.h.now += 1 / 15
        call.send(0)
        call.h.sfu.timers.run(call.h.now)
    assert _plis_for(call, q_ssrc) == asked  # started: no more asking


def test_a_resume_while_an_unanswered_request_is_fresh_is_asked_for_again() -> None:
    """Resumed before the keyframe another subscriber of the layer asked for arrives, the
    relay's own request is held back (that keyframe is still to come, it assumes); when it
    never comes (the publisher ignored that request), the relay asks again. (Bob's own
    requests while paused are not passed on: he is sent nothing to decode.)"""
    call = Call()
    call.start_all()
    for layer in range(3):
        call.send(layer)
    track_id, q_ssrc = call.track.track_id, LAYERS[0][1]
    prefs = call.h.sfu.set_subscription_preferences
    call.h.now += 1.0
    prefs("r", "bob", track_id, {"max_height": 180})
    call.send(0, keyframe=True)
    call.h.now += 1.0
    prefs("r", "bob", track_id, {"paused": True})
    call.h.now += 3.0
    call.h.sent.clear()
    call.h.receive(rtcp.pli(1, call.video.ssrc), BOB)
    assert _plis_for(call, q_ssrc) == 0  # bob is paused: not passed on
    call.track.layers[0].keyframes.request(call.h.now)  # another subscriber of q asks
    assert _plis_for(call, q_ssrc) == 1  # passed on; the publisher ignores it
    call.h.now += 0.05
    prefs("r", "bob", track_id, {"paused": False})
    assert _plis_for(call, q_ssrc) == 1  # held back: the keyframe asked for is "to come"
    for _ in range(15):
        call.h.now += 1 / 15
        call.send(0)
        call.h.sfu.timers.run(call.h.now)
    assert _plis_for(call, q_ssrc) >= 2
    call.send(0, keyframe=True)
    assert len(call.to_bob()) == 1
