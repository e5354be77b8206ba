"""Request and response bodies of the control API (served as /openapi.json).

Request models are strict (no type coercion) and reject unknown fields, so that a misspelt
flag such as ``canPublish`` is an error rather than a silently applied default. Size limits that
depend on the configuration (metadata, SDP) are checked by the routes, which answer 413.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ID_PATTERN",
    "MAX_METADATA_DEPTH",
    "CreateParticipant",
    "CreateRoom",
    "DemoToken",
    "DemoTokenRequest",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "Identifier",
    "ParticipantIdParam",
    "ParticipantInfo",
    "PublisherAnswer",
    "PublisherOffer",
    "Readiness",
    "RoomIdParam",
    "RoomInfo",
    "RoomList",
    "SubscriberAnswer",
    "SubscriberOffer",
    "TrackIdParam",
    "TrackInfo",
    "VideoCodec",
    "encoded_json_size",
    "json_depth",
]

#: Identifiers (room_id, participant_id, track_id): 1-64 characters of [A-Za-z0-9._-], not
#: starting or ending with ``.``, so that no id is ``.`` or ``..`` (a path segment that HTTP
#: clients collapse: ``DELETE .../participants/..`` would otherwise address the room).
ID_PATTERN = r"^[A-Za-z0-9_-](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_-])?$"
ID_DESCRIPTION = (
    "Opaque identifier: 1-64 characters of [A-Za-z0-9._-], not starting or ending with `.`."
)

#: A video codec name of a room's ``codec_preference``.
VideoCodec = Literal["VP8", "H264", "VP9", "AV1"]

#: Deepest nesting of objects and arrays accepted in ``metadata``.
MAX_METADATA_DEPTH = 32

Identifier = Annotated[
    str, Field(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]

#: The ``{room_id}`` and ``{participant_id}`` path parameters.
RoomIdParam = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]
ParticipantIdParam = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]
#: The ``{track_id}`` path parameter (for routes on one track).
TrackIdParam = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` is 1), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_METADATA_DEPTH:
            break
        stack.extend((child, depth) for child in children)
    return deepest


def encoded_json_size(value: Any) -> int:
    """Size in bytes of the compact UTF-8 JSON encoding of a value."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return len(text.encode("utf-8"))


def valid_text(value: str) -> str:
    """Reject strings that cannot be encoded as UTF-8 (lone surrogates from ``\\ud800``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains invalid Unicode (a lone surrogate)") from None
    return value


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------
# Errors and health


class ErrorDetail(_Response):
    code: str = Field(description="Machine-readable error code, e.g. `room_not_found`.")
    message: str = Field(description="Human-readable explanation.")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="For schema errors (422): one entry per invalid field."
    )


class ErrorResponse(_Response):
    """Body of every error response."""

    error: ErrorDetail


class Health(_Response):
    status: Literal["ok"] = "ok"


class Readiness(_Response):
    status: Literal["ready", "draining", "overloaded"]


# --------------------------------------------------------------------------------------------
# Rooms and participants


class TrackInfo(_Response):
    """A stream a participant publishes."""

    track_id: str
    participant_id: str
    kind: Literal["audio", "video"]
    codec: str = Field(description="MIME type of the forwarded codec, e.g. `audio/opus`.")
    mid: str = Field(description="The m-line of the publisher connection carrying the track.")
    muted: bool = Field(description="Not forwarded now: no media for a while, or a moderator.")
    moderated: bool = Field(
        default=False, description="Muted by a moderator (`POST .../mute`) until unmuted."
    )
    simulcast_layers: list[Any] = Field(description="Simulcast encodings, empty without simulcast.")


class ParticipantInfo(_Response):
    """A member of a room."""

    participant_id: str
    room_id: str
    metadata: dict[str, Any] | None = Field(description="The opaque object given at creation.")
    joined_at: float = Field(description="Unix time in seconds.")
    state: Literal["new", "connected", "disconnected"]
    e2ee: bool = Field(
        default=False, description="Encrypts its media end to end (created so, or by token)."
    )
    tracks: list[TrackInfo]
    subscriptions: list[str] = Field(description="Ids of the tracks forwarded to this participant.")
    worker: int | None = Field(
        default=None,
        description="Index of the media worker process that holds it (several workers only).",
    )


class RoomInfo(_Response):
    """A room and everyone in it."""

    room_id: str
    created_at: float = Field(description="Unix time in seconds.")
    participants: list[ParticipantInfo]
    max_participants: int
    e2ee_required: bool
    codec_preference: list[str] = Field(
        description="Video codecs publishers are answered with, most preferred first."
    )


class RoomList(_Response):
    rooms: list[RoomInfo]


class WorkerInfo(_Response):
    """One media worker process."""

    index: int
    pid: int | None
    state: Literal["starting", "ready", "failed"]
    media_port: int | None = Field(description="The UDP port its participants' media use.")
    participants: int
    rooms: int
    packet_rate: float = Field(description="RTP packets forwarded per second (moving average).")
    cpu: float | None = Field(description="Share of one core used over the last second.")
    restarts: int


class WorkerList(_Response):
    workers: list[WorkerInfo]


class CreateRoom(_Request):
    """``POST /v1/rooms``; every field is optional."""

    room_id: Identifier | None = Field(default=None, description="Generated when omitted.")
    max_participants: int | None = Field(
        default=None, ge=1, description="Defaults to `rooms.default_max_participants`."
    )
    e2ee_required: bool = Field(
        default=False, description="Participants must encrypt media end to end."
    )
    empty_timeout: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds an empty room lives on; defaults to `rooms.empty_timeout`.",
    )
    codec_preference: list[VideoCodec] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Video codecs a publisher's video is taken in, most preferred first; defaults to "
            "`media.codec_preference`. The first one the publisher offers in a form every "
            "client decodes wins (H264: Constrained Baseline, packetization-mode 1; VP9 and "
            "AV1: profile 0); other forms of a listed codec (H.264 High) only as a last "
            "resort; unlisted codecs never."
        ),
    )

    @field_validator("codec_preference")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a codec twice")
        return value


class CreateParticipant(_Request):
    """``POST /v1/rooms/{room_id}/participants``; every field is optional."""

    participant_id: Identifier | None = Field(default=None, description="Generated when omitted.")
    metadata: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Opaque JSON object (at most `limits.max_metadata_bytes` encoded, nested at most "
            f"{MAX_METADATA_DEPTH} deep) handed back in reads and events; never logged."
        ),
    )
    can_publish: bool = True
    can_subscribe: bool = True
    auto_subscribe: bool = Field(
        default=True, description="Subscribe to every track of the room as it is published."
    )
    e2ee: bool = Field(
        default=False,
        description=(
            "The client encrypts its media end to end. In a room with `e2ee_required`, only "
            "such participants may publish (others may still subscribe)."
        ),
    )

    @field_validator("metadata")
    @classmethod
    def _shallow(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if json_depth(value) > MAX_METADATA_DEPTH:
            raise ValueError(f"nested more than {MAX_METADATA_DEPTH} levels deep")
        try:
            encoded_json_size(value)
        except UnicodeEncodeError:
            raise ValueError("contains invalid Unicode (a lone surrogate)") from None
        except (TypeError, ValueError):
            raise ValueError("must hold only finite numbers, strings, booleans and null") from None
        return value


# --------------------------------------------------------------------------------------------
# Session descriptions


class PublisherOffer(_Request):
    """The client's offer for its publisher connection."""

    type: Literal["offer"]
    sdp: str = Field(description="At most `limits.max_sdp_bytes` bytes (UTF-8).")

    @field_validator("sdp")
    @classmethod
    def _sdp_text(cls, value: str) -> str:
        return valid_text(value)


class PublisherAnswer(_Response):
    type: Literal["answer"] = "answer"
    sdp: str


class SubscriberOffer(_Response):
    """The relay's offer for the subscriber connection."""

    type: Literal["offer"] = "offer"
    sdp: str
    revision: int = Field(description="Echo it in the answer; answers to older offers get 409.")


class SubscriberAnswer(_Request):
    """The client's answer to a subscriber offer."""

    type: Literal["answer"]
    sdp: str = Field(description="At most `limits.max_sdp_bytes` bytes (UTF-8).")
    revision: int = Field(ge=0, le=2**63 - 1)

    @field_validator("sdp")
    @classmethod
    def _sdp_text(cls, value: str) -> str:
        return valid_text(value)


# --------------------------------------------------------------------------------------------
# Demo


class DemoTokenRequest(_Request):
    """``POST /demo/token``: join a room (created if missing) as a new participant."""

    room_id: Identifier
    participant_id: Identifier | None = Field(default=None, description="Generated when omitted.")
    can_publish: bool = True
    can_subscribe: bool = True
    e2ee: bool = Field(
        default=False,
        description="The page encrypts its media end to end: a new room is created with "
        "`e2ee_required`, the participant and its token get `e2ee`.",
    )


class DemoToken(_Response):
    """A new participant and a participant token for it."""

    room_id: str
    participant_id: str
    token: str = Field(description="Participant token: `Authorization: Bearer <token>`.")
    expires_at: float = Field(description="Unix time in seconds.")
    e2ee_required: bool = Field(
        default=False,
        description="The room requires end-to-end encryption (a page without the passphrase "
        "cannot take part).",
    )


class SubscriptionPreferences(_Request):
    """What a subscriber wants of one track. A field left out keeps its current value; a limit
    given as null is lifted."""

    paused: bool | None = Field(
        default=None,
        description="true: stop forwarding this track (its packets stop at the relay); false: "
        "forward it again, from its next keyframe (asked for at once).",
    )
    max_width: int | None = Field(
        default=None, ge=1, le=16384, description="Widest picture wanted, in pixels."
    )
    max_height: int | None = Field(
        default=None, ge=1, le=16384, description="Tallest picture wanted, in pixels."
    )
    max_fps: int | float | None = Field(
        default=None, gt=0, le=240, description="Highest frame rate wanted."
    )
    priority: int | None = Field(
        default=None,
        ge=0,
        le=10,
        description="Share of the subscriber's bandwidth: higher priorities get better layers "
        "first (a screen share, say); 0 by default. Among equal priorities the room's "
        "current speaker comes first.",
    )


class SubscriptionInfo(_Response):
    """One track as a participant receives it, and what it asked for."""

    track_id: str
    publisher_id: str = Field(description="The participant that publishes the track.")
    kind: str = Field(description="`audio` or `video`.")
    forwarded: bool = Field(description="Packets of the track are sent to the participant now.")
    reason: str | None = Field(
        description="Why the participant's answer did not take the track, null if it did."
    )
    paused: bool
    max_width: int | None
    max_height: int | None
    max_fps: float | None
    priority: int
