"""OutboundStream: one track as one subscriber receives it, the last step of the packet path.

:meth:`OutboundStream.forward` turns the publisher's plain packet into this subscriber's
protected copy: sequence number and timestamp rewritten (continuous across source switches),
SSRC and payload type replaced, header extensions mapped to the subscriber's ids (plus its mid
and, when negotiated, a transport-wide sequence number), SRTP with the subscriber's key. The
copy goes into the caller's batch; the track sends the whole batch at once.

The stream also keeps what the subscriber's receiver reports say about it and translates the
publisher's sender reports. NACKs are answered by its :class:`~relay.sfu.feedback.NackResponder`
when NACK was negotiated.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.rtc.rtcp import ntp_middle32
from relay.rtc.rtp import ExtensionRewriter, RtpError, SequenceRewriter, rewrite_packet
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import Address, WebRtcTransport
from relay.rtc.vp8 import Vp8Error, Vp8Rewriter, parse_vp8

if TYPE_CHECKING:
    from relay.metrics import Metrics
    from relay.sfu.feedback import NackResponder, TransportCcSender
    from relay.sfu.participant import Participant
    from relay.sfu.track import Track

#: how many of our recent sender reports are remembered to compute RTT from receiver reports
_SR_MEMORY = 8
#: seconds a starting video stream waits for the first packet of a keyframe before it starts
#: on the newest packet anyway (the subscriber's own keyframe request does the rest)
KEYFRAME_WAIT = 1.0


def _not_connected(packet: bytes) -> bytes:
    raise SrtpError("the subscriber's transport has no SRTP session")


class OutboundStream:
    """The per-subscriber end of a track's fan-out."""

    __slots__ = (
        "track",
        "target",
        "wanted",
        "participant",
        "metrics",
        "ssrc",
        "payload_type",
        "rewriter",
        "start_by",
        "ext",
        "transport",
        "protect",
        "twcc",
        "nack",
        "vp8",
        "vp8_switch",
        "vp8_heads",
        "packets_sent",
        "bytes_sent",
        "payload_bytes",
        "fraction_lost",
        "packets_lost",
        "jitter",
        "round_trip_time",
        "sr_sent",
    )

    def __init__(
        self, track: Track, payload_type: int, metrics: Metrics, participant: Participant
    ) -> None:
        #: the track (with simulcast: the layer) this stream is forwarded from now, and the
        #: layer it should be forwarded from (it moves there at that layer's next keyframe)
        self.track = track
        self.target: Track | None = None
        #: the layer the subscriber should get, which the target becomes once it sends
        self.wanted: Track | None = None
        #: the subscribing participant
        self.participant = participant
        self.metrics = metrics
        self.ssrc = secrets.randbits(32) or 1
        self.payload_type = payload_type
        self.rewriter = SequenceRewriter(track.clock_rate)
        #: while the rewriter is starting: the time after which any newest packet may start it
        self.start_by = 0.0
        self.ext = ExtensionRewriter({}, None, None)
        #: the subscriber leg's transport, and its SRTP protect while connected
        self.transport: WebRtcTransport | None = None
        self.protect: Callable[[bytes], bytes] = _not_connected
        #: transport-wide sequence numbers of the subscriber leg, when negotiated (the
        #: extension rewriter knows the element's id)
        self.twcc: TransportCcSender | None = None
        #: retransmissions, when the subscriber negotiated NACK
        self.nack: NackResponder | None = None
        #: VP8 simulcast: PictureID and TL0PICIDX renumbered so that the subscriber's decoder
        #: sees one stream across layer switches; the next packet starts a new source; the
        #: descriptor each recent packet was sent with, by output seq (for retransmissions)
        self.vp8: Vp8Rewriter | None = None
        self.vp8_switch = False
        self.vp8_heads: list[tuple[int, bytes, int] | None] = []
        self.packets_sent = 0
        #: bytes sent on the wire (SRTP), and payload octets sent (the sender report's count)
        self.bytes_sent = 0
        self.payload_bytes = 0
        self.fraction_lost = 0.0
        self.packets_lost = 0
        self.jitter = 0.0
        self.round_trip_time: float | None = None
        #: middle 32 bits of the NTP time of our sender reports -> when we sent them
        self.sr_sent: dict[int, float] = {}

    # -- set-up ---------------------------------------------------------------------------
    def attach(self, transport: WebRtcTransport, twcc: TransportCcSender | None) -> None:
        """Send on a connected subscriber transport (its SRTP session and transport-cc)."""
        self.transport = transport
        srtp = transport.srtp
        self.protect = srtp.protect if srtp is not None else _not_connected
        self.twcc = twcc

    def detach(self) -> None:
        self.protect = _not_connected

    def restart(self, now: float) -> None:
        """Start over on the track's next keyframe (first activation or a new source), with
        seq and timestamp continuing from what the subscriber already got."""
        self.switch_source()
        self.start_by = now + KEYFRAME_WAIT

    def switch_source(self) -> None:
        """The next packet forwarded starts a new source (a keyframe: a restart, or another
        simulcast layer)."""
        self.rewriter.switch_source()
        self.vp8_switch = True

    def rewrite_vp8(self, enabled: bool, capacity: int) -> None:
        """Renumber VP8 descriptors (simulcast layers of a VP8 track) or stop doing so;
        ``capacity``: how many recent packets' descriptors are kept for retransmissions."""
        if enabled and self.vp8 is None:
            self.vp8 = Vp8Rewriter()
            self.vp8_switch = True
            self.vp8_heads = [None] * capacity
        elif not enabled:
            self.vp8 = None
            self.vp8_heads = []

    # -- the packet path ------------------------------------------------------------------
    def forward(
        self,
        plain: bytes,
        offset: int,
        seq: int,
        ts: int,
        elements: list[tuple[int, bytes]],
        size: int,
        now: float,
        batch: list[tuple[bytes, Address]],
    ) -> int:
        """Append this subscriber's protected copy of ``plain`` to ``batch``; its size (0 when
        there is none: a packet from before the current source, or a protection failure)."""
        vp8 = self.vp8
        head: tuple[bytes, int] | None = None
        if vp8 is not None:
            try:
                desc = parse_vp8(plain, offset)
            except Vp8Error:
                self.metrics.drops["rtp_malformed"] += 1
                return 0
            descriptor = vp8.rewrite(desc, self.vp8_switch)
            self.vp8_switch = False
            if descriptor is None:
                return 0  # before the new source's keyframe: nothing sent, no seq used
            head = (descriptor, desc.size)
            plain = plain[:offset] + descriptor + plain[offset + desc.size :]
        rewritten = self.rewriter.rewrite(seq, ts, now)
        if rewritten is None:
            self.metrics.drops["stale_packet"] += 1
            return 0
        out_seq, out_ts = rewritten
        if head is not None:
            heads = self.vp8_heads
            heads[out_seq % len(heads)] = (out_seq, head[0], head[1])
        twcc = self.twcc
        if twcc is not None:
            stamp = twcc.history.next_seq(size, now)
            block = self.ext.stamped(elements, stamp)
            nack = self.nack
            if nack is not None and nack.stamps is not None:
                nack.stamps[out_seq & nack.stamp_mask] = (out_seq << 16) | stamp
        else:
            block = self.ext.block(elements)
        out = rewrite_packet(plain, offset, self.ssrc, self.payload_type, out_seq, out_ts, block)
        try:
            packet = self.protect(out)
        except SrtpError:
            self.metrics.send_errors += 1
            return 0
        batch.append((packet, self.transport.addr))  # type: ignore[union-attr, arg-type]
        sent = len(packet)
        self.packets_sent += 1
        self.bytes_sent += sent
        self.payload_bytes += len(plain) - offset
        return sent

    def build(
        self,
        plain: bytes,
        offset: int,
        out_seq: int,
        out_ts: int,
        elements: list[tuple[int, bytes]],
        stamp: int | None,
    ) -> bytes:
        """This subscriber's plain copy of a packet, with the given output seq, timestamp and
        transport-wide stamp (for retransmissions: :meth:`forward` builds it inline). With VP8
        renumbering, the descriptor is the one that packet was first sent with."""
        if self.vp8 is not None:
            heads = self.vp8_heads
            entry = heads[out_seq % len(heads)]
            if entry is None or entry[0] != out_seq:
                raise RtpError("the packet's VP8 descriptor is no longer known")
            _seq, descriptor, size = entry
            plain = plain[:offset] + descriptor + plain[offset + size :]
        block = self.ext.block(elements) if stamp is None else self.ext.stamped(elements, stamp)
        return rewrite_packet(plain, offset, self.ssrc, self.payload_type, out_seq, out_ts, block)

    # -- RTCP -----------------------------------------------------------------------------
    def sender_report(self, ntp: int, rtp_ts: int, now: float) -> tuple[int, int] | None:
        """(timestamp in this stream's units, NTP) for translating the publisher's sender
        report, remembered to compute the round-trip time; None before the stream started."""
        out_ts = self.rewriter.map_timestamp(rtp_ts)
        if out_ts is None:
            return None
        self.sr_sent[ntp_middle32(ntp)] = now
        while len(self.sr_sent) > _SR_MEMORY:
            del self.sr_sent[next(iter(self.sr_sent))]
        return out_ts, ntp

    def on_report_block(
        self, fraction_lost: int, packets_lost: int, jitter: int, lsr: int, dlsr: int, now: float
    ) -> None:
        """A receiver report block from the subscriber about this stream."""
        self.fraction_lost = fraction_lost / 256.0
        self.packets_lost = max(0, packets_lost)
        self.jitter = jitter / self.track.clock_rate
        sent = self.sr_sent.get(lsr)
        if lsr and sent is not None:
            rtt = now - sent - dlsr / 65536.0
            if rtt >= 0:
                self.round_trip_time = rtt
