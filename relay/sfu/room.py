"""Room: the participants who can hear and see each other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay.rtc.sdp import DEFAULT_VIDEO_PREFERENCE

if TYPE_CHECKING:
    from relay.sfu.participant import Participant


class Room:
    """A room: its settings, its participants, and the publishers of other workers whose
    tracks it imports."""

    def __init__(
        self,
        room_id: str,
        created_at: float,
        max_participants: int,
        e2ee_required: bool,
        empty_timeout: float,
        now: float,
        codec_preference: tuple[str, ...] = DEFAULT_VIDEO_PREFERENCE,
    ) -> None:
        self.room_id = room_id
        self.created_at = created_at
        self.max_participants = max_participants
        self.e2ee_required = e2ee_required
        self.empty_timeout = empty_timeout
        #: video codecs publishers are answered with, most preferred first
        self.codec_preference = codec_preference
        self.participants: dict[str, Participant] = {}
        #: publishers connected to other workers whose tracks this worker imports, by id
        #: (:attr:`Participant.remote`; not in :attr:`participants`, not counted, not listed)
        self.remote: dict[str, Participant] = {}
        #: monotonic time the room became empty (it starts empty)
        self.empty_since: float | None = now
        #: participant id of the active speaker, None for silence
        self.speaker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "room_id": self.room_id,
            "created_at": self.created_at,
            "participants": [p.to_dict() for p in self.participants.values()],
            "max_participants": self.max_participants,
            "e2ee_required": self.e2ee_required,
            "codec_preference": list(self.codec_preference),
        }
