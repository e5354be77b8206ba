"""The media port: the first step of the packet path, for every datagram of the shared UDP port.

Demultiplexing follows RFC 7983 on the first byte: 0-3 STUN, 20-63 DTLS, 128-191 RTP/RTCP.
STUN finds its leg by our ICE username fragment; everything else by the remote address latched
from a valid check. SRTP and SRTCP go to the leg (publisher or subscriber) of that address,
which does the rest synchronously. The port owns the address maps and the latching rules
(authenticated checks only; NAT rebinding followed only by authenticated packets) and drives
the DTLS handshakes, including their retransmission timers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from relay.privacy import LogLimit, client_address, log_limited, same_host
from relay.rtc.ice import StunError, parse_binding_request
from relay.rtc.rtp import is_rtcp
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import Address, TransportState
from relay.sfu.leg import Leg, MediaContext

#: authenticated but unlatched addresses remembered per transport
MAX_ALT_ADDRESSES = 4

log = logging.getLogger(__name__)
#: log lines a client can cause (latches, latch moves, failed handshakes), per connection: a
#: burst of LOG_BURST, then one every 1/LOG_RATE s (and at most 20 a second over all of them)
LOG_BURST = 5
LOG_RATE = 0.1


class MediaPort:
    """First-byte demultiplexing, ICE and DTLS for every leg on the shared port."""

    def __init__(
        self,
        ctx: MediaContext,
        on_connected: Callable[[Leg], None],
        on_failed: Callable[[Leg], None],
    ) -> None:
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.clock = ctx.clock
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.by_ufrag: dict[str, Leg] = {}
        self.by_addr: dict[Address, Leg] = {}
        #: addresses that passed a fresh authenticated STUN check but are not latched; SRTP or
        #: SRTCP from one of them that authenticates moves the latch there (NAT rebinding
        #: without re-nomination), as does a DTLS handshake completed from one
        self.alt_addrs: dict[Address, Leg] = {}
        #: bounds the log lines clients can cause (see LOG_BURST)
        self.log_limit = LogLimit(rate=LOG_RATE, burst=LOG_BURST)

    # -- legs -----------------------------------------------------------------------------
    def add(self, leg: Leg) -> None:
        self.by_ufrag[leg.transport.local.ufrag] = leg
        leg.dtls_timer = self.ctx.timers.timer(lambda now: self._dtls_timeout(leg, now))

    def remove(self, leg: Leg) -> None:
        """Close the leg's transport (close_notify when DTLS ran) and forget its addresses."""
        transport = leg.transport
        self.send_handshake(leg, transport.close())
        leg.close()
        self.by_ufrag.pop(transport.local.ufrag, None)
        if transport.addr is not None and self.by_addr.get(transport.addr) is leg:
            del self.by_addr[transport.addr]
        for addr in transport.alternates:
            if self.alt_addrs.get(addr) is leg:
                del self.alt_addrs[addr]
        transport.alternates.clear()

    def address_closed(self, addr: Address) -> None:
        """A connection-oriented address went away (an ICE-TCP connection closed): nothing
        more arrives from it or can be sent to it. Its leg keeps the latch until an
        authenticated packet moves it (a client that reconnects, or its UDP path), or its
        consent times out like any silent connection."""
        if self.by_addr.get(addr) is not None:
            del self.by_addr[addr]
        leg = self.alt_addrs.pop(addr, None)
        if leg is not None and addr in leg.transport.alternates:
            leg.transport.alternates.remove(addr)

    def send_handshake(self, leg: Leg, datagrams: list[bytes]) -> None:
        """Send handshake datagrams and keep the leg's DTLS retransmission timer armed."""
        leg.send_datagrams(datagrams)
        self._arm_dtls(leg)

    def _arm_dtls(self, leg: Leg) -> None:
        timer = leg.dtls_timer
        if timer is None:
            return
        dtls = leg.transport.dtls
        deadline = (
            dtls.next_timeout()
            if dtls is not None and leg.transport.state is TransportState.CONNECTING
            else None
        )
        if deadline is None:
            timer.cancel()
        elif timer.when != deadline:
            timer.arm(deadline)

    def _dtls_timeout(self, leg: Leg, now: float) -> None:
        transport = leg.transport
        if transport.state is not TransportState.CONNECTING:
            return
        out, connected = transport.handle_timeout(now)
        self.send_handshake(leg, out)
        self._after_dtls(leg, connected)

    # -- the datagram entry point -----------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not data:
            self.metrics.drops["unknown_first_byte"] += 1
            return
        first = data[0]
        if 127 < first < 192:
            leg = self.by_addr.get(addr)
            if leg is None:
                self._from_alternate(data, addr)
            elif leg.transport.srtp is None:
                self.metrics.drops["srtp_not_ready"] += 1
            elif is_rtcp(data):
                leg.receive_rtcp(data)
            else:
                leg.receive_rtp(data)
        elif first < 4:
            self._stun(data, addr)
        elif 19 < first < 64:
            self._dtls(data, addr)
        else:
            self.metrics.drops["unknown_first_byte"] += 1

    def _from_alternate(self, data: bytes, addr: Address) -> None:
        """SRTP or SRTCP from an address that passed a STUN check but is not latched (a client
        whose NAT rebound). It is unprotected first: only a packet whose authentication tag
        and replay window pass moves the latch there; anything else is a counted drop."""
        metrics = self.metrics
        leg = self.alt_addrs.get(addr)
        if leg is None:
            metrics.drops["unknown_address"] += 1
            return
        transport = leg.transport
        srtp = transport.srtp
        if srtp is None:
            metrics.drops["srtp_not_ready"] += 1
            return
        rtcp_packet = is_rtcp(data)
        try:
            plain = srtp.unprotect_rtcp(data) if rtcp_packet else srtp.unprotect(data)
        except SrtpError:
            metrics.drops["srtp_unprotect"] += 1
            return
        self._latch(leg, addr, transport.addr)
        if rtcp_packet:
            leg.receive_rtcp(data, plain)
        else:
            leg.receive_rtp(data, plain)

    # -- STUN and latching ------------------------------------------------------------------
    def _stun(self, data: bytes, addr: Address) -> None:
        try:
            request = parse_binding_request(data)
        except StunError:
            self.metrics.drops["stun_malformed"] += 1
            return
        leg = self.by_ufrag.get(request.local_ufrag)
        if leg is None:
            self.metrics.drops["stun_unknown_ufrag"] += 1
            return
        transport = leg.transport
        response, ok, changed, out = transport.handle_binding(request, addr, self.clock())
        self.ctx.sender.sendto(response, addr)
        if not ok:
            self.metrics.drops["stun_unauthorized"] += 1
            return
        if transport.check_replayed:
            # answered (a lost response is retransmitted this way), but a copied check from
            # another address must not become a latch or an alternate
            self.metrics.drops["stun_replayed"] += 1
            return
        self.metrics.stun_requests += 1
        if changed:
            self._latch(leg, addr, transport.displaced)
        elif addr != transport.addr:
            self._remember(leg, addr)
        self.send_handshake(leg, out)

    def _remember(self, leg: Leg, addr: Address) -> None:
        """Keep an authenticated, unlatched address of a leg (a bounded few)."""
        if self.alt_addrs.get(addr) is leg:
            return
        alternates = leg.transport.alternates
        if len(alternates) >= MAX_ALT_ADDRESSES:
            oldest = alternates.pop(0)
            if self.alt_addrs.get(oldest) is leg:
                del self.alt_addrs[oldest]
        alternates.append(addr)
        self.alt_addrs[addr] = leg

    def _latch(self, leg: Leg, addr: Address, old: Address | None) -> None:
        """Route `addr` to the leg; its previous address `old` becomes an alternate."""
        if old is not None and self.by_addr.get(old) is leg:
            del self.by_addr[old]
            self._remember(leg, old)
        transport = leg.transport
        transport.addr = addr
        self.by_addr[addr] = leg
        if self.alt_addrs.get(addr) is leg:
            del self.alt_addrs[addr]
            transport.alternates.remove(addr)
        p = leg.participant
        # client addresses only through the formatter ([log] client_addresses)
        if old is None:
            log_limited(
                log,
                self.log_limit,
                (p.room.room_id, p.participant_id, transport.role),
                self.clock(),
                logging.INFO,
                "participant %s: %s connection latched to %s",
                p.participant_id,
                transport.role,
                client_address(addr),
            )
        else:
            log_limited(
                log,
                self.log_limit,
                (p.room.room_id, p.participant_id, transport.role),
                self.clock(),
                logging.INFO,
                "participant %s: %s connection moved from %s to %s (%s)",
                p.participant_id,
                transport.role,
                client_address(old),
                client_address(addr),
                "same host, new port" if same_host(old, addr) else "new host",
            )

    # -- DTLS -----------------------------------------------------------------------------
    def _dtls(self, data: bytes, addr: Address) -> None:
        """A DTLS record. From an alternate address it is only heard during the handshake, and
        the latch moves there only when that record completes the handshake (the Finished MAC
        and the certificate fingerprint authenticate it): a record that merely looks like
        DTLS authenticates nothing."""
        leg = self.by_addr.get(addr)
        latched = leg is not None
        if leg is None:
            leg = self.alt_addrs.get(addr)
            if leg is None:
                self.metrics.drops["unknown_address"] += 1
                return
            if leg.transport.state is not TransportState.CONNECTING:
                self.metrics.drops["dtls_unlatched"] += 1
                return
        transport = leg.transport
        if transport.state in (TransportState.FAILED, TransportState.CLOSED, TransportState.NEW):
            self.metrics.drops["dtls_failed"] += 1
            return
        out, connected = transport.handle_dtls(data, self.clock())
        if connected and not latched:
            self._latch(leg, addr, transport.addr)
        self.send_handshake(leg, out)
        self._after_dtls(leg, connected)
        dtls = transport.dtls
        if dtls is not None and dtls.application_data:
            # SCTP packets of the leg's data channels (relay/sfu/datachannels.py)
            records, dtls.application_data = dtls.application_data, []
            if leg.data is not None and latched:
                transport.rx_seen = True
                leg.data.receive_records(records)

    def _after_dtls(self, leg: Leg, connected: bool) -> None:
        state = leg.transport.state
        if connected:
            self.on_connected(leg)
        elif state is TransportState.FAILED or state is TransportState.CLOSED:
            if leg.dtls_timer is not None:
                leg.dtls_timer.cancel()
            if state is TransportState.FAILED:
                transport = leg.transport
                p = leg.participant
                log_limited(
                    log,
                    self.log_limit,
                    (p.room.room_id, p.participant_id, transport.role),
                    self.clock(),
                    logging.WARNING,
                    "participant %s: DTLS handshake of the %s connection with %s failed: %s",
                    p.participant_id,
                    transport.role,
                    client_address(transport.addr),
                    transport.failure_reason,
                )
            self.on_failed(leg)
