"""Subscription: one track offered to one participant, what was negotiated for it, and the
outbound stream that carries it once it is active."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.rtc.rtp import SequenceRewriter
from relay.sfu.outbound import OutboundStream

if TYPE_CHECKING:
    from relay.metrics import Metrics
    from relay.sfu.participant import Participant
    from relay.sfu.track import Track


#: the subscriber's wishes, as PUT .../subscriptions/{track_id} sets them
PREFERENCES = ("paused", "max_width", "max_height", "max_fps", "priority")


@dataclass(slots=True)
class Continuation:
    """What a WHEP viewer's m-line keeps of a subscription whose track ended, for the next
    track it takes (a viewer cannot renegotiate, so its answer's SSRCs and payload types stay
    the m-line's): where the numbering and the sender report's counts stopped, the wishes."""

    ssrc: int
    rtx_ssrc: int
    payload_type: int
    rtx_payload_type: int | None
    answer_extmaps: dict[str, int]
    preferences: dict[str, Any]
    rewriter: SequenceRewriter
    packets_sent: int
    payload_bytes: int
    bytes_sent: int


class Subscription:
    """A track as offered on one subscriber connection's m-line."""

    def __init__(
        self,
        track: Track,
        participant: Participant,
        mid: str,
        payload_type: int,
        metrics: Metrics,
    ) -> None:
        self.track = track
        #: the subscribing participant
        self.participant = participant
        self.mid = mid
        self.payload_type = payload_type
        #: the packet path's end for this subscriber
        self.stream = OutboundStream(track, payload_type, metrics, participant)
        self.rtx_ssrc = secrets.randbits(32) or 1
        #: the RTX payload type offered, when the relay offers retransmissions
        self.rtx_payload_type: int | None = None
        #: header extensions the subscriber's answer accepted: URI -> id
        self.answer_extmaps: dict[str, int] = {}
        #: the subscriber's answer covering this subscription was applied
        self.negotiated = False
        #: forwarded right now (negotiated, transport connected, not ended)
        self.active = False
        #: why the subscriber's latest answer did not take this track, None if it did
        self.declined: str | None = None
        #: the subscriber's wishes (PUT .../subscriptions/{track_id}): a paused subscription
        #: is not forwarded; the size and rate limits choose among a track's layers
        self.paused = False
        self.max_width: int | None = None
        self.max_height: int | None = None
        self.max_fps: float | None = None
        #: bandwidth shares go to higher priorities first (0-10; a screen share, say)
        self.priority = 0
        #: the bandwidth allocation's memory of this stream's moves: when it last moved up a
        #: layer, how many moves up in a row had to be taken back soon after, and until when
        #: it may not move up again (relay/sfu/sfu.py _allocate_subscriber)
        self.raised_at = float("-inf")
        self.failed_raises = 0
        self.hold_until = float("-inf")
        self.bitrate = 0.0
        self._bytes_at_tick = 0

    @property
    def ssrc(self) -> int:
        return self.stream.ssrc

    def retire(self) -> Continuation:
        """The track ended: what the m-line's next track goes on with (:meth:`resume`)."""
        stream = self.stream
        return Continuation(
            ssrc=stream.ssrc,
            rtx_ssrc=self.rtx_ssrc,
            payload_type=self.payload_type,
            rtx_payload_type=self.rtx_payload_type,
            answer_extmaps=self.answer_extmaps,
            preferences=self.preferences(),
            rewriter=stream.rewriter,
            packets_sent=stream.packets_sent,
            payload_bytes=stream.payload_bytes,
            bytes_sent=stream.bytes_sent,
        )

    def resume(self, kept: Continuation) -> None:
        """Carry on an ended subscription's stream (same SSRCs, payload types and extension
        ids, the subscriber's wishes): the first packet forwarded, a keyframe of this track,
        follows the last one sent in sequence number and timestamp (a source switch)."""
        stream = self.stream
        stream.ssrc = kept.ssrc
        stream.payload_type = self.payload_type = kept.payload_type
        kept.rewriter.switch_source()
        stream.rewriter = kept.rewriter
        stream.packets_sent = kept.packets_sent
        stream.payload_bytes = kept.payload_bytes
        stream.bytes_sent = self._bytes_at_tick = kept.bytes_sent
        self.rtx_ssrc = kept.rtx_ssrc
        self.rtx_payload_type = kept.rtx_payload_type
        self.answer_extmaps = kept.answer_extmaps
        for name in PREFERENCES:
            setattr(self, name, kept.preferences[name])
        self.negotiated = True

    def tick(self, interval: float) -> None:
        sent = self.stream.bytes_sent
        self.bitrate = (sent - self._bytes_at_tick) * 8 / interval if interval > 0 else 0.0
        self._bytes_at_tick = sent

    def stats_dict(self) -> dict[str, Any]:
        stream = self.stream
        nack = stream.nack
        return {
            "track_id": self.track.track_id,
            "kind": self.track.kind,
            "direction": "outbound",
            "ssrc": stream.ssrc,
            "packets": stream.packets_sent,
            "bytes": stream.bytes_sent,
            "packets_lost": stream.packets_lost,
            "fraction_lost": stream.fraction_lost,
            "jitter": stream.jitter,
            "round_trip_time": stream.round_trip_time,
            "bitrate": self.bitrate,
            "nacks_received": nack.nacks_received if nack else 0,
            "retransmissions": nack.retransmissions if nack else 0,
            "retransmission_bytes": nack.retransmission_bytes if nack else 0,
            "retransmissions_repeat_suppressed": nack.repeats_suppressed if nack else 0,
            "retransmissions_budget_suppressed": nack.budget_suppressed if nack else 0,
            "forwarded": self.active,
            "reason": self.declined,
            "preferences": self.preferences(),
            # simulcast: the layer (rid) the stream carries now, and the one it moves to
            "layer": _rid(stream.track) if self.track.layers else None,
            "target_layer": _rid(stream.target) if self.track.layers else None,
            # layers within the stream (VP8 temporal, VP9 SVC, AV1): the highest spatial and
            # temporal layer forwarded now (null: all of them)
            "svc_layers": (
                {"max_spatial": stream.max_spatial, "max_temporal": stream.max_temporal}
                if self.track.svc is not None
                else None
            ),
        }

    def preferences(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PREFERENCES}

    def to_dict(self) -> dict[str, Any]:
        """The subscription as PUT .../subscriptions/{track_id} returns it."""
        return {
            "track_id": self.track.track_id,
            "publisher_id": self.track.participant_id,
            "kind": self.track.kind,
            "forwarded": self.active,
            "reason": self.declined,
            **self.preferences(),
        }


def _rid(layer: Track | None) -> str | None:
    """A simulcast layer's rid (its index for SSRC simulcast), None for none."""
    if layer is None or layer.parent is None:
        return None
    return layer.rid if layer.rid is not None else str(layer.parent.layers.index(layer))
