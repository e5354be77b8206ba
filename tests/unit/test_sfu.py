"""The SFU core, sans-I/O: negotiation, m-line reuse, revisions, and the bytes it forwards."""

from __future__ import annotations

import dataclasses
import logging
import struct
from pathlib import Path

import pytest

from relay.config import DataChannelSettings, Settings
from relay.rtc import rtcp
from relay.rtc.extensions import TRANSPORT_CC_URI
from relay.rtc.rtp import build_extension_block, extension_profile, parse_extensions, parse_rtp
from relay.rtc.sdp import OfferedMedia, build_offer, parse_sdp
from relay.sfu.errors import BadRequest, Conflict, NotFound
from relay.sfu.feedback import TransportCcFeedback
from tests.unit.harness import Harness, client_transport

FIXTURES = Path(__file__).parent.parent / "fixtures" / "sdp"
AIORTC_AUDIO_SSRC = 1043279043
AIORTC_VIDEO_SSRC = 789159697


def aiortc_offer(audio: bool = True, video: bool = True) -> str:
    text = (FIXTURES / "aiortc_offer.sdp").read_text()
    if not video:
        text = text.replace("a=ssrc-group:FID", "a=x-removed")
        head, _, _ = text.partition("m=video")
        text = head
    if not audio:
        head, sep, tail = text.partition("m=audio")
        _, sep2, video_part = tail.partition("m=video")
        text = head.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 1") + "m=video" + video_part
    return text


#: a VP8 payload that starts a keyframe (S=1, partition 0; P=0 in the payload header): a new
#: subscription starts forwarding on one of these
VP8_KEYFRAME = b"\x10\x00\x9d\x01\x2akeyframe"


def rtp(
    ssrc: int,
    pt: int,
    seq: int,
    ts: int,
    elements: list[tuple[int, bytes]],
    payload: bytes = b"\x90\x10payload-bytes",
) -> bytes:
    ext = build_extension_block(elements)
    first = 0x90 if ext else 0x80
    return struct.pack("!BBHII", first, pt, seq, ts, ssrc) + ext + payload


def test_publish_subscribe_offer_and_events() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    answer = h.sfu.publisher_offer("r", "alice", aiortc_offer())
    parsed = parse_sdp(answer)
    assert parsed.ice_lite and [m.direction for m in parsed.media] == ["recvonly", "recvonly"]
    assert [e["track"]["kind"] for e in h.events_of("track.published")] == ["audio", "video"]
    assert h.events_of("subscriber.renegotiate")[-1]["participant_id"] == "bob"
    offer_sdp, revision = h.sfu.subscriber_offer("r", "bob")
    offer = parse_sdp(offer_sdp)
    assert [(m.kind, m.direction) for m in offer.media] == [
        ("audio", "sendonly"),
        ("video", "sendonly"),
    ]
    # audio and video of one publisher share an msid stream: the publisher's id
    assert {m.msid[0] for m in offer.media} == {"alice"}
    assert len({m.ssrcs[0] for m in offer.media}) == 2
    assert offer.media[0].codecs[0].name == "opus" and offer.media[1].codecs[0].name == "VP8"
    assert offer.bundle_mids == ["0", "1"] and offer.media[0].setup == "actpass"
    # alice gets nothing of her own
    assert h.sfu.get_participant("r", "alice").subscriptions == {}


def test_ended_track_mline_goes_inactive_and_is_reused_in_place() -> None:
    h = Harness()
    for pid in ("alice", "carol", "bob"):
        h.sfu.add_participant("r", pid)
    h.sfu.publisher_offer("r", "alice", aiortc_offer())
    h.sfu.publisher_offer("r", "carol", aiortc_offer())
    h.answer("bob")
    first = parse_sdp(h.sfu.subscriber_offer("r", "bob")[0])
    assert [m.msid[0] for m in first.media] == ["alice", "alice", "carol", "carol"]
    h.sfu.remove_participant("r", "alice", "left")
    second = parse_sdp(h.sfu.subscriber_offer("r", "bob")[0])
    assert [m.mid for m in second.media] == [m.mid for m in first.media]
    assert [m.direction for m in second.media] == ["inactive", "inactive", "sendonly", "sendonly"]
    h.sfu.add_participant("r", "dave")
    h.sfu.publisher_offer("r", "dave", aiortc_offer())
    third = parse_sdp(h.sfu.subscriber_offer("r", "bob")[0])
    assert [m.mid for m in third.media] == [m.mid for m in first.media]
    assert [m.msid[0] for m in third.media] == ["dave", "dave", "carol", "carol"]


def test_stale_answer_gets_conflict() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    offer_sdp, revision = h.sfu.subscriber_offer("r", "bob")
    h.sfu.publisher_offer("r", "alice", aiortc_offer())  # bumps bob's revision
    with pytest.raises(Conflict) as exc:
        h.sfu.subscriber_answer("r", "bob", offer_sdp, revision)
    assert exc.value.code == "stale_revision"


def test_bad_input_errors() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    with pytest.raises(BadRequest) as exc:
        h.sfu.publisher_offer("r", "alice", "v=0\r\nnonsense")
    assert exc.value.code == "bad_sdp"
    with pytest.raises(NotFound):
        h.sfu.publisher_offer("r", "nobody", aiortc_offer())
    with pytest.raises(Conflict):
        h.sfu.subscriber_answer("r", "alice", aiortc_offer(), 0)  # no offer made yet


def test_forwarded_bytes_rewrite_ssrc_pt_seq_ts_and_extensions() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.publish("alice", aiortc_offer())
    h.answer("bob")
    alice, bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
    h.connect(alice.publisher_leg, ("10.0.0.1", 4000))
    h.sent.clear()
    h.connect(bob.subscriber_leg, ("10.0.0.2", 5000))
    # a video subscriber that becomes active asks the publisher for a keyframe at once
    to_alice = [d for d, a in h.sent if a == ("10.0.0.1", 4000)]
    plis = [p for d in to_alice for p in rtcp.parse_rtcp(d) if isinstance(p, rtcp.Pli)]
    assert [p.media_ssrc for p in plis] == [AIORTC_VIDEO_SSRC]

    audio = next(s for s in bob.subscriptions.values() if s.track.kind == "audio")
    h.sent.clear()
    # aiortc's ids: mid=1, audio level=2; the relay offers bob audio level=1, mid=4
    for seq, ts in ((65534, 1000), (65535, 1960), (0, 2920)):
        h.receive(
            rtp(AIORTC_AUDIO_SSRC, 96, seq, ts, [(1, b"0"), (2, b"\x85")]), ("10.0.0.1", 4000)
        )
    out = [d for d, a in h.sent if a == ("10.0.0.2", 5000)]
    assert len(out) == 3
    parsed = [parse_rtp(d) for d in out]
    seqs = [p[1] for p in parsed]
    assert seqs[1] == (seqs[0] + 1) & 0xFFFF and seqs[2] == (seqs[0] + 2) & 0xFFFF
    assert [p[2] - parsed[0][2] for p in parsed] == [0, 960, 1920]
    stamps = []
    for data, (pt, _seq, _ts, ssrc, _m, offset, ext_offset, ext_length) in zip(
        out, parsed, strict=True
    ):
        assert ssrc == audio.ssrc and pt == audio.payload_type == 111
        assert data[offset:] == b"\x90\x10payload-bytes"
        elements = dict(parse_extensions(data, ext_offset, ext_length, extension_profile(data)))
        # the relay's own transport-wide sequence number (id 3) replaces nothing of alice's
        stamps.append(int.from_bytes(elements.pop(3), "big"))
        assert elements == {1: b"\x85", 4: audio.mid.encode()}
    assert stamps == [stamps[0], stamps[0] + 1, stamps[0] + 2]
    assert h.sfu.metrics.packets_out == 3


def test_unknown_ssrc_and_unchecked_address_are_dropped_and_counted() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.publish("alice", aiortc_offer())
    alice = h.sfu.get_participant("r", "alice")
    h.connect(alice.publisher_leg, ("10.0.0.1", 4000))
    h.receive(rtp(12345, 96, 1, 1, []), ("10.0.0.1", 4000))  # authenticated, unknown SSRC
    h.receive(rtp(AIORTC_AUDIO_SSRC, 96, 1, 1, []), ("10.9.9.9", 1))  # nobody checked it
    # RTP that authenticates but does not parse (P set, padding count 0) ...
    h.receive(b"\xa0\x60" + bytes(10) + b"payload\x00", ("10.0.0.1", 4000))
    # ... and two bytes that are not even SRTP
    h.receive(b"\x80\x60", ("10.0.0.1", 4000), raw=True)
    h.receive(b"\xff" * 40, ("10.0.0.1", 4000), raw=True)
    drops = h.sfu.metrics.drops
    assert drops["unknown_ssrc"] == 1 and drops["unknown_address"] == 1
    assert drops["rtp_malformed"] == 1 and drops["unknown_first_byte"] == 1
    assert drops["srtp_unprotect"] == 1


def test_subscriber_answer_passive_makes_relay_dtls_client() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.sfu.publisher_offer("r", "alice", aiortc_offer())
    h.answer("bob", setup="passive")
    assert h.sfu.get_participant("r", "bob").subscriber_leg.transport.dtls_server is False


def test_consent_timeout_removes_silent_participant() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.publish("alice", aiortc_offer())
    h.connect(h.sfu.get_participant("r", "alice").publisher_leg, ("10.0.0.1", 4000))
    h.now += 1
    h.sfu.tick(h.now)
    assert "alice" in h.sfu.get_room("r").participants
    h.now += h.sfu.settings.session.consent_timeout + 1
    h.sfu.tick(h.now)
    assert "alice" not in h.sfu.get_room("r").participants
    assert h.events_of("participant.left")[-1] == {
        "type": "participant.left",
        "room_id": "r",
        "at": 1.7e9,
        "participant_id": "alice",
        "reason": "timeout",
    }
    assert h.sfu.port.by_addr == {} and h.sfu.port.by_ufrag == {}


def _video_call(h: Harness) -> tuple:
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.publish("alice", aiortc_offer())
    h.answer("bob")
    alice, bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
    h.connect(alice.publisher_leg, ("10.0.0.1", 4000))
    h.connect(bob.subscriber_leg, ("10.0.0.2", 5000))
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    return alice, bob, video


def _sent_to(h: Harness, addr: tuple[str, int]) -> list[bytes]:
    return [d for d, a in h.sent if a == addr]


def _twcc_feedback(h: Harness, addr: tuple[str, int]) -> list[tuple[int, bool]]:
    """(sequence number, received) of the one transport-cc feedback packet sent to ``addr``."""
    from relay.rtc.twcc import parse_feedback

    feedback = [
        p
        for d in _sent_to(h, addr)
        for p in rtcp.parse_rtcp(d)
        if isinstance(p, rtcp.TransportFeedback)
    ]
    assert len(feedback) == 1, feedback
    return [(seq, received) for seq, received, _t in parse_feedback(feedback[0].fci).packets]


def test_subscriber_nack_is_answered_on_the_rtx_stream() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    assert video.stream.nack is not None and video.stream.nack.use_rtx
    h.sent.clear()
    for seq in range(100, 105):
        payload = VP8_KEYFRAME if seq == 100 else b"\x90\x10payload-bytes"
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000, [], payload), ("10.0.0.1", 4000))
    originals = {parse_rtp(d)[1]: d for d in _sent_to(h, ("10.0.0.2", 5000))}
    lost = sorted(originals)[2]
    h.sent.clear()
    h.receive(rtcp.nack(1234, video.ssrc, [lost]), ("10.0.0.2", 5000))
    resent = _sent_to(h, ("10.0.0.2", 5000))
    assert len(resent) == 1
    pt, _seq, ts, ssrc, _m, offset, _eo, _el = parse_rtp(resent[0])
    assert ssrc == video.rtx_ssrc and pt == video.rtx_payload_type
    # RFC 4588: the original sequence number, then the original payload
    original = originals[lost]
    assert int.from_bytes(resent[0][offset : offset + 2], "big") == lost
    assert resent[0][offset + 2 :] == original[parse_rtp(original)[5] :]
    assert h.sfu.metrics.retransmissions == 1


def test_publisher_gap_is_nacked_and_rtx_repairs_it() -> None:
    h = Harness()
    alice, _bob, video = _video_call(h)
    track = video.track
    for seq in (200, 201, 203):  # 202 goes missing
        payload = VP8_KEYFRAME if seq == 200 else b"\x90\x10payload-bytes"
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000, [], payload), ("10.0.0.1", 4000))
    h.sent.clear()
    h.now += 0.05
    h.sfu.timers.run(h.now)
    nacks = [
        p
        for d in _sent_to(h, ("10.0.0.1", 4000))
        for p in rtcp.parse_rtcp(d)
        if isinstance(p, rtcp.Nack)
    ]
    assert [(n.media_ssrc, n.lost) for n in nacks] == [(AIORTC_VIDEO_SSRC, [202])]
    # the publisher resends 202 on its RTX stream (FID group of the aiortc offer)
    rtx_ssrc, rtx_pt = track.rtx_ssrc, track.rtx_payload_type
    assert rtx_ssrc == 3923720075 and rtx_pt is not None
    h.sent.clear()
    h.receive(
        rtp(rtx_ssrc, rtx_pt, 7, 9000, [], payload=(202).to_bytes(2, "big") + b"repaired"),
        ("10.0.0.1", 4000),
    )
    forwarded = _sent_to(h, ("10.0.0.2", 5000))
    assert len(forwarded) == 1
    pt, seq, _ts, ssrc, _m, offset, _eo, _el = parse_rtp(forwarded[0])
    assert ssrc == video.ssrc and pt == video.payload_type
    assert forwarded[0][offset:] == b"repaired"
    assert track.rtx_received == 1 and track.nack.generator.missing == 0
    h.now += 1
    h.sent.clear()
    h.sfu.timers.run(h.now)
    assert not [
        p
        for d in _sent_to(h, ("10.0.0.1", 4000))
        for p in rtcp.parse_rtcp(d)
        if isinstance(p, rtcp.Nack)
    ]


def test_transport_cc_feedback_goes_to_a_chrome_publisher() -> None:
    h = Harness()
    h.sfu.add_participant("r", "carol")
    h.publish("carol", (FIXTURES / "chrome_offer.sdp").read_text())
    carol = h.sfu.get_participant("r", "carol")
    leg = carol.publisher_leg
    assert isinstance(leg.feedback, TransportCcFeedback)
    assert leg.feedback.ext_id == 3  # Chrome's transport-cc id
    h.connect(leg, ("10.0.0.3", 6000))
    audio_ssrc = 457497428
    for i, seq in enumerate((10, 11, 13)):
        h.now += 0.01
        h.receive(
            rtp(audio_ssrc, 111, 500 + i, 960 * i, [(3, seq.to_bytes(2, "big"))]),
            ("10.0.0.3", 6000),
        )
    h.sent.clear()
    h.sfu.timers.run(h.now + h.sfu.settings.rtp.feedback_interval)
    assert _twcc_feedback(h, ("10.0.0.3", 6000)) == [
        (10, True),
        (11, True),
        (12, False),
        (13, True),
    ]


def test_nack_disabled_offers_no_rtx_and_ignores_nacks() -> None:
    settings = Settings()
    h = Harness(dataclasses.replace(settings, rtp=dataclasses.replace(settings.rtp, nack=False)))
    _alice, _bob, video = _video_call(h)
    assert video.stream.nack is None and video.track.history is None
    assert video.rtx_payload_type is None
    offer = parse_sdp(h.sfu.subscriber_offer("r", "bob")[0])
    assert not offer.media[1].ssrc_groups and "nack" not in offer.media[1].codecs[0].rtcp_fb


def test_participant_that_never_connects_times_out() -> None:
    h = Harness()
    h.sfu.add_participant("r", "ghost")
    h.now += h.sfu.settings.session.connect_timeout - 1
    h.sfu.tick(h.now)
    assert "ghost" in h.sfu.get_room("r").participants
    h.now += 2
    h.sfu.tick(h.now)
    assert "ghost" not in h.sfu.get_room("r").participants
    assert h.events_of("participant.left")[-1]["reason"] == "timeout"


def test_track_silent_for_a_while_is_reported_muted_then_unmuted() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.publish("alice", aiortc_offer(video=False))
    h.connect(h.sfu.get_participant("r", "alice").publisher_leg, ("10.0.0.1", 4000))

    def send(seq: int) -> None:
        h.receive(rtp(AIORTC_AUDIO_SSRC, 96, seq, seq * 960, []), ("10.0.0.1", 4000))

    send(1)
    for _ in range(5):  # one second per tick, nothing sent after the first
        h.now += 1
        h.sfu.tick(h.now)
    assert [e["type"] for e in h.events if e["type"].startswith("track.")] == [
        "track.published",
        "track.muted",
    ]
    send(2)
    h.now += 1
    h.sfu.tick(h.now)
    assert h.events_of("track.unmuted")[-1]["participant_id"] == "alice"


# --- data channels and two-byte header extensions ----------------------------------------------

TWCC_URI = TRANSPORT_CC_URI
CHROME_AUDIO_SSRC = 457497428


def chrome_offer() -> str:
    return (FIXTURES / "chrome_offer.sdp").read_text()


def test_chrome_offer_with_a_data_channel_publishes_audio_and_video() -> None:
    h = Harness()
    h.sfu.add_participant("r", "carol")
    answer = parse_sdp(h.sfu.publisher_offer("r", "carol", chrome_offer()))
    assert [(m.kind, m.port != 0) for m in answer.media] == [
        ("audio", True),
        ("video", True),
        ("application", True),
    ]
    assert answer.bundle_mids == ["0", "1", "2"]
    assert answer.media[2].sctp_port == 5000 and answer.media[2].max_message_size == 65536
    assert answer.extmap_allow_mixed
    carol = h.sfu.get_participant("r", "carol")
    assert sorted(t.kind for t in carol.tracks.values()) == ["audio", "video"]
    assert carol.publisher_leg is not None and carol.publisher_leg.data is not None


def test_data_channel_only_offer_is_a_bad_sdp_that_says_why_when_turned_off() -> None:
    h = Harness(dataclasses.replace(Settings(), datachannels=DataChannelSettings(enabled=False)))
    h.sfu.add_participant("r", "carol")
    head, *sections = chrome_offer().split("m=")
    offer = head.replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 2") + "m=" + sections[2]
    with pytest.raises(BadRequest) as exc:
        h.sfu.publisher_offer("r", "carol", offer)
    assert exc.value.code == "bad_sdp"
    message = str(exc.value)
    assert "data channels are turned off" in message
    assert "audio and video only" in message
    carol = h.sfu.get_participant("r", "carol")
    assert carol.publisher_leg is None and carol.tracks == {}


def test_subscriber_offer_carries_extmap_allow_mixed() -> None:
    h = Harness()
    h.sfu.add_participant("r", "bob")
    offer_sdp, _ = h.sfu.subscriber_offer("r", "bob")
    assert parse_sdp(offer_sdp).extmap_allow_mixed


def test_two_byte_extensions_from_a_publisher_are_fed_back_and_forwarded() -> None:
    h = Harness()
    h.sfu.add_participant("r", "carol")
    h.sfu.add_participant("r", "bob")
    # Chrome's offer with audio level at 15, mid at 16 and transport-cc at 17
    offer = (
        chrome_offer()
        .replace(f"a=extmap:3 {TWCC_URI}", f"a=extmap:17 {TWCC_URI}")
        .replace(
            "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
            "a=extmap:16 urn:ietf:params:rtp-hdrext:sdes:mid",
        )
        .replace(
            "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "a=extmap:15 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        )
    )
    answer = parse_sdp(h.publish("carol", offer))
    assert answer.extmap_allow_mixed
    assert (17, TWCC_URI) in {(e.id, e.uri) for e in answer.media[0].extmaps}
    h.answer("bob")
    carol, bob = (h.sfu.get_participant("r", p) for p in ("carol", "bob"))
    assert carol.publisher_leg.feedback.ext_id == 17 and carol.publisher_leg.mid_ext_id == 16
    h.connect(carol.publisher_leg, ("10.0.0.3", 6000))
    h.connect(bob.subscriber_leg, ("10.0.0.2", 5000))
    audio = next(s for s in bob.subscriptions.values() if s.track.kind == "audio")
    h.sent.clear()
    for i, seq in enumerate((10, 11, 13)):
        h.now += 0.01
        packet = rtp(
            CHROME_AUDIO_SSRC,
            111,
            500 + i,
            960 * i,
            [(15, b"\x85"), (16, b"0"), (17, seq.to_bytes(2, "big"))],
        )
        assert packet[12:14] == b"\x10\x00"  # the two-byte form
        h.receive(packet, ("10.0.0.3", 6000))

    # forwarded to bob in the one-byte form, with bob's ids: audio level 1, mid 4, twcc 3
    out = _sent_to(h, ("10.0.0.2", 5000))
    assert len(out) == 3
    stamps = []
    for data in out:
        *_, offset, ext_offset, ext_length = parse_rtp(data)
        assert extension_profile(data) == 0xBEDE
        assert data[offset:] == b"\x90\x10payload-bytes"
        elements = dict(parse_extensions(data, ext_offset, ext_length, 0xBEDE))
        stamps.append(int.from_bytes(elements.pop(3), "big"))
        assert elements == {1: b"\x85", 4: audio.mid.encode()}
    assert stamps == [stamps[0], stamps[0] + 1, stamps[0] + 2]

    # and carol gets transport-cc feedback for the sequence numbers of her id 17
    h.sfu.timers.run(h.now + h.sfu.settings.rtp.feedback_interval)
    assert h.sfu.metrics.twcc_feedback_sent == 1
    assert _twcc_feedback(h, ("10.0.0.3", 6000)) == [
        (10, True),
        (11, True),
        (12, False),
        (13, True),
    ]


# -- tracks a subscriber cannot take ------------------------------------------------------------


def answer_declining(h: Harness, pid: str, reject: str = "", wrong_codec: str = "") -> int:
    """Answer the current subscriber offer, rejecting (port 0) the m-line with mid ``reject``
    and answering the one with mid ``wrong_codec`` with a payload type the relay did not offer,
    the way a client that cannot decode a codec does."""
    offer_sdp, revision = h.sfu.subscriber_offer("r", pid)
    media = []
    for m in parse_sdp(offer_sdp).media:
        codecs = m.codecs
        if m.mid == wrong_codec:
            codecs = [dataclasses.replace(c, payload_type=c.payload_type + 1) for c in codecs]
        media.append(
            OfferedMedia(
                mid=m.mid,
                kind=m.kind,
                direction="recvonly" if m.direction == "sendonly" else "inactive",
                codecs=codecs,
                extmaps=m.extmaps,
                ssrc=None,
            )
        )
    sections = build_offer(client_transport(), media).split("m=")
    for i, section in enumerate(sections[1:], start=1):
        if f"a=mid:{reject}\r\n" in section and reject:
            kind = section.split(" ", 1)[0]
            sections[i] = section.replace(f"{kind} 5000 ", f"{kind} 0 ", 1)
    h.subscriber_answer(pid, "m=".join(sections), offer_sdp, revision)
    return revision


def test_subscriber_rejecting_a_track_is_an_event_and_in_the_stats() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.sfu.publisher_offer("r", "alice", aiortc_offer())
    alice = h.sfu.get_participant("r", "alice")
    video = next(t for t in alice.tracks.values() if t.kind == "video")
    bob = h.sfu.get_participant("r", "bob")
    video_mid = bob.subscriptions[video.track_id].mid

    answer_declining(h, "bob", reject=video_mid)
    events = h.events_of("track.unsupported")
    assert events == [
        {
            "type": "track.unsupported",
            "room_id": "r",
            "at": 1.7e9,
            "participant_id": "bob",
            "track_id": video.track_id,
            "publisher_id": "alice",
            "codec": "video/VP8",
            "reason": "rejected by the subscriber",
        }
    ]
    h.connect(bob.subscriber_leg, ("10.0.0.2", 5000))
    outbound = {s["track_id"]: s for s in h.sfu.participant_stats("r", "bob")["outbound"]}
    assert outbound[video.track_id]["forwarded"] is False
    assert outbound[video.track_id]["reason"] == "rejected by the subscriber"
    audio = next(s for s in outbound.values() if s["kind"] == "audio")
    assert audio["forwarded"] is True and audio["reason"] is None
    assert video.track_id not in {s.track.track_id for s in _outputs(alice)}

    # the same answer again (a renegotiation for something else) says nothing new
    answer_declining(h, "bob", reject=video_mid)
    assert len(h.events_of("track.unsupported")) == 1

    # a codec the answer does not take is another reason; taking the track clears it
    answer_declining(h, "bob", wrong_codec=video_mid)
    assert [e["reason"] for e in h.events_of("track.unsupported")] == [
        "rejected by the subscriber",
        "codec VP8 not accepted",
    ]
    answer_declining(h, "bob")
    outbound = {s["track_id"]: s for s in h.sfu.participant_stats("r", "bob")["outbound"]}
    assert outbound[video.track_id]["forwarded"] is True
    assert outbound[video.track_id]["reason"] is None
    answer_declining(h, "bob", reject=video_mid)
    assert len(h.events_of("track.unsupported")) == 3


def test_track_unsupported_is_logged_with_ids_only(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice", metadata={"name": "Alice Example"})
    h.sfu.add_participant("r", "bob", metadata={"phone": "+15551234567"})
    h.sfu.publisher_offer("r", "alice", aiortc_offer())
    bob = h.sfu.get_participant("r", "bob")
    video_mid = next(s.mid for s in bob.subscriptions.values() if s.track.kind == "video")
    with caplog.at_level(logging.INFO, logger="relay.sfu.sfu"):
        answer_declining(h, "bob", reject=video_mid)
    lines = [r.getMessage() for r in caplog.records if "cannot take" in r.getMessage()]
    assert len(lines) == 1 and "bob" in lines[0] and "alice" in lines[0]
    assert "Alice Example" not in caplog.text and "+15551234567" not in caplog.text


def _outputs(p) -> list:
    return [out for t in p.tracks.values() for out in t.subscriptions.values() if out.active]
