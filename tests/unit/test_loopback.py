"""LoopbackRelay: a real Sfu in memory, with a publisher and two subscribers that do the whole
ICE/DTLS handshake with its port, forwarding, NACK from the shared history, PLI upstream."""

from __future__ import annotations

import pytest

from relay.client.loopback import LoopbackRelay, ManualClock
from relay.client.peer import VIDEO_PT, TrackSpec
from relay.rtc import rtcp
from relay.rtc.nack import rtx_unwrap
from relay.rtc.rtp import parse_rtp
from relay.sfu.publisher_leg import PublisherLeg
from relay.sfu.subscriber_leg import SubscriberLeg

SSRC = 0x1234567
#: a VP8 payload descriptor that starts a keyframe (S=1, then P=0): subscriptions start on it
KEYFRAME = b"\x10\x00" + bytes(98)


@pytest.fixture
def relay() -> LoopbackRelay:
    relay = LoopbackRelay()
    relay.add_publisher("pub", [TrackSpec("video", SSRC, "0")])
    relay.add_subscriber("s1")
    relay.add_subscriber("s2")
    relay.deliver()  # the keyframe requests the subscriptions' activation made
    return relay


def _send(relay: LoopbackRelay, seqs: range) -> list[bytes]:
    pub = relay.endpoint("pub").peer
    return [
        relay.publish(pub, SSRC, VIDEO_PT, seq, seq * 3000, KEYFRAME + seq.to_bytes(2, "big"))
        for seq in seqs
    ]


def test_handshakes_latch_every_leg(relay: LoopbackRelay) -> None:
    assert isinstance(relay.leg("pub"), PublisherLeg)
    assert isinstance(relay.leg("s1"), SubscriberLeg)
    for pid in ("pub", "s1", "s2"):
        assert relay.endpoint(pid).peer.connected
        assert relay.leg(pid).transport.ready
        assert relay.leg(pid).participant is relay.participant(pid)
    assert len(relay.track("pub", SSRC).outputs) == 2


def test_subscribers_decrypt_rewritten_continuous_streams(relay: LoopbackRelay) -> None:
    _send(relay, range(1000, 1010))
    got = relay.deliver()
    assert got["pub"].rtp == []
    track = relay.track("pub", SSRC)
    seen_ssrcs = set()
    for pid in ("s1", "s2"):
        sub = track.subscriptions[pid]
        packets = got[pid].rtp
        assert len(packets) == 10
        assert relay.endpoint(pid).peer.rtp_received == {sub.ssrc: 10}
        headers = [parse_rtp(p) for p in packets]
        assert {h[3] for h in headers} == {sub.ssrc}  # the relay's SSRC, not the publisher's
        assert sub.ssrc != SSRC
        assert {h[0] for h in headers} == {sub.payload_type}
        seqs = [h[1] for h in headers]
        assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(10)]
        assert seqs[-1] == sub.stream.rewriter.last_seq
        assert [p[-2:] for p in packets] == [s.to_bytes(2, "big") for s in range(1000, 1010)]
        seen_ssrcs.add(sub.ssrc)
    assert len(seen_ssrcs) == 2
    assert relay.undelivered == []


def test_nack_is_answered_on_rtx_from_the_shared_history(relay: LoopbackRelay) -> None:
    _send(relay, range(500, 510))
    got = relay.deliver()
    track = relay.track("pub", SSRC)
    sub1 = track.subscriptions["s1"]
    assert track.history is not None
    for sub in track.subscriptions.values():  # one history for the track, not per subscriber
        assert sub.stream.nack is not None and sub.stream.track.history is track.history
    lost = parse_rtp(got["s1"].rtp[3])[1]

    s1 = relay.endpoint("s1").peer
    relay.send_rtcp(s1, rtcp.nack(0x5151, sub1.ssrc, [lost]))
    got = relay.deliver()

    assert got["s2"].rtp == [] and got["s2"].rtcp == []
    assert got["pub"].rtp == []
    (packet,) = got["s1"].rtp
    _pt, _seq, _ts, ssrc, *_ = parse_rtp(packet)
    assert ssrc == sub1.rtx_ssrc
    assert packet[1] & 0x7F == sub1.rtx_payload_type
    osn, original = rtx_unwrap(packet, sub1.ssrc, sub1.payload_type)
    assert osn == lost
    assert original[-2:] == (503).to_bytes(2, "big")
    responders = [track.subscriptions[pid].stream.nack for pid in ("s1", "s2")]
    assert [r.retransmissions if r else None for r in responders] == [1, 0]
    assert relay.sfu.metrics.retransmissions == 1


def test_pli_from_a_subscriber_reaches_the_publisher(relay: LoopbackRelay) -> None:
    _send(relay, range(10, 13))
    relay.deliver()
    # past the keyframe-request throttle of the activation PLIs
    relay.advance(relay.settings.session.keyframe_request_interval + 0.01)
    relay.deliver()
    sub2 = relay.track("pub", SSRC).subscriptions["s2"]
    relay.send_rtcp(relay.endpoint("s2").peer, rtcp.pli(0x5252, sub2.ssrc))
    got = relay.deliver()
    plis = [p for p in got["pub"].rtcp if isinstance(p, rtcp.Pli)]
    assert [p.media_ssrc for p in plis] == [SSRC]
    assert plis[0].sender_ssrc == relay.participant("pub").rtcp_ssrc
    assert got["s1"].rtcp == [] and got["s2"].rtcp == []


def test_subscriber_first_is_renegotiated_when_a_publisher_comes() -> None:
    relay = LoopbackRelay()
    relay.add_subscriber("s1")
    relay.add_publisher("pub", [TrackSpec("video", SSRC, "0")])
    assert relay.participant("s1").applied_revision == relay.participant("s1").revision
    _send(relay, range(1, 4))
    assert len(relay.deliver()["s1"].rtp) == 3


def test_advance_fires_the_relays_timers() -> None:
    relay = LoopbackRelay()
    assert isinstance(relay.clock, ManualClock)
    relay.add_publisher("pub", [TrackSpec("video", SSRC, "0")])
    _send(relay, range(1, 4))
    relay.advance(relay.settings.session.sender_report_interval + 0.01)
    got = relay.deliver()
    reports = [p for p in got["pub"].rtcp if isinstance(p, rtcp.ReceiverReport)]
    assert reports and reports[0].reports[0].ssrc == SSRC


def test_sending_with_replaces_the_outbox() -> None:
    relay = LoopbackRelay()
    relay.add_publisher("pub", [TrackSpec("audio", SSRC, "0")])
    relay.add_subscriber("s1")
    relay.deliver()
    sent: list[tuple[bytes, tuple[str, int]]] = []

    class Sink:
        def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
            sent.append((data, addr))

        def send(self, batch: list[tuple[bytes, tuple[str, int]]]) -> None:
            sent.extend(batch)

    with relay.sending_with(Sink()):
        relay.publish(relay.endpoint("pub").peer, SSRC, 111, 1, 960, b"\x01" * 40)
    assert [addr for _, addr in sent] == [relay.endpoint("s1").addr]
    assert relay.outbox == []
    relay.publish(relay.endpoint("pub").peer, SSRC, 111, 2, 1920, b"\x01" * 40)
    assert len(relay.deliver()["s1"].rtp) == 1


def test_without_rtx_a_lost_packet_is_resent_as_it_was() -> None:
    relay = LoopbackRelay()
    relay.add_publisher("pub", [TrackSpec("video", SSRC, "0")])
    relay.add_subscriber("s1", rtx=False)
    relay.deliver()
    _send(relay, range(20, 25))
    s1_addr = relay.endpoint("s1").addr
    lost = relay.outbox.pop(2)  # the third packet never reaches s1
    assert lost[1] == s1_addr
    got = relay.deliver()
    sub = relay.track("pub", SSRC).subscriptions["s1"]
    assert sub.stream.nack is not None and not sub.stream.nack.use_rtx
    seqs = [parse_rtp(p)[1] for p in got["s1"].rtp]
    missing = (seqs[1] + 1) & 0xFFFF
    assert missing not in seqs
    relay.send_rtcp(relay.endpoint("s1").peer, rtcp.nack(0x5151, sub.ssrc, [missing]))
    (packet,) = relay.deliver()["s1"].rtp
    _pt, seq, _ts, ssrc, *_ = parse_rtp(packet)
    assert (seq, ssrc) == (missing, sub.ssrc)
    assert packet[-2:] == (22).to_bytes(2, "big")


def test_advancing_time_keeps_consent_and_times_out_a_silent_peer() -> None:
    relay = LoopbackRelay()
    relay.add_publisher("pub", [TrackSpec("audio", SSRC, "0")])
    relay.add_subscriber("s1")
    relay.add_subscriber("s2")
    relay.endpoint("s2").peer.close(notify=False)  # gone without a word: no more checks
    consent = relay.settings.session.consent_timeout
    for _ in range(int(consent) + 3):
        relay.advance(1.0)
        relay.deliver()
    assert set(relay.room.participants) == {"pub", "s1"}
    assert relay.endpoint("s1").peer.connected
