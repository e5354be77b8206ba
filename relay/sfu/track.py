"""Track: one stream a participant publishes (one m-line of its publisher connection), and its
fan-out to the subscribers' outbound streams.

:meth:`Track.receive` is the middle of the packet path: the publisher leg hands it every plain
packet routed to the track; it keeps the receive statistics, NACK generation and the packet
history, and makes one protected copy per active outbound stream, sent as one batch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from relay.rtc import rtcp
from relay.rtc.codecs import KeyframeStart, keyframe_detector, keyframe_size_reader
from relay.rtc.dependency_descriptor import DEPENDENCY_DESCRIPTOR_URI
from relay.rtc.nack import PacketHistory
from relay.rtc.rtp import ReceiveStatistics
from relay.rtc.sdp import Codec
from relay.rtc.transport import Address
from relay.sfu.feedback import KeyframeRequester, NackRequester
from relay.sfu.svc import LayerStats, layered_codec

if TYPE_CHECKING:
    from relay.sfu.leg import MediaContext
    from relay.sfu.outbound import OutboundStream
    from relay.sfu.participant import Participant
    from relay.sfu.subscription import Subscription

#: seconds a packet stays in a track's history (older is not worth resending)
HISTORY_AGE = 2.0
#: ticks (seconds) over which a track's peak bit rate is taken
PEAK_SECONDS = 4

_pack_ssrc = struct.Struct("!I").pack_into


class PipeTap:
    """One worker pipe a track (or simulcast layer) is copied to: the peer worker's pipe
    address, the SSRC the copies carry there, the pipe socket's batch send (one per
    worker: every tap of a track sends through the same one), and whether the peer wants the
    copies now (its subscribers receive or move to this stream; relay/workers/pipe.py)."""

    __slots__ = ("ssrc", "addr", "send", "packets", "wanted")

    def __init__(
        self,
        ssrc: int,
        addr: Address,
        send: Callable[[list[tuple[bytes | bytearray, Address]]], object],
    ) -> None:
        self.ssrc = ssrc
        self.addr = addr
        self.send = send
        #: packets copied to the pipe
        self.packets = 0
        #: the peer wants this stream (until it says otherwise: a new tap copies everything);
        #: while False nothing of it is sent there, packets, sender reports nor BYE
        self.wanted = True


class Recorder(Protocol):
    """A recording file a track's packets are written to (``relay.recording.writer.TrackFile``):
    takes one plain RTP packet, never blocks."""

    def packet(self, plain: bytes, offset: int, seq: int, ts: int, now: float) -> None: ...


class Upstream(Protocol):
    """Where the feedback of a track imported from another worker goes (the pipe back to
    the worker its publisher is connected to) instead of a publisher leg."""

    def send_keyframe_request(self, track: Track) -> None:
        """Ask for a keyframe of ``track`` (a PLI on its pipe SSRC)."""

    def send_nack(self, track: Track, lost: list[int]) -> None:
        """Ask for the packets ``lost`` of ``track`` again (a NACK on its pipe SSRC)."""

    def layers_changed(self, track: Track) -> None:
        """Which of ``track``'s streams (its simulcast layers, or itself) the subscribers here
        receive or move to may have changed (told to the exporting worker when it did)."""


class Track:
    """A published audio or video stream and the subscriptions it feeds."""

    def __init__(
        self,
        ctx: MediaContext,
        track_id: str,
        participant: Participant,
        kind: str,
        mid: str,
        codec: Codec,
        ext_uris: dict[int, str],
    ) -> None:
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.track_id = track_id
        #: the publishing participant
        self.participant = participant
        self.kind = kind
        self.mid = mid
        self.codec = codec
        self.clock_rate = codec.clock_rate
        #: publisher's payload type of the forwarded codec; anything else is dropped
        self.payload_type = codec.payload_type
        self.ext_uris = ext_uris
        self.ssrc: int | None = None
        #: the publisher's SDP names the media SSRC (else it is learned from packets)
        self.ssrc_signalled = False
        #: highest sequence number seen on the media SSRC (-1: none yet); a packet that raises
        #: it is the track's newest, the only kind a subscription may start on
        self.highest_seq = -1
        #: whether a packet is the first of a keyframe (None: audio, any newest packet will do)
        self.keyframe_start: KeyframeStart | None = (
            keyframe_detector(codec.name) if kind == "video" else None
        )
        self.rtx_ssrc: int | None = None
        #: the publisher's RTX payload type, when it retransmits on an RTX stream
        self.rtx_payload_type: int | None = None
        #: loss detection on the publisher's leg (video with NACK negotiated)
        self.nack: NackRequester | None = None
        #: the packets received, as the publisher sent them, for subscribers' NACKs (one
        #: history per track, whatever the number of subscribers; video with NACK enabled)
        self.history: PacketHistory | None = None
        self.keyframes = KeyframeRequester(ctx, self)
        self.rtx_received = 0
        self.muted = False
        #: muted by a moderator through the API: nothing of it is forwarded, piped or recorded
        #: (set on the track and each of its simulcast layers)
        self.moderated = False
        #: recording files this stream's packets go to (relay/sfu/recording.py)
        self.recorders: list[Recorder] = []
        #: active outbound streams, in the order they became active: the fan-out iterates this
        self.outputs: list[OutboundStream] = []
        #: every subscription of this track, by subscriber participant id
        self.subscriptions: dict[str, Subscription] = {}
        self.stats: ReceiveStatistics | None = None
        #: (ntp timestamp, rtp timestamp, arrival) of the publisher's latest sender report
        self.last_sr: tuple[int, int, float] | None = None
        self.packets = 0
        self.bytes = 0
        self.bitrate = 0.0
        #: the highest per-second bit rate of the last PEAK_SECONDS ticks (keyframe bursts
        #: included: what a subscriber's path must carry for this track or layer)
        self.peak_bitrate = 0.0
        self._recent_bitrates: list[float] = []
        self._bytes_at_tick = 0
        self.ended = False
        #: publisher's id of ssrc-audio-level (0: none), and the levels seen since the last tick
        self.audio_level_id = 0
        self.level_sum = 0
        self.level_count = 0
        self.last_media = 0.0
        #: simulcast: the layers of this track (each a Track of its own with its SSRCs,
        #: statistics, loss recovery and fan-out; this one then receives nothing itself),
        #: and, on a layer, the track it belongs to and its rid
        self.layers: list[Track] = []
        self.parent: Track | None = None
        self.rid: str | None = None
        #: on a layer: streams that move here from another layer at this layer's next
        #: keyframe, the picture size its keyframes announce (VP8), its latest packet
        self.pending: list[OutboundStream] = []
        self.width = 0
        self.height = 0
        self.last_packet = 0.0
        self._vp8 = codec.name.lower() == "vp8"
        #: on a simulcast track: the rids last announced as wanted (publisher.layers)
        self.wanted_layers: list[str] | None = None
        #: layers within the RTP stream (VP8 temporal layers, VP9 SVC, AV1 with the dependency
        #: descriptor): which exist, their picture sizes where known, their bit and frame
        #: rates, counted while the track has active subscribers and summarised by tick() once
        #: a second, for the layer allocation (OutboundStream.max_spatial / max_temporal).
        #: None for other codecs, and from when a VP8 stream turns out to have no temporal
        #: layers.
        self.svc: LayerStats | None = (
            LayerStats(codec.name, self._dd_id())
            if kind == "video" and layered_codec(codec.name)
            else None
        )
        #: other workers this track's packets are copied to (relay/workers/pipe.py), on the
        #: track or layer that receives them
        self.pipes: list[PipeTap] = []
        #: local fan-outs handed to ``ctx.defer`` and not run yet: while there are any, the
        #: next packet's waits behind them, so subscribers get the packets in order
        self.fan_outs_deferred = 0
        #: a track imported from another worker (and each of its layers): where its keyframe
        #: requests, NACKs and layer choices go (None: a local track, the publisher leg's)
        self.upstream: Upstream | None = None

    def _dd_id(self) -> int:
        """The publisher's id of the dependency descriptor extension (0: not negotiated)."""
        return next((i for i, uri in self.ext_uris.items() if uri == DEPENDENCY_DESCRIPTOR_URI), 0)

    @property
    def participant_id(self) -> str:
        return self.participant.participant_id

    def set_ssrc(self, ssrc: int, now: float) -> None:
        """Bind the media SSRC (from SDP or learnt from the mid extension or payload type);
        every subscription switches to the new source at its next keyframe."""
        if self.ssrc != ssrc:
            previous, self.ssrc = self.ssrc, ssrc
            self.restart_source(now)
            if self.pipes and previous is not None:
                self.restart_pipes()

    @property
    def piped(self) -> bool:
        """Another worker wants this stream's packets now (a wanted :class:`PipeTap`)."""
        return any(tap.wanted for tap in self.pipes)

    def restart_pipes(self) -> None:
        """The stream copied to other workers starts over (a new SSRC, a new layer in the
        place of the one piped): the copies keep their pipe SSRC, so a BYE on it tells the
        importers to start over too (those that do not want it now start over when they
        want it again)."""
        batch: list[tuple[bytes | bytearray, Address]] = [
            (rtcp.bye([tap.ssrc]), tap.addr) for tap in self.pipes if tap.wanted
        ]
        if batch:
            self.pipes[0].send(batch)

    def restart_source(self, now: float) -> None:
        """The stream starts over (a new SSRC; for an imported track, a BYE on the pipe): its
        numbering, statistics, loss detection and history are new, and every subscription
        switches to it at its next keyframe."""
        ssrc = self.ssrc
        assert ssrc is not None
        self.highest_seq = -1
        self.stats = ReceiveStatistics(ssrc, self.clock_rate)
        if self.nack is not None:
            self.nack.generator.reset()
        if self.history is not None:
            self.history.clear()
        for sub in self.subscriptions.values():
            sub.stream.restart(now)
        for stream in self.outputs if self.parent is not None else ():
            stream.restart(now)  # a layer's new source: the streams on it start over

    def enable_retransmission(self, nack: bool, history_size: int) -> None:
        """NACK generation upstream (``nack``) and the history that answers subscribers."""
        if nack and self.nack is None:
            self.nack = NackRequester(self.ctx, self)
        elif not nack and self.nack is not None:
            self.nack.close()
            self.nack = None
        if self.kind == "video" and history_size and self.history is None:
            self.history = PacketHistory(history_size, max_age=HISTORY_AGE)

    def rebuild_outputs(self) -> None:
        """Recompute the fan-out lists after any subscription changed state. With simulcast,
        each active stream is forwarded from the layer it is on (``stream.track``) and, when
        its target layer is another one, waits in that layer's :attr:`pending` list for a
        keyframe; a stream on none of the layers starts on its target."""
        active = [s.stream for s in self.subscriptions.values() if s.active]
        layers = self.layers
        if not layers:
            self.outputs = active
            if self.upstream is not None:
                self.upstream.layers_changed(self)
            return
        outputs: dict[int, list[OutboundStream]] = {id(layer): [] for layer in layers}
        pending: dict[int, list[OutboundStream]] = {id(layer): [] for layer in layers}
        for stream in active:
            target = stream.target if stream.target in layers else layers[-1]
            current = stream.track
            if current not in layers:
                stream.track = current = target
                stream.target = target
            outputs[id(current)].append(stream)
            if target is not current:
                pending[id(target)].append(stream)
        for layer in layers:
            layer.outputs = outputs[id(layer)]
            layer.pending = pending[id(layer)]
        if self.upstream is not None:
            self.upstream.layers_changed(self)

    def used_layers(self) -> list[Track]:
        """The streams of this track that its active subscriptions receive, move to, or
        would rather get (with simulcast: the layers each stream is on, targets and wants;
        a stream on none of them yet counts the top layer, where it starts), else the track
        itself while one subscription is active. ``publisher.layers`` announces these as
        wanted; an imported track tells its exporter (relay/workers/pipe.py)."""
        layers = self.layers
        active = [s.stream for s in self.subscriptions.values() if s.active]
        if not layers:
            return [self] if active else []
        used: set[int] = set()
        for stream in active:
            on = [t for t in (stream.track, stream.target, stream.wanted) if t in layers]
            used.update(id(t) for t in on or layers[-1:])
        return [t for t in layers if id(t) in used]

    @property
    def renumbers_vp8(self) -> bool:
        """VP8 simulcast: the subscribers' streams renumber the VP8 descriptors, whose
        PictureID and TL0PICIDX sequences differ from layer to layer."""
        return bool(self.layers) and self._vp8

    def receive_streams(self) -> list[Track]:
        """The tracks that receive packets: the layers with simulcast, else this one."""
        return self.layers or [self]

    def _layer_keyframe(self, plain: bytes, offset: int, now: float) -> None:
        """A newest packet of a simulcast layer: at the first packet of a keyframe, note the
        picture size and take over the streams waiting to switch to this layer."""
        keyframe_start = self.keyframe_start
        if keyframe_start is None or not keyframe_start(plain, offset):
            return
        self.keyframes.arrived = now
        read_size = keyframe_size_reader(self.codec.name)  # VP8 header, H.264 SPS
        if read_size is not None:
            size = read_size(plain, offset)
            if size is not None:
                self.width, self.height = size
        if not self.pending:
            return
        moving = self.pending
        self.pending = []
        for stream in moving:
            old = stream.track
            if old is not self:
                old.outputs = [s for s in old.outputs if s is not stream]
                stream.track = self
                stream.switch_source()
                stream.start_by = now
        self.outputs = self.outputs + [s for s in moving if s not in self.outputs]
        if self.upstream is not None and self.parent is not None:
            self.upstream.layers_changed(self.parent)  # the layers left may be unused now

    # -- the packet path ------------------------------------------------------------------
    def receive(
        self,
        plain: bytes,
        seq: int,
        ts: int,
        offset: int,
        elements: list[tuple[int, bytes]],
        size: int,
        now: float,
    ) -> None:
        """One plain packet of the media SSRC (or unwrapped from RTX): account for it and
        send a copy to every active outbound stream."""
        # only the track's newest packet may start a subscription: never a retransmission or
        # a late packet, whose successors were already forwarded to the others
        highest = self.highest_seq
        newest = highest < 0 or 0 < ((seq - highest) & 0xFFFF) < 0x8000
        if newest:
            self.highest_seq = seq
            if self.parent is not None:
                self.last_packet = now
                self._layer_keyframe(plain, offset, now)
        metrics = self.metrics
        metrics.packets_in += 1
        metrics.bytes_in += size
        self.packets += 1
        self.bytes += size
        self.stats.update(seq, ts, now, size)  # type: ignore[union-attr]
        if self.nack is not None:
            self.nack.on_packet(seq, now)
        if self.history is not None:
            self.history.store(seq, plain, now)
        level_id = self.audio_level_id
        if level_id:
            for ext_id, value in elements:
                if ext_id == level_id and value:
                    self.level_sum += value[0] & 0x7F
                    self.level_count += 1
        if self.moderated:
            return
        if self.recorders:
            for recorder in self.recorders:
                recorder.packet(plain, offset, seq, ts, now)
        if self.pipes or self.fan_outs_deferred:
            piped = self._pipe(plain, offset, now) if self.pipes else 0
            defer = self.ctx.defer
            if defer is not None and self.outputs and (piped or self.fan_outs_deferred):
                # the copies for the other workers first: the local fan-out of this packet
                # waits until the datagrams read with it have been piped too (in order)
                self.fan_outs_deferred += 1
                defer(self._deferred_fan_out, plain, seq, ts, offset, elements, size, now, newest)
                return
        self._fan_out(plain, seq, ts, offset, elements, size, now, newest)

    def _deferred_fan_out(self, *packet: Any) -> None:
        """:meth:`_fan_out` of a packet whose turn came (its arguments as given to it)."""
        self.fan_outs_deferred -= 1
        self._fan_out(*packet)

    def _fan_out(
        self,
        plain: bytes,
        seq: int,
        ts: int,
        offset: int,
        elements: list[tuple[int, bytes]],
        size: int,
        now: float,
        newest: bool,
    ) -> None:
        """One copy of the packet to every active outbound stream, sent as one batch."""
        outputs = self.outputs
        if not outputs:
            return
        metrics = self.metrics
        svc = self.svc
        if svc is not None:
            svc.count(plain, offset, elements, size)
            if svc.temporal is False:  # VP8 without temporal layers: nothing to count
                self.svc = None
        batch: list[tuple[bytes, Address]] = []
        sent = 0
        startable: bool | None = None
        for stream in outputs:
            if stream.rewriter.starting:
                if startable is None:
                    keyframe_start = self.keyframe_start
                    startable = newest and (keyframe_start is None or keyframe_start(plain, offset))
                    if startable:
                        self.keyframes.arrived = now
                if not startable and not (newest and now >= stream.start_by):
                    metrics.keyframe_waits += 1
                    continue
            sent += stream.forward(plain, offset, seq, ts, elements, size, now, batch)
        if batch:
            self.ctx.sender.send(batch)
            metrics.packets_out += len(batch)
            metrics.bytes_out += sent
        metrics.forward_latency.observe(self.ctx.clock() - now)

    def _pipe(self, plain: bytes, offset: int, now: float) -> int:
        """One copy of the packet per pipe that wants it, with the pipe's SSRC, sent as one
        batch; how many. While a keyframe asked for is still to come, whether this packet
        starts it (an importer's request then goes out again at once, as a local subscriber's
        would)."""
        keyframes = self.keyframes
        keyframe_start = self.keyframe_start
        if (
            keyframe_start is not None
            and keyframes.arrived < keyframes.last
            and keyframe_start(plain, offset)
        ):
            keyframes.arrived = now
        pipes = self.pipes
        batch: list[tuple[bytes | bytearray, Address]] = []
        for tap in pipes:
            if tap.wanted:
                copy = bytearray(plain)
                _pack_ssrc(copy, 8, tap.ssrc)
                batch.append((copy, tap.addr))
                tap.packets += 1
        if batch:
            send_soon = self.ctx.send_soon
            if send_soon is not None:
                send_soon(pipes[0].send, batch)
            else:
                pipes[0].send(batch)
        return len(batch)

    def close(self) -> None:
        """The track ended: stop its timers (and its layers')."""
        self.keyframes.close()
        if self.nack is not None:
            self.nack.close()
        for layer in self.layers:
            layer.ended = True
            layer.close()

    # -- housekeeping and views -----------------------------------------------------------
    def tick(self, interval: float) -> None:
        self.bitrate = (self.bytes - self._bytes_at_tick) * 8 / interval if interval > 0 else 0.0
        self._bytes_at_tick = self.bytes
        recent = self._recent_bitrates
        recent.append(self.bitrate)
        if len(recent) > PEAK_SECONDS:
            del recent[0]
        self.peak_bitrate = max(recent)
        svc = self.svc
        if svc is not None:
            svc.dd_id = self._dd_id()  # the publisher may have renegotiated its ids
            svc.tick(interval)

    def to_dict(self) -> dict[str, Any]:
        return {
            "track_id": self.track_id,
            "participant_id": self.participant_id,
            "kind": self.kind,
            "codec": self.codec.mime_type,
            "mid": self.mid,
            "muted": self.muted or self.moderated,
            "moderated": self.moderated,
            "simulcast_layers": [layer.layer_dict() for layer in self.layers],
        }

    def layer_dict(self) -> dict[str, Any]:
        """A simulcast layer as the API shows it."""
        return {
            "rid": self.rid,
            "ssrc": self.ssrc,
            "width": self.width or None,
            "height": self.height or None,
            "bitrate": self.bitrate,
        }

    def stats_dict(self) -> dict[str, Any]:
        if self.layers:
            layers = [layer.stats_dict() for layer in self.layers]
            out = dict(layers[-1]) if layers else {}
            out.update(
                track_id=self.track_id,
                ssrc=None,
                packets=sum(x["packets"] for x in layers),
                bytes=sum(x["bytes"] for x in layers),
                bitrate=sum(x["bitrate"] for x in layers),
                layers=layers,
            )
            return out
        st = self.stats
        generator = self.nack.generator if self.nack is not None else None
        return {
            "track_id": self.track_id,
            "kind": self.kind,
            "direction": "inbound",
            "ssrc": self.ssrc,
            "packets": self.packets,
            "bytes": self.bytes,
            "packets_lost": max(0, st.packets_lost) if st else 0,
            "fraction_lost": (st.fraction_lost / 256.0) if st else 0.0,
            "jitter": (st.jitter / self.clock_rate) if st else 0.0,
            # measured from NACK to retransmission: known once loss has been repaired
            "round_trip_time": generator.rtt if generator else None,
            "bitrate": self.bitrate,
            "nacks_sent": generator.nacks_sent if generator else 0,
            "retransmissions_received": self.rtx_received,
            "lost_unrepaired": generator.lost_unrepaired if generator else 0,
            **(
                {"rid": self.rid, "width": self.width, "height": self.height} if self.parent else {}
            ),
            # layers within the stream (VP8 temporal, VP9, AV1), once some were seen
            **({"svc": self.svc.to_dict()} if self.svc is not None and self.svc.bitrates else {}),
        }
