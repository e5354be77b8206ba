"""A relay in memory: a real :class:`~relay.sfu.sfu.Sfu` without sockets, with
:class:`~relay.client.peer.ClientPeer` publishers and subscribers that do the whole ICE and
DTLS handshake with its media port. For unit tests and the hot-path bench.

Nothing is copied from the relay: datagrams from a peer go to ``port.datagram_received`` as
they would from the socket, and what the relay sends is recorded in :attr:`LoopbackRelay.outbox`
until :meth:`LoopbackRelay.deliver` hands each datagram to the peer at its address. Time is a
:class:`ManualClock` (unless another clock is given) that only moves when the caller
:meth:`advances <LoopbackRelay.advance>` it, which also fires the relay's timers and the peers'.

Interface::

    relay = LoopbackRelay(settings=None, clock=None)
    pub = relay.add_publisher("pub", [TrackSpec("video", 0x1234, "0")])   # connected
    sub = relay.add_subscriber("s1")          # offer/answer through the Sfu, then connected
    relay.publish(pub, ssrc, pt, seq, ts, payload, extensions=None)       # protect + port
    relay.send_rtcp(sub, rtcp.pli(...))       # protect_rtcp + port
    got = relay.deliver()                     # {participant id: Received(rtp, rtcp, other)}
    relay.advance(0.5)                        # clock, peers' timers, relay timers
    relay.sfu / relay.port / relay.outbox / relay.recorder / relay.sending_with(sender)
    relay.endpoint(pid) / relay.participant(pid) / relay.track(pid, ssrc) / relay.leg(pid)

Publishers only publish (``can_subscribe=False``) and subscribers only subscribe
(``can_publish=False``); every participant has one peer and one address. Subscribers that were
connected before a publisher came are renegotiated by :meth:`LoopbackRelay.add_publisher`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from relay.client.peer import ClientPeer, RemoteDescription, TrackSpec
from relay.config import Settings
from relay.metrics import Metrics
from relay.rtc.dtls import Certificate
from relay.rtc.rtcp import RtcpPacket
from relay.sfu.leg import CallbackSender, DatagramSender, Leg
from relay.sfu.participant import Participant
from relay.sfu.room import Room
from relay.sfu.sfu import Sfu
from relay.sfu.track import Track

__all__ = ["Endpoint", "LoopbackRelay", "ManualClock", "Received", "accept_rtx"]

Address = tuple[str, int]

#: rounds of relay -> peers -> relay in one :meth:`LoopbackRelay.deliver` (a loop guard)
MAX_ROUNDS = 64
#: first port of the addresses handed out to peers that were not given one
FIRST_PORT = 40000


class ManualClock:
    """Seconds that move only when told to: ``clock()`` reads, ``advance(dt)`` moves."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not go back")
        self.now += seconds
        return self.now


@dataclass
class Received:
    """What one peer received in one :meth:`LoopbackRelay.deliver`."""

    #: authenticated RTP packets, decrypted, in arrival order
    rtp: list[bytes] = field(default_factory=list)
    #: the RTCP packets of every authenticated SRTCP compound, parsed, in arrival order
    rtcp: list[RtcpPacket] = field(default_factory=list)
    #: other datagrams (STUN, DTLS) and SRTP or SRTCP the peer could not authenticate
    other: int = 0


@dataclass
class Endpoint:
    """A participant as the loopback sees it: its peer, its address, its role."""

    participant_id: str
    peer: ClientPeer
    addr: Address
    role: str  # "publisher" or "subscriber"
    #: a subscriber's answers accept RTX (see :func:`accept_rtx`)
    rtx: bool = True


def accept_rtx(answer: str, offer: RemoteDescription) -> str:
    """``answer`` (from ``ClientPeer.create_answer``, which answers the media codec only) with
    the RTX payload type the relay offered added to every m-line it was offered on and kept."""
    rtx = {
        m.mid: (m.payload_type, m.codec.rtx_payload_type, m.codec.clock_rate)
        for m in offer.media
        if m.codec is not None and m.payload_type is not None and m.codec.rtx_payload_type
    }
    sections: list[list[str]] = [[]]
    for line in answer.splitlines():
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    out = sections[0]
    for section in sections[1:]:
        mid = next((x[6:] for x in section if x.startswith("a=mid:")), None)
        kept = section[0].split()[1] != "0"
        if kept and mid in rtx:
            pt, rtx_pt, clock_rate = rtx[mid]
            section[0] += f" {rtx_pt}"
            section += [f"a=rtpmap:{rtx_pt} rtx/{clock_rate}", f"a=fmtp:{rtx_pt} apt={pt}"]
        out += section
    return "\r\n".join(out) + "\r\n"


class LoopbackRelay:
    """A real Sfu with its media port in memory, and the peers connected to it.

    ``settings`` default to :class:`~relay.config.Settings` with room for 1000 participants
    per room; one room (``room_id``) holds every participant, as big as the settings allow.
    ``clock`` defaults to a :class:`ManualClock`; the relay and the peers share it.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        room_id: str = "loopback",
        clock: Callable[[], float] | None = None,
        certificate: Certificate | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if settings is None:
            base = Settings()
            settings = dataclasses.replace(
                base, limits=dataclasses.replace(base.limits, max_participants_per_room=1000)
            )
        self.settings = settings
        self.clock: Callable[[], float] = clock if clock is not None else ManualClock()
        #: one certificate for the relay and every peer (generating one takes a while)
        self.certificate = certificate or Certificate.generate()
        #: every datagram the relay sent and :meth:`deliver` has not handed over yet
        self.outbox: list[tuple[bytes, Address]] = []
        #: the sender that fills :attr:`outbox` (the relay's sender unless replaced)
        self.recorder: DatagramSender = CallbackSender(
            lambda data, addr: self.outbox.append((data, addr))
        )
        self.sfu = Sfu(
            settings,
            certificate=self.certificate,
            candidates=[("127.0.0.1", 9)],
            sender=self.recorder,
            clock=self.clock,
            metrics=metrics or Metrics(),
        )
        self.port = self.sfu.port
        self.room: Room = self.sfu.create_room(
            room_id, max_participants=settings.limits.max_participants_per_room
        )
        self.endpoints: dict[str, Endpoint] = {}
        self._by_addr: dict[Address, Endpoint] = {}
        self._by_peer: dict[int, Endpoint] = {}
        #: datagrams :meth:`deliver` found no peer for
        self.undelivered: list[tuple[bytes, Address]] = []

    # -- participants ---------------------------------------------------------------------
    def add_publisher(
        self,
        participant_id: str,
        tracks: Sequence[TrackSpec],
        addr: Address | None = None,
        *,
        peer: ClientPeer | None = None,
    ) -> ClientPeer:
        """A participant that publishes ``tracks``: its offer answered by
        ``Sfu.publisher_offer``, its peer connected from ``addr`` (a fresh one if None).
        Subscribers already connected are renegotiated to receive the new tracks."""
        peer = peer or ClientPeer(self.certificate, consent_interval=2.0)
        endpoint = self._endpoint(participant_id, peer, addr, "publisher")
        self.sfu.add_participant(self.room.room_id, participant_id, can_subscribe=False)
        answer = self.sfu.publisher_offer(
            self.room.room_id, participant_id, peer.create_offer(list(tracks))
        )
        peer.set_remote_description(RemoteDescription.parse(answer))
        self._connect(endpoint)
        for other in self.endpoints.values():
            if other.role == "subscriber":
                self.renegotiate(other.participant_id)
        return peer

    def add_subscriber(
        self,
        participant_id: str,
        addr: Address | None = None,
        *,
        peer: ClientPeer | None = None,
        rtx: bool = True,
    ) -> ClientPeer:
        """A participant that subscribes to every track of the room: ``Sfu.subscriber_offer``,
        the peer's answer to ``Sfu.subscriber_answer``, its peer connected from ``addr``.

        With ``rtx`` the answer accepts the RTX the relay offers, as browsers do (the
        relay then answers NACKs on RTX streams); without it, retransmissions are the original
        packets (which the peer's replay window rejects unless the original was lost)."""
        peer = peer or ClientPeer(self.certificate, consent_interval=2.0)
        endpoint = self._endpoint(participant_id, peer, addr, "subscriber")
        endpoint.rtx = rtx
        self.sfu.add_participant(self.room.room_id, participant_id, can_publish=False)
        self._negotiate_subscriber(endpoint)
        self._connect(endpoint)
        return peer

    def renegotiate(self, participant_id: str) -> bool:
        """A new subscriber offer and its answer when the subscriber's subscriptions changed
        since its last answer; False when there was nothing to negotiate."""
        endpoint = self.endpoints[participant_id]
        p = self.participant(participant_id)
        if endpoint.role != "subscriber" or p.applied_revision == p.revision:
            return False
        self._negotiate_subscriber(endpoint)
        return True

    def _negotiate_subscriber(self, endpoint: Endpoint) -> None:
        room_id, pid = self.room.room_id, endpoint.participant_id
        sdp, revision = self.sfu.subscriber_offer(room_id, pid)
        remote = RemoteDescription.parse(sdp, revision)
        answer = endpoint.peer.create_answer(remote)
        if endpoint.rtx:
            answer = accept_rtx(answer, remote)
        self.sfu.subscriber_answer(room_id, pid, answer, revision)
        endpoint.peer.set_remote_description(remote)

    def _endpoint(
        self, participant_id: str, peer: ClientPeer, addr: Address | None, role: str
    ) -> Endpoint:
        if participant_id in self.endpoints:
            raise ValueError(f"participant {participant_id} is already connected")
        if addr is None:
            addr = ("127.0.0.1", FIRST_PORT + len(self.endpoints))
        if addr in self._by_addr:
            raise ValueError(f"address {addr} is taken")
        endpoint = Endpoint(participant_id, peer, addr, role)
        self.endpoints[participant_id] = endpoint
        self._by_addr[addr] = endpoint
        self._by_peer[id(peer)] = endpoint
        return endpoint

    def _connect(self, endpoint: Endpoint) -> None:
        """ICE and DTLS until both ends are connected (time moves on only if they stall)."""
        peer, addr = endpoint.peer, endpoint.addr
        self.send(peer, *peer.start(self.clock()))
        for _ in range(30):
            self._deliver({addr}, {})
            leg = self.port.by_addr.get(addr)
            if peer.connected and leg is not None and leg.transport.ready:
                return
            if isinstance(self.clock, ManualClock):
                self.advance(0.5)
            else:
                self.send(peer, *peer.handle_timeout(self.clock() + 1.0))
        raise RuntimeError(f"{endpoint.participant_id}: the in-memory handshake did not finish")

    # -- lookups --------------------------------------------------------------------------
    def endpoint(self, participant_id: str) -> Endpoint:
        return self.endpoints[participant_id]

    def participant(self, participant_id: str) -> Participant:
        return self.sfu.get_participant(self.room.room_id, participant_id)

    def leg(self, participant_id: str) -> Leg:
        """The leg the port routes the participant's address to."""
        return self.port.by_addr[self.endpoints[participant_id].addr]

    def track(self, participant_id: str, ssrc: int) -> Track:
        """A publisher's track by the SSRC it publishes it with."""
        leg = self.participant(participant_id).publisher_leg
        if leg is None:
            raise KeyError(f"{participant_id} does not publish")
        return leg.ssrc_map[ssrc]

    # -- datagrams in ---------------------------------------------------------------------
    def send(self, peer: ClientPeer, *datagrams: bytes) -> None:
        """Datagrams from ``peer`` to the relay's port, from the peer's address."""
        addr = self._by_peer[id(peer)].addr
        receive = self.port.datagram_received
        for datagram in datagrams:
            receive(datagram, addr)

    def publish(
        self,
        peer: ClientPeer,
        ssrc: int,
        pt: int,
        seq: int,
        ts: int,
        payload: bytes,
        extensions: Sequence[tuple[int, bytes]] | None = None,
        marker: bool = False,
    ) -> bytes:
        """One RTP packet protected by ``peer`` and handed to the port; the SRTP datagram.
        ``extensions=None`` sends the sdes:mid of a published SSRC (see ``protect_rtp``)."""
        datagram = peer.protect_rtp(ssrc, pt, seq, ts, payload, marker, extensions)
        self.send(peer, datagram)
        return datagram

    def send_rtcp(self, peer: ClientPeer, compound: bytes) -> bytes:
        """One RTCP compound packet protected by ``peer`` and handed to the port."""
        datagram = peer.protect_rtcp(compound)
        self.send(peer, datagram)
        return datagram

    # -- datagrams out --------------------------------------------------------------------
    def deliver(self) -> dict[str, Received]:
        """Hand every datagram in the outbox to the peer at its address, and what the peers
        send back to the port, until the relay sends nothing more; what each participant
        received (every participant has an entry, possibly empty). Datagrams to an address
        without a peer go to :attr:`undelivered`."""
        got: dict[str, Received] = {pid: Received() for pid in self.endpoints}
        self._deliver(None, got)
        return got

    def _deliver(self, only: set[Address] | None, got: dict[str, Received]) -> None:
        for _ in range(MAX_ROUNDS):
            if only is None:
                batch, self.outbox[:] = list(self.outbox), []
            else:
                batch = [(d, a) for d, a in self.outbox if a in only]
                self.outbox[:] = [(d, a) for d, a in self.outbox if a not in only]
            if not batch:
                return
            for data, addr in batch:
                endpoint = self._by_addr.get(addr)
                if endpoint is None:
                    self.undelivered.append((data, addr))
                    continue
                received = got.setdefault(endpoint.participant_id, Received())
                self.send(endpoint.peer, *self._receive(endpoint.peer, data, received))
        raise RuntimeError(f"the relay and its peers still talk after {MAX_ROUNDS} rounds")

    def _receive(self, peer: ClientPeer, data: bytes, received: Received) -> list[bytes]:
        """``peer.receive`` with what it decrypts recorded (the peer's own callbacks still run)."""
        on_rtp, on_rtcp = peer.on_rtp, peer.on_rtcp
        before = len(received.rtp), len(received.rtcp)

        def record_rtp(plain: bytes, now: float) -> None:
            received.rtp.append(plain)
            if on_rtp is not None:
                on_rtp(plain, now)

        def record_rtcp(packets: list[RtcpPacket]) -> None:
            received.rtcp.extend(packets)
            if on_rtcp is not None:
                on_rtcp(packets)

        peer.on_rtp, peer.on_rtcp = record_rtp, record_rtcp
        try:
            replies = peer.receive(data, self.clock())
        finally:
            peer.on_rtp, peer.on_rtcp = on_rtp, on_rtcp
        if (len(received.rtp), len(received.rtcp)) == before:
            received.other += 1
        return replies

    @contextlib.contextmanager
    def sending_with(self, sender: DatagramSender) -> Iterator[DatagramSender]:
        """The relay sends through ``sender`` (a real socket, say) instead of the outbox."""
        media = self.sfu.media
        previous, media.sender = media.sender, sender
        try:
            yield sender
        finally:
            media.sender = previous

    # -- time -----------------------------------------------------------------------------
    def advance(self, seconds: float) -> float:
        """Move the :class:`ManualClock` on, hand what the peers' timers send (consent
        checks, DTLS retransmissions) to the port, then fire the relay's timers that are due.
        What the relay sends stays in the outbox for :meth:`deliver`. The new time.

        A long jump is one step: the peers check consent once, at the new time (advance in
        steps shorter than the consent interval to see every check)."""
        clock = self.clock
        if not isinstance(clock, ManualClock):
            raise TypeError("advance() needs the LoopbackRelay's own ManualClock")
        now = clock.advance(seconds)
        for endpoint in list(self.endpoints.values()):
            self.send(endpoint.peer, *endpoint.peer.handle_timeout(now))
        self.sfu.timers.run(now)
        return now
