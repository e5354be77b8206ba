"""PublisherLeg: the connection a participant publishes on, from SRTP to the track.

For every SRTP datagram the port hands it, the leg authenticates and decrypts it, parses the
header, feeds the congestion-control feedback object the answer negotiated, finds the track
(by SSRC; for an unsignalled SSRC by the mid extension or a payload type, RFC 8843 §9.2),
unwraps RTX, and hands the plain packet to :meth:`Track.receive`. SRTCP from the publisher
carries its sender reports, which are translated for every subscriber.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.rtc import rtcp
from relay.rtc.nack import rtx_unwrap
from relay.rtc.rtp import RtpError, extension_profile, parse_extensions, parse_rtp
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import Address, WebRtcTransport
from relay.sfu.feedback import ReceiverReports, RembFeedback, TransportCcFeedback
from relay.sfu.leg import Leg, MediaContext

if TYPE_CHECKING:
    from relay.sfu.participant import Participant
    from relay.sfu.track import Track

_NO_EXTENSIONS: list[tuple[int, bytes]] = []


class PublisherLeg(Leg):
    """Receives what one participant publishes."""

    role = "publisher"

    def __init__(
        self, ctx: MediaContext, participant: Participant, transport: WebRtcTransport
    ) -> None:
        super().__init__(ctx, participant, transport)
        #: media SSRC -> track and RTX SSRC -> track
        self.ssrc_map: dict[int, Track] = {}
        self.rtx_map: dict[int, Track] = {}
        #: the publisher's header-extension id of sdes:mid (to learn unsignalled SSRCs)
        self.mid_ext_id: int | None = None
        #: ... and of repaired-rtp-stream-id, which only RTX packets carry
        self.repaired_rid_ext_id: int | None = None
        #: ... and of rtp-stream-id, which names a simulcast layer (RFC 8852)
        self.rid_ext_id: int | None = None
        #: payload types unique to one published m-line of a track with unsignalled SSRCs ->
        #: (track, is the RTX payload type): the last way to route a packet with an unknown
        #: SSRC and no mid (RFC 8843 §9.2)
        self.payload_routes: dict[int, tuple[Track, bool]] = {}
        #: congestion-control feedback to the publisher: transport-cc or REMB, as negotiated
        self.feedback: TransportCcFeedback | RembFeedback | None = None
        self.reports = ReceiverReports(self)

    # -- RTP ------------------------------------------------------------------------------
    def receive_rtp(self, data: bytes, plain: bytes | None = None) -> None:
        now = self.ctx.clock()
        metrics = self.metrics
        if plain is None:
            try:
                plain = self.transport.srtp.unprotect(data)  # type: ignore[union-attr]
            except SrtpError:
                metrics.drops["srtp_unprotect"] += 1
                return
        self.transport.rx_seen = True
        try:
            pt, seq, ts, ssrc, _marker, offset, ext_offset, ext_length = parse_rtp(plain)
            if ext_length:
                elements = parse_extensions(plain, ext_offset, ext_length, extension_profile(plain))
            else:
                elements = _NO_EXTENSIONS
        except RtpError:
            metrics.drops["rtp_malformed"] += 1
            return
        size = len(data)
        feedback = self.feedback
        if feedback is not None:
            feedback.on_packet(elements, size, now)
        track = self.ssrc_map.get(ssrc)
        if track is None:
            track = self.rtx_map.get(ssrc) or self.learn_ssrc(ssrc, pt, elements, now)
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
                    pt, seq, ts, ssrc, _marker, offset, _eo, _el = parse_rtp(plain)
                except RtpError:
                    metrics.drops["rtx_padding"] += 1
                    return
                history = track.history
                if history is not None and history.get(seq) is not None:
                    # libwebrtc probes bandwidth with retransmissions of packets it sent
                    # before: the subscribers have them (a second copy would be an SRTP
                    # replay for them)
                    metrics.drops["rtx_duplicate"] += 1
                    return
                track.rtx_received += 1
        if pt != track.payload_type:
            metrics.drops["unknown_payload_type"] += 1
            return
        track.receive(plain, seq, ts, offset, elements, size, now)

    def learn_ssrc(
        self, ssrc: int, pt: int, elements: list[tuple[int, bytes]], now: float
    ) -> Track | None:
        """Bind an unsignalled SSRC to a track, in the order of RFC 8843 §9.2: the sdes:mid
        header extension, else a payload type unique to one m-line. An SSRC whose payload type
        is the track's RTX payload type, or that carries repaired-rtp-stream-id, binds to the
        track's RTX slot, never to its media slot. A new binding replaces the old one."""
        track: Track | None = None
        is_rtx = False
        mid_id = self.mid_ext_id
        if mid_id:
            for ext_id, value in elements:
                if ext_id == mid_id:
                    track = self.participant.tracks_by_mid.get(value.decode("ascii", "replace"))
                    break
        if track is not None:
            rrid_id = self.repaired_rid_ext_id
            repaired = next((v for i, v in elements if i == rrid_id), None) if rrid_id else None
            is_rtx = (pt == track.rtx_payload_type and pt != track.payload_type) or (
                repaired is not None
            )
            if track.layers:
                # simulcast: the rid (of the stream an RTX packet repairs) names the layer
                rid_id = self.rid_ext_id
                rid_value = repaired
                if rid_value is None and rid_id:
                    rid_value = next((v for i, v in elements if i == rid_id), None)
                rid = rid_value.decode("ascii", "replace") if rid_value is not None else None
                layer = next((t for t in track.layers if t.rid == rid), None)
                if layer is None:
                    return None
                track = layer
        else:
            route = self.payload_routes.get(pt)
            if route is None:
                return None
            track, is_rtx = route
        if is_rtx:
            if track.rtx_payload_type is None:
                return None  # no RTX negotiated: nothing to unwrap it with
            if track.rtx_ssrc is not None and self.rtx_map.get(track.rtx_ssrc) is track:
                del self.rtx_map[track.rtx_ssrc]
            self.rtx_map[ssrc] = track
            track.rtx_ssrc = ssrc
            return track
        if track.ssrc is not None and self.ssrc_map.get(track.ssrc) is track:
            del self.ssrc_map[track.ssrc]
        self.ssrc_map[ssrc] = track
        track.set_ssrc(ssrc, now)
        return track

    def route_payload_types(self) -> None:
        """Recompute :attr:`payload_routes` from the published tracks' payload types: a type
        used by one m-line only, of a track whose SSRCs the SDP does not name."""
        seen: dict[int, list[tuple[Track, bool]]] = {}
        for track in self.participant.tracks.values():
            if track.layers:
                continue  # the layers share the payload types: only mid and rid tell them apart
            seen.setdefault(track.payload_type, []).append((track, False))
            if track.rtx_payload_type is not None:
                seen.setdefault(track.rtx_payload_type, []).append((track, True))
        self.payload_routes = {
            pt: uses[0]
            for pt, uses in seen.items()
            if len(uses) == 1 and not uses[0][0].ssrc_signalled
        }

    def unroute(self, track: Track) -> None:
        """Forget the SSRCs (media and RTX) that lead packets to `track` or its layers."""
        targets = [track, *track.layers]
        for ssrc in [s for s, t in self.ssrc_map.items() if any(t is x for x in targets)]:
            del self.ssrc_map[ssrc]
        for ssrc in [s for s, t in self.rtx_map.items() if any(t is x for x in targets)]:
            del self.rtx_map[ssrc]

    def receive_streams(self) -> list[Track]:
        """Every track (or simulcast layer) that receives packets on this leg."""
        return [t for track in self.participant.tracks.values() for t in track.receive_streams()]

    def media_ssrcs(self) -> list[int]:
        return [t.ssrc for t in self.receive_streams() if t.ssrc is not None]

    def any_media_ssrc(self) -> int | None:
        return next((t.ssrc for t in self.receive_streams() if t.ssrc), None)

    # -- RTCP -----------------------------------------------------------------------------
    def receive_rtcp(self, data: bytes, plain: bytes | None = None) -> None:
        packets = self.parse_srtcp(data, plain)
        if packets is None:
            return
        now = self.ctx.clock()
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                track = self.ssrc_map.get(packet.ssrc)
                if track is not None and track.stats is not None:
                    track.stats.on_sender_report(rtcp.ntp_middle32(packet.ntp_timestamp), now)
                    track.last_sr = (packet.ntp_timestamp, packet.rtp_timestamp, now)
                    translate_sender_report(track, packet, now)
                    if track.pipes:
                        pipe_sender_report(track, packet)

    def on_connected(self, now: float) -> None:
        self.reports.start(now)

    def close(self) -> None:
        super().close()
        self.reports.close()
        if self.feedback is not None:
            self.feedback.close()


def translate_sender_report(track: Track, sr: rtcp.SenderReport, now: float) -> None:
    """The publisher's SR for each subscriber of ``track`` (its SSRC, its timestamps, its
    counts). The NTP time is kept: audio and video of one publisher share its clock, which is
    what the subscriber needs for lip sync."""
    for stream in track.outputs:
        translated = stream.sender_report(sr.ntp_timestamp, sr.rtp_timestamp, now)
        leg = stream.participant.subscriber_leg
        if translated is None or leg is None:
            continue
        out_ts, ntp = translated
        leg.send_rtcp(
            rtcp.sender_report(
                stream.ssrc,
                ntp,
                out_ts,
                stream.packets_sent & 0xFFFFFFFF,
                stream.payload_bytes & 0xFFFFFFFF,
            )
            + rtcp.sdes_cname(stream.ssrc, stream.participant.cname)
        )


def pipe_sender_report(track: Track, sr: rtcp.SenderReport) -> None:
    """The publisher's SR, as it is, on each pipe ``track`` is copied to and wanted on: a
    plain SR on the pipe's SSRC (the importing worker translates it for its subscribers)."""
    pipes = track.pipes
    batch: list[tuple[bytes | bytearray, Address]] = [
        (
            rtcp.sender_report(
                tap.ssrc, sr.ntp_timestamp, sr.rtp_timestamp, sr.packet_count, sr.octet_count
            ),
            tap.addr,
        )
        for tap in pipes
        if tap.wanted
    ]
    if batch:
        pipes[0].send(batch)
