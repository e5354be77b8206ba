"""A real :class:`~relay.sfu.sfu.Sfu` without sockets, whose legs connect for real.

Every participant's connection (publisher or subscriber) has a client-side
:class:`~relay.client.peer.ClientPeer`. The SDP the relay receives is the test's (a captured
offer from ``tests/fixtures/sdp``, a hand-built answer) with its ``a=ice-ufrag``, ``a=ice-pwd``
and ``a=fingerprint`` rewritten to that peer's (:meth:`ClientPeer.adopt_offer`, which also takes
the SDP's ``a=setup`` as the peer's DTLS role and drops its candidates): the media description
is the test's, the transport is real. :meth:`Harness.connect` then runs ICE (the peer's
checks, signed with the relay's password) and DTLS between the peer and
``sfu.port.datagram_received``, the relay's replies going back to the peer, until both ends
are connected; nothing of the relay is set by hand.

What goes in: :meth:`Harness.receive` protects a plain RTP or RTCP packet with the SRTP
session of the peer at the address (when one is connected there) and hands it to the port;
``raw=True`` (or no connected peer at the address) hands over the bytes as they are.

What comes out: every datagram the relay sends is in :attr:`Harness.wire` as sent, and in
:attr:`Harness.sent` with SRTP and SRTCP replaced by their plaintext, decrypted once, in order,
by the peer at that address; STUN and DTLS, and anything to an address without a peer, stay
as they were sent. A datagram the peer's SRTP session refuses (a failed tag, or its replay
window: a byte-identical resend) goes to :attr:`Harness.rejected` instead of :attr:`sent`.
"""

from __future__ import annotations

import dataclasses

from relay.client.peer import ClientPeer, RemoteDescription
from relay.config import Settings
from relay.rtc.dtls import Certificate
from relay.rtc.extensions import TRANSPORT_CC_URI
from relay.rtc.rtp import is_rtcp
from relay.rtc.sdp import LocalTransport, OfferedMedia, build_offer, parse_sdp
from relay.rtc.srtp import SrtpError
from relay.sfu.leg import CallbackSender, Leg
from relay.sfu.sfu import Sfu

Address = tuple[str, int]

#: one certificate for the relay and every peer: generating one is slow
CERT = Certificate.generate()
#: datagrams the relay may send a peer while it connects (a loop guard)
MAX_HANDSHAKE_DATAGRAMS = 64


def _is_srtp(data: bytes) -> bool:
    return bool(data) and 127 < data[0] < 192


class Harness:
    def __init__(self, settings: Settings | None = None) -> None:
        #: what the relay sent, SRTP/SRTCP decrypted by the peer at the address
        self.sent: list[tuple[bytes, Address]] = []
        #: what the relay sent, as sent
        self.wire: list[tuple[bytes, Address]] = []
        #: SRTP/SRTCP the peer at the address could not unprotect, as sent
        self.rejected: list[tuple[bytes, Address]] = []
        self.events: list[dict] = []
        self.now = 100.0
        #: (participant id, "publisher" | "subscriber") -> that connection's client
        self.peers: dict[tuple[str, str], ClientPeer] = {}
        #: address -> the peer sending from it (and receiving at it)
        self.peer_at: dict[Address, ClientPeer] = {}
        #: address -> indexes into :attr:`sent` of datagrams a handshaking peer has not had
        self._handshaking: dict[Address, list[int]] = {}
        self.sfu = Sfu(
            settings or Settings(),
            certificate=CERT,
            candidates=[("127.0.0.1", 40000)],
            sender=CallbackSender(self._record),
            clock=lambda: self.now,
            wallclock=lambda: 1.7e9,
            emit=lambda event: self.events.append(event.to_dict()),
        )
        self.sfu.create_room("r")

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def wire_to(self, addr: Address) -> list[bytes]:
        """The datagrams sent to ``addr``, as sent (SRTP protected)."""
        return [d for d, a in self.wire if a == addr]

    # -- peers and SDP ------------------------------------------------------------------
    def peer(self, pid: str, role: str = "publisher") -> ClientPeer:
        """The client of participant ``pid``'s ``role`` connection (made on first use)."""
        key = (pid, role)
        peer = self.peers.get(key)
        if peer is None:
            peer = self.peers[key] = ClientPeer(CERT)
        return peer

    def as_peer(self, pid: str, role: str, sdp: str) -> str:
        """``sdp`` with the ICE credentials and fingerprint of ``pid``'s ``role`` peer (its
        candidates dropped); its ``a=setup`` becomes the peer's DTLS role."""
        return self.peer(pid, role).adopt_offer(sdp)

    def publish(self, pid: str, offer: str) -> str:
        """``Sfu.publisher_offer`` with ``offer`` as ``pid``'s publisher peer sends it; the
        peer takes the relay's answer. The answer."""
        answer = self.sfu.publisher_offer("r", pid, self.as_peer(pid, "publisher", offer))
        self.peer(pid, "publisher").set_remote_description(RemoteDescription.parse(answer))
        return answer

    def subscriber_answer(self, pid: str, answer: str, offer: str, revision: int) -> None:
        """``Sfu.subscriber_answer`` with ``answer`` (to ``offer``) as ``pid``'s subscriber
        peer sends it; the peer takes the relay's offer."""
        peer = self.peer(pid, "subscriber")
        self.sfu.subscriber_answer("r", pid, self.as_peer(pid, "subscriber", answer), revision)
        peer.set_remote_description(RemoteDescription.parse(offer, revision))

    def answer(
        self, pid: str, setup: str = "active", rtx: bool = True, twcc: bool = True
    ) -> tuple[str, int]:
        """Answer the current subscriber offer the way a client would (recvonly, same mids;
        without ``rtx``, refusing the RTX payload types offered; without ``twcc``, refusing
        transport-cc: the relay then has no bandwidth estimate for the subscriber)."""
        offer_sdp, revision = self.sfu.subscriber_offer("r", pid)
        offer = parse_sdp(offer_sdp)
        media = []
        for m in offer.media:
            codecs = m.codecs
            if not rtx:
                codecs = [dataclasses.replace(c, rtx_payload_type=None) for c in codecs]
            extmaps = m.extmaps
            if not twcc:
                codecs = [
                    dataclasses.replace(c, rtcp_fb=[f for f in c.rtcp_fb if f != "transport-cc"])
                    for c in codecs
                ]
                extmaps = [e for e in extmaps if e.uri != TRANSPORT_CC_URI]
            media.append(
                OfferedMedia(
                    mid=m.mid,
                    kind=m.kind,
                    direction="recvonly" if m.direction == "sendonly" else "inactive",
                    codecs=codecs,
                    extmaps=extmaps,
                    ssrc=None,
                )
            )
        self.subscriber_answer(
            pid, build_offer(client_transport(setup), media), offer_sdp, revision
        )
        return offer_sdp, revision

    # -- connecting ---------------------------------------------------------------------
    def connect(self, leg: Leg, addr: Address) -> ClientPeer:
        """ICE and DTLS between the leg's peer, from ``addr``, and the relay's port, until both
        ends are connected (the clock does not move). The peer."""
        key = (leg.participant.participant_id, leg.transport.role)
        peer = self.peers.get(key)
        if peer is None or peer.remote is None:
            raise RuntimeError(f"{key}: negotiate through the harness before connecting")
        self.peer_at[addr] = peer
        queue = self._handshaking[addr] = []
        refused: list[int] = []
        try:
            self._send(peer.start(self.now), addr)
            handed = 0
            while queue:
                handed += 1
                if handed > MAX_HANDSHAKE_DATAGRAMS:
                    raise RuntimeError(f"{key}: the handshake does not end")
                index = queue.pop(0)
                data = self.sent[index][0]
                if not _is_srtp(data):
                    self._send(peer.receive(data, self.now), addr)
                    continue
                # sent once the relay's end was connected, after its last handshake datagram:
                # the peer, which took that one, is connected too
                plain = self._unprotect(peer, data) if peer.connected else None
                if plain is None:
                    refused.append(index)
                else:
                    self.sent[index] = (plain, addr)
        finally:
            del self._handshaking[addr]
        self.rejected += [self.sent[i] for i in refused]
        for index in reversed(refused):
            del self.sent[index]
        if not (peer.connected and leg.transport.ready):
            raise RuntimeError(f"{key}: the in-memory handshake did not finish")
        return peer

    def rebind(self, addr: Address, new: Address) -> None:
        """The peer at ``addr`` also sends from (and receives at) ``new``: a NAT rebinding."""
        self.peer_at[new] = self.peer_at[addr]

    # -- datagrams ------------------------------------------------------------------------
    def receive(self, datagram: bytes, addr: Address, raw: bool = False) -> bytes:
        """The port receives ``datagram`` from ``addr``: a plain RTP or RTCP packet protected
        by the peer at ``addr`` when one is connected there, else (or with ``raw``) the bytes
        as given. What the port got."""
        if not raw and self.can_protect(datagram, addr):
            datagram = self.protect(datagram, addr)
        self.sfu.port.datagram_received(datagram, addr)
        return datagram

    def can_protect(self, datagram: bytes, addr: Address) -> bool:
        """``datagram`` looks like RTP or RTCP and a connected peer sends from ``addr``."""
        peer = self.peer_at.get(addr)
        return peer is not None and peer.connected and _is_srtp(datagram)

    def protect(self, datagram: bytes, addr: Address) -> bytes:
        """SRTP (or SRTCP) of a plain RTP (RTCP) packet, protected by the peer at ``addr``
        (the next packet of its session); SrtpError when libsrtp refuses it."""
        srtp = self.peer_at[addr].srtp
        assert srtp is not None
        return srtp.protect_rtcp(datagram) if is_rtcp(datagram) else srtp.protect(datagram)

    def _send(self, datagrams: list[bytes], addr: Address) -> None:
        for datagram in datagrams:
            self.sfu.port.datagram_received(datagram, addr)

    def _record(self, data: bytes, addr: Address) -> None:
        self.wire.append((data, addr))
        queue = self._handshaking.get(addr)
        if queue is not None:
            queue.append(len(self.sent))
            self.sent.append((data, addr))
            return
        peer = self.peer_at.get(addr)
        if peer is not None and peer.connected and _is_srtp(data):
            plain = self._unprotect(peer, data)
            if plain is None:
                self.rejected.append((data, addr))
                return
            data = plain
        self.sent.append((data, addr))

    @staticmethod
    def _unprotect(peer: ClientPeer, data: bytes) -> bytes | None:
        srtp = peer.srtp
        assert srtp is not None
        try:
            return srtp.unprotect_rtcp(data) if is_rtcp(data) else srtp.unprotect(data)
        except SrtpError:
            return None


def client_transport(setup: str = "active") -> LocalTransport:
    """The transport lines of a hand-built subscriber answer (:meth:`Harness.as_peer` puts the
    peer's credentials and fingerprint in)."""
    return LocalTransport(
        "clnt", "clientpassword0123456789", ("sha-256", "AA:BB"), [("10.0.0.2", 5000)], setup, 1, 1
    )
