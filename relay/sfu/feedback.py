"""The RTCP features, one object each, bound to a leg or a stream only when negotiated.

Publisher side (the relay is the receiver):

- :class:`TransportCcFeedback`: transport-wide congestion control feedback (draft-holmer),
  bound to a publisher leg whose answer kept transport-cc;
- :class:`RembFeedback`: receiver-estimated maximum bitrate, bound instead when the publisher
  offered goog-remb but not transport-cc;
- :class:`NackRequester`: loss detection and NACKs, bound to a video track with NACK;
- :class:`ReceiverReports`: RTCP receiver reports, one per publisher leg;
- :class:`KeyframeRequester`: PLIs to the publisher, throttled, one per track.

Subscriber side (the relay is the sender):

- :class:`TransportCcSender`: the transport-wide sequence numbers the relay stamps on a
  subscriber leg's packets and the feedback it reads back, bound when the subscriber's answer
  kept transport-cc;
- :class:`NackResponder`: retransmissions from the track's packet history, on the RTX stream
  when negotiated, within a budget, bound to an outbound stream whose answer kept NACK.

Sender-report translation is part of :class:`~relay.sfu.outbound.OutboundStream`. A feature
that acts on time owns a :class:`~relay.sfu.timers.Timer` and arms it only while it has work.

Adding a feature: write it here as a class holding its state and its timer, construct it where
the negotiation that enables it is applied (``Sfu.publisher_offer`` / ``subscriber_answer``),
and give the leg or stream one attribute for it that is None when it is not negotiated.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from relay.rtc import rtcp
from relay.rtc.bwe import RembEstimator
from relay.rtc.gcc import FeedbackReport, GccEstimator, feedback_report
from relay.rtc.nack import (
    MAX_RESENDS,
    MIN_RESEND_INTERVAL,
    RESEND_OVERHEAD,
    NackGenerator,
    RetransmissionBudget,
    rtx_wrap,
)
from relay.rtc.rtp import RtpError, extension_profile, parse_extensions, parse_rtp
from relay.rtc.twcc import TwccFeedback, TwccRecorder, TwccSendHistory

if TYPE_CHECKING:
    from relay.sfu.leg import MediaContext
    from relay.sfu.outbound import OutboundStream
    from relay.sfu.publisher_leg import PublisherLeg
    from relay.sfu.track import Track

#: sequence numbers per NACK packet sent upstream
NACK_CHUNK = 128
#: sequence numbers of one NACK answered at most (a NACK storm must not become a send storm)
MAX_NACK_ITEMS = 256
#: resent packets remembered per outbound stream (to suppress repeats)
_RESENT_MEMORY = 1024
_NO_ELEMENTS: list[tuple[int, bytes]] = []


def _element(elements: list[tuple[int, bytes]], ext_id: int) -> bytes | None:
    for ident, value in elements:
        if ident == ext_id:
            return value
    return None


# -- publisher side ----------------------------------------------------------------------------
class TransportCcFeedback:
    """Arrival times of a publisher leg's packets, reported back every feedback interval."""

    __slots__ = ("leg", "ext_id", "recorder", "interval", "timer")

    def __init__(self, leg: PublisherLeg, ext_id: int) -> None:
        self.leg = leg
        self.ext_id = ext_id
        self.recorder = TwccRecorder(leg.participant.rtcp_ssrc)
        self.interval = leg.ctx.settings.rtp.feedback_interval
        self.timer = leg.ctx.timers.timer(self.send)

    def on_packet(self, elements: list[tuple[int, bytes]], size: int, now: float) -> None:
        ext_id = self.ext_id
        for ident, value in elements:
            if ident == ext_id:
                if len(value) >= 2:
                    if self.recorder.on_packet((value[0] << 8) | value[1], now):
                        self.send(now)  # a batch is full
                    elif self.timer.when is None:
                        self.timer.arm(now + self.interval)
                return

    def send(self, now: float) -> None:
        self.timer.cancel()
        recorder = self.recorder
        if not recorder.media_ssrc:
            # libwebrtc ignores transport feedback whose media SSRC is not one of its own
            ssrc = self.leg.any_media_ssrc()
            if ssrc is None:
                return
            recorder.media_ssrc = ssrc
        for packet in recorder.build_feedback(now):
            if self.leg.send_rtcp(packet):
                self.leg.metrics.twcc_feedback_sent += 1

    def close(self) -> None:
        self.timer.cancel()


class RembFeedback:
    """A receive-side bandwidth estimate from arrival rate and abs-send-time, sent as REMB."""

    __slots__ = ("leg", "abs_send_time_id", "estimator", "interval", "timer")

    def __init__(self, leg: PublisherLeg, abs_send_time_id: int) -> None:
        self.leg = leg
        self.abs_send_time_id = abs_send_time_id
        self.estimator = RembEstimator()
        self.interval = leg.ctx.settings.rtp.feedback_interval
        self.timer = leg.ctx.timers.timer(self.send)

    def on_packet(self, elements: list[tuple[int, bytes]], size: int, now: float) -> None:
        send_time = None
        if self.abs_send_time_id:
            value = _element(elements, self.abs_send_time_id)
            if value is not None and len(value) == 3:
                send_time = (value[0] << 16) | (value[1] << 8) | value[2]
        self.estimator.on_packet(size, now, send_time)
        if self.timer.when is None:
            self.timer.arm(now + self.interval)

    def on_loss(self, fraction: float) -> None:
        self.estimator.on_loss(fraction)

    def send(self, now: float) -> None:
        estimator = self.estimator
        if not estimator.should_send(now):
            return
        estimate = estimator.estimate(now)
        ssrcs = self.leg.media_ssrcs()
        if estimate and ssrcs:
            rtcp_ssrc = self.leg.participant.rtcp_ssrc
            if self.leg.send_rtcp(rtcp.remb(rtcp_ssrc, estimate, ssrcs)):
                self.leg.metrics.remb_sent += 1

    def close(self) -> None:
        self.timer.cancel()


class NackRequester:
    """Loss on one track's publisher stream: NACKs while the packets can still arrive, a
    keyframe request when they cannot."""

    __slots__ = ("track", "generator", "timer", "retry")

    def __init__(self, ctx: MediaContext, track: Track) -> None:
        self.track = track
        self.generator = NackGenerator(track.clock_rate)
        self.timer = ctx.timers.timer(self.send)
        #: how often outstanding losses are looked at again
        self.retry = min(ctx.settings.rtp.feedback_interval, self.generator.min_retry_interval)

    def on_packet(self, seq: int, now: float) -> None:
        generator = self.generator
        generator.on_packet(seq, now)
        if generator.missing and self.timer.when is None:
            self.timer.arm(now + generator.reorder_delay)

    def send(self, now: float) -> None:
        track = self.track
        generator = self.generator
        leg = track.participant.publisher_leg
        upstream = track.upstream
        if (leg is None and upstream is None) or track.ssrc is None:
            return
        lost = generator.poll(now, generator.rtt)
        if upstream is not None:  # imported from another worker: over the pipe
            if lost:
                upstream.send_nack(track, lost)
        elif leg is not None:
            rtcp_ssrc = track.participant.rtcp_ssrc
            for i in range(0, len(lost), NACK_CHUNK):
                leg.send_rtcp(rtcp.nack(rtcp_ssrc, track.ssrc, lost[i : i + NACK_CHUNK]))
        track.metrics.nacks_sent += len(lost)
        if generator.keyframe_needed:
            generator.keyframe_needed = False
            track.keyframes.request(now)
        if generator.missing:
            self.timer.arm(now + self.retry)

    def close(self) -> None:
        self.timer.cancel()


class ReceiverReports:
    """A receiver report about every track of a publisher leg, each sender-report interval."""

    __slots__ = ("leg", "interval", "timer")

    def __init__(self, leg: PublisherLeg) -> None:
        self.leg = leg
        self.interval = leg.ctx.settings.session.sender_report_interval
        self.timer = leg.ctx.timers.timer(self.send)

    def start(self, now: float) -> None:
        self.timer.arm_by(now + self.interval)

    def send(self, now: float) -> None:
        leg = self.leg
        if not leg.transport.ready:
            return
        self.timer.arm(now + self.interval)
        blocks = [
            t.stats.report_block(now)
            for t in leg.receive_streams()
            if t.stats and t.stats.packets_received
        ]
        if not blocks:
            return
        leg.send_rtcp(rtcp.receiver_report(leg.participant.rtcp_ssrc, blocks[:31]))
        feedback = leg.feedback
        if isinstance(feedback, RembFeedback):
            feedback.on_loss(max(b.fraction_lost for b in blocks) / 256.0)

    def close(self) -> None:
        self.timer.cancel()


class KeyframeRequester:
    """PLIs for one track: at most one per keyframe-request interval. A forced request (a
    subscription that starts now needs a keyframe it has not missed) goes out unless the
    keyframe asked for last is still to come: subscribers that join together cost the
    publisher one keyframe. A request made while the publisher cannot be reached is kept and
    retried. While a subscriber's stream on this track waits for a keyframe to start (resumed,
    activated, its source new) and the publisher goes on sending without one, the request is
    made again every :data:`WAIT_RETRY` seconds (at least the interval): a publisher may drop
    a request (Chromium ignores one less than 300 ms after the one before, for any layer), and
    a stream that starts only at a keyframe (VP8 simulcast, VP9, AV1) would wait for ever."""

    __slots__ = (
        "track",
        "ctx",
        "interval",
        "last",
        "arrived",
        "pending",
        "requests",
        "timer",
        "_packets_at",
    )

    #: seconds between retries of a pending request
    RETRY = 1.0
    #: seconds after a request (at least the interval) to ask again while a stream waits
    WAIT_RETRY = 0.5

    def __init__(self, ctx: MediaContext, track: Track) -> None:
        self.track = track
        self.ctx = ctx
        self.interval = ctx.settings.session.keyframe_request_interval
        self.last = float("-inf")
        #: when the first packet of a keyframe last started a subscription
        self.arrived = float("-inf")
        self.pending = False
        #: PLIs sent for this track
        self.requests = 0
        self.timer = ctx.timers.timer(self._retry)
        #: the track's packet count at the last request (did the publisher send since?)
        self._packets_at = 0

    def request(self, now: float, force: bool = False) -> None:
        if now - self.last < self.interval and (not force or self.arrived < self.last):
            if not self.timer.armed and self._waiting():
                self.timer.arm(self.last + self._wait_retry())  # in case it never comes
            return
        self._send(now)

    def _send(self, now: float) -> None:
        track = self.track
        leg = track.participant.publisher_leg
        upstream = track.upstream
        if (upstream is None and (leg is None or not leg.transport.ready)) or track.ssrc is None:
            self.pending = True
            self.timer.arm_by(now + self.RETRY)
            return
        self.last = now
        self.pending = False
        self.timer.cancel()
        self._packets_at = track.packets
        self.requests += 1
        self.ctx.metrics.keyframe_requests += 1
        if upstream is not None:  # imported from another worker: over the pipe
            upstream.send_keyframe_request(track)
        elif leg is not None:
            leg.send_rtcp(rtcp.pli(track.participant.rtcp_ssrc, track.ssrc))
        if self._waiting():
            self.timer.arm(now + self._wait_retry())

    def _wait_retry(self) -> float:
        return max(self.interval, self.WAIT_RETRY)

    def _waiting(self) -> bool:
        """A subscriber's stream on this track waits for a keyframe to start (one moving here
        from another simulcast layer waits in ``pending``: the allocation asks for those)."""
        track = self.track
        return not track.ended and any(
            stream.rewriter.starting and stream.target in (None, track) for stream in track.outputs
        )

    def _retry(self, now: float) -> None:
        track = self.track
        if track.ended:
            return
        if self.pending:
            if track.outputs or track.piped:
                self.request(now, force=True)
        elif self._waiting() and track.packets > self._packets_at:
            self._send(now)  # the publisher went on without a keyframe: ask again

    def close(self) -> None:
        self.pending = False
        self.timer.cancel()


# -- subscriber side ---------------------------------------------------------------------------
class TransportCcSender:
    """Transport-wide sequence numbers on a subscriber leg, what its feedback says about
    delivery, and the send-side bandwidth estimate it feeds (GCC, relay/rtc/gcc.py)."""

    __slots__ = ("ext_id", "history", "estimator")

    def __init__(self, ext_id: int) -> None:
        self.ext_id = ext_id
        self.history = TwccSendHistory()
        self.estimator = GccEstimator()

    def stamp(self, size: int, now: float) -> int:
        return self.history.next_seq(size, now)

    def on_feedback(self, feedback: TwccFeedback, now: float) -> FeedbackReport:
        """Match a feedback against the history and feed the estimator; what it reported."""
        # feedback_report matches the feedback against the history (on_feedback) itself
        report = feedback_report(self.history, feedback, now)
        self.estimator.on_report(report, now)
        return report


class NackResponder:
    """Answers one subscriber's NACKs for one outbound stream from the packet history of the
    track (with simulcast: of the layer) it is forwarded from.

    The history is the track's, shared by every subscriber: a packet is stored once, as the
    publisher sent it, and rewritten for the asking subscriber when it is resent. Each packet
    is resent to a subscriber at most once per RTT (10 ms at least) and :data:`MAX_RESENDS`
    times in all, and no more bytes than the budget's share of what the stream was forwarded.
    Without RTX the packet is resent as it was sent, byte for byte (SRTP then protects the same
    plaintext under the same index, which is safe); :attr:`stamps` remembers the transport-wide
    sequence number each packet carried for that.
    """

    __slots__ = (
        "stream",
        "budget",
        "rtx_ssrc",
        "rtx_payload_type",
        "rtx_seq",
        "stamps",
        "stamp_mask",
        "_resent",
        "nacks_received",
        "retransmissions",
        "retransmission_bytes",
        "misses",
        "repeats_suppressed",
        "budget_suppressed",
    )

    def __init__(
        self,
        stream: OutboundStream,
        capacity: int,
        budget_fraction: float,
        rtx: tuple[int, int, int] | None,
    ) -> None:
        """``capacity``: the tracks' history capacity (a power of two); ``rtx``: (RTX SSRC,
        RTX payload type, first RTX sequence number), None without."""
        self.stream = stream
        self.budget = RetransmissionBudget(budget_fraction)
        self.rtx_ssrc, self.rtx_payload_type, self.rtx_seq = rtx or (0, 0, 0)
        #: ``out_seq << 16 | transport-wide stamp`` of the packets sent recently, by
        #: ``out_seq & stamp_mask`` (only without RTX: a resend must repeat the stamp)
        self.stamps: array[int] | None = None
        self.stamp_mask = capacity - 1
        if rtx is None:
            self.stamps = array("I", bytes(4 * capacity))
        #: output seq -> (time of the last resend, resends)
        self._resent: dict[int, tuple[float, int]] = {}
        self.nacks_received = 0
        self.retransmissions = 0
        self.retransmission_bytes = 0
        self.misses = 0
        self.repeats_suppressed = 0
        self.budget_suppressed = 0

    @property
    def use_rtx(self) -> bool:
        return self.stamps is None

    def resend(self, out_seq: int, now: float) -> bytes | None:
        """The plain RTP packet to send for a NACKed output sequence number, None when it is
        not in the history (counted in :attr:`misses`) or is suppressed."""
        stream = self.stream
        in_seq = stream.rewriter.input_seq_of(out_seq)
        history = stream.track.history  # the layer's the stream is on now, with simulcast
        stored = None if in_seq is None or history is None else history.get(in_seq, now)
        if stored is None:
            self.misses += 1
            return None
        resent = self._resent.get(out_seq)
        rtt = stream.round_trip_time or 0.0
        if resent is not None:
            when, count = resent
            if count >= MAX_RESENDS or now - when < max(rtt, MIN_RESEND_INTERVAL):
                self.repeats_suppressed += 1
                return None
            count += 1
        else:
            count = 1
        if not self.budget.take(len(stored) + RESEND_OVERHEAD + 16):
            self.budget_suppressed += 1
            return None
        try:
            packet = self._rebuild(stored, out_seq, now)
        except RtpError:
            self.misses += 1
            return None
        if len(self._resent) >= _RESENT_MEMORY:
            del self._resent[next(iter(self._resent))]
        self._resent[out_seq] = (now, count)
        self.retransmissions += 1
        return packet

    def probe_copy(self, out_seq: int, now: float) -> bytes | None:
        """An RTX copy of a packet sent recently, for a bandwidth probe (not a retransmission:
        no budget, no resend accounting); None without RTX or when the packet is gone."""
        if self.stamps is not None:
            return None
        stream = self.stream
        in_seq = stream.rewriter.input_seq_of(out_seq)
        history = stream.track.history
        stored = None if in_seq is None or history is None else history.get(in_seq, now)
        if stored is None:
            return None
        try:
            return self._rebuild(stored, out_seq, now)
        except RtpError:
            return None

    def _rebuild(self, stored: bytes, out_seq: int, now: float) -> bytes:
        stream = self.stream
        _pt, _seq, ts, _ssrc, _m, offset, ext_offset, ext_length = parse_rtp(stored)
        elements = (
            parse_extensions(stored, ext_offset, ext_length, extension_profile(stored))
            if ext_length
            else _NO_ELEMENTS
        )
        out_ts = (ts + stream.rewriter.ts_offset) & 0xFFFFFFFF
        if self.stamps is not None:
            stamp = None
            if stream.twcc is not None:
                recorded = self.stamps[out_seq & self.stamp_mask]
                if recorded >> 16 != out_seq:
                    raise RtpError("the packet's transport-wide stamp is no longer known")
                stamp = recorded & 0xFFFF
            return stream.build(stored, offset, out_seq, out_ts, elements, stamp)
        twcc = stream.twcc
        stamp = twcc.stamp(len(stored) + 2, now) if twcc is not None else None
        packet = stream.build(stored, offset, out_seq, out_ts, elements, stamp)
        packet = rtx_wrap(packet, self.rtx_ssrc, self.rtx_payload_type, self.rtx_seq)
        self.rtx_seq = (self.rtx_seq + 1) & 0xFFFF
        return packet


def publisher_feedback(
    leg: PublisherLeg, twcc_id: int, abs_send_time_id: int, remb: bool
) -> TransportCcFeedback | RembFeedback | None:
    """The congestion-control feedback object a publisher's answer negotiated, or None."""
    if twcc_id:
        current = leg.feedback
        if isinstance(current, TransportCcFeedback) and current.ext_id == twcc_id:
            return current
        return TransportCcFeedback(leg, twcc_id)
    if remb:
        current = leg.feedback
        if isinstance(current, RembFeedback):
            current.abs_send_time_id = abs_send_time_id
            return current
        return RembFeedback(leg, abs_send_time_id)
    return None


__all__ = [
    "KeyframeRequester",
    "NackRequester",
    "NackResponder",
    "ReceiverReports",
    "RembFeedback",
    "TransportCcFeedback",
    "TransportCcSender",
    "publisher_feedback",
]
