"""Bandwidth probes towards one subscriber: a short paced burst above what is being sent, so
that the subscriber's transport-cc feedback shows whether its path carries more before the
relay moves it up a layer.

A probe *cluster* is sent at the rate :meth:`~relay.rtc.gcc.GccEstimator.probe_rate` gives,
for :data:`CLUSTER_DURATION` and at least :data:`~relay.rtc.gcc.PROBE_MIN_PACKETS` packets,
one packet per timer tick spaced by its size at that rate. Its packets are RTX retransmissions
of the newest packets of the subscriber's video streams (real payload, so a probe costs the
receiver nothing but a duplicate it discards, and needs no padding support), on the streams'
RTX SSRCs: a subscriber that did not negotiate RTX is not probed (its estimate then grows by
the estimator's own increase, about 8 % a second). Each copy carries a transport-wide
sequence number like any packet. The feedback for the packets sent during the cluster (media
included: the estimator measures what the path carried in that window) gives the probe's
result (:func:`~relay.rtc.gcc.probe_bitrate`), which lifts the estimate when it is higher.

Sans-I/O apart from its timer and the leg's datagram sender; the subscriber leg owns one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.rtc.gcc import PROBE_MIN_PACKETS, FeedbackReport, PacketResult, probe_bitrate
from relay.rtc.srtp import SrtpError

if TYPE_CHECKING:
    from relay.sfu.feedback import TransportCcSender
    from relay.sfu.outbound import OutboundStream
    from relay.sfu.subscriber_leg import SubscriberLeg

#: seconds a probe cluster lasts (at least)
CLUSTER_DURATION = 0.03
#: seconds after a cluster's last packet by which its feedback must have arrived
RESULT_TIMEOUT = 1.0
#: how far back in a stream's output the probe copies reach (packets)
COPY_DEPTH = 16


class Prober:
    """Probe clusters on one subscriber leg (transport-cc negotiated)."""

    __slots__ = (
        "leg",
        "twcc",
        "timer",
        "rate",
        "streams",
        "sending",
        "cluster_packets",
        "bytes_left",
        "cursor",
        "window",
        "sent_before",
        "sent_in_window",
        "results",
        "lost",
        "clusters",
        "packets",
        "bytes",
        "last_result",
    )

    def __init__(self, leg: SubscriberLeg, twcc: TransportCcSender) -> None:
        self.leg = leg
        self.twcc = twcc
        self.timer = leg.ctx.timers.timer(self._send)
        self.rate = 0.0
        self.streams: list[OutboundStream] = []
        #: a cluster is being sent; its packets so far; bytes still to send
        self.sending = False
        self.cluster_packets = 0
        self.bytes_left = 0.0
        self.cursor = 0
        #: [first send, last send] of the cluster being sent or measured, None between
        self.window: tuple[float, float] | None = None
        #: transport-wide packets stamped before the cluster, and within it (probes and media)
        self.sent_before = 0
        self.sent_in_window = 0
        self.results: list[PacketResult] = []
        self.lost = 0
        #: totals: clusters started, probe packets and bytes sent
        self.clusters = 0
        self.packets = 0
        self.bytes = 0
        #: bits/s the last measured cluster showed (None: too few of its packets reported)
        self.last_result: float | None = None

    @property
    def busy(self) -> bool:
        """A cluster is being sent or waits for its feedback."""
        return self.window is not None

    def start(self, rate: float, now: float) -> bool:
        """Send a cluster at ``rate`` bits/s; False (nothing sent) when no video stream can
        carry probe copies or a cluster is still going or being measured."""
        window = self.window
        if window is not None and not self.sending and now - window[1] > RESULT_TIMEOUT:
            self.window = None  # its feedback never came: give up on measuring it
        if self.busy or rate <= 0:
            return False
        streams = [
            sub.stream
            for sub in self.leg.participant.subscriptions.values()
            if sub.active
            and sub.stream.nack is not None
            and sub.stream.nack.use_rtx
            and sub.stream.track.history is not None
            and sub.stream.packets_sent > 0
        ]
        if not streams:
            return False
        self.streams = streams
        self.rate = rate
        self.bytes_left = rate * CLUSTER_DURATION / 8.0
        self.cluster_packets = 0
        self.cursor = 0
        self.sending = True
        self.window = (now, now)
        self.sent_before = self.twcc.history.packets_sent
        self.results = []
        self.lost = 0
        self.clusters += 1
        self._send(now)
        return True

    def _send(self, now: float) -> None:
        """One probe copy, and the timer for the next."""
        if not self.sending or self.window is None:
            return
        leg = self.leg
        transport = leg.transport
        srtp, addr = transport.srtp, transport.addr
        packet = self._next_copy(now) if srtp is not None and addr is not None else None
        if packet is None or srtp is None or addr is None:
            self._end_sending()
            return
        try:
            protected = srtp.protect(packet)
        except SrtpError:
            leg.metrics.send_errors += 1
            self._end_sending()
            return
        leg.ctx.sender.sendto(protected, addr)
        size = len(protected)
        self.packets += 1
        self.bytes += size
        leg.metrics.probe_packets += 1
        leg.metrics.probe_bytes += size
        first = now if self.cluster_packets == 0 else self.window[0]
        self.window = (first, now)
        self.cluster_packets += 1
        self.bytes_left -= size
        if self.cluster_packets >= PROBE_MIN_PACKETS and self.bytes_left <= 0:
            self._end_sending()
        else:
            self.timer.arm(now + size * 8.0 / self.rate)

    def _next_copy(self, now: float) -> bytes | None:
        """An RTX copy of one of the newest packets of the streams, round-robin."""
        streams = self.streams
        for _ in range(len(streams) * COPY_DEPTH):
            index = self.cursor
            self.cursor += 1
            stream = streams[index % len(streams)]
            nack = stream.nack
            if nack is None or not nack.use_rtx or stream.transport is None:
                continue
            back = (index // len(streams)) % COPY_DEPTH
            packet = nack.probe_copy((stream.rewriter.last_seq - back) & 0xFFFF, now)
            if packet is not None:
                return packet
        return None

    def _end_sending(self) -> None:
        self.sending = False
        self.timer.cancel()
        self.sent_in_window = self.twcc.history.packets_sent - self.sent_before
        if self.cluster_packets == 0:
            self.window = None  # nothing could be sent: nothing to measure

    def on_report(self, report: FeedbackReport, now: float) -> float | None:
        """Feed one transport-cc feedback; the probe's result (bits/s) when this feedback
        completes the measurement of a cluster (every packet sent in its window reported,
        or :data:`RESULT_TIMEOUT` passed), else None. The caller applies it
        (:meth:`~relay.rtc.gcc.GccEstimator.on_probe_result`)."""
        window = self.window
        if window is None:
            return None
        first, last = window
        self.results.extend(p for p in report.acked if first <= p.send_time <= last)
        self.lost += sum(1 for p in report.lost if first <= p.send_time <= last)
        if self.sending:
            return None  # (feedback for its first packets may come before its last is sent)
        if len(self.results) + self.lost < self.sent_in_window and now - last < RESULT_TIMEOUT:
            return None
        result = probe_bitrate(self.results, max(self.sent_in_window, len(self.results)))
        self.window = None
        self.results = []
        self.last_result = result
        return result

    def close(self) -> None:
        self.timer.cancel()
        self.sending = False
        self.window = None


__all__ = ["CLUSTER_DURATION", "COPY_DEPTH", "RESULT_TIMEOUT", "Prober"]
