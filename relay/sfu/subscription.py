"""Subscription: one track offered to one participant, what was negotiated for it, and the
outbound stream that carries it once it is active."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from relay.sfu.outbound import OutboundStream

if TYPE_CHECKING:
    from relay.metrics import Metrics
    from relay.sfu.participant import Participant
    from relay.sfu.track import Track


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
        return {
            "paused": self.paused,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "max_fps": self.max_fps,
            "priority": self.priority,
        }

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
