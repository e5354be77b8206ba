"""SubscriberLeg: the connection a participant receives on.

The packets themselves leave through the tracks' fan-out (each
:class:`~relay.sfu.outbound.OutboundStream` protects with this leg's SRTP session). What comes
back is RTCP: receiver reports (loss, jitter, round-trip time per stream), keyframe requests
(PLI, FIR) that go to the publisher throttled, NACKs answered from the track's history, and
transport-cc feedback about the relay's own packets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.rtc import rtcp
from relay.rtc.rtp import RtpError
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import WebRtcTransport
from relay.rtc.twcc import TwccFeedback, parse_feedback
from relay.sfu.feedback import MAX_NACK_ITEMS, TransportCcSender
from relay.sfu.leg import Leg, MediaContext
from relay.sfu.probe import Prober

if TYPE_CHECKING:
    from relay.sfu.outbound import OutboundStream
    from relay.sfu.participant import Participant
    from relay.sfu.subscription import Subscription


class SubscriberLeg(Leg):
    """Sends one participant its subscriptions; reads its RTCP."""

    role = "subscriber"

    def __init__(
        self, ctx: MediaContext, participant: Participant, transport: WebRtcTransport
    ) -> None:
        super().__init__(ctx, participant, transport)
        #: transport-wide sequence numbers, when the subscriber's answer kept transport-cc,
        #: and the bandwidth probes measured through them
        self.twcc: TransportCcSender | None = None
        self.prober: Prober | None = None
        #: the latest REMB the subscriber sent (bits/s) and when: its own estimate, used when
        #: transport-cc was not negotiated
        self.remb: int | None = None
        self.remb_at = 0.0
        #: what the layer allocation expects this subscriber to receive, bits/s (0: no
        #: estimate in use), and whom to tell when the estimate falls below it
        self.allocated = 0.0
        self.allocated_at = -1.0
        #: since when the estimate has been below ``allocated`` (None: it is not)
        self.below_since: float | None = None
        self.on_estimate_drop: Callable[[SubscriberLeg, float], None] | None = None

    def set_twcc(self, ext_id: int) -> None:
        """Stamp transport-wide sequence numbers with element ``ext_id`` (0: not negotiated):
        a new estimator and prober when the id changes."""
        if not ext_id:
            self.twcc = None
        elif self.twcc is None or self.twcc.ext_id != ext_id:
            self.twcc = TransportCcSender(ext_id)
        else:
            return
        if self.prober is not None:
            self.prober.close()
        self.prober = Prober(self, self.twcc) if self.twcc is not None else None

    @property
    def estimate(self) -> int | None:
        """The bandwidth estimate for this subscriber, bits/s: from transport-cc feedback,
        else from its REMB; None when there is neither. With transport-cc it starts at the
        estimator's start value (300 kbit/s) before the first feedback, and grows with probes."""
        if self.twcc is not None:
            return self.twcc.estimator.estimate
        return self.remb

    def close(self) -> None:
        super().close()
        if self.prober is not None:
            self.prober.close()

    def receive_rtp(self, data: bytes, plain: bytes | None = None) -> None:
        self.transport.rx_seen = True
        self.metrics.drops["not_publishing"] += 1

    def subscriptions_by_ssrc(self) -> dict[int, Subscription]:
        return {s.stream.ssrc: s for s in self.participant.subscriptions.values()}

    def receive_rtcp(self, data: bytes, plain: bytes | None = None) -> None:
        packets = self.parse_srtcp(data, plain)
        if packets is None:
            return
        now = self.ctx.clock()
        by_ssrc = self.subscriptions_by_ssrc()
        for packet in packets:
            if isinstance(packet, (rtcp.ReceiverReport, rtcp.SenderReport)):
                for block in packet.reports:
                    sub = by_ssrc.get(block.ssrc)
                    if sub is not None:
                        sub.stream.on_report_block(
                            block.fraction_lost,
                            block.packets_lost,
                            block.jitter,
                            block.lsr,
                            block.dlsr,
                            now,
                        )
            elif isinstance(packet, rtcp.Pli):
                self._keyframe_wanted(by_ssrc.get(packet.media_ssrc), now)
            elif isinstance(packet, rtcp.Fir):
                for ssrc, _seq in packet.entries:
                    self._keyframe_wanted(by_ssrc.get(ssrc), now)
            elif isinstance(packet, rtcp.Nack):
                sub = by_ssrc.get(packet.media_ssrc)
                if sub is not None:
                    self.retransmit(sub.stream, packet.lost, now)
            elif isinstance(packet, rtcp.TransportFeedback):
                if self.twcc is not None:
                    try:
                        self.on_transport_feedback(parse_feedback(packet.fci), now)
                    except (rtcp.RtcpError, RtpError, ValueError):
                        self.metrics.drops["rtcp_malformed"] += 1
            elif isinstance(packet, rtcp.Remb):
                self.remb = packet.bitrate
                self.remb_at = now
                self._check_estimate(now)

    @staticmethod
    def _keyframe_wanted(sub: Subscription | None, now: float) -> None:
        """A PLI or FIR for ``sub``'s outbound stream: a keyframe request to its track's
        publisher, only while the stream is forwarded (a paused subscription, or one not yet
        negotiated, would make the publisher send keyframes to nobody)."""
        if sub is not None and sub.active:
            sub.stream.track.keyframes.request(now)

    def on_transport_feedback(self, feedback: TwccFeedback, now: float) -> None:
        """One transport-cc feedback: the estimate, a probe's result, the allocation told when
        the estimate fell below what it sends."""
        twcc = self.twcc
        assert twcc is not None
        report = twcc.on_feedback(feedback, now)
        prober = self.prober
        if prober is not None and prober.window is not None:
            result = prober.on_report(report, now)
            if result is not None:
                twcc.estimator.on_probe_result(result, now)
        self._check_estimate(now)

    def _check_estimate(self, now: float) -> None:
        allocated = self.allocated
        if allocated and self.on_estimate_drop is not None:
            estimate = self.estimate
            if estimate is not None and estimate < allocated:
                self.on_estimate_drop(self, now)

    def retransmit(self, stream: OutboundStream, lost: list[int], now: float) -> None:
        """Answer a NACK for one stream (on its RTX stream when negotiated), within the
        stream's retransmission budget, the oldest packets first (the oldest gap holds the
        subscriber's decoder up the longest; a NACK's own order need not be by age, for
        instance one sorted numerically across a sequence number wrap). A packet the history
        no longer has is repaired by a keyframe, unless the relay is itself still recovering
        it from the publisher (it then reaches every subscriber when it arrives)."""
        metrics = self.metrics
        metrics.nacks_received += len(lost)
        responder = stream.nack
        transport = self.transport
        if responder is None or transport.srtp is None or transport.addr is None:
            return
        responder.nacks_received += len(lost)
        responder.budget.refill(stream.bytes_sent, now)
        repeats, over_budget = responder.repeats_suppressed, responder.budget_suppressed
        missed = False
        addr = transport.addr
        sendto = self.ctx.sender.sendto
        newest = stream.rewriter.last_seq
        for seq in sorted(lost[:MAX_NACK_ITEMS], key=lambda seq: (seq - newest) & 0xFFFF):
            misses = responder.misses
            packet = responder.resend(seq, now)
            if packet is None:
                if not missed and responder.misses != misses:
                    missed = not self._recovering(stream, seq)
                continue
            try:
                protected = transport.srtp.protect(packet)
            except SrtpError:
                metrics.send_errors += 1
                continue
            sendto(protected, addr)
            metrics.retransmissions += 1
            metrics.retransmission_bytes += len(protected)
            responder.retransmission_bytes += len(protected)
        metrics.retransmissions_suppressed["repeat"] += responder.repeats_suppressed - repeats
        metrics.retransmissions_suppressed["budget"] += responder.budget_suppressed - over_budget
        if missed:
            metrics.retransmission_misses += 1
            stream.track.keyframes.request(now)

    @staticmethod
    def _recovering(stream: OutboundStream, out_seq: int) -> bool:
        """Whether the packet a subscriber's sequence number stands for is missing on the
        publisher's leg and still being NACKed there."""
        nack = stream.track.nack
        if nack is None:
            return False
        seq = stream.rewriter.input_seq(out_seq)
        return seq is not None and nack.generator.is_missing(seq)
