"""Participant: one member of a room, with a publisher and a subscriber connection."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.rtc.sdp import Codec, MediaDescription, OfferedMedia

if TYPE_CHECKING:
    from relay.sfu.leg import Leg
    from relay.sfu.publisher_leg import PublisherLeg
    from relay.sfu.room import Room
    from relay.sfu.subscriber_leg import SubscriberLeg
    from relay.sfu.subscription import Continuation, Subscription
    from relay.sfu.track import Track


@dataclass
class Slot:
    """One m-line of the subscriber connection. Slots never reorder; a freed one is reused."""

    mid: str
    kind: str
    subscription: Subscription | None = None
    #: a WHEP viewer's m-line (its answer is final): the viewer's offered m-line, the codec
    #: answered on it, and what it kept of the subscription it carried until that track
    #: ended, which the next track it takes goes on with (Sfu._follow)
    offer: MediaDescription | None = None
    codec: Codec | None = None
    retired: Continuation | None = None


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
        e2ee: bool = False,
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
        #: encrypts its media end to end (created so, or its token said so when it published)
        self.e2ee = e2ee
        self.state = "new"
        #: the connection it publishes on and the one it receives on, once offered
        self.publisher_leg: PublisherLeg | None = None
        self.subscriber_leg: SubscriberLeg | None = None
        #: published tracks by id and by the publisher connection's mid
        self.tracks: dict[str, Track] = {}
        self.tracks_by_mid: dict[str, Track] = {}
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
        #: the publisher of tracks imported from another worker (relay/workers/pipe.py): it
        #: has no connection here, is not listed, has no events and never times out
        self.remote = False
        #: a WHEP viewer: the (publisher id, track id) its offer asked for, None for all of
        #: the room; None for a participant that is not a viewer
        self.viewer: tuple[str | None, str | None] | None = None

    @property
    def legs(self) -> list[Leg]:
        return [leg for leg in (self.publisher_leg, self.subscriber_leg) if leg is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "participant_id": self.participant_id,
            "room_id": self.room.room_id,
            "metadata": self.metadata,
            "joined_at": self.joined_at,
            "state": self.state,
            "e2ee": self.e2ee,
            "tracks": [t.to_dict() for t in self.tracks.values()],
            "subscriptions": [tid for tid, s in self.subscriptions.items() if not s.track.ended],
        }
