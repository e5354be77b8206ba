"""A leg: one participant's connection as the packet path sees it.

Every WebRTC transport (one ICE/DTLS/SRTP 5-tuple) is wrapped in a leg: a
:class:`~relay.sfu.publisher_leg.PublisherLeg` for the connection a participant publishes on,
a :class:`~relay.sfu.subscriber_leg.SubscriberLeg` for the one it receives on. The port hands
each authenticated SRTP or SRTCP datagram to the leg its address is latched to; the leg does
the rest. What every leg shares lives here: the media context and sending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from relay.metrics import Metrics
from relay.rtc import rtcp
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import Address, WebRtcTransport
from relay.sfu.timers import Timer, Timers

if TYPE_CHECKING:
    from relay.config import Settings
    from relay.sfu.datachannels import DataEndpoint
    from relay.sfu.participant import Participant


class DatagramSender(Protocol):
    """The media socket as the packet path uses it."""

    def sendto(self, data: bytes, addr: Address) -> None:
        """One datagram."""

    def send(self, batch: list[tuple[bytes, Address]]) -> None:
        """Several datagrams at once (every copy of one forwarded packet)."""


class CallbackSender:
    """A :class:`DatagramSender` over a plain ``send(data, addr)`` function (tests, tools)."""

    def __init__(self, send: Callable[[bytes, Address], object]) -> None:
        self._send = send

    def sendto(self, data: bytes, addr: Address) -> None:
        self._send(data, addr)

    def send(self, batch: list[tuple[bytes, Address]]) -> None:
        send = self._send
        for data, addr in batch:
            send(data, addr)


@dataclass
class MediaContext:
    """What every part of the packet path shares: settings, counters, time, timers, socket."""

    settings: Settings
    metrics: Metrics
    clock: Callable[[], float]
    timers: Timers
    sender: DatagramSender
    #: ``defer(callback, *args)``: run it once the datagrams read together with the current one
    #: have been handled (the asyncio layer's; None: at once). A track piped to other workers
    #: sends every queued packet's pipe copies before its local fan-outs.
    defer: Callable[..., None] | None = None
    #: ``send_soon(send, batch)``: ``send(batch)`` once the datagrams read together with the
    #: current one have been handled, with the other batches for the same ``send`` meanwhile
    #: (the asyncio layer's; None: at once). A piped track's copies for other workers go out
    #: this way: the packets read in one turn in one system call, waking the importer once.
    send_soon: Callable[[Callable[[list[Any]], object], list[Any]], None] | None = None


class Leg:
    """The part of a publisher or subscriber leg that is the same for both."""

    role = ""

    def __init__(self, ctx: MediaContext, participant: Participant, transport: WebRtcTransport):
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.participant = participant
        self.transport = transport
        #: DTLS retransmissions while handshaking (armed by the port)
        self.dtls_timer: Timer | None = None
        #: data channels over this connection (SCTP over its DTLS), when negotiated
        self.data: DataEndpoint | None = None

    def send_datagrams(self, datagrams: list[bytes]) -> None:
        """Handshake datagrams (DTLS) to the latched address, if any."""
        addr = self.transport.addr
        if addr is None:
            return
        sendto = self.ctx.sender.sendto
        for datagram in datagrams:
            sendto(datagram, addr)

    def send_rtcp(self, packet: bytes) -> bool:
        """Protect and send one RTCP compound packet; False when the leg cannot send."""
        transport = self.transport
        srtp = transport.srtp
        if srtp is None or transport.addr is None:
            return False
        try:
            protected = srtp.protect_rtcp(packet)
        except SrtpError:
            self.metrics.send_errors += 1
            return False
        self.ctx.sender.sendto(protected, transport.addr)
        self.metrics.rtcp_out += 1
        return True

    def parse_srtcp(self, data: bytes, plain: bytes | None) -> list[rtcp.RtcpPacket] | None:
        """SRTCP (or its already-unprotected ``plain``) to parsed RTCP packets, counting what
        fails; None when nothing is usable."""
        metrics = self.metrics
        if plain is None:
            try:
                plain = self.transport.srtp.unprotect_rtcp(data)  # type: ignore[union-attr]
            except SrtpError:
                metrics.drops["srtp_unprotect"] += 1
                return None
        try:
            packets = rtcp.parse_rtcp(plain)
        except rtcp.RtcpError:
            metrics.drops["rtcp_malformed"] += 1
            return None
        self.transport.rx_seen = True
        metrics.rtcp_in += 1
        return packets

    def receive_rtp(self, data: bytes, plain: bytes | None = None) -> None:
        raise NotImplementedError

    def receive_rtcp(self, data: bytes, plain: bytes | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every timer of the leg (the port closes the transport)."""
        if self.dtls_timer is not None:
            self.dtls_timer.cancel()
        if self.data is not None:
            self.data.close()
