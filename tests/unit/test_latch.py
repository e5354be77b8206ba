"""The media port's latch, with bytes over real ICE, DTLS and SRTP: only an authenticated
datagram moves it (a fresh, nominating STUN check, SRTP/SRTCP whose tag and replay window
pass, a completed DTLS handshake); replayed checks and forged or replayed media move nothing
and are counted as drops."""

from __future__ import annotations

from aioice import stun

from relay.rtc import rtcp
from relay.rtc.rtp import parse_rtp
from relay.rtc.transport import RECENT_CHECKS
from tests.unit.harness import Harness
from tests.unit.test_sfu import AIORTC_VIDEO_SSRC, VP8_KEYFRAME, aiortc_offer, rtp

ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)
BOB_MOVED = ("10.0.0.2", 5999)
ATTACKER = ("10.6.6.6", 6666)


def check(h: Harness, pid: str, role: str, nominate: bool) -> bytes:
    """A fresh Binding request from the participant's client, with valid MESSAGE-INTEGRITY."""
    (request,) = h.peer(pid, role).check(h.now, nominate=nominate)
    return request


def _call(h: Harness) -> tuple:
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.publish("alice", aiortc_offer())
    h.answer("bob")
    alice, bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
    h.connect(alice.publisher_leg, ALICE)
    h.connect(bob.subscriber_leg, BOB)
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    return alice, bob, video


def _media(h: Harness, seq: int) -> None:
    payload = VP8_KEYFRAME if seq == 100 else b"\x90\x10payload-bytes"
    h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000 + seq, [], payload), ALICE)


def _media_to(h: Harness, addr: tuple[str, int]) -> list[bytes]:
    """RTP sent to ``addr`` (decrypted by bob's client where it is bob's address)."""
    return [d for d, a in h.sent if a == addr and 127 < d[0] < 192 and not rtcp_like(d)]


def rtcp_like(data: bytes) -> bool:
    return 192 <= data[1] <= 223


def test_replayed_nominating_check_and_forged_media_move_nothing() -> None:
    h = Harness()
    _alice, bob, video = _call(h)
    sub = bob.subscriber_leg
    # an authenticated SRTCP packet of bob's, for the attacker to copy
    srtcp = h.receive(rtcp.receiver_report(1234, []), BOB)
    accepted = h.sfu.metrics.stun_requests
    captured = check(h, "bob", "subscriber", nominate=True)
    h.receive(captured, BOB)
    assert sub.transport.addr == BOB and h.sfu.metrics.stun_requests == accepted + 1
    h.sent.clear()
    # the copy is answered (as a retransmission would be) ...
    h.receive(captured, ATTACKER)
    answers = [d for d, a in h.sent if a == ATTACKER]
    assert len(answers) == 1 and stun.parse_message(answers[0]).message_class is stun.Class.RESPONSE
    # ... but neither latched nor remembered as an alternate
    assert sub.transport.addr == BOB and ATTACKER not in h.sfu.port.alt_addrs
    assert h.sfu.metrics.drops["stun_replayed"] == 1
    # RTP-, RTCP- and DTLS-looking junk, forged SRTP (a made-up tag) and bob's own SRTCP
    # copied, from the attacker's address
    for junk in (
        b"\x80" + bytes(40),
        rtp(video.ssrc, 97, 1, 1, []) + bytes(16),
        rtcp.pli(1, video.ssrc),
        srtcp,
        b"\x16\xfe\xfd" + bytes(30),
    ):
        h.receive(junk, ATTACKER, raw=True)
    assert sub.transport.addr == BOB and h.sfu.port.by_addr.get(ATTACKER) is None
    h.sent.clear()
    for seq in range(100, 110):
        _media(h, seq)
    assert _media_to(h, ATTACKER) == []
    assert len(_media_to(h, BOB)) == 10 and h.rejected == []


def test_forged_media_from_an_alternate_is_dropped_authenticated_media_relatches() -> None:
    h = Harness()
    _alice, bob, video = _call(h)
    sub = bob.subscriber_leg
    # bob's NAT rebinds: a fresh check without USE-CANDIDATE from the new port is remembered
    h.rebind(BOB, BOB_MOVED)
    h.receive(check(h, "bob", "subscriber", nominate=False), BOB_MOVED)
    assert sub.transport.addr == BOB and h.sfu.port.alt_addrs.get(BOB_MOVED) is sub
    # SRTCP that fails authentication (plain RTCP, junk, bob's SRTCP with its tag altered)
    # moves nothing
    report = rtcp.receiver_report(1234, [])
    forged = bytearray(h.peer("bob", "subscriber").protect_rtcp(report))
    forged[-1] ^= 0x01
    drops = h.sfu.metrics.drops["srtp_unprotect"]
    h.receive(report, BOB_MOVED, raw=True)
    h.receive(b"\x80" + bytes(30), BOB_MOVED, raw=True)
    h.receive(bytes(forged), BOB_MOVED, raw=True)
    h.receive(b"\x17\xfe\xfd" + bytes(30), BOB_MOVED, raw=True)  # DTLS-looking
    assert sub.transport.addr == BOB
    assert h.sfu.metrics.drops["srtp_unprotect"] == drops + 3
    assert h.sfu.metrics.drops["dtls_unlatched"] == 1
    # an authenticated receiver report from the new port does
    srtcp = h.receive(report, BOB_MOVED)
    assert sub.transport.addr == BOB_MOVED and h.sfu.port.by_addr.get(BOB_MOVED) is sub
    assert h.sfu.port.alt_addrs.get(BOB) is sub  # the old one became the alternate
    # the same packet again (a replay) from the old address does not move it back
    h.receive(srtcp, BOB, raw=True)
    assert sub.transport.addr == BOB_MOVED
    assert h.sfu.metrics.drops["srtp_unprotect"] == drops + 4
    h.sent.clear()
    for seq in range(100, 105):
        _media(h, seq)
    assert len(_media_to(h, BOB_MOVED)) == 5 and _media_to(h, BOB) == []
    assert parse_rtp(_media_to(h, BOB_MOVED)[0])[3] == video.ssrc and h.rejected == []


def test_fresh_nominating_check_moves_the_latch_its_replay_does_not() -> None:
    h = Harness()
    alice, _bob, _video = _call(h)
    pub = alice.publisher_leg
    moved = ("10.0.0.1", 4999)
    captured = check(h, "alice", "publisher", nominate=True)
    h.receive(captured, moved)
    assert pub.transport.addr == moved  # NAT rebinding with re-nomination
    h.receive(captured, ATTACKER)
    assert pub.transport.addr == moved and ATTACKER not in h.sfu.port.alt_addrs


def test_transaction_cache_is_bounded() -> None:
    h = Harness()
    alice, _bob, _video = _call(h)
    pub = alice.publisher_leg
    for _ in range(RECENT_CHECKS * 3):  # each check a new transaction id
        h.receive(check(h, "alice", "publisher", nominate=False), ALICE)
    assert len(pub.transport.recent_checks) == RECENT_CHECKS
    assert h.sfu.metrics.drops["stun_replayed"] == 0


def test_replayed_checks_do_not_keep_consent_alive() -> None:
    h = Harness()
    _alice, _bob, _video = _call(h)
    captured = check(h, "bob", "subscriber", nominate=False)
    h.receive(captured, BOB)
    timeout = h.sfu.settings.session.consent_timeout
    # bob is gone; someone keeps replaying his last check, from his address and from another
    end = h.now + timeout + 3
    while h.now < end:
        h.now += 1
        h.receive(captured, BOB)
        h.receive(captured, ATTACKER)
        h.sfu.tick(h.now)
    assert "bob" not in h.sfu.get_room("r").participants


def test_fresh_checks_from_an_unlatched_address_do_not_refresh_the_latched_one() -> None:
    h = Harness()
    alice, _bob, _video = _call(h)
    pub = alice.publisher_leg
    h.now += 1
    h.sfu.tick(h.now)  # the consent check takes what was seen so far
    assert not pub.transport.rx_seen
    h.receive(check(h, "alice", "publisher", nominate=False), ("10.0.0.1", 4111))
    assert not pub.transport.rx_seen
    h.receive(check(h, "alice", "publisher", nominate=False), ALICE)
    assert pub.transport.rx_seen
