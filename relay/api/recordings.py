"""The recording endpoints of the control API (consent-gated recording).

``POST /v1/rooms/{room_id}/recordings`` asks for a recording; every participant gets
``recording.requested`` and answers with ``PUT .../participants/{id}/consent``. Only the tracks
of participants who said yes are written (relay/recording/service.py keeps the state and the
consent timeline; the media processes write the files without decoding them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from relay.api.auth import Principal, require_admin, require_participant
from relay.api.events import EventBus
from relay.api.schemas import (
    ID_DESCRIPTION,
    ID_PATTERN,
    ErrorResponse,
    ParticipantIdParam,
    RoomIdParam,
)
from relay.config import Settings
from relay.recording.service import RecordingService

__all__ = [
    "ConsentAnswer",
    "RecordingCreated",
    "RecordingInfo",
    "RecordingList",
    "install_recordings",
    "recordings_router",
]


# --------------------------------------------------------------------------------------------
# Schemas


class ConsentAnswer(BaseModel):
    """A participant's answer to the room's recording."""

    model_config = ConfigDict(strict=True, extra="forbid")

    recording: bool = Field(
        description="true: this participant's tracks are written from now on; false: nothing "
        "of it is written from now on (its files are closed before the answer returns)."
    )


class RecordingCreated(BaseModel):
    recording_id: str = Field(description="`rec_` and 16 hex digits.")
    state: str = Field(description="`requested` until the first track is written.")


class ConsentEntry(BaseModel):
    participant_id: str
    consent: bool
    at: float = Field(description="Unix time in seconds.")


class RecordedFile(BaseModel):
    """One interval of one track written to one file."""

    participant_id: str
    track_id: str
    kind: str | None = Field(description="`audio` or `video`.")
    codec: str | None = Field(default=None, description="MIME type, e.g. `audio/opus`.")
    file: str = Field(description="File name in the recording's directory (opaque ids only).")
    started_at: float
    ended_at: float | None = Field(description="null while it is being written.")
    bytes: int | None = Field(default=None, description="Size on disk now (null: no file).")


class RecordingInfo(BaseModel):
    recording_id: str
    room_id: str
    state: str = Field(description="`requested`, `recording`, `stopped` or `failed`.")
    reason: str | None = Field(
        description="Why it stopped: `requested`, `room_closed`, `disk_full`, `io_error`."
    )
    requested_at: float
    started_at: float | None
    stopped_at: float | None
    consent: list[ConsentEntry] = Field(description="Every consent answer, in order.")
    files: list[RecordedFile] = Field(description="Every interval written, in order.")


class RecordingList(BaseModel):
    recordings: list[RecordingInfo]


# --------------------------------------------------------------------------------------------
# Routes


def _service(request: Request) -> RecordingService:
    return request.app.state.recordings


Service = Annotated[RecordingService, Depends(_service)]
Admin = Annotated[Principal, Depends(require_admin)]
ParticipantAccess = Annotated[Principal, Depends(require_participant)]
RecordingIdParam = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
]

_DESCRIPTIONS = {
    401: "Missing or invalid credentials.",
    403: "The credentials do not allow this call.",
    404: "No such room, participant (`room_not_found`, `participant_not_found`) or "
    "recording (`recording_not_found`).",
    409: "`recording_disabled` (recording.directory is empty), `e2ee_room` (the room is "
    "end-to-end encrypted), `recording_active` (the room is already being recorded), "
    "`no_recording` (consent with no recording running), `e2ee_participant`.",
    422: "The body or a parameter does not match the schema.",
    503: "`recording_unavailable`: the recording directory cannot be written.",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    codes = sorted({401, 422, *statuses})
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


recordings_router = APIRouter(prefix="/v1", tags=["recordings"])


@recordings_router.post(
    "/rooms/{room_id}/recordings",
    status_code=status.HTTP_201_CREATED,
    response_model=RecordingCreated,
    summary="Ask for a recording of a room",
    responses=_errors(403, 404, 409, 503),
)
async def request_recording(room_id: RoomIdParam, service: Service, principal: Admin) -> Any:
    """API key only. Every participant gets `recording.requested` (and each who joins later,
    while it runs) and answers with `PUT .../participants/{id}/consent`. Nothing is written
    before a participant says yes; the state turns `recording` (event `recording.started`)
    when the first track is written. Refused in a room that requires end-to-end encryption
    (`409 e2ee_room`), while recording is off (`409 recording_disabled`) and while the room
    is already being recorded (`409 recording_active`)."""
    rec = await service.request(room_id)
    return {"recording_id": rec.recording_id, "state": rec.state}


@recordings_router.put(
    "/rooms/{room_id}/participants/{participant_id}/consent",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Answer a recording request for one participant",
    responses=_errors(403, 404, 409),
)
async def set_consent(
    room_id: RoomIdParam,
    participant_id: ParticipantIdParam,
    body: ConsentAnswer,
    service: Service,
    principal: ParticipantAccess,
) -> Response:
    """The API key, or the participant's own token. `true`: the participant's tracks (those
    published now and later) are written from now on, each consent interval to new files.
    `false` (a refusal, or withdrawing consent): none of its media is written from now on;
    its files are closed before this answers; event `recording.participant_excluded`
    (`no_consent` or `withdrawn`). `409 no_recording` when the room is not being recorded."""
    await service.set_consent(room_id, participant_id, body.recording)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@recordings_router.post(
    "/recordings/{recording_id}/stop",
    response_model=RecordingInfo,
    summary="Stop a recording",
    responses=_errors(403, 404),
)
async def stop_recording(recording_id: RecordingIdParam, service: Service, principal: Admin) -> Any:
    """API key only. Every file is closed; event `recording.stopped` (`reason: requested`).
    Stopping a stopped recording changes nothing."""
    rec = await service.stop(recording_id)
    return service.view(rec)


@recordings_router.get(
    "/recordings",
    response_model=RecordingList,
    summary="List recordings",
    responses=_errors(403),
)
async def list_recordings(service: Service, principal: Admin) -> Any:
    """API key only. Every recording kept (running, and stopped within the retention)."""
    return {"recordings": [service.view(rec) for rec in service.list_recordings()]}


@recordings_router.get(
    "/recordings/{recording_id}",
    response_model=RecordingInfo,
    summary="Get a recording: its files and consent timeline",
    responses=_errors(403, 404),
)
async def get_recording(recording_id: RecordingIdParam, service: Service, principal: Admin) -> Any:
    """API key only. The state, every consent answer and every written interval (which
    participant's track, which file, from when to when)."""
    return service.view(service.get(recording_id))


@recordings_router.delete(
    "/recordings/{recording_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a recording and its files",
    responses=_errors(403, 404),
)
async def delete_recording(
    recording_id: RecordingIdParam, service: Service, principal: Admin
) -> Response:
    """API key only. Stops the recording if it runs, then erases its directory (files and
    manifest)."""
    await service.delete(recording_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --------------------------------------------------------------------------------------------
# Wiring


def install_recordings(app: FastAPI, core: Any, settings: Settings, events: EventBus) -> None:
    """Add the recording routes and the :class:`RecordingService` (``app.state.recordings``)
    to the control API. The app's lifespan starts and closes the service; a server that runs
    the app without its lifespan (relay/server.py) calls ``start`` and ``aclose`` itself."""
    service = RecordingService(settings, core, events)
    app.state.recordings = service
    app.include_router(recordings_router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            await service.start()
            try:
                yield state
            finally:
                await service.aclose()

    app.router.lifespan_context = lifespan
