"""Routing a publisher's packets (RFC 8843 §9.2: mid, signalled SSRC, unique payload type; RTX
told apart from media) and where a subscription starts (a keyframe, never a retransmission),
driven through the SFU core with bytes."""

from __future__ import annotations

from pathlib import Path

from relay.rtc import rtcp
from relay.rtc.rtp import parse_rtp
from relay.sfu.outbound import KEYFRAME_WAIT
from tests.unit.harness import Harness
from tests.unit.test_sfu import (
    AIORTC_VIDEO_SSRC,
    VP8_KEYFRAME,
    aiortc_offer,
    rtp,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "sdp"
PUBLISHER = ("10.0.0.1", 4000)
SUBSCRIBER = ("10.0.0.2", 5000)
DELTA = b"\x10\x01delta"  # VP8: start of an interframe
AUDIO = b"\xfc\xffopus"


def without(sdp: str, *prefixes: str) -> str:
    """The SDP with every line starting with one of ``prefixes`` removed."""
    kept = [line for line in sdp.splitlines() if not line.startswith(prefixes)]
    return "\r\n".join(kept) + "\r\n"


def call(publisher_sdp: str) -> tuple[Harness, object, object]:
    """alice publishes ``publisher_sdp``, bob subscribes; both connected."""
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.publish("alice", publisher_sdp)
    h.answer("bob")
    alice, bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
    h.connect(alice.publisher_leg, PUBLISHER)
    h.connect(bob.subscriber_leg, SUBSCRIBER)
    h.sent.clear()
    return h, alice, bob


def send(h: Harness, ssrc: int, pt: int, seq: int, payload: bytes, elements=()) -> None:
    h.receive(rtp(ssrc, pt, seq, seq * 3000, list(elements), payload), PUBLISHER)


def forwarded(h: Harness) -> list[tuple[int, int, bytes]]:
    """(ssrc, payload type, payload) of every RTP packet sent to bob, cleared after."""
    out = []
    for data, addr in h.sent:
        if addr == SUBSCRIBER and not 192 <= data[1] <= 223:
            pt, _seq, _ts, ssrc, _m, offset, _eo, _el = parse_rtp(data)
            out.append((ssrc, pt, data[offset:]))
    h.sent.clear()
    return out


def plis_sent(h: Harness) -> int:
    return sum(
        isinstance(p, rtcp.Pli)
        for data, addr in h.sent
        if addr == PUBLISHER
        for p in rtcp.parse_rtcp(data)
    )


def test_no_ssrc_and_no_extmap_are_routed_by_payload_type() -> None:
    # a native stack that signals neither a=ssrc nor a=extmap (so no mid extension either)
    offer = without(aiortc_offer(), "a=ssrc", "a=extmap")
    h, alice, bob = call(offer)
    subs = {s.track.kind: s for s in bob.subscriptions.values()}
    send(h, 5001, 96, 10, AUDIO)  # opus: payload type 96 is the audio m-line's alone
    send(h, 6001, 97, 20, VP8_KEYFRAME)  # VP8: 97 is the video m-line's alone
    send(h, 6001, 97, 21, DELTA)
    out = forwarded(h)
    assert [(ssrc, pt) for ssrc, pt, _ in out] == [
        (subs["audio"].ssrc, subs["audio"].payload_type),
        (subs["video"].ssrc, subs["video"].payload_type),
        (subs["video"].ssrc, subs["video"].payload_type),
    ]
    assert h.sfu.metrics.drops["unknown_ssrc"] == 0
    # the publisher restarts its video on a new SSRC: the binding is replaced, not added
    send(h, 6002, 97, 500, VP8_KEYFRAME)
    assert len(forwarded(h)) == 1
    assert sorted(alice.publisher_leg.ssrc_map) == [5001, 6002]
    send(h, 6001, 97, 22, DELTA)  # the old SSRC is unknown again, and learned again
    assert sorted(alice.publisher_leg.ssrc_map) == [5001, 6001]


def test_rtx_without_mid_is_bound_by_its_payload_type_to_the_rtx_slot() -> None:
    h, alice, bob = call(without(aiortc_offer(), "a=ssrc", "a=extmap"))
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    track = video.track
    send(h, 6001, 97, 100, VP8_KEYFRAME)
    send(h, 6001, 97, 102, DELTA)  # 101 lost
    forwarded(h)
    # aiortc's RTX payload type for VP8 is 98; the payload starts with the original seq
    send(h, 7001, 98, 1, (101).to_bytes(2, "big") + b"\x00\x01repaired")
    assert track.ssrc == 6001 and track.rtx_ssrc == 7001
    assert [ssrc for ssrc, t in alice.publisher_leg.ssrc_map.items() if t is track] == [6001]
    assert alice.publisher_leg.rtx_map == {7001: track}
    assert forwarded(h) == [(video.ssrc, video.payload_type, b"\x00\x01repaired")]
    assert track.rtx_received == 1


def test_rtx_with_mid_never_takes_the_media_slot() -> None:
    # Chromium with SSRCs unsignalled (as with RID simulcast): mid on media and RTX packets
    chrome = without((FIXTURES / "chrome_offer.sdp").read_text(), "a=ssrc")
    h, alice, bob = call(chrome)
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    track = video.track
    mid = [(4, track.mid.encode())]  # Chromium's sdes:mid id
    send(h, 1111, 96, 300, VP8_KEYFRAME, mid)
    send(h, 1111, 96, 302, DELTA, mid)
    # Chromium retransmits 301 on its RTX SSRC (payload type 97, apt=96), mid included
    send(h, 2222, 97, 9, (301).to_bytes(2, "big") + DELTA, mid)
    assert track.ssrc == 1111 and track.rtx_ssrc == 2222
    # once acknowledged, Chromium stops sending the mid on media packets: still forwarded
    send(h, 1111, 96, 303, DELTA)
    send(h, 1111, 96, 304, DELTA)
    out = forwarded(h)
    assert [ssrc for ssrc, _pt, _p in out] == [video.ssrc] * 5
    assert h.sfu.metrics.drops["unknown_ssrc"] == 0
    assert h.sfu.metrics.drops["unknown_payload_type"] == 0


def test_repaired_rid_marks_rtx_even_with_the_media_payload_type() -> None:
    chrome = without((FIXTURES / "chrome_offer.sdp").read_text(), "a=ssrc")
    h, alice, _bob = call(chrome)
    track = alice.tracks_by_mid["1"]
    # repaired-rtp-stream-id is id 11 in Chromium's offer; only RTX packets carry it
    send(h, 3333, 97, 1, b"\x00\x05" + DELTA, [(4, b"1"), (11, b"f")])
    assert track.rtx_ssrc == 3333 and track.ssrc is None
    assert h.sfu.metrics.drops["rtx_before_media"] == 1


def test_a_payload_type_shared_by_two_m_lines_routes_nothing() -> None:
    offer = without(aiortc_offer(), "a=ssrc", "a=extmap")
    video = offer[offer.index("m=video") :]
    second = video.replace("a=mid:1", "a=mid:2")
    offer = offer.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 2") + second
    h, alice, _bob = call(offer)
    send(h, 6001, 97, 20, VP8_KEYFRAME)  # 97 is VP8 on both video m-lines: ambiguous
    assert h.sfu.metrics.drops["unknown_ssrc"] == 1
    assert 97 not in alice.publisher_leg.payload_routes and 96 in alice.publisher_leg.payload_routes


def test_signalled_ssrcs_are_not_taken_over_by_payload_type() -> None:
    h, alice, _bob = call(aiortc_offer())
    send(h, 424242, 97, 1, VP8_KEYFRAME)
    assert h.sfu.metrics.drops["unknown_ssrc"] == 1
    assert alice.publisher_leg.payload_routes == {}


def test_subscription_starts_on_a_keyframe_and_asks_for_one() -> None:
    h, _alice, bob = call(aiortc_offer())
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    send(h, AIORTC_VIDEO_SSRC, 97, 50, DELTA)
    send(h, AIORTC_VIDEO_SSRC, 97, 51, DELTA)
    assert forwarded(h) == []
    assert h.sfu.metrics.keyframe_waits == 2
    send(h, AIORTC_VIDEO_SSRC, 97, 52, VP8_KEYFRAME)
    send(h, AIORTC_VIDEO_SSRC, 97, 53, DELTA)
    out = h.sent[:]
    assert [p for _s, _pt, p in forwarded(h)] == [VP8_KEYFRAME, DELTA]
    seqs = [parse_rtp(d)[1] for d, a in out if a == SUBSCRIBER]
    assert seqs[1] == (seqs[0] + 1) & 0xFFFF
    assert not video.stream.rewriter.starting


def test_without_a_keyframe_the_subscription_starts_on_the_newest_packet_in_time() -> None:
    h, _alice, _bob = call(aiortc_offer())
    send(h, AIORTC_VIDEO_SSRC, 97, 50, DELTA)
    assert forwarded(h) == []
    h.now += KEYFRAME_WAIT + 0.01
    send(h, AIORTC_VIDEO_SSRC, 97, 51, DELTA)
    assert len(forwarded(h)) == 1


def test_a_retransmission_never_starts_a_subscription() -> None:
    # the join-during-repair race: bob's subscription switches on between the relay's NACK to
    # alice and her retransmission
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.publish("alice", aiortc_offer())
    alice = h.sfu.get_participant("r", "alice")
    h.connect(alice.publisher_leg, PUBLISHER)
    for seq in (10, 11, 13):  # 12 is lost on alice's leg
        send(h, AIORTC_VIDEO_SSRC, 97, seq, DELTA)
    h.sfu.add_participant("r", "bob")
    h.answer("bob")
    bob = h.sfu.get_participant("r", "bob")
    h.connect(bob.subscriber_leg, SUBSCRIBER)
    h.sent.clear()
    track = alice.tracks_by_mid["1"]
    # alice's retransmission of 12 (even were it a keyframe's first packet) is older than 13
    send(h, track.rtx_ssrc, track.rtx_payload_type, 1, (12).to_bytes(2, "big") + VP8_KEYFRAME)
    assert forwarded(h) == []
    send(h, AIORTC_VIDEO_SSRC, 97, 14, VP8_KEYFRAME)
    send(h, AIORTC_VIDEO_SSRC, 97, 15, DELTA)
    assert [p for _s, _pt, p in forwarded(h)] == [VP8_KEYFRAME, DELTA]


def test_subscriber_nack_waits_for_the_publishers_repair_then_one_keyframe_request() -> None:
    h, alice, bob = call(aiortc_offer())
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    send(h, AIORTC_VIDEO_SSRC, 97, 200, VP8_KEYFRAME)
    send(h, AIORTC_VIDEO_SSRC, 97, 201, DELTA)
    send(h, AIORTC_VIDEO_SSRC, 97, 203, DELTA)  # 202 missing on alice's leg
    out_seqs = [parse_rtp(d)[1] for d, a in h.sent if a == SUBSCRIBER]
    h.sent.clear()
    missing = (out_seqs[1] + 1) & 0xFFFF  # bob's number for 202: never sent to him
    h.now += 0.02
    h.receive(rtcp.nack(1234, video.ssrc, [missing]), SUBSCRIBER)
    assert plis_sent(h) == 0 and h.sfu.metrics.retransmission_misses == 0
    # the relay NACKs alice for 202 until it gives up; then one keyframe request goes up
    track = video.track
    track.keyframes.last = float("-inf")
    for _ in range(150):
        h.now += 0.01
        h.sfu.timers.run(h.now)
    assert track.nack.generator.missing == 0 and track.nack.generator.lost_unrepaired == 1
    assert plis_sent(h) == 1


def test_subscriber_nack_for_a_packet_nobody_can_repair_asks_for_a_keyframe() -> None:
    h, _alice, bob = call(aiortc_offer())
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    send(h, AIORTC_VIDEO_SSRC, 97, 200, VP8_KEYFRAME)
    last = parse_rtp(h.sent[-1][0])[1]
    h.sent.clear()
    video.track.keyframes.last = float("-inf")
    h.receive(rtcp.nack(1234, video.ssrc, [(last - 40) & 0xFFFF]), SUBSCRIBER)
    assert plis_sent(h) == 1 and h.sfu.metrics.retransmission_misses == 1
