"""What the SFU core tells the outside world: one dataclass per event type.

The core emits these objects; the control API serialises them (``to_dict``) for event streams
and webhooks. Every event names its room and carries the wall-clock time it happened at.
Participants appear only by their opaque ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Event:
    """Common fields. ``type`` is the wire name of the event (a class constant)."""

    type: ClassVar[str] = ""
    room_id: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent to event-stream consumers and webhooks."""
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out


@dataclass(frozen=True, slots=True)
class RoomClosed(Event):
    type: ClassVar[str] = "room.closed"


@dataclass(frozen=True, slots=True)
class ParticipantJoined(Event):
    type: ClassVar[str] = "participant.joined"
    participant_id: str
    #: the participant encrypts its media end to end (created with ``e2ee``)
    e2ee: bool = False
    #: the room requires end-to-end encryption: clients switch on their frame encryption
    e2ee_required: bool = False


@dataclass(frozen=True, slots=True)
class ParticipantConnected(Event):
    type: ClassVar[str] = "participant.connected"
    participant_id: str


@dataclass(frozen=True, slots=True)
class ParticipantLeft(Event):
    type: ClassVar[str] = "participant.left"
    participant_id: str
    #: left | kicked | timeout | room_closed
    reason: str


@dataclass(frozen=True, slots=True)
class TrackPublished(Event):
    type: ClassVar[str] = "track.published"
    participant_id: str
    #: the track as GET .../participants/{id} shows it
    track: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TrackUnpublished(Event):
    type: ClassVar[str] = "track.unpublished"
    participant_id: str
    track_id: str


@dataclass(frozen=True, slots=True)
class TrackMuted(Event):
    type: ClassVar[str] = "track.muted"
    participant_id: str
    track_id: str
    #: "inactivity" (no media for a while) or "moderator" (muted through the API)
    by: str = "inactivity"


@dataclass(frozen=True, slots=True)
class TrackUnmuted(Event):
    type: ClassVar[str] = "track.unmuted"
    participant_id: str
    track_id: str
    #: "inactivity" (media flows again) or "moderator" (unmuted through the API)
    by: str = "inactivity"


@dataclass(frozen=True, slots=True)
class TrackUnsupported(Event):
    """A subscriber's answer did not take a track (its codec, or the m-line rejected)."""

    type: ClassVar[str] = "track.unsupported"
    participant_id: str
    track_id: str
    publisher_id: str
    codec: str
    reason: str


@dataclass(frozen=True, slots=True)
class SubscriberRenegotiate(Event):
    """The participant's subscriber connection needs a new offer (GET it at this revision)."""

    type: ClassVar[str] = "subscriber.renegotiate"
    participant_id: str
    revision: int


@dataclass(frozen=True, slots=True)
class PublisherLayers(Event):
    """The simulcast layers of a track some subscriber receives or is moving to changed: the
    publisher may stop encoding the others (``RTCRtpSender.setParameters``, ``active:
    false``) and start them again when they are wanted."""

    type: ClassVar[str] = "publisher.layers"
    participant_id: str
    track_id: str
    #: rids of the wanted layers, in the offer's order
    wanted: list[str]
    #: rids of the layers nobody receives
    unused: list[str]


@dataclass(frozen=True, slots=True)
class SpeakerChanged(Event):
    type: ClassVar[str] = "speaker.changed"
    #: the loudest participant, or None when nobody speaks
    participant_id: str | None


@dataclass(frozen=True, slots=True)
class RecordingRequested(Event):
    """A recording of the room was asked for: each participant named answers with
    ``PUT .../participants/{id}/consent`` (sent again for each participant who joins while
    the recording runs)."""

    type: ClassVar[str] = "recording.requested"
    recording_id: str
    #: the participants asked for their consent
    participant_ids: list[str]


@dataclass(frozen=True, slots=True)
class RecordingStarted(Event):
    """The first track of a consenting participant is being written."""

    type: ClassVar[str] = "recording.started"
    recording_id: str


@dataclass(frozen=True, slots=True)
class RecordingParticipantExcluded(Event):
    """A participant's media is not (or no longer) written."""

    type: ClassVar[str] = "recording.participant_excluded"
    recording_id: str
    participant_id: str
    #: no_consent | withdrawn | left
    reason: str


@dataclass(frozen=True, slots=True)
class RecordingStopped(Event):
    """The recording ended; its files are complete."""

    type: ClassVar[str] = "recording.stopped"
    recording_id: str
    #: requested | room_closed | disk_full | io_error
    reason: str


#: every event type by its wire name
EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RoomClosed,
        ParticipantJoined,
        ParticipantConnected,
        ParticipantLeft,
        TrackPublished,
        TrackUnpublished,
        TrackMuted,
        TrackUnmuted,
        TrackUnsupported,
        SubscriberRenegotiate,
        PublisherLayers,
        SpeakerChanged,
        RecordingRequested,
        RecordingStarted,
        RecordingParticipantExcluded,
        RecordingStopped,
    )
}
