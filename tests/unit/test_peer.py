"""ClientPeer (relay/client/peer.py) against the relay's own WebRtcTransport, in memory and on
loopback: checks, address latching, DTLS in both roles, SRTP/SRTCP both ways."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aioice import stun

from relay.client.peer import (
    AUDIO_PT,
    MID_EXT_ID,
    VIDEO_PT,
    ClientPeer,
    PeerError,
    RemoteDescription,
    TrackSpec,
    UdpClientPeer,
    build_rtp,
)
from relay.rtc import rtcp
from relay.rtc import sdp as sdpmod
from relay.rtc.dtls import DEFAULT_SRTP_PROFILES, Certificate, DtlsState
from relay.rtc.ice import parse_binding_request
from relay.rtc.rtp import extension_profile, is_rtcp, parse_extensions, parse_rtp
from relay.rtc.transport import TransportState, WebRtcTransport

CLIENT = ("127.0.0.1", 50000)
RELAY = ("127.0.0.1", 40000)
TRACKS = [TrackSpec("audio", 1111), TrackSpec("video", 2222)]


@pytest.fixture(scope="module")
def relay_cert() -> Certificate:
    return Certificate.generate()


@pytest.fixture(scope="module")
def client_cert() -> Certificate:
    return Certificate.generate()


def _local(transport: WebRtcTransport, setup: str, addr: tuple[str, int] = RELAY):
    return sdpmod.LocalTransport(
        ice_ufrag=transport.local.ufrag,
        ice_pwd=transport.local.pwd,
        fingerprint=(transport.certificate.algorithm, transport.certificate.fingerprint),
        candidates=[addr],
        setup=setup,
        session_id=1,
        session_version=1,
    )


@dataclass
class Pair:
    """A ClientPeer and a relay-side transport, wired by a lossless in-memory pump."""

    peer: ClientPeer
    transport: WebRtcTransport
    remote: RemoteDescription
    relay_rx: list[bytes] = field(default_factory=list)
    #: datagrams from the client dropped while this returns True
    drop: Callable[[bytes], bool] = lambda d: False

    def relay_side(self, data: bytes, addr: tuple[str, int], now: float) -> list[bytes]:
        t = self.transport
        if data[0] < 4:
            response, _ok, _changed, out = t.handle_binding(parse_binding_request(data), addr, now)
            return [response, *out]
        if 19 < data[0] < 64:
            out, _connected = t.handle_dtls(data, now)
            return out
        assert t.srtp is not None
        self.relay_rx.append(
            t.srtp.unprotect_rtcp(data) if is_rtcp(data) else t.srtp.unprotect(data)
        )
        return []

    def pump(self, to_relay: list[bytes], now: float, addr: tuple[str, int] = CLIENT) -> None:
        to_client: list[bytes] = []
        for _ in range(100):
            if not to_relay and not to_client:
                return
            for d in to_relay:
                if not self.drop(d):
                    to_client += self.relay_side(d, addr, now)
            to_relay = []
            for d in to_client:
                to_relay += self.peer.receive(d, now)
            to_client = []
        raise AssertionError("datagrams kept flowing")


def publisher_pair(relay_cert: Certificate, client_cert: Certificate, setup: str) -> Pair:
    peer = ClientPeer(client_cert)
    transport = WebRtcTransport(relay_cert, DEFAULT_SRTP_PROFILES, role="publisher")
    offer = peer.create_offer(TRACKS, setup=setup)
    answer, answered = sdpmod.build_answer(sdpmod.parse_sdp(offer), _local(transport, "passive"))
    assert [a.direction for a in answered] == ["recvonly", "recvonly"]
    remote = RemoteDescription.parse(answer)
    peer.set_remote_description(remote)
    first = answered[0].offer
    assert first.ice_ufrag and first.ice_pwd
    transport.set_remote(
        first.ice_ufrag, first.ice_pwd, first.fingerprints, dtls_server=first.setup != "passive"
    )
    return Pair(peer, transport, remote)


def subscriber_pair(relay_cert: Certificate, client_cert: Certificate, setup: str) -> Pair:
    peer = ClientPeer(client_cert)
    transport = WebRtcTransport(relay_cert, DEFAULT_SRTP_PROFILES, role="subscriber")
    opus = sdpmod.Codec(AUDIO_PT, "opus", 48000, 2, {"minptime": "10"}, [], None, "audio")
    vp8 = sdpmod.Codec(VIDEO_PT, "VP8", 90000, None, {}, ["nack pli"], None, "video")
    offered = [
        sdpmod.OfferedMedia(
            "0", "audio", "sendonly", [opus], [sdpmod.Extmap(4, sdpmod.SUPPORTED_EXTENSIONS[0])], 5
        ),
        sdpmod.OfferedMedia("1", "video", "sendonly", [vp8], [], 6, msid=("alice", "TR_1")),
        sdpmod.OfferedMedia("2", "audio", "inactive", [opus], [], None),
    ]
    offer = sdpmod.build_offer(_local(transport, "actpass"), offered)
    remote = RemoteDescription.parse(offer, revision=3)
    assert [(m.mid, m.ssrc, m.payload_type) for m in remote.media] == [
        ("0", 5, AUDIO_PT),
        ("1", 6, VIDEO_PT),
        ("2", None, AUDIO_PT),
    ]
    assert remote.media[1].msid == ("alice", "TR_1")
    answer = peer.create_answer(remote, setup=setup)
    parsed = sdpmod.parse_sdp(answer)
    assert [m.direction for m in parsed.media] == ["recvonly", "recvonly", "inactive"]
    assert parsed.media[0].extmaps[0].id == 4
    checked = sdpmod.check_answer(offered, parsed)
    assert checked is not None and checked.setup == setup
    peer.set_remote_description(remote)
    transport.set_remote(
        checked.ice_ufrag, checked.ice_pwd, checked.fingerprints, dtls_server=setup == "active"
    )
    return Pair(peer, transport, remote)


def test_remote_description_parses_the_relays_answer(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    remote = pair.remote
    assert remote.ice_ufrag == pair.transport.local.ufrag
    assert remote.ice_pwd == pair.transport.local.pwd
    assert remote.fingerprints == [("sha-256", relay_cert.fingerprint)]
    assert remote.setup == "passive" and remote.ice_lite
    assert remote.address == RELAY
    assert [(m.kind, m.direction, m.payload_type) for m in remote.media] == [
        ("audio", "recvonly", AUDIO_PT),
        ("video", "recvonly", VIDEO_PT),
    ]


def test_offer_signals_ssrcs_codecs_and_mid(client_cert) -> None:
    peer = ClientPeer(client_cert)
    offer = sdpmod.parse_sdp(peer.create_offer(TRACKS, setup="passive"))
    assert offer.bundle_mids == ["0", "1"]
    audio, video = offer.media
    assert (audio.direction, audio.ssrcs, audio.codecs[0].name) == ("sendonly", [1111], "opus")
    assert (video.direction, video.ssrcs, video.codecs[0].name) == ("sendonly", [2222], "VP8")
    assert all(m.setup == "passive" and m.rtcp_mux for m in offer.media)
    assert all(m.extmaps[0].id == MID_EXT_ID for m in offer.media)
    assert audio.fingerprints == [("sha-256", client_cert.fingerprint)]
    with pytest.raises(PeerError):
        peer.create_offer([], setup="actpass")
    with pytest.raises(PeerError):
        peer.create_offer(TRACKS, setup="sideways")


def test_check_is_answered_and_the_address_latched(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    (check,) = pair.peer.start(0.0)
    request = parse_binding_request(check)
    assert request.local_ufrag == pair.transport.local.ufrag
    assert request.remote_ufrag == pair.peer.local.ufrag
    assert request.use_candidate and request.controlling and request.priority
    assert request.authenticate(pair.transport.local.pwd)
    assert "FINGERPRINT" in request.message.attributes
    pair.pump([check], 0.0)
    assert pair.peer.ice_connected
    assert pair.peer.mapped_address == CLIENT
    assert pair.transport.addr == CLIENT and pair.transport.nominated


@pytest.mark.parametrize(
    ("make", "setup", "peer_is_client"),
    [
        (publisher_pair, "actpass", True),
        (publisher_pair, "active", True),
        (publisher_pair, "passive", False),
        (subscriber_pair, "active", True),
        (subscriber_pair, "passive", False),
    ],
)
def test_dtls_completes_in_both_roles(
    relay_cert, client_cert, make, setup: str, peer_is_client: bool
) -> None:
    pair = make(relay_cert, client_cert, setup)
    assert pair.peer.dtls_client is peer_is_client
    assert pair.transport.dtls_server is peer_is_client
    pair.pump(pair.peer.start(0.0), 0.0)
    assert pair.peer.connected, pair.peer.stats()
    assert pair.transport.state is TransportState.CONNECTED
    assert pair.peer.dtls_state is DtlsState.CONNECTED
    assert pair.peer.srtp is not None and pair.transport.srtp is not None
    assert pair.peer.srtp.profile == pair.transport.srtp.profile


def test_srtp_round_trip(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    pair.pump(pair.peer.start(0.0), 0.0)
    peer, transport = pair.peer, pair.transport
    assert transport.srtp is not None

    # client -> relay, with the sdes:mid extension of the published SSRC
    pair.pump([peer.protect_rtp(2222, VIDEO_PT, 7, 9000, b"\x10frame", marker=True)], 1.0)
    (plain,) = pair.relay_rx
    pt, seq, ts, ssrc, marker, offset, ext_offset, ext_length = parse_rtp(plain)
    assert (pt, seq, ts, ssrc, marker, plain[offset:]) == (
        VIDEO_PT,
        7,
        9000,
        2222,
        True,
        b"\x10frame",
    )
    elements = parse_extensions(plain, ext_offset, ext_length, extension_profile(plain))
    assert elements == [(MID_EXT_ID, b"1")]
    # explicit (no) extensions
    pair.pump([peer.protect_rtp(9999, AUDIO_PT, 1, 2, b"x", extensions=[])], 1.0)
    assert parse_rtp(pair.relay_rx[-1])[6:] == (0, 0)

    # client -> relay RTCP
    pair.pump([peer.protect_rtcp(rtcp.pli(1, 2))], 1.0)
    (packet,) = rtcp.parse_rtcp(pair.relay_rx[-1])
    assert isinstance(packet, rtcp.Pli) and packet.media_ssrc == 2

    # relay -> client RTP and RTCP, through the callbacks
    got_rtp: list[tuple[bytes, float]] = []
    got_rtcp: list[list] = []
    peer.on_rtp = lambda data, now: got_rtp.append((data, now))
    peer.on_rtcp = got_rtcp.append
    sent = build_rtp(42, VIDEO_PT, 100, 3000, b"payload")
    assert peer.receive(transport.srtp.protect(sent), 2.5) == []
    assert got_rtp == [(sent, 2.5)]
    assert peer.rtp_received == {42: 1}
    report = rtcp.sender_report(42, rtcp.ntp_from_unix(0), 3000, 1, 7)
    peer.receive(transport.srtp.protect_rtcp(report), 2.6)
    assert isinstance(got_rtcp[0][0], rtcp.SenderReport) and got_rtcp[0][0].ssrc == 42
    # forged SRTP fails authentication and is counted, not delivered
    forged = bytearray(transport.srtp.protect(build_rtp(42, VIDEO_PT, 101, 3000, b"p")))
    forged[-1] ^= 0xFF
    peer.receive(bytes(forged), 2.7)
    assert peer.srtp_errors == 1 and len(got_rtp) == 1


def test_checks_are_retried_then_consent_is_refreshed(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    peer = pair.peer
    pair.drop = lambda d: d[0] < 4  # the network eats every check for now
    pair.pump(peer.start(0.0), 0.0)
    times = [0.0]
    now = 0.0
    while len(times) < 8:
        due = peer.next_timeout()
        assert due is not None and due > now
        now = due
        out = peer.handle_timeout(now)
        pair.pump(out, now)
        if out:
            times.append(now)
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] == 0.05 and gaps[-1] == 0.5 and gaps == sorted(gaps)
    assert not peer.ice_connected
    pair.drop = lambda d: False
    now += 0.5
    pair.pump(peer.handle_timeout(now), now)
    assert peer.connected
    # consent freshness: one check every consent_interval, answered
    successes = peer.check_successes
    due = peer.next_timeout()
    assert due == pytest.approx(now + peer.consent_interval)
    pair.pump(peer.handle_timeout(due), due)
    assert peer.check_successes == successes + 1
    assert peer.next_timeout() == pytest.approx(due + peer.consent_interval)


def test_consent_and_ice_timeouts_fail_the_peer(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    pair.pump(pair.peer.start(0.0), 0.0)
    assert pair.peer.connected
    pair.drop = lambda d: True
    now = 0.0
    while not pair.peer.failed and now < 100:
        now = pair.peer.next_timeout() or now + 1
        pair.pump(pair.peer.handle_timeout(now), now)
    assert pair.peer.failed and "consent" in (pair.peer.failure_reason or "")
    assert 30.0 < now <= 33.0

    lonely = ClientPeer(client_cert, ice_timeout=5.0)
    lonely.create_offer(TRACKS)
    lonely.set_remote_description(pair.remote)
    lonely.start(0.0)
    now = 0.0
    while not lonely.failed and now < 100:
        now = lonely.next_timeout() or now + 1
        lonely.handle_timeout(now)
    assert lonely.failed and 5.0 < now <= 5.6
    assert lonely.next_timeout() is None


def test_wrong_password_gets_401_and_no_connection(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    pair.remote.ice_pwd = "x" * 32  # the client checks with a password the relay does not have
    pair.pump(pair.peer.start(0.0), 0.0)
    assert pair.peer.check_errors == [401]
    assert not pair.peer.ice_connected and pair.transport.addr is None


def test_responses_not_matching_a_check_are_ignored(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "actpass")
    (check,) = pair.peer.start(0.0)
    request = stun.parse_message(check)
    # right transaction, wrong integrity key
    forged = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, request.transaction_id)
    forged.attributes["XOR-MAPPED-ADDRESS"] = CLIENT
    forged.add_message_integrity(b"not the relay's password")
    assert pair.peer.receive(bytes(forged), 0.0) == []
    # a stray response for a transaction we never started
    stray = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)
    stray.add_message_integrity(pair.transport.local.pwd.encode())
    pair.peer.receive(bytes(stray), 0.0)
    # garbage of every kind
    for junk in (b"\x00\x01\x00", b"\x17" * 20, b"\xff\x00", b"\x80\x00" * 10, b""):
        pair.peer.receive(junk, 0.0)
    assert not pair.peer.ice_connected
    assert pair.peer.ignored >= 5


def test_close_notify_closes_the_relay_side(relay_cert, client_cert) -> None:
    pair = publisher_pair(relay_cert, client_cert, "passive")
    pair.pump(pair.peer.start(0.0), 0.0)
    assert pair.peer.connected
    pair.pump(pair.peer.close(), 1.0)
    assert pair.peer.closed and not pair.peer.connected
    assert pair.transport.state is TransportState.CLOSED
    assert pair.peer.next_timeout() is None
    with pytest.raises(PeerError):
        pair.peer.protect_rtp(1111, AUDIO_PT, 1, 1, b"x")


class _LoopbackRelay(asyncio.DatagramProtocol):
    """One relay-side WebRtcTransport behind a UDP socket, latching like the media port."""

    def __init__(self, transport: WebRtcTransport) -> None:
        self.rtc = transport
        self.udp: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.unknown = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.udp is not None
        now = time.monotonic()
        if data[0] < 4:
            response, _ok, _changed, out = self.rtc.handle_binding(
                parse_binding_request(data), addr, now
            )
            self.udp.sendto(response, addr)
        elif addr != self.rtc.addr:
            self.unknown += 1
            return
        elif data[0] < 64:
            out, _connected = self.rtc.handle_dtls(data, now)
        else:
            assert self.rtc.srtp is not None
            self.received.append((self.rtc.srtp.unprotect(data), addr))
            return
        for d in out:
            self.udp.sendto(d, self.rtc.addr)


async def test_udp_client_peer_connects_sends_receives_and_rebinds(relay_cert, client_cert) -> None:
    loop = asyncio.get_running_loop()
    transport = WebRtcTransport(relay_cert, DEFAULT_SRTP_PROFILES, role="publisher")
    udp, relay = await loop.create_datagram_endpoint(
        lambda: _LoopbackRelay(transport), local_addr=("127.0.0.1", 0)
    )
    try:
        addr = udp.get_extra_info("sockname")[:2]
        peer = ClientPeer(client_cert)
        offer = peer.create_offer(TRACKS, setup="passive")  # the relay side is the DTLS client
        answer, answered = sdpmod.build_answer(
            sdpmod.parse_sdp(offer), _local(transport, "passive", addr)
        )
        first = answered[0].offer
        assert first.ice_ufrag and first.ice_pwd
        transport.set_remote(first.ice_ufrag, first.ice_pwd, first.fingerprints, False)
        remote = RemoteDescription.parse(answer)
        peer.set_remote_description(remote)
        got: list[bytes] = []
        peer.on_rtp = lambda data, now: got.append(data)
        async with UdpClientPeer.connect(peer, remote.address) as client:
            await client.connected(timeout=10)
            first_addr = client.local_address
            assert transport.addr == first_addr
            client.send_rtp(1111, AUDIO_PT, 1, 960, b"opus")
            assert transport.srtp is not None
            udp.sendto(transport.srtp.protect(build_rtp(77, VIDEO_PT, 5, 0, b"vp8")), first_addr)
            for _ in range(200):
                if relay.received and got:
                    break
                await asyncio.sleep(0.01)
            assert parse_rtp(relay.received[0][0])[3] == 1111
            assert parse_rtp(got[0])[3] == 77

            new_addr = await client.rebind()
            assert new_addr != first_addr
            for _ in range(200):
                if transport.addr == new_addr:
                    break
                await asyncio.sleep(0.01)
            assert transport.addr == new_addr
            client.send_rtp(1111, AUDIO_PT, 2, 1920, b"opus")
            for _ in range(200):
                if len(relay.received) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert relay.received[1][1] == new_addr
            assert relay.unknown == 0
        assert peer.closed
        for _ in range(200):
            if transport.state is TransportState.CLOSED:
                break
            await asyncio.sleep(0.01)
        assert transport.state is TransportState.CLOSED  # close_notify on exit
    finally:
        udp.close()


async def test_connected_times_out_without_a_relay(client_cert, relay_cert) -> None:
    transport = WebRtcTransport(relay_cert, DEFAULT_SRTP_PROFILES, role="publisher")
    peer = ClientPeer(client_cert)
    offer = peer.create_offer(TRACKS)
    answer, _ = sdpmod.build_answer(
        sdpmod.parse_sdp(offer), _local(transport, "passive", ("127.0.0.1", 9))
    )
    peer.set_remote_description(RemoteDescription.parse(answer))
    async with UdpClientPeer.connect(peer, ("127.0.0.1", 9)) as client:
        with pytest.raises(PeerError, match="not connected"):
            await client.connected(timeout=0.3)
        assert peer.checks_sent >= 2
