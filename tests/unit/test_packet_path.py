"""The packet path's parts with bytes: the timer queue, the outbound stream's copy, NACK answers
from the track's shared history (with and without RTX), keyframe-request throttling, and a relay
that goes quiet when its publishers do."""

from __future__ import annotations

import pytest

from relay.rtc import rtcp
from relay.rtc.extensions import TRANSPORT_CC_URI
from relay.rtc.rtp import extension_profile, parse_extensions, parse_rtp
from relay.rtc.rtp import is_rtcp as rtcp_packet
from relay.rtc.srtp import SrtpSession
from relay.sfu.timers import Timers
from tests.unit.harness import Harness
from tests.unit.test_demux import call, without
from tests.unit.test_sfu import (
    AIORTC_VIDEO_SSRC,
    VP8_KEYFRAME,
    _sent_to,
    _video_call,
    aiortc_offer,
    rtp,
)

ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)


# -- the timer queue ---------------------------------------------------------------------------
def test_timers_fire_in_deadline_order_once_and_report_earlier_deadlines() -> None:
    reported: list[float] = []
    timers = Timers(on_earlier=reported.append)
    fired: list[tuple[str, float]] = []
    a = timers.timer(lambda now: fired.append(("a", now)))
    b = timers.timer(lambda now: fired.append(("b", now)))
    c = timers.timer(lambda now: fired.append(("c", now)))
    a.arm(3.0)
    b.arm(1.0)
    c.arm(2.0)
    assert reported == [3.0, 1.0]  # 2.0 is later than what the driver already waits for
    c.arm(5.0)  # moved later: the stale entry at 2.0 must not fire
    a.arm_by(4.0)  # already armed for earlier: unchanged
    assert timers.next_deadline() == 1.0
    assert timers.run(2.5) == 3.0
    assert fired == [("b", 2.5)]
    b.arm(2.6)
    b.cancel()
    assert timers.run(10.0) is None
    assert fired == [("b", 2.5), ("a", 10.0), ("c", 10.0)]
    assert not (a.armed or b.armed or c.armed)


def test_a_failing_timer_is_counted_and_the_others_still_fire() -> None:
    timers = Timers()
    fired: list[float] = []

    def broken(now: float) -> None:
        raise RuntimeError("bug")

    timers.timer(broken).arm(1.0)
    timers.timer(fired.append).arm(2.0)
    timers.run(3.0)
    assert fired == [3.0] and timers.errors == 1


def test_a_timer_may_rearm_itself_from_its_callback() -> None:
    timers = Timers()
    fired: list[float] = []

    def tick(now: float) -> None:
        fired.append(now)
        if len(fired) < 3:
            timer.arm(now + 1.0)

    timer = timers.timer(tick)
    timer.arm(1.0)
    assert timers.run(1.0) == 2.0
    assert timers.run(2.0) == 3.0
    assert timers.run(3.0) is None
    assert fired == [1.0, 2.0, 3.0]


# -- the outbound stream ------------------------------------------------------------------------
def _send_video(h: Harness, seqs: range, ts: int = 9000) -> None:
    for seq in seqs:
        payload = VP8_KEYFRAME if seq == seqs[0] else b"\x90\x10payload-%d" % seq
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, ts + seq, [], payload), ALICE)


def test_the_copy_is_rewritten_for_the_subscriber_and_sent_as_one_batch() -> None:
    h = Harness()
    batches: list[int] = []
    sender = h.sfu.media.sender
    send = sender.send

    def counting_send(batch: list) -> None:
        batches.append(len(batch))
        send(batch)

    sender.send = counting_send  # type: ignore[method-assign]
    _alice, _bob, video = _video_call(h)
    stream = video.stream
    h.sent.clear()
    h.wire.clear()
    _send_video(h, range(100, 103))
    out = _sent_to(h, BOB)
    assert batches == [1, 1, 1] and len(out) == 3
    seqs = []
    for data in out:
        pt, seq, ts, ssrc, _m, offset, ext_offset, ext_length = parse_rtp(data)
        assert (ssrc, pt) == (stream.ssrc, video.payload_type)
        assert extension_profile(data) == 0xBEDE
        elements = dict(parse_extensions(data, ext_offset, ext_length, 0xBEDE))
        assert elements[4] == video.mid.encode()  # the subscriber's own mid
        assert len(elements[3]) == 2  # the relay's transport-wide sequence number
        seqs.append(seq)
    assert seqs == [seqs[0], (seqs[0] + 1) & 0xFFFF, (seqs[0] + 2) & 0xFFFF]
    # bytes on the wire: SRTP's authentication tag included
    assert stream.packets_sent == 3 and stream.bytes_sent == sum(len(d) for d in h.wire_to(BOB))
    assert h.sfu.metrics.packets_out == 3


def test_a_packet_from_before_a_source_switch_is_not_forwarded() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    _send_video(h, range(100, 103))
    video.stream.restart(h.now)
    _send_video(h, range(500, 502))  # the new source starts on its keyframe
    h.sent.clear()
    h.receive(rtp(AIORTC_VIDEO_SSRC, 97, 499, 9499, []), ALICE)  # late
    assert _sent_to(h, BOB) == []
    assert h.sfu.metrics.drops["stale_packet"] == 1


# -- NACK answers from the track's history ----------------------------------------------------------
def test_without_rtx_a_resent_packet_is_the_original_byte_for_byte() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.publish("alice", aiortc_offer())
    h.answer("bob", rtx=False)
    alice, bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
    h.connect(alice.publisher_leg, ALICE)
    h.connect(bob.subscriber_leg, BOB)
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    responder = video.stream.nack
    assert responder is not None and not responder.use_rtx
    assert video.answer_extmaps.get(TRANSPORT_CC_URI)
    h.sent.clear()
    h.wire.clear()
    _send_video(h, range(100, 106))
    # what bob decrypted, and the SRTP it came in, in the same order
    plain, protected = _sent_to(h, BOB), h.wire_to(BOB)
    assert len(plain) == len(protected) == 6 and h.rejected == []
    originals = {parse_rtp(d)[1]: (d, p) for d, p in zip(plain, protected, strict=True)}
    lost = sorted(originals)[3]
    original, original_srtp = originals[lost]
    h.sent.clear()
    h.wire.clear()
    h.now += 0.05
    h.receive(rtcp.nack(1, video.ssrc, [lost]), BOB)
    # the same plaintext under the same (SSRC, seq): SRTP may protect it again safely, and it
    # is the same SRTP packet, byte for byte ...
    assert h.wire_to(BOB) == [original_srtp]
    # ... which bob's session, having taken it once, refuses as a replay (a client whose copy
    # was lost takes it); a session with the same keys that has not seen it decrypts it to
    # the original packet
    assert _sent_to(h, BOB) == [] and h.rejected == [(original_srtp, BOB)]
    keys = h.peer("bob", "subscriber").dtls.srtp_keys
    assert SrtpSession(keys).unprotect(original_srtp) == original


def test_with_rtx_a_resent_packet_is_rebuilt_for_the_asker_only() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    for pid in ("bob", "carol"):
        h.sfu.add_participant("r", pid)
    h.publish("alice", aiortc_offer())
    h.answer("bob")
    h.answer("carol")
    alice, bob, carol = (h.sfu.get_participant("r", p) for p in ("alice", "bob", "carol"))
    h.connect(alice.publisher_leg, ALICE)
    h.connect(bob.subscriber_leg, BOB)
    carol_addr = ("10.0.0.3", 6000)
    h.connect(carol.subscriber_leg, carol_addr)
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    track = video.track
    assert track.history is not None
    h.sent.clear()
    _send_video(h, range(100, 106))
    originals = {parse_rtp(d)[1]: d for d in _sent_to(h, BOB)}
    lost = sorted(originals)[2]
    h.sent.clear()
    h.receive(rtcp.nack(1, video.ssrc, [lost]), BOB)
    assert _sent_to(h, carol_addr) == []
    (resent,) = _sent_to(h, BOB)
    pt, _seq, _ts, ssrc, _m, offset, ext_offset, ext_length = parse_rtp(resent)
    assert (ssrc, pt) == (video.rtx_ssrc, video.rtx_payload_type)
    assert int.from_bytes(resent[offset : offset + 2], "big") == lost  # RFC 4588 OSN
    original = originals[lost]
    assert resent[offset + 2 :] == original[parse_rtp(original)[5] :]
    # a fresh transport-wide sequence number: the retransmission is a new packet on the wire
    stamp = dict(parse_extensions(resent, ext_offset, ext_length, 0xBEDE))[3]
    _o = parse_rtp(original)
    first = dict(parse_extensions(original, _o[6], _o[7], 0xBEDE))[3]
    assert stamp != first
    # one history for the track, whatever the number of subscribers
    assert not hasattr(video.stream, "history")


# -- keyframe requests -------------------------------------------------------------------------------
def _plis(h: Harness) -> int:
    return sum(isinstance(p, rtcp.Pli) for d in _sent_to(h, ALICE) for p in rtcp.parse_rtcp(d))


def test_keyframe_requests_are_throttled() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    h.sent.clear()
    h.now += 10
    pli = rtcp.pli(1, video.ssrc)
    h.receive(pli, BOB)
    h.receive(pli, BOB)  # within the interval: dropped
    assert _plis(h) == 1
    h.now += h.sfu.settings.session.keyframe_request_interval
    h.receive(pli, BOB)
    assert _plis(h) == 2


def test_a_paused_subscriber_cannot_make_the_publisher_send_keyframes() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    h.sfu.set_subscription_preferences("r", "bob", video.track.track_id, {"paused": True})
    h.sent.clear()
    for _ in range(5):  # a request per interval, for a stream bob does not get
        h.now += h.sfu.settings.session.keyframe_request_interval
        h.receive(rtcp.pli(1, video.ssrc), BOB)
        h.receive(rtcp.fir(1, video.ssrc, 1), BOB)
    assert _plis(h) == 0
    # unpaused: its requests count again
    h.sfu.set_subscription_preferences("r", "bob", video.track.track_id, {"paused": False})
    h.now += h.sfu.settings.session.keyframe_request_interval
    h.sent.clear()
    h.receive(rtcp.pli(1, video.ssrc), BOB)
    assert _plis(h) == 1


def test_a_keyframe_request_nobody_can_take_yet_is_kept_and_retried() -> None:
    # the publisher cannot be asked yet: its SDP names no SSRC and no packet has come, so a
    # request has nowhere to go; it is kept and retried on its timer
    h, _alice, bob = call(without(aiortc_offer(), "a=ssrc"))
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    keyframes = video.track.keyframes
    assert video.track.ssrc is None and video.active
    assert keyframes.pending and keyframes.timer.armed and _plis(h) == 0
    # a first packet: its SSRC is learnt by payload type, and the next retry goes out
    h.receive(rtp(6001, 97, 1, 3000, [], b"\x10\x01delta"), ALICE)
    assert video.track.ssrc == 6001 and _plis(h) == 0
    h.sent.clear()
    h.sfu.timers.run(h.now + keyframes.RETRY)
    assert _plis(h) == 1 and not keyframes.pending


# -- time ------------------------------------------------------------------------------------
def test_a_quiet_relay_arms_nothing_but_housekeeping() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    for seq in (100, 101, 103):  # one gap: feedback, a NACK and its retries are due
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000, []), ALICE)
    assert video.track.nack is not None and video.track.nack.timer.armed
    for _ in range(400):  # four seconds of nothing new
        h.now += 0.01
        h.sfu.timers.run(h.now)
    armed = {
        "nack": video.track.nack.timer.armed,
        "keyframes": video.track.keyframes.timer.armed,
    }
    assert armed == {"nack": False, "keyframes": False}
    deadline = h.sfu.timers.next_deadline()
    assert deadline is not None and deadline - h.now <= 1.0  # housekeeping, receiver reports


@pytest.mark.parametrize("packets", [0, 3])
def test_transport_cc_feedback_is_armed_only_by_arrivals(packets: int) -> None:
    h = Harness()
    h.sfu.add_participant("r", "carol")
    from tests.unit.test_sfu import FIXTURES

    h.publish("carol", (FIXTURES / "chrome_offer.sdp").read_text())
    leg = h.sfu.get_participant("r", "carol").publisher_leg
    h.connect(leg, ("10.0.0.3", 6000))
    feedback = leg.feedback
    assert feedback is not None and not feedback.timer.armed
    for i in range(packets):
        h.receive(
            rtp(457497428, 111, 500 + i, 960 * i, [(3, i.to_bytes(2, "big"))]), ("10.0.0.3", 6000)
        )
    assert feedback.timer.armed == bool(packets)
    h.sfu.timers.run(h.now + 1.0)
    assert not feedback.timer.armed


def test_subscribers_that_join_together_cost_the_publisher_one_keyframe() -> None:
    h = Harness()
    h.sfu.add_participant("r", "alice")
    subscribers = ("bob", "carol", "dave")
    for pid in subscribers:
        h.sfu.add_participant("r", pid)
    h.publish("alice", aiortc_offer())
    for pid in subscribers:
        h.answer(pid)
    alice = h.sfu.get_participant("r", "alice")
    h.connect(alice.publisher_leg, ALICE)
    h.now += 10
    h.sent.clear()
    for i, pid in enumerate(subscribers[:2]):
        h.connect(h.sfu.get_participant("r", pid).subscriber_leg, ("10.0.1.1", 7000 + i))
    assert _plis(h) == 1  # the second start waits for the keyframe the first asked for
    _send_video(h, range(300, 302))  # it arrives and starts both
    h.now += 0.1
    h.connect(h.sfu.get_participant("r", "dave").subscriber_leg, ("10.0.1.1", 7002))
    assert _plis(h) == 2  # that keyframe is gone: a new subscriber needs another one


def test_a_translated_sender_report_counts_the_subscriber_stream_and_its_payload() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    _send_video(h, range(100, 104))
    forwarded = [d for d in _sent_to(h, BOB) if 127 < d[0] < 192 and not rtcp_packet(d)]
    payload = sum(len(d) - parse_rtp(d)[5] for d in forwarded)
    h.sent.clear()
    ntp = 0xE000000012345678
    h.receive(rtcp.sender_report(AIORTC_VIDEO_SSRC, ntp, 9103, 4, 999), ALICE)
    (report,) = [
        p for d in _sent_to(h, BOB) for p in rtcp.parse_rtcp(d) if isinstance(p, rtcp.SenderReport)
    ]
    # RFC 3550 §6.4.1: the octet count is payload octets only, not headers or the SRTP tag
    assert (report.ssrc, report.packet_count, report.octet_count) == (video.ssrc, 4, payload)
    assert report.ntp_timestamp == ntp  # kept: lip sync with the publisher's other tracks
    last_ts = parse_rtp(forwarded[-1])[2]
    assert report.rtp_timestamp == last_ts  # the publisher's 9103, in this stream's units


def test_a_retransmission_of_a_packet_already_received_is_not_forwarded_again() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    track = video.track
    _send_video(h, range(100, 106))
    h.sent.clear()
    # libwebrtc's RTX probe: packet 103 again on the RTX stream
    probe = rtp(
        track.rtx_ssrc, track.rtx_payload_type, 1, 9103, [], (103).to_bytes(2, "big") + b"x"
    )
    h.receive(probe, ALICE)
    assert [d for d in _sent_to(h, BOB) if 127 < d[0] < 192 and not rtcp_packet(d)] == []
    assert h.sfu.metrics.drops["rtx_duplicate"] == 1 and track.rtx_received == 0


def test_the_subscribers_feedback_feeds_its_bandwidth_estimate() -> None:
    from relay.rtc.gcc import GccEstimator
    from relay.rtc.twcc import TwccRecorder

    h = Harness()
    _alice, _bob, video = _video_call(h)
    recorder = TwccRecorder(sender_ssrc=1, media_ssrc=video.ssrc)
    for round_ in range(20):  # 2 s of video, bob's feedback every 100 ms
        _send_video(h, range(100 + 10 * round_, 110 + 10 * round_))
        for data in _sent_to(h, BOB):
            if 127 < data[0] < 192 and not rtcp_packet(data):
                *_, ext_offset, ext_length = parse_rtp(data)
                stamp = dict(parse_extensions(data, ext_offset, ext_length, 0xBEDE))[3]
                recorder.on_packet(int.from_bytes(stamp, "big"), h.now + 0.02)
        h.sent.clear()
        h.now += 0.1
        for packet in recorder.build_feedback(h.now):
            h.receive(packet, BOB)
    delivery = h.sfu.participant_stats("r", "bob")["subscriber_delivery"]
    assert delivery["packets_acked"] == 200 and delivery["packets_lost"] == 0
    assert delivery["estimator_state"] in ("normal", "underusing", "overusing")
    # fed: the estimate moved from where every estimator starts
    assert delivery["estimated_bitrate"] != GccEstimator().estimate
