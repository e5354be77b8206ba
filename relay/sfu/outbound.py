"""OutboundStream: one track as one subscriber receives it, the last step of the packet path.

:meth:`OutboundStream.forward` turns the publisher's plain packet into this subscriber's
protected copy: sequence number and timestamp rewritten (continuous across source switches),
SSRC and payload type replaced, header extensions mapped to the subscriber's ids (plus its mid
and, when negotiated, a transport-wide sequence number), SRTP with the subscriber's key. The
copy goes into the caller's batch; the track sends the whole batch at once.

Layers within one RTP stream (VP8 temporal layers, VP9 spatial and temporal layers, the decode
targets of an AV1 dependency descriptor): the stream forwards only the layers up to
:attr:`OutboundStream.max_spatial` and :attr:`OutboundStream.max_temporal` (None: all), which
the layer allocation sets (see their docstrings). A packet not forwarded is told to the
sequence rewriter (:meth:`~relay.rtc.rtp.SequenceRewriter.drop`), so the subscriber's numbering
has no gap and its NACKs map back to the right packets; the payload descriptors are renumbered
(:class:`~relay.rtc.vp8.Vp8Rewriter`, :class:`~relay.rtc.vp9.Vp9Rewriter`), the AV1 dependency
descriptor tells the subscriber which decode targets it can decode
(:class:`~relay.rtc.dependency_descriptor.DecodeTargetSelector`), and with VP9 and AV1 the RTP
marker bit moves to the end of the highest layer forwarded. A stream that filters nothing and
renumbers nothing pays one attribute test per packet for all this
(:attr:`OutboundStream.layered`).

The stream also keeps what the subscriber's receiver reports say about it and translates the
publisher's sender reports. NACKs are answered by its :class:`~relay.sfu.feedback.NackResponder`
when NACK was negotiated.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.rtc.dependency_descriptor import (
    DecodeTargetSelector,
    DependencyDescriptorError,
    write_with_bitmask,
)
from relay.rtc.dependency_descriptor import parse as parse_dependency_descriptor
from relay.rtc.rtcp import ntp_middle32
from relay.rtc.rtp import ExtensionRewriter, RtpError, SequenceRewriter, rewrite_packet
from relay.rtc.srtp import SrtpError
from relay.rtc.transport import Address, WebRtcTransport
from relay.rtc.vp8 import Vp8Descriptor, Vp8Error, Vp8Rewriter, parse_vp8
from relay.rtc.vp9 import Vp9Descriptor, Vp9Error, Vp9Rewriter, parse_vp9

if TYPE_CHECKING:
    from relay.metrics import Metrics
    from relay.sfu.feedback import NackResponder, TransportCcSender
    from relay.sfu.participant import Participant
    from relay.sfu.track import Track

#: how many of our recent sender reports are remembered to compute RTT from receiver reports
_SR_MEMORY = 8
#: seconds between keyframe requests of a VP9 stream waiting to go up a spatial layer
LAYER_UP_RETRY = 1.0
#: the RTP padding that fills an output number whose packet was not forwarded after all (a
#: late packet of a layer above the target): 4 octets, the last one their count
_PADDING = b"\x00\x00\x00\x04"
#: AV1: the temporal unit of the next packet is not known to be a new one
_UNIT_UNKNOWN = -2
#: descriptors kept for retransmissions when nothing said how many (the history's default)
_HEADS = 1024

#: what the layered path sent a recent packet with: (output seq, payload descriptor, input
#: descriptor size, marker or None: as received, dependency descriptor or None: as received)
_Head = tuple[int, bytes, int, bool | None, bytes | None]

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
        "layered",
        "_max_spatial",
        "_max_temporal",
        "_renumber_vp8",
        "_vp8_filtered",
        "_codec",
        "av1",
        "_capacity",
        "vp8",
        "vp9",
        "new_source",
        "heads",
        "_adopt",
        "_layer_asked",
        "_unit_ts",
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
        #: the packets' payload descriptors are read and rewritten (VP8 simulcast renumbering,
        #: layers filtered within the stream): the one test the packet path makes for all this
        self.layered = False
        self._max_spatial: int | None = None
        self._max_temporal: int | None = None
        #: VP8 simulcast: the descriptors are renumbered whatever the layers (rewrite_vp8)
        self._renumber_vp8 = False
        #: VP8: temporal layers were filtered once (the rewriter stays: its numbering is the
        #: subscriber's now); the codec, lower case
        self._vp8_filtered = False
        self._codec = track.codec.name.lower()
        #: descriptors kept for retransmissions (the track's history capacity)
        self._capacity = _HEADS
        #: VP8: PictureID and TL0PICIDX renumbered so that the subscriber's decoder sees one
        #: stream across simulcast layer switches and dropped temporal layers
        self.vp8: Vp8Rewriter | None = None
        #: VP9: the spatial and temporal layers forwarded, PictureID and TL0PICIDX continuous
        self.vp9: Vp9Rewriter | None = None
        #: AV1 (dependency descriptor): the decode target forwarded
        self.av1: DecodeTargetSelector | None = None
        #: the next packet starts a new source (for the descriptor rewriters)
        self.new_source = False
        #: (output seq, descriptor, input descriptor size, marker or None: as received,
        #: dependency descriptor or None: as received) of recent packets sent by the layered
        #: path, by output seq (for retransmissions)
        self.heads: list[_Head | None] = []
        #: a rewriter is wanted on a stream forwarded unchanged so far: it takes over at the
        #: next picture start, continuing its numbering (no keyframe needed to go down)
        self._adopt = False
        #: when a keyframe was last asked for to go up a spatial layer
        self._layer_asked = float("-inf")
        #: AV1: the RTP timestamp of the latest packet (a new one starts a temporal unit)
        self._unit_ts = -1
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
        self.new_source = True

    def rewrite_vp8(self, enabled: bool, capacity: int) -> None:
        """Renumber VP8 descriptors (simulcast layers of a VP8 track) or stop doing so;
        ``capacity``: how many recent packets' descriptors are kept for retransmissions. A
        stream that filters temporal layers keeps renumbering whatever ``enabled`` says."""
        self._renumber_vp8 = enabled
        self._capacity = capacity
        if not enabled and not self._vp8_filtered:
            self.vp8 = None
        self._configure()
        if not self.layered:
            self.heads = []

    # -- layers within the stream: what the layer allocation sets ---------------------------
    @property
    def max_spatial(self) -> int | None:
        """The highest spatial layer forwarded (0: the lowest), None: all of them.

        Set by the layer allocation (any time, from the control plane): VP9 SVC streams
        forward the spatial layers 0..max_spatial of every picture, going down at the next
        picture and up at the next keyframe, which setting a higher value asks the publisher
        for (force=True) and asks again every :data:`LAYER_UP_RETRY` seconds while the
        stream waits. AV1 streams with the dependency descriptor forward the frames of the
        best decode target within max_spatial and max_temporal (going up at a switch point
        or a keyframe, asked for alike). VP8 ignores it (its simulcast layers are tracks of
        their own: ``target``). What a track's layers are: ``Track.svc``."""
        return self._max_spatial

    @max_spatial.setter
    def max_spatial(self, value: int | None) -> None:
        self.set_layers(value, self._max_temporal)

    @property
    def max_temporal(self) -> int | None:
        """The highest temporal layer forwarded (0: the base layer), None: all of them.

        Set by the layer allocation (e.g. from the subscriber's ``max_fps`` and
        ``Track.svc.frame_rates``): VP8 and VP9 streams forward temporal layers
        0..max_temporal, going down at the next picture and up at the next picture the
        publisher marks as a switching point (VP8 Y, VP9 U) or a keyframe; no keyframe is
        asked for. AV1: see :attr:`max_spatial`."""
        return self._max_temporal

    @max_temporal.setter
    def max_temporal(self, value: int | None) -> None:
        self.set_layers(self._max_spatial, value)

    def set_layers(self, spatial: int | None, temporal: int | None) -> None:
        """Set :attr:`max_spatial` and :attr:`max_temporal` at once (None: all)."""
        for value in (spatial, temporal):
            if value is not None and (isinstance(value, bool) or not 0 <= value <= 7):
                raise ValueError(f"a layer id is 0..7 or None, not {value!r}")
        if spatial == self._max_spatial and temporal == self._max_temporal:
            return
        going_up = spatial is None or (
            self._max_spatial is not None and spatial > self._max_spatial
        )
        self._max_spatial = spatial
        self._max_temporal = temporal
        self._configure()
        vp9 = self.vp9
        waiting = (vp9 is not None and vp9.current_sid < vp9.target_sid) or (
            self.av1 is not None and self.av1.waiting
        )
        if going_up and waiting:
            self._ask_layer_up(self.track.ctx.clock())

    def _configure(self) -> None:
        """Create or retarget the descriptor rewriters after a change of wishes."""
        codec = self.track.codec.name.lower()
        spatial = 7 if self._max_spatial is None else self._max_spatial
        temporal = 7 if self._max_temporal is None else self._max_temporal
        filtering = self._max_spatial is not None or self._max_temporal is not None
        self._codec = codec
        if codec == "vp8":
            if self._max_temporal is not None:
                self._vp8_filtered = True
            if self.vp8 is not None:
                self.vp8.forward(min(temporal, 3))
            elif self._renumber_vp8:
                self.vp8 = Vp8Rewriter(tid=min(temporal, 3))
                self.new_source = True
            elif self._max_temporal is not None:
                self._adopt = True  # made by the packet path (_adopt_vp8)
            # a rewriter once used is kept: the subscriber's numbering is its own now
            self.layered = self.vp8 is not None or self._adopt
        elif codec == "vp9":
            if self.vp9 is not None:
                self.vp9.forward(spatial, temporal)
            elif filtering:
                self._adopt = True  # made by the packet path (_adopt_vp9)
            self.layered = self.vp9 is not None or self._adopt
        elif codec == "av1":
            if self.av1 is not None:
                self.av1.set_layers(spatial, temporal)
            elif filtering:
                continuing = not self.rewriter.starting
                self.av1 = DecodeTargetSelector(spatial, temporal, continuing=continuing)
                # mid-stream, the next packet may be in the middle of a temporal unit
                self._unit_ts = _UNIT_UNKNOWN if continuing else -1
            self.layered = self.av1 is not None
        if self.layered and len(self.heads) != self._capacity:
            self.heads = [None] * self._capacity

    def _ask_layer_up(self, now: float) -> None:
        self._layer_asked = now
        self.track.keyframes.request(now, force=True)

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
        there is none: a packet from before the current source, a layer not forwarded, or a
        protection failure)."""
        if self.layered:
            return self._forward_layers(plain, offset, seq, ts, elements, size, now, batch)
        rewritten = self.rewriter.rewrite(seq, ts, now)
        if rewritten is None:
            self.metrics.drops["stale_packet"] += 1
            return 0
        out_seq, out_ts = rewritten
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

    def _forward_layers(
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
        """:meth:`forward` of a stream whose payload descriptors are rewritten: the packet's
        layers decide whether it is forwarded, and its descriptor is renumbered."""
        descriptor: bytes | None = None
        desc_size = 0
        marker: bool | None = None
        dd: bytes | None = None
        try:
            if self._codec == "av1":
                picked = self._select_av1(plain, ts, elements, now)
                if picked is None:
                    return self._not_forwarded(plain, offset, seq, ts, elements, size, now, batch)
                marker, dd, elements = picked
            elif self._codec == "vp9":
                desc9 = parse_vp9(plain, offset)
                vp9 = self.vp9
                if vp9 is None and self._adopt:
                    vp9 = self._adopt_vp9(desc9)
                if vp9 is not None:
                    result = vp9.rewrite(desc9, plain[1] >= 0x80, self.new_source)
                    self.new_source = False
                    if result is None:
                        return self._not_forwarded(
                            plain, offset, seq, ts, elements, size, now, batch
                        )
                    descriptor, marker = result
                    desc_size = desc9.size
                    if (
                        vp9.current_sid < vp9.target_sid
                        and now - self._layer_asked >= LAYER_UP_RETRY
                        and desc9.begin
                        and desc9.sid == 0
                        and self._missing_layer(vp9.current_sid)
                    ):
                        self._ask_layer_up(now)
            else:
                desc8 = parse_vp8(plain, offset)
                vp8 = self.vp8
                if vp8 is None and self._adopt:
                    vp8 = self._adopt_vp8(desc8)
                if vp8 is not None:
                    descriptor = vp8.rewrite(desc8, self.new_source)
                    self.new_source = False
                    if descriptor is None:
                        return self._not_forwarded(
                            plain, offset, seq, ts, elements, size, now, batch
                        )
                    desc_size = desc8.size
        except (Vp8Error, Vp9Error):
            self.metrics.drops["rtp_malformed"] += 1
            return 0
        rewritten = self.rewriter.rewrite(seq, ts, now)
        if rewritten is None:
            self.metrics.drops["stale_packet"] += 1
            return 0
        out_seq, out_ts = rewritten
        heads = self.heads
        if descriptor is not None:
            heads[out_seq % len(heads)] = (out_seq, descriptor, desc_size, marker, dd)
            plain = _rewritten(plain, offset, descriptor, desc_size, marker)
        else:  # the payload as received (AV1; or a rewriter is yet to take over)
            heads[out_seq % len(heads)] = (out_seq, b"", 0, marker, dd)
            if marker is not None:
                plain = _rewritten(plain, offset, b"", 0, marker)
        return self._send(plain, offset, out_seq, out_ts, elements, size, now, batch)

    def _select_av1(
        self, plain: bytes, ts: int, elements: list[tuple[int, bytes]], now: float
    ) -> tuple[bool, bytes | None, list[tuple[int, bytes]]] | None:
        """AV1 with the dependency descriptor: None when the packet's frame is not in the
        decode target forwarded; else the RTP marker it must carry, the descriptor written for
        the subscriber (None: as received) and the elements to send with it."""
        selector = self.av1
        svc = getattr(self.track, "svc", None)
        dd_id = svc.dd_id if svc is not None else 0
        value = next((v for i, v in elements if i == dd_id), None) if dd_id else None
        marker = plain[1] >= 0x80
        if selector is None or value is None:
            return marker, None, elements  # nothing to select with: every packet
        try:
            frame = parse_dependency_descriptor(value, svc.structure)  # type: ignore[union-attr]
        except DependencyDescriptorError:
            # a frame that needs a structure not received (a lost keyframe packet)
            if now - self._layer_asked >= LAYER_UP_RETRY:
                self._ask_layer_up(now)
            return None
        # a new RTP timestamp: a new temporal unit (not known for the first packet mid-stream)
        unit_start = ts != self._unit_ts and self._unit_ts != _UNIT_UNKNOWN
        self._unit_ts = ts
        if not selector.forward(frame, unit_start):
            return None
        if selector.waiting and frame.start_of_frame and now - self._layer_asked >= LAYER_UP_RETRY:
            self._ask_layer_up(now)
        dd: bytes | None = None
        if (
            frame.new_structure
            or frame.active_decode_targets_bitmask is not None
            or (frame.start_of_frame and selector.filtering())
        ):
            dd = write_with_bitmask(frame, selector.bitmask())
            elements = [(i, dd if i == dd_id else v) for i, v in elements]
        return selector.picture_end(frame, marker), dd, elements

    def _adopt_vp9(self, desc: Vp9Descriptor) -> Vp9Rewriter | None:
        """The VP9 rewriter of a stream that was forwarded unchanged: it takes over at the first
        packet of a picture, the numbering going on (or, when the stream starts over anyway, at
        the next keyframe); None until then."""
        if not self.rewriter.starting and not (desc.begin and desc.sid == 0):
            return None
        self.vp9 = vp9 = Vp9Rewriter(
            spatial=7 if self._max_spatial is None else self._max_spatial,
            temporal=7 if self._max_temporal is None else self._max_temporal,
        )
        if self.rewriter.starting:
            self.new_source = True
        else:
            vp9.continue_from(desc)
            self.new_source = False
        self._adopt = False
        return vp9

    def _adopt_vp8(self, desc: Vp8Descriptor) -> Vp8Rewriter | None:
        """:meth:`_adopt_vp9` for VP8 temporal layers."""
        if not self.rewriter.starting and not desc.frame_start:
            return None
        self.vp8 = vp8 = Vp8Rewriter(
            tid=3 if self._max_temporal is None else min(self._max_temporal, 3)
        )
        if self.rewriter.starting:
            self.new_source = True
        else:
            vp8.continue_from(desc)
            self.new_source = False
        self._adopt = False
        return vp8

    def _missing_layer(self, current: int) -> bool:
        """Whether the track has sent a spatial layer above ``current`` lately (else going up
        has nothing to wait for)."""
        svc = getattr(self.track, "svc", None)
        return svc is not None and svc.spatial_layers > current + 1

    def _not_forwarded(
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
        """A packet not forwarded: the numbering closes up over it, or, when its output number
        was already skipped over (a late packet), that number gets a padding-only packet,
        which the subscriber takes as received instead of NACKing it."""
        reserved = self.rewriter.drop(seq)
        if reserved is None:
            return 0
        out_ts = (ts + self.rewriter.ts_offset) & 0xFFFFFFFF
        padding = bytes(((plain[0] & 0xDF) | 0x20, plain[1] & 0x7F)) + plain[2:offset] + _PADDING
        return self._send(padding, offset, reserved, out_ts, elements, size, now, batch)

    def _send(
        self,
        plain: bytes,
        offset: int,
        out_seq: int,
        out_ts: int,
        elements: list[tuple[int, bytes]],
        size: int,
        now: float,
        batch: list[tuple[bytes, Address]],
    ) -> int:
        """The end of :meth:`forward` (which has it inline) for the other paths: transport-wide
        stamp, extensions, header rewrite, protection, the batch and the counters."""
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
        transport-wide stamp (for retransmissions: :meth:`forward` builds it inline). With
        rewritten descriptors, the descriptor (and marker bit) is the one that packet was first
        sent with."""
        if self.layered:
            heads = self.heads
            entry = heads[out_seq % len(heads)] if heads else None
            if entry is not None and entry[0] == out_seq:
                _seq, descriptor, size, marker, dd = entry
                plain = _rewritten(plain, offset, descriptor, size, marker)
                if dd is not None:
                    svc = getattr(self.track, "svc", None)
                    dd_id = svc.dd_id if svc is not None else 0
                    elements = [(i, dd if i == dd_id else v) for i, v in elements]
            elif self.vp8 is not None or self.vp9 is not None or self.av1 is not None:
                raise RtpError("the packet's payload descriptor is no longer known")
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


def _rewritten(
    plain: bytes, offset: int, descriptor: bytes, size: int, marker: bool | None
) -> bytes:
    """``plain`` with its payload descriptor (``size`` octets at ``offset``) replaced, and its
    RTP marker bit set to ``marker`` unless None."""
    if marker is None or marker == (plain[1] >= 0x80):
        return plain[:offset] + descriptor + plain[offset + size :]
    second = (plain[1] & 0x7F) | (0x80 if marker else 0)
    return b"".join(
        (plain[:1], bytes((second,)), plain[2:offset], descriptor, plain[offset + size :])
    )
