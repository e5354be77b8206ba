"""The media router's latch, with bytes: only an authenticated datagram moves it (a fresh,
nominating STUN check, SRTP/SRTCP whose tag passes, a completed DTLS handshake); replayed checks
and forged media move nothing and are counted as drops."""

from __future__ import annotations

from aioice import stun

from relay.rtc import rtcp
from relay.rtc.rtp import parse_rtp
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import RECENT_CHECKS, WebRtcTransport
from tests.unit.test_sfu import AIORTC_VIDEO_SSRC, VP8_KEYFRAME, Harness, aiortc_offer, rtp

ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)
BOB_MOVED = ("10.0.0.2", 5999)
ATTACKER = ("10.6.6.6", 6666)
TAG = b"\xa5TAG"


class TaggedSrtp:
    """Stands in for an SRTP session: a packet authenticates when it ends with the session's
    tag, once (a replay window of one packet each)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def protect(self, data: bytes) -> bytes:
        return data + TAG

    def unprotect(self, data: bytes) -> bytes:
        if not data.endswith(TAG) or data in self.seen:
            raise SrtpError("authentication failed")
        self.seen.add(data)
        return data[: -len(TAG)]

    protect_rtcp = protect
    unprotect_rtcp = unprotect


def check(transport: WebRtcTransport, nominate: bool, transaction_id: bytes | None = None) -> bytes:
    """A Binding request from the transport's client, with valid MESSAGE-INTEGRITY."""
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    if transaction_id is not None:
        msg.transaction_id = transaction_id
    msg.attributes["USERNAME"] = f"{transport.local.ufrag}:{transport.remote_ufrag}"
    msg.attributes["PRIORITY"] = 1000
    msg.attributes["ICE-CONTROLLING"] = 1
    if nominate:
        msg.attributes["USE-CANDIDATE"] = None
    msg.add_message_integrity(transport.local.pwd.encode())
    msg.add_fingerprint()
    return bytes(msg)


def _call(h: Harness) -> tuple:
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    h.sfu.publisher_offer("r", "alice", aiortc_offer())
    h.answer("bob")
    alice, bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
    h.connect(alice.publisher, ALICE)
    h.connect(bob.subscriber, BOB)
    bob.subscriber.srtp = TaggedSrtp()
    video = next(s for s in bob.subscriptions.values() if s.track.kind == "video")
    return alice, bob, video


def _media(h: Harness, seq: int) -> None:
    payload = VP8_KEYFRAME if seq == 100 else b"\x90\x10payload-bytes"
    h.sfu.router.handle_datagram(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000 + seq, [], payload), ALICE)


def _media_to(h: Harness, addr: tuple[str, int]) -> list[bytes]:
    return [d for d, a in h.sent if a == addr and 127 < d[0] < 192 and not rtcp_like(d)]


def rtcp_like(data: bytes) -> bool:
    return 192 <= data[1] <= 223


def test_replayed_nominating_check_and_forged_media_move_nothing() -> None:
    h = Harness()
    _alice, bob, video = _call(h)
    sub = bob.subscriber
    captured = check(sub, nominate=True)
    h.sfu.router.handle_datagram(captured, BOB)
    assert sub.addr == BOB and h.sfu.metrics.stun_requests == 1
    h.sent.clear()
    # the copy is answered (as a retransmission would be) ...
    h.sfu.router.handle_datagram(captured, ATTACKER)
    answers = [d for d, a in h.sent if a == ATTACKER]
    assert len(answers) == 1 and stun.parse_message(answers[0]).message_class is stun.Class.RESPONSE
    # ... but neither latched nor remembered as an alternate
    assert sub.addr == BOB and ATTACKER not in h.sfu.router.alt_addrs
    assert h.sfu.metrics.drops["stun_replayed"] == 1
    # RTP-, RTCP- and DTLS-looking junk, and forged SRTP, from the attacker's address
    for junk in (
        b"\x80" + bytes(40),
        rtp(video.ssrc, 97, 1, 1, []) + b"\x00TAG",
        rtcp.pli(1, video.ssrc),
        b"\x16\xfe\xfd" + bytes(30),
    ):
        h.sfu.router.handle_datagram(junk, ATTACKER)
    assert sub.addr == BOB and h.sfu.router.by_addr.get(ATTACKER) is None
    h.sent.clear()
    for seq in range(100, 110):
        _media(h, seq)
    assert _media_to(h, ATTACKER) == []
    assert len(_media_to(h, BOB)) == 10


def test_forged_media_from_an_alternate_is_dropped_authenticated_media_relatches() -> None:
    h = Harness()
    _alice, bob, video = _call(h)
    sub = bob.subscriber
    # bob's NAT rebinds: a fresh check without USE-CANDIDATE from the new port is remembered
    h.sfu.router.handle_datagram(check(sub, nominate=False), BOB_MOVED)
    assert sub.addr == BOB and h.sfu.router.alt_addrs.get(BOB_MOVED) is sub
    # SRTCP that fails authentication (or replays an authenticated one) moves nothing
    report = rtcp.receiver_report(1234, [])
    drops = h.sfu.metrics.drops["srtp_unprotect"]
    h.sfu.router.handle_datagram(report, BOB_MOVED)
    h.sfu.router.handle_datagram(b"\x80" + bytes(30), BOB_MOVED)
    h.sfu.router.handle_datagram(b"\x17\xfe\xfd" + bytes(30), BOB_MOVED)  # DTLS-looking
    assert sub.addr == BOB
    assert h.sfu.metrics.drops["srtp_unprotect"] == drops + 2
    assert h.sfu.metrics.drops["dtls_unlatched"] == 1
    # an authenticated receiver report from the new port does
    h.sfu.router.handle_datagram(report + TAG, BOB_MOVED)
    assert sub.addr == BOB_MOVED and h.sfu.router.by_addr.get(BOB_MOVED) is sub
    assert h.sfu.router.alt_addrs.get(BOB) is sub  # the old one became the alternate
    # the same packet again (a replay) from the old address does not move it back
    h.sfu.router.handle_datagram(report + TAG, BOB)
    assert sub.addr == BOB_MOVED
    h.sent.clear()
    for seq in range(100, 105):
        _media(h, seq)
    assert len(_media_to(h, BOB_MOVED)) == 5 and _media_to(h, BOB) == []
    assert parse_rtp(_media_to(h, BOB_MOVED)[0][: -len(TAG)])[3] == video.ssrc


def test_fresh_nominating_check_moves_the_latch_its_replay_does_not() -> None:
    h = Harness()
    alice, _bob, _video = _call(h)
    pub = alice.publisher
    moved = ("10.0.0.1", 4999)
    captured = check(pub, nominate=True)
    h.sfu.router.handle_datagram(captured, moved)
    assert pub.addr == moved  # NAT rebinding with re-nomination
    h.sfu.router.handle_datagram(captured, ATTACKER)
    assert pub.addr == moved and ATTACKER not in h.sfu.router.alt_addrs


def test_transaction_cache_is_bounded() -> None:
    h = Harness()
    alice, _bob, _video = _call(h)
    pub = alice.publisher
    for i in range(RECENT_CHECKS * 3):
        h.sfu.router.handle_datagram(check(pub, False, i.to_bytes(12, "big")), ALICE)
    assert len(pub.recent_checks) == RECENT_CHECKS
    assert h.sfu.metrics.drops["stun_replayed"] == 0


def test_replayed_checks_do_not_keep_consent_alive() -> None:
    h = Harness()
    _alice, bob, _video = _call(h)
    sub = bob.subscriber
    captured = check(sub, nominate=False)
    h.sfu.router.handle_datagram(captured, BOB)
    timeout = h.sfu.settings.session.consent_timeout
    # bob is gone; someone keeps replaying his last check, from his address and from another
    end = h.now + timeout + 3
    while h.now < end:
        h.now += 1
        h.sfu.router.handle_datagram(captured, BOB)
        h.sfu.router.handle_datagram(captured, ATTACKER)
        h.sfu.tick(h.now)
    assert "bob" not in h.sfu.get_room("r").participants


def test_fresh_checks_from_an_unlatched_address_do_not_refresh_the_latched_one() -> None:
    h = Harness()
    alice, _bob, _video = _call(h)
    pub = alice.publisher
    pub.rx_seen = False
    h.sfu.router.handle_datagram(check(pub, nominate=False), ("10.0.0.1", 4111))
    assert not pub.rx_seen
    h.sfu.router.handle_datagram(check(pub, nominate=False), ALICE)
    assert pub.rx_seen
