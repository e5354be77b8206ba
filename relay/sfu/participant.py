"""Participant: one member of a room, with a publisher and a subscriber connection."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.rtc.sdp import OfferedMedia

if TYPE_CHECKING:
    from relay.rtc.transport import WebRtcTransport
    from relay.sfu.room import Room
    from relay.sfu.subscription import Subscription
    from relay.sfu.track import Track


@dataclass
class Slot:
    """One m-line of the subscriber connection. Slots never reorder; a freed one is reused."""

    mid: str
    kind: str
    subscription: Subscription | None = None


@dataclass
class OfferState:
    """What we last offered on the subscriber connection, to check the answer against."""

    revision: int
    media: list[OfferedMedia] = field(default_factory=list)


class Participant:
    """A member of a room. Identified only by an opaque id; metadata is never logged."""

    def __init__(
        self,
        participant_id: str,
        room: Room,
        metadata: dict[str, Any],
        joined_at: float,
        can_publish: bool,
        can_subscribe: bool,
        auto_subscribe: bool,
    ) -> None:
        self.participant_id = participant_id
        self.room = room
        self.metadata = metadata
        self.joined_at = joined_at
        #: monotonic time of joining, for the connect timeout
        self.joined_clock = 0.0
        self.can_publish = can_publish
        self.can_subscribe = can_subscribe
        self.auto_subscribe = auto_subscribe
        self.state = "new"
        self.publisher: WebRtcTransport | None = None
        self.subscriber: WebRtcTransport | None = None
        #: published tracks by id and by the publisher connection's mid
        self.tracks: dict[str, Track] = {}
        self.tracks_by_mid: dict[str, Track] = {}
        #: media SSRC -> track and RTX SSRC -> track, for packets on the publisher connection
        self.ssrc_map: dict[int, Track] = {}
        self.rtx_map: dict[int, Track] = {}
        #: the publisher's header-extension id of sdes:mid (to learn unsignalled SSRCs)
        self.mid_ext_id: int | None = None
        #: ... and of repaired-rtp-stream-id, which only RTX packets carry
        self.repaired_rid_ext_id: int | None = None
        #: payload types unique to one published m-line of a track with unsignalled SSRCs ->
        #: (track, is the RTX payload type): the last way to route a packet with an unknown
        #: SSRC and no mid (RFC 8843 §9.2)
        self.payload_routes: dict[int, tuple[Track, bool]] = {}
        #: subscriptions by track id
        self.subscriptions: dict[str, Subscription] = {}
        self.slots: list[Slot] = []
        self.revision = 0
        self.offered: OfferState | None = None
        self.applied_revision = -1
        #: subscriber-side payload types, one per distinct codec configuration
        self.payload_types: dict[tuple[Any, ...], int] = {}
        self.cname = secrets.token_hex(8)
        #: SSRC the relay uses as sender of RTCP towards this participant
        self.rtcp_ssrc = secrets.randbits(32) or 1
        self.connected_once = False

    def route_payload_types(self) -> None:
        """Recompute :attr:`payload_routes` from the published tracks' payload types: a type
        used by one m-line only, of a track whose SSRCs the SDP does not name."""
        seen: dict[int, list[tuple[Track, bool]]] = {}
        for track in self.tracks.values():
            seen.setdefault(track.payload_type, []).append((track, False))
            if track.rtx_payload_type is not None:
                seen.setdefault(track.rtx_payload_type, []).append((track, True))
        self.payload_routes = {
            pt: uses[0]
            for pt, uses in seen.items()
            if len(uses) == 1 and not uses[0][0].ssrc_signalled
        }

    @property
    def transports(self) -> list[WebRtcTransport]:
        return [t for t in (self.publisher, self.subscriber) if t is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "participant_id": self.participant_id,
            "room_id": self.room.room_id,
            "metadata": self.metadata,
            "joined_at": self.joined_at,
            "state": self.state,
            "tracks": [t.to_dict() for t in self.tracks.values()],
            "subscriptions": [tid for tid, s in self.subscriptions.items() if not s.track.ended],
        }
