"""The media router: every datagram of the shared UDP port is handled here, to completion.

Demultiplexing follows RFC 7983 on the first byte: 0-3 STUN, 20-63 DTLS, 128-191 RTP/RTCP.
STUN finds its transport by our ICE username fragment; everything else by the remote address
latched from a valid check. RTP is forwarded synchronously: unprotect, route by SSRC, and for
each active subscription rewrite the header, protect and send. No task, queue or await here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.metrics import Metrics
from relay.rtc import rtcp
from relay.rtc.ice import StunError, parse_binding_request
from relay.rtc.nack import RetransmissionBudget, rtx_unwrap, rtx_wrap
from relay.rtc.rtp import (
    RtpError,
    extension_profile,
    is_rtcp,
    parse_extensions,
    parse_rtp,
    rewrite_packet,
)
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import Address, TransportState, WebRtcTransport
from relay.rtc.twcc import parse_feedback, write_transport_seq

if TYPE_CHECKING:
    from relay.sfu.participant import Participant
    from relay.sfu.sfu import Sfu
    from relay.sfu.subscription import Subscription
    from relay.sfu.track import Track

log = logging.getLogger(__name__)

_NO_EXTENSIONS: list[tuple[int, bytes]] = []
#: sequence numbers of one NACK answered at most (a NACK storm must not become a send storm)
_MAX_NACK_ITEMS = 256
#: sequence numbers per NACK packet sent upstream
_NACK_CHUNK = 128
#: authenticated but unlatched addresses remembered per transport
MAX_ALT_ADDRESSES = 4


class MediaRouter:
    """Demultiplexes the shared port and forwards media between transports."""

    def __init__(self, sfu: Sfu, send: Callable[[bytes, Address], Any], metrics: Metrics) -> None:
        self.sfu = sfu
        self.send = send
        self.metrics = metrics
        self.clock = sfu.clock
        self.by_ufrag: dict[str, WebRtcTransport] = {}
        self.by_addr: dict[Address, WebRtcTransport] = {}
        #: addresses that passed a fresh authenticated STUN check but are not latched; SRTP or
        #: SRTCP from one of them that authenticates moves the latch there (NAT rebinding
        #: without re-nomination), as does a DTLS handshake completed from one
        self.alt_addrs: dict[Address, WebRtcTransport] = {}
        self.handshaking: set[WebRtcTransport] = set()
        #: publisher transports to send feedback to (transport-cc, NACK, REMB)
        self.feedback_transports: set[WebRtcTransport] = set()
        self._last_reports = float("-inf")

    # -- transports -----------------------------------------------------------------------
    def add_transport(self, transport: WebRtcTransport) -> None:
        self.by_ufrag[transport.local.ufrag] = transport
        self.handshaking.add(transport)

    def close_transport(self, transport: WebRtcTransport) -> None:
        self.send_all(transport.close(), transport)
        self.by_ufrag.pop(transport.local.ufrag, None)
        if transport.addr is not None and self.by_addr.get(transport.addr) is transport:
            del self.by_addr[transport.addr]
        for addr in transport.alternates:
            if self.alt_addrs.get(addr) is transport:
                del self.alt_addrs[addr]
        transport.alternates.clear()
        self.handshaking.discard(transport)
        self.feedback_transports.discard(transport)

    def send_all(self, datagrams: list[bytes], transport: WebRtcTransport) -> None:
        addr = transport.addr
        if addr is None:
            return
        for datagram in datagrams:
            self.send(datagram, addr)

    def _send_rtcp(self, transport: WebRtcTransport, packet: bytes) -> None:
        srtp = transport.srtp
        if srtp is None or transport.addr is None:
            return
        try:
            self.send(srtp.protect_rtcp(packet), transport.addr)
        except SrtpError:
            self.metrics.send_errors += 1
            return
        self.metrics.rtcp_out += 1

    # -- the datagram entry point -----------------------------------------------------------
    def handle_datagram(self, data: bytes, addr: Address) -> None:
        if not data:
            self.metrics.drops["unknown_first_byte"] += 1
            return
        first = data[0]
        if 127 < first < 192:
            transport = self.by_addr.get(addr)
            if transport is None:
                self._from_alternate(data, addr)
                return
            srtp = transport.srtp
            if srtp is None:
                self.metrics.drops["srtp_not_ready"] += 1
                return
            if is_rtcp(data):
                self._rtcp(transport, srtp, data)
            else:
                self._rtp(transport, srtp, data)
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
        transport = self.alt_addrs.get(addr)
        if transport is None:
            metrics.drops["unknown_address"] += 1
            return
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
        self._latch(transport, addr, transport.addr)
        if rtcp_packet:
            self._rtcp(transport, srtp, data, plain)
        else:
            self._rtp(transport, srtp, data, plain)

    # -- RTP: the hot path --------------------------------------------------------------------
    def _rtp(
        self, transport: WebRtcTransport, srtp: Any, data: bytes, plain: bytes | None = None
    ) -> None:
        now = self.clock()
        metrics = self.metrics
        if plain is None:
            try:
                plain = srtp.unprotect(data)
            except SrtpError:
                metrics.drops["srtp_unprotect"] += 1
                return
        transport.rx_seen = True
        if transport.role != "publisher":
            metrics.drops["not_publishing"] += 1
            return
        try:
            pt, seq, ts, ssrc, _marker, payload_offset, ext_offset, ext_length = parse_rtp(plain)
            if ext_length:
                elements = parse_extensions(plain, ext_offset, ext_length, extension_profile(plain))
            else:
                elements = _NO_EXTENSIONS
        except RtpError:
            metrics.drops["rtp_malformed"] += 1
            return
        if transport.twcc_id:
            self._record_twcc(transport, elements, now)
        elif transport.remb is not None:
            self._record_remb(transport, elements, len(data), now)
        publisher: Participant = transport.owner
        track = publisher.ssrc_map.get(ssrc)
        if track is None:
            track = publisher.rtx_map.get(ssrc) or self._learn_ssrc(
                publisher, ssrc, pt, elements, now
            )
            if track is None:
                metrics.drops["unknown_ssrc"] += 1
                return
            if ssrc == track.rtx_ssrc:
                # a retransmission on the publisher's RTX stream: unwrap it and forward it as
                # the packet it repairs (padding-only probes have nothing to unwrap)
                if track.ssrc is None:
                    metrics.drops["rtx_before_media"] += 1
                    return
                try:
                    seq, plain = rtx_unwrap(plain, track.ssrc, track.payload_type)
                    pt, seq, ts, ssrc, _marker, payload_offset, _eo, _el = parse_rtp(plain)
                except RtpError:
                    metrics.drops["rtx_padding"] += 1
                    return
                track.rtx_received += 1
        if pt != track.payload_type:
            metrics.drops["unknown_payload_type"] += 1
            return
        # only the track's newest packet may start a subscription: never a retransmission or
        # a late packet, whose successors were already forwarded to the others
        highest = track.highest_seq
        newest = highest < 0 or 0 < ((seq - highest) & 0xFFFF) < 0x8000
        if newest:
            track.highest_seq = seq
        size = len(data)
        metrics.packets_in += 1
        metrics.bytes_in += size
        track.packets += 1
        track.bytes += size
        track.stats.update(seq, ts, now, size)
        if track.nack is not None:
            track.nack.on_packet(seq, now)
        level_id = track.audio_level_id
        if level_id:
            for ext_id, value in elements:
                if ext_id == level_id and value:
                    track.level_sum += value[0] & 0x7F
                    track.level_count += 1
        send = self.send
        startable: bool | None = None
        for sub in track.outputs:
            rewriter = sub.rewriter
            if rewriter.starting:
                if startable is None:
                    keyframe_start = track.keyframe_start
                    startable = newest and (
                        keyframe_start is None or keyframe_start(plain, payload_offset)
                    )
                if not startable and not (newest and now >= sub.start_by):
                    metrics.keyframe_waits += 1
                    continue
            rewritten = rewriter.rewrite(seq, ts, now)
            if rewritten is None:
                metrics.drops["stale_packet"] += 1
                continue
            out_transport = sub.subscriber.subscriber
            twcc_id = out_transport.twcc_id
            try:
                if twcc_id:
                    stamp = out_transport.twcc_send.next_seq(size, now)
                    block = sub.ext.block(elements, [(twcc_id, stamp.to_bytes(2, "big"))])
                else:
                    block = sub.ext.block(elements)
                out = rewrite_packet(
                    plain,
                    payload_offset,
                    sub.ssrc,
                    sub.payload_type,
                    rewritten[0],
                    rewritten[1],
                    block,
                )
                if sub.history is not None:
                    sub.history.store(rewritten[0], out, now)
                packet = out_transport.srtp.protect(out)
            except (SrtpError, AttributeError):
                metrics.send_errors += 1
                continue
            send(packet, out_transport.addr)
            sub.packets_sent += 1
            sub.bytes_sent += len(packet)
            metrics.packets_out += 1
            metrics.bytes_out += len(packet)
        metrics.forward_latency.observe(self.clock() - now)

    def _record_twcc(
        self, transport: WebRtcTransport, elements: list[tuple[int, bytes]], now: float
    ) -> None:
        twcc_id = transport.twcc_id
        for ext_id, value in elements:
            if ext_id == twcc_id and len(value) >= 2:
                if transport.twcc.on_packet((value[0] << 8) | value[1], now):
                    self._send_twcc(transport, now)
                return

    def _record_remb(
        self,
        transport: WebRtcTransport,
        elements: list[tuple[int, bytes]],
        size: int,
        now: float,
    ) -> None:
        abs_id = transport.abs_send_time_id
        send_time = None
        if abs_id:
            for ext_id, value in elements:
                if ext_id == abs_id and len(value) == 3:
                    send_time = (value[0] << 16) | (value[1] << 8) | value[2]
        transport.remb.on_packet(size, now, send_time)

    def _learn_ssrc(
        self,
        publisher: Participant,
        ssrc: int,
        pt: int,
        elements: list[tuple[int, bytes]],
        now: float,
    ) -> Track | None:
        """Bind an unsignalled SSRC to a track, in the order of RFC 8843 §9.2: the sdes:mid
        header extension, else a payload type unique to one m-line. An SSRC whose payload type
        is the track's RTX payload type, or that carries repaired-rtp-stream-id, binds to the
        track's RTX slot, never to its media slot. A new binding replaces the old one."""
        track: Track | None = None
        is_rtx = False
        mid_id = publisher.mid_ext_id
        if mid_id:
            for ext_id, value in elements:
                if ext_id == mid_id:
                    track = publisher.tracks_by_mid.get(value.decode("ascii", "replace"))
                    break
        if track is not None:
            rrid_id = publisher.repaired_rid_ext_id
            is_rtx = (pt == track.rtx_payload_type and pt != track.payload_type) or (
                bool(rrid_id) and any(ext_id == rrid_id for ext_id, _ in elements)
            )
        else:
            route = publisher.payload_routes.get(pt)
            if route is None:
                return None
            track, is_rtx = route
        if is_rtx:
            if track.rtx_payload_type is None:
                return None  # no RTX negotiated: nothing to unwrap it with
            if track.rtx_ssrc is not None and publisher.rtx_map.get(track.rtx_ssrc) is track:
                del publisher.rtx_map[track.rtx_ssrc]
            publisher.rtx_map[ssrc] = track
            track.rtx_ssrc = ssrc
            return track
        if track.ssrc is not None and publisher.ssrc_map.get(track.ssrc) is track:
            del publisher.ssrc_map[track.ssrc]
        publisher.ssrc_map[ssrc] = track
        track.set_ssrc(ssrc, now)
        return track

    # -- RTCP -----------------------------------------------------------------------------
    def _rtcp(
        self, transport: WebRtcTransport, srtp: Any, data: bytes, plain: bytes | None = None
    ) -> None:
        metrics = self.metrics
        if plain is None:
            try:
                plain = srtp.unprotect_rtcp(data)
            except SrtpError:
                metrics.drops["srtp_unprotect"] += 1
                return
        try:
            packets = rtcp.parse_rtcp(plain)
        except rtcp.RtcpError:
            metrics.drops["rtcp_malformed"] += 1
            return
        transport.rx_seen = True
        metrics.rtcp_in += 1
        now = self.clock()
        participant: Participant = transport.owner
        if transport.role == "publisher":
            for packet in packets:
                if isinstance(packet, rtcp.SenderReport):
                    track = participant.ssrc_map.get(packet.ssrc)
                    if track is not None and track.stats is not None:
                        track.stats.on_sender_report(rtcp.ntp_middle32(packet.ntp_timestamp), now)
                        track.last_sr = (packet.ntp_timestamp, packet.rtp_timestamp, now)
                        self._forward_sender_report(track, packet, now)
            return
        by_ssrc = {s.ssrc: s for s in participant.subscriptions.values()}
        for packet in packets:
            if isinstance(packet, (rtcp.ReceiverReport, rtcp.SenderReport)):
                for block in packet.reports:
                    sub = by_ssrc.get(block.ssrc)
                    if sub is not None:
                        sub.on_report_block(
                            block.fraction_lost,
                            block.packets_lost,
                            block.jitter,
                            block.lsr,
                            block.dlsr,
                            now,
                        )
            elif isinstance(packet, rtcp.Pli):
                sub = by_ssrc.get(packet.media_ssrc)
                if sub is not None:
                    self.request_keyframe(sub.track, now)
            elif isinstance(packet, rtcp.Fir):
                for ssrc, _seq in packet.entries:
                    sub = by_ssrc.get(ssrc)
                    if sub is not None:
                        self.request_keyframe(sub.track, now)
            elif isinstance(packet, rtcp.Nack):
                sub = by_ssrc.get(packet.media_ssrc)
                if sub is not None:
                    self._retransmit(transport, sub, packet.lost, now)
            elif isinstance(packet, rtcp.TransportFeedback):
                if transport.twcc_send is not None:
                    try:
                        transport.twcc_send.on_feedback(parse_feedback(packet.fci), now)
                    except (rtcp.RtcpError, RtpError, ValueError):
                        metrics.drops["rtcp_malformed"] += 1

    def _retransmit(
        self, transport: WebRtcTransport, sub: Subscription, lost: list[int], now: float
    ) -> None:
        """Answer a subscriber's NACK from the history (on its RTX stream when negotiated),
        within the subscription's retransmission budget: each packet at most once per RTT
        (10 ms at least) and a few times in all, and no more bytes than the budget's share of
        what the subscription was forwarded."""
        metrics = self.metrics
        history = sub.history
        metrics.nacks_received += len(lost)
        sub.nacks_received += len(lost)
        if history is None or transport.srtp is None or transport.addr is None:
            return
        budget = sub.retransmission_budget
        if budget is None:
            budget = sub.retransmission_budget = RetransmissionBudget(
                self.sfu.settings.rtp.retransmission_budget
            )
        budget.refill(sub.bytes_sent, now)
        rtt = sub.round_trip_time or 0.0
        missed = False
        repeats, over_budget = history.repeats_suppressed, history.budget_suppressed
        for seq in lost[:_MAX_NACK_ITEMS]:
            packet = history.resend(seq, now, rtt, budget=budget)
            if packet is None:
                if not missed and history.get(seq) is None:
                    # a packet the relay is itself recovering from the publisher reaches every
                    # subscriber when it arrives: wait for it rather than ask for a keyframe
                    missed = not self._recovering(sub, seq)
                continue
            if sub.use_rtx:
                packet = rtx_wrap(packet, sub.rtx_ssrc, sub.rtx_payload_type, sub.rtx_seq)
                sub.rtx_seq = (sub.rtx_seq + 1) & 0xFFFF
            if transport.twcc_id:
                try:
                    packet = write_transport_seq(
                        packet, transport.twcc_id, transport.twcc_send.next_seq(len(packet), now)
                    )
                except RtpError:
                    pass
            try:
                protected = transport.srtp.protect(packet)
            except SrtpError:
                metrics.send_errors += 1
                continue
            self.send(protected, transport.addr)
            metrics.retransmissions += 1
            metrics.retransmission_bytes += len(protected)
            sub.retransmission_bytes += len(protected)
        metrics.retransmissions_suppressed["repeat"] += history.repeats_suppressed - repeats
        metrics.retransmissions_suppressed["budget"] += history.budget_suppressed - over_budget
        if missed:
            # what the history no longer has can only be repaired by a keyframe
            metrics.retransmission_misses += 1
            self.request_keyframe(sub.track, now)

    @staticmethod
    def _recovering(sub: Subscription, out_seq: int) -> bool:
        """Whether the packet a subscriber's sequence number stands for is missing on the
        publisher's leg and still being NACKed there."""
        nack = sub.track.nack
        if nack is None:
            return False
        seq = sub.rewriter.input_seq(out_seq)
        return seq is not None and nack.is_missing(seq)

    def _forward_sender_report(self, track: Track, sr: rtcp.SenderReport, now: float) -> None:
        """Translate a publisher's SR for each subscriber (its SSRC, its timestamps, its counts).

        The NTP time is kept: audio and video of one publisher share its clock, which is what
        the subscriber needs for lip sync.
        """
        for sub in track.outputs:
            rtp_ts = sub.rewriter.map_timestamp(sr.rtp_timestamp)
            if rtp_ts is None:
                continue
            packet = rtcp.sender_report(
                sub.ssrc, sr.ntp_timestamp, rtp_ts, sub.packets_sent, sub.bytes_sent
            ) + rtcp.sdes_cname(sub.ssrc, sub.subscriber.cname)
            sub.remember_sr(sr.ntp_timestamp, now)
            self._send_rtcp(sub.subscriber.subscriber, packet)

    def request_keyframe(self, track: Track, now: float, force: bool = False) -> None:
        """PLI to the publisher, at most once per keyframe_request_interval unless forced."""
        interval = self.sfu.settings.session.keyframe_request_interval
        if not force and now - track.last_keyframe_request < interval:
            return
        publisher = track.publisher.publisher
        if publisher is None or not publisher.ready or track.ssrc is None:
            track.keyframe_pending = True
            return
        track.last_keyframe_request = now
        track.keyframe_pending = False
        self.metrics.keyframe_requests += 1
        self._send_rtcp(publisher, rtcp.pli(track.publisher.rtcp_ssrc, track.ssrc))

    def _send_twcc(self, transport: WebRtcTransport, now: float) -> None:
        twcc = transport.twcc
        if not twcc.media_ssrc:
            # libwebrtc ignores transport feedback whose media SSRC is not one of its own
            publisher: Participant = transport.owner
            ssrc = next((t.ssrc for t in publisher.tracks.values() if t.ssrc), None)
            if ssrc is None:
                return
            twcc.media_ssrc = ssrc
        for packet in twcc.build_feedback(now):
            self._send_rtcp(transport, packet)
            self.metrics.twcc_feedback_sent += 1

    def poll_feedback(self, now: float) -> None:
        """Periodic feedback to publishers: transport-cc, NACKs for missing packets, REMB."""
        for transport in list(self.feedback_transports):
            if transport.state is TransportState.CLOSED:
                self.feedback_transports.discard(transport)
                continue
            if not transport.ready:
                continue
            if transport.twcc is not None:
                self._send_twcc(transport, now)
            publisher: Participant = transport.owner
            for track in publisher.tracks.values():
                nack = track.nack
                if nack is None or track.ssrc is None:
                    continue
                lost = nack.poll(now, nack.rtt)
                for i in range(0, len(lost), _NACK_CHUNK):
                    self._send_rtcp(
                        transport,
                        rtcp.nack(publisher.rtcp_ssrc, track.ssrc, lost[i : i + _NACK_CHUNK]),
                    )
                self.metrics.nacks_sent += len(lost)
                if nack.keyframe_needed:
                    nack.keyframe_needed = False
                    self.request_keyframe(track, now)
            remb = transport.remb
            if remb is not None and remb.should_send(now):
                estimate = remb.estimate(now)
                ssrcs = [t.ssrc for t in publisher.tracks.values() if t.ssrc is not None]
                if estimate and ssrcs:
                    self._send_rtcp(transport, rtcp.remb(publisher.rtcp_ssrc, estimate, ssrcs))
                    self.metrics.remb_sent += 1

    def send_reports(self, sfu: Sfu, now: float) -> None:
        """Receiver reports to every connected publisher, each sender_report_interval."""
        if now - self._last_reports < sfu.settings.session.sender_report_interval:
            return
        self._last_reports = now
        for room in sfu.rooms.values():
            for p in room.participants.values():
                transport = p.publisher
                if transport is None or not transport.ready:
                    continue
                blocks = [
                    t.stats.report_block(now)
                    for t in p.tracks.values()
                    if t.stats is not None and t.stats.packets_received
                ]
                for track in p.tracks.values():
                    if track.keyframe_pending and track.outputs:
                        self.request_keyframe(track, now, force=True)
                if blocks:
                    self._send_rtcp(transport, rtcp.receiver_report(p.rtcp_ssrc, blocks[:31]))
                    if transport.remb is not None:
                        transport.remb.on_loss(max(b.fraction_lost for b in blocks) / 256.0)

    # -- STUN and DTLS --------------------------------------------------------------------
    def _stun(self, data: bytes, addr: Address) -> None:
        try:
            request = parse_binding_request(data)
        except StunError:
            self.metrics.drops["stun_malformed"] += 1
            return
        transport = self.by_ufrag.get(request.local_ufrag)
        if transport is None:
            self.metrics.drops["stun_unknown_ufrag"] += 1
            return
        now = self.clock()
        response, ok, changed, out = transport.handle_binding(request, addr, now)
        self.send(response, addr)
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
            self._latch(transport, addr, transport.displaced)
        elif addr != transport.addr:
            self._remember(transport, addr)
        self.send_all(out, transport)

    def _remember(self, transport: WebRtcTransport, addr: Address) -> None:
        """Keep an authenticated, unlatched address of a transport (a bounded few)."""
        if self.alt_addrs.get(addr) is transport:
            return
        alternates = transport.alternates
        if len(alternates) >= MAX_ALT_ADDRESSES:
            oldest = alternates.pop(0)
            if self.alt_addrs.get(oldest) is transport:
                del self.alt_addrs[oldest]
        alternates.append(addr)
        self.alt_addrs[addr] = transport

    def _latch(self, transport: WebRtcTransport, addr: Address, old: Address | None) -> None:
        """Route `addr` to the transport; its previous address `old` becomes an alternate."""
        if old is not None and self.by_addr.get(old) is transport:
            del self.by_addr[old]
            self._remember(transport, old)
        transport.addr = addr
        self.by_addr[addr] = transport
        if self.alt_addrs.get(addr) is transport:
            del self.alt_addrs[addr]
            transport.alternates.remove(addr)

    def _dtls(self, data: bytes, addr: Address) -> None:
        """A DTLS record. From an alternate address it is only heard during the handshake, and
        the latch moves there only when that record completes the handshake (the Finished MAC
        and the certificate fingerprint authenticate it): a record that merely looks like
        DTLS authenticates nothing."""
        transport = self.by_addr.get(addr)
        latched = transport is not None
        if transport is None:
            transport = self.alt_addrs.get(addr)
            if transport is None:
                self.metrics.drops["unknown_address"] += 1
                return
            if transport.state is not TransportState.CONNECTING:
                self.metrics.drops["dtls_unlatched"] += 1
                return
        if transport.state in (TransportState.FAILED, TransportState.CLOSED, TransportState.NEW):
            self.metrics.drops["dtls_failed"] += 1
            return
        out, connected = transport.handle_dtls(data, self.clock())
        if connected and not latched:
            self._latch(transport, addr, transport.addr)
        self.send_all(out, transport)
        self._after_dtls(transport, connected)

    def _after_dtls(self, transport: WebRtcTransport, connected: bool) -> None:
        if connected:
            self.handshaking.discard(transport)
            self.sfu.on_transport_connected(transport)
        elif transport.state in (TransportState.FAILED, TransportState.CLOSED):
            self.handshaking.discard(transport)
            self.sfu.on_transport_failed(transport)

    def poll_timers(self, now: float) -> None:
        """DTLS retransmissions of the transports still handshaking."""
        for transport in list(self.handshaking):
            if transport.state is TransportState.CONNECTING:
                out, connected = transport.handle_timeout(now)
                self.send_all(out, transport)
                self._after_dtls(transport, connected)
