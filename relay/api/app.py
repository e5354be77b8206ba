"""The HTTP control API: rooms, participants, negotiation, events, health, metrics.

Handlers are thin: they validate the request (schemas, size limits, credentials), call the
synchronous SFU core on the event loop and shape its result. The core raises
:class:`relay.sfu.errors.SfuError` for anything it refuses; :mod:`relay.api.errors` maps every
failure to ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import __version__
from relay.api.auth import (
    ApiKeyAuthenticator,
    Auth,
    Authenticator,
    Principal,
    TokenAuthenticator,
    authenticate,
    require_admin,
    require_participant,
    require_publisher,
    require_room,
    require_subscriber,
)
from relay.api.core import ControlCore, LocalCore
from relay.api.demo import demo_router, dev_tokens_enabled
from relay.api.errors import error_response, install_error_handlers
from relay.api.events import EventBus, sse_stream
from relay.api.recordings import install_recordings
from relay.api.reports import reports_router
from relay.api.schemas import (
    ID_PATTERN,
    CreateParticipant,
    CreateRoom,
    ErrorResponse,
    Health,
    ParticipantIdParam,
    ParticipantInfo,
    PublisherAnswer,
    PublisherOffer,
    Readiness,
    RoomIdParam,
    RoomInfo,
    RoomList,
    SubscriberAnswer,
    SubscriberOffer,
    SubscriptionInfo,
    SubscriptionPreferences,
    TrackIdParam,
    WorkerList,
    encoded_json_size,
)
from relay.api.whip import install_whip
from relay.config import Settings
from relay.sfu.errors import Draining, Forbidden, TooLarge
from relay.sfu.sfu import Sfu

__all__ = ["API_DESCRIPTION", "BodyLimitMiddleware", "create_app"]

log = logging.getLogger("relay.api")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Largest request line plus headers, in bytes (h11's limit for a head still arriving).
MAX_HEADER_BYTES = 16384

API_DESCRIPTION = """\
Rooms, participants and WebRTC negotiation of the relay.

The full reference (every endpoint, error code, event and limit, and how a signaling server
uses them) is `docs/api.md` in the relay's source tree.

## Credentials
Every `/v1` call carries `Authorization: Bearer <credential>`:

- **API key** (`api.keys`): every call.
- **Participant token**, when `auth.token_secret` is set: a JWT signed with HS256 under that
  secret (no other algorithm is accepted) with the claims `room` (room id), `sub` (participant
  id), `can_publish`, `can_subscribe` (booleans) and `exp` (Unix seconds); `nbf` is honoured,
  and the optional `e2ee` (boolean) says the client encrypts its media end to end.
  A signaling server creates the participant with its API key, signs a token for it and hands
  the token to the client, which may then call only:
  - `GET` and `DELETE ?reason=left` on `/v1/rooms/{room}/participants/{sub}`,
  - `.../{sub}/publisher` (if `can_publish`), `.../{sub}/subscriber` (if `can_subscribe`),
    `.../{sub}/stats`, `PUT .../{sub}/consent` (its answer to a recording request),
  - `GET /v1/events?room_id={room}` (read it with `fetch()`, which can send the
    `Authorization` header; the token is never accepted in a URL),
  - `POST /v1/rooms/{room}/reports` (abuse reports, where `compliance.region` has them).

  Anything else is `403`; a token that is expired, not yet valid, forged, or lacks a claim
  is `401` with `WWW-Authenticate: Bearer error="invalid_token"`. The flags only narrow what
  the participant was created with.
"""


class MetricsSource(Protocol):
    def render(self) -> str: ...


# --------------------------------------------------------------------------------------------
# Request body limit


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_body_bytes`` with 413, before any handler runs.

    The declared ``Content-Length`` is checked first; the body is then read (bounded) and
    counted as it streams in, so a chunked or mis-declared body cannot get past the limit.
    A body that takes longer than ``body_timeout`` seconds to arrive gets 408; a client that
    disconnects mid-body gets no answer (no handler runs). A request line and headers larger
    than ``max_header_bytes`` get 431 (the HTTP server refuses a head that size while it is
    still arriving; this catches one that arrived whole). The handler receives the body
    already read.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout: float | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if head > self.max_header_bytes:
            await self._refuse(
                scope,
                receive,
                send,
                431,
                "headers_too_large",
                f"request line and headers larger than {self.max_header_bytes} bytes",
            )
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await self._refuse(
                        scope, receive, send, 400, "bad_request", "invalid Content-Length header"
                    )
                    return
                if declared > limit:
                    await self._too_large(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        first: Message
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # disconnected while sending the body: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await self._too_large(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        body = b"".join(chunks)
                        first = {"type": "http.request", "body": body, "more_body": False}
                        break
        except TimeoutError:
            await self._refuse(
                scope,
                receive,
                send,
                408,
                "request_timeout",
                f"request body not received within {self.body_timeout:g} s",
            )
            return
        pending: list[Message] = [first]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(
            scope,
            receive,
            send,
            413,
            "too_large",
            f"request body larger than {self.max_body_bytes} bytes",
        )

    @staticmethod
    async def _refuse(
        scope: Scope, receive: Receive, send: Send, status_code: int, code: str, message: str
    ) -> None:
        response = error_response(status_code, code, message, headers={"Connection": "close"})
        await response(scope, receive, send)


# --------------------------------------------------------------------------------------------
# Dependencies and parameters


def _sfu(request: Request) -> ControlCore:
    return request.app.state.sfu


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _events(request: Request) -> EventBus:
    return request.app.state.events


Core = Annotated[Any, Depends(_sfu)]
Config = Annotated[Settings, Depends(_settings)]
Bus = Annotated[EventBus, Depends(_events)]
RoomId = RoomIdParam
ParticipantId = ParticipantIdParam
Admin = Annotated[Principal, Depends(require_admin)]
RoomAccess = Annotated[Principal, Depends(require_room)]
ParticipantAccess = Annotated[Principal, Depends(require_participant)]
PublisherAccess = Annotated[Principal, Depends(require_publisher)]
SubscriberAccess = Annotated[Principal, Depends(require_subscriber)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error responses (401 and 422 apply to every /v1 route)."""
    descriptions = {
        400: "Invalid field or SDP.",
        401: "Missing or invalid API key.",
        403: "The credentials do not allow this call.",
        404: "No such room or participant.",
        409: "Already exists, or conflicts with the current state.",
        413: "Body, metadata or SDP over its configured limit.",
        422: "The body or a parameter does not match the schema.",
        429: "A configured limit is reached.",
        503: "The relay is draining, or overloaded (code `overloaded`, with Retry-After).",
    }
    codes = sorted({401, 422, *statuses})
    return {code: {"model": ErrorResponse, "description": descriptions[code]} for code in codes}


def _refuse_while_draining(sfu: ControlCore) -> None:
    if sfu.draining:
        raise Draining("the relay is draining and accepts no new sessions")


def _check_sdp_size(sdp: str, settings: Settings) -> None:
    limit = settings.limits.max_sdp_bytes
    if len(sdp.encode("utf-8")) > limit:
        raise TooLarge(f"sdp larger than {limit} bytes", code="too_large")


# --------------------------------------------------------------------------------------------
# Routes

health = APIRouter(tags=["health"])


@health.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """200 while the process runs."""
    return Health()


@health.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={
        503: {
            "model": Readiness,
            "description": "Draining, or overloaded (with Retry-After): no new sessions.",
        }
    },
)
async def readyz(sfu: Core) -> Any:
    """200 while the relay accepts new sessions, 503 while it drains or sheds load."""
    if sfu.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    overload = sfu.overload
    if overload.shedding:
        return JSONResponse(
            {"status": "overloaded"},
            status_code=503,
            headers={"Retry-After": str(overload.retry_after)},
        )
    return Readiness(status="ready")


@health.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request) -> PlainTextResponse:
    """Counters, gauges and histograms in the Prometheus text format 0.0.4."""
    source: MetricsSource = request.app.state.metrics
    core: ControlCore = request.app.state.sfu
    text = await core.metrics_text(source.render())
    return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)


v1 = APIRouter(prefix="/v1")


@v1.post(
    "/rooms",
    status_code=status.HTTP_201_CREATED,
    response_model=RoomInfo,
    tags=["rooms"],
    summary="Create a room",
    responses=_errors(400, 403, 409, 413, 429, 503),
)
async def create_room(
    sfu: Core,
    principal: Admin,
    body: Annotated[CreateRoom | None, Body()] = None,
) -> Any:
    _refuse_while_draining(sfu)
    body = body or CreateRoom()
    return await sfu.create_room(
        room_id=body.room_id,
        max_participants=body.max_participants,
        e2ee_required=body.e2ee_required,
        empty_timeout=body.empty_timeout,
        codec_preference=body.codec_preference,
    )


@v1.get(
    "/rooms",
    response_model=RoomList,
    tags=["rooms"],
    summary="List rooms",
    responses=_errors(403),
)
async def list_rooms(sfu: Core, principal: Admin) -> Any:
    return {"rooms": await sfu.list_rooms()}


@v1.get(
    "/rooms/{room_id}",
    response_model=RoomInfo,
    tags=["rooms"],
    summary="Get a room",
    responses=_errors(403, 404),
)
async def get_room(room_id: RoomId, sfu: Core, principal: RoomAccess) -> Any:
    """API keys only: participant tokens see their room through its events."""
    return await sfu.get_room(room_id)


@v1.delete(
    "/rooms/{room_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["rooms"],
    summary="Close a room",
    responses=_errors(403, 404),
)
async def delete_room(room_id: RoomId, sfu: Core, principal: Admin) -> Response:
    """Disconnects every participant and closes the room."""
    await sfu.delete_room(room_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@v1.post(
    "/rooms/{room_id}/participants",
    status_code=status.HTTP_201_CREATED,
    response_model=ParticipantInfo,
    tags=["participants"],
    summary="Add a participant",
    responses=_errors(400, 403, 404, 409, 413, 429, 503),
)
async def create_participant(
    room_id: RoomId,
    sfu: Core,
    settings: Config,
    principal: Admin,
    body: Annotated[CreateParticipant | None, Body()] = None,
) -> Any:
    _refuse_while_draining(sfu)
    body = body or CreateParticipant()
    if body.metadata is not None:
        limit = settings.limits.max_metadata_bytes
        if encoded_json_size(body.metadata) > limit:
            raise TooLarge(f"metadata larger than {limit} bytes (JSON-encoded)", code="too_large")
    return await sfu.add_participant(
        room_id,
        participant_id=body.participant_id,
        metadata=body.metadata,
        can_publish=body.can_publish,
        can_subscribe=body.can_subscribe,
        auto_subscribe=body.auto_subscribe,
        e2ee=body.e2ee,
    )


@v1.get(
    "/rooms/{room_id}/participants/{participant_id}",
    response_model=ParticipantInfo,
    tags=["participants"],
    summary="Get a participant",
    responses=_errors(403, 404),
)
async def get_participant(
    room_id: RoomId, participant_id: ParticipantId, sfu: Core, principal: ParticipantAccess
) -> Any:
    return await sfu.get_participant(room_id, participant_id)


@v1.delete(
    "/rooms/{room_id}/participants/{participant_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["participants"],
    summary="Remove a participant (leave or kick)",
    responses=_errors(403, 404),
)
async def delete_participant(
    room_id: RoomId,
    participant_id: ParticipantId,
    sfu: Core,
    principal: ParticipantAccess,
    reason: Annotated[
        Literal["left", "kicked"], Query(description="Reported in `participant.left`.")
    ] = "kicked",
) -> Response:
    if reason == "kicked" and not principal.is_admin:
        raise Forbidden("only the API key may kick a participant")
    await sfu.remove_participant(room_id, participant_id, reason=reason)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@v1.post(
    "/rooms/{room_id}/participants/{participant_id}/publisher",
    response_model=PublisherAnswer,
    tags=["negotiation"],
    summary="Offer the publisher connection",
    responses=_errors(400, 403, 404, 413, 429, 503),
)
async def publisher_offer(
    room_id: RoomId,
    participant_id: ParticipantId,
    body: PublisherOffer,
    sfu: Core,
    settings: Config,
    principal: PublisherAccess,
) -> PublisherAnswer:
    """The client's offer for what it publishes; the relay answers. Call again to renegotiate.

    In a room with `e2ee_required`, a participant neither created with `e2ee` nor holding a
    token with the `e2ee` claim gets `403 e2ee_required`."""
    _check_sdp_size(body.sdp, settings)
    answer = await sfu.publisher_offer(room_id, participant_id, body.sdp, e2ee=principal.e2ee)
    return PublisherAnswer(sdp=answer)


@v1.post(
    "/rooms/{room_id}/participants/{participant_id}/subscriber",
    response_model=SubscriberOffer,
    tags=["negotiation"],
    summary="Get an offer for the subscriber connection",
    responses=_errors(403, 404, 503),
)
async def subscriber_offer(
    room_id: RoomId, participant_id: ParticipantId, sfu: Core, principal: SubscriberAccess
) -> SubscriberOffer:
    """An offer for every track the participant is subscribed to now."""
    sdp, revision = await sfu.subscriber_offer(room_id, participant_id)
    return SubscriberOffer(sdp=sdp, revision=revision)


@v1.put(
    "/rooms/{room_id}/participants/{participant_id}/subscriber",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["negotiation"],
    summary="Answer the subscriber offer",
    responses=_errors(400, 403, 404, 409, 413),
)
async def subscriber_answer(
    room_id: RoomId,
    participant_id: ParticipantId,
    body: SubscriberAnswer,
    sfu: Core,
    settings: Config,
    principal: SubscriberAccess,
) -> Response:
    """The client's answer; an answer to an older revision gets 409."""
    _check_sdp_size(body.sdp, settings)
    await sfu.subscriber_answer(room_id, participant_id, body.sdp, body.revision)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@v1.put(
    "/rooms/{room_id}/participants/{participant_id}/subscriptions/{track_id}",
    response_model=SubscriptionInfo,
    tags=["participants"],
    summary="Set what a participant wants of one subscribed track",
    responses=_errors(400, 403, 404),
)
async def set_subscription(
    room_id: RoomId,
    participant_id: ParticipantId,
    track_id: TrackIdParam,
    body: SubscriptionPreferences,
    sfu: Core,
    principal: SubscriberAccess,
) -> SubscriptionInfo:
    """Pause or resume one track for this participant, or limit the picture size and frame
    rate it wants of it (a participant token may set its own). Fields left out keep their
    value; `null` lifts a limit. Resuming forwards the track again from its next keyframe,
    which the relay asks the publisher for at once. The size and rate limits choose among
    the layers of a track that has several; a track with one layer is forwarded as it is."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    sub = await sfu.set_subscription_preferences(room_id, participant_id, track_id, changes)
    return SubscriptionInfo(**sub)


async def _moderate(
    sfu: ControlCore, room_id: str, participant_id: str, track_id: str, muted: bool
) -> Response:
    await sfu.moderate_track(room_id, participant_id, track_id, muted)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@v1.post(
    "/rooms/{room_id}/participants/{participant_id}/tracks/{track_id}/mute",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["moderation"],
    summary="Mute a participant's track at the relay",
    responses=_errors(403, 404),
)
async def mute_track(
    room_id: RoomId,
    participant_id: ParticipantId,
    track_id: TrackIdParam,
    sfu: Core,
    principal: Admin,
) -> Response:
    """API key only. The relay stops forwarding the track (to every subscriber, on every
    worker, and to recordings) until it is unmuted; subscribers get `track.muted` with
    `by: "moderator"`. Muting a muted track changes nothing. `404 track_not_found` when the
    participant publishes no such track."""
    return await _moderate(sfu, room_id, participant_id, track_id, True)


@v1.post(
    "/rooms/{room_id}/participants/{participant_id}/tracks/{track_id}/unmute",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    tags=["moderation"],
    summary="Unmute a participant's track muted by a moderator",
    responses=_errors(403, 404),
)
async def unmute_track(
    room_id: RoomId,
    participant_id: ParticipantId,
    track_id: TrackIdParam,
    sfu: Core,
    principal: Admin,
) -> Response:
    """API key only. Forwarding resumes from the track's next keyframe, asked of the
    publisher at once; subscribers get `track.unmuted` with `by: "moderator"`."""
    return await _moderate(sfu, room_id, participant_id, track_id, False)


@v1.get(
    "/rooms/{room_id}/participants/{participant_id}/stats",
    response_model=dict[str, Any],
    tags=["participants"],
    summary="Per-track statistics",
    responses=_errors(403, 404),
)
async def participant_stats(
    room_id: RoomId, participant_id: ParticipantId, sfu: Core, principal: ParticipantAccess
) -> Any:
    """Packets, bytes, loss, jitter, round-trip time and bitrate per track, both directions.

    Each outbound track also says whether it is `forwarded` now and, when the subscriber's
    answer did not take it (rejected, or not its codec), the `reason` (also sent as the event
    `track.unsupported`)."""
    return await sfu.participant_stats(room_id, participant_id)


@v1.get(
    "/workers",
    response_model=WorkerList,
    tags=["health"],
    summary="List the media worker processes",
    responses=_errors(403),
)
async def list_workers(sfu: Core, principal: Admin) -> Any:
    """Every media worker process: its state (`starting`, `ready`, `failed`), pid, media port,
    how many participants and rooms it holds, the packets it forwards per second, its CPU use
    (share of one core) and how often it was restarted. A single-process relay lists itself."""
    return {"workers": await sfu.workers()}


@v1.get(
    "/events",
    response_class=StreamingResponse,
    tags=["events"],
    summary="Server-Sent Events stream",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`event: <type>` and `data: <JSON>` per event; keepalive comments.",
        },
        **_errors(403, 429),
    },
)
async def stream_events(
    events: Bus,
    settings: Config,
    principal: Annotated[Principal, Depends(authenticate)],
    room_id: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=ID_PATTERN, description="Only this room."),
    ] = None,
) -> StreamingResponse:
    """Every event, or those of one room, as they happen. Ends on shutdown or overflow.

    Types: `participant.joined`, `participant.connected`, `participant.left`,
    `track.published`, `track.unpublished`, `track.muted`, `track.unmuted`,
    `track.unsupported` (a subscriber's answer did not take a track: `participant_id` of the
    subscriber, `track_id`, `publisher_id`, `codec`, `reason`), `subscriber.renegotiate`,
    `speaker.changed`, `room.closed`, `recording.requested` (`recording_id`,
    `participant_ids` asked for consent), `recording.started`, `recording.participant_excluded`
    (`participant_id`, `reason`), `recording.stopped` (`reason`).

    A participant token must name its own room in `room_id`. Open streams are limited per API
    key (`limits.event_streams_per_key`) and per participant token
    (`limits.event_streams_per_token`); one more is `429 too_many_streams` with `Retry-After`."""
    if not principal.may_access(room_id):
        raise Forbidden("these credentials are not valid for every room")
    if principal.is_admin:
        owner, limit = principal.subject, settings.limits.event_streams_per_key
    else:
        owner = f"token:{principal.room_id}/{principal.participant_id}"
        limit = settings.limits.event_streams_per_token
    subscription = events.subscribe(room_id, owner=owner, limit=limit)
    return StreamingResponse(
        sse_stream(subscription),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(subscription.close),
    )


# --------------------------------------------------------------------------------------------
# Application


def create_app(
    sfu: Sfu | ControlCore,
    settings: Settings,
    events: EventBus,
    metrics: MetricsSource,
    *,
    authenticators: Sequence[Authenticator] | None = None,
) -> FastAPI:
    """The control API for one SFU core.

    ``authenticators`` replaces the default chain: the API keys of ``settings.api.keys``, then
    participant tokens signed with ``settings.auth.token_secret`` when it is set. While the
    demo's development tokens are enabled (see :mod:`relay.api.demo`) and no secret is
    configured, a random per-process secret signs and verifies them instead.
    The app's lifespan starts the event bus and closes it on shutdown; both are idempotent,
    so the server may also drive the bus itself (it should :meth:`EventBus.close` before
    stopping the HTTP server, so open event streams do not hold the shutdown).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.start()
        try:
            yield
        finally:
            await events.aclose()

    app = FastAPI(
        title="relay control API",
        version=__version__,
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    dev_tokens = dev_tokens_enabled(settings)
    token_secret = settings.auth.token_secret or (secrets.token_urlsafe(32) if dev_tokens else "")
    if authenticators is None:
        authenticators = [ApiKeyAuthenticator(settings.api.keys)]
        if token_secret:
            authenticators.append(TokenAuthenticator(token_secret))
    auth = Auth(list(authenticators))
    app.state.sfu = LocalCore(sfu) if isinstance(sfu, Sfu) else sfu
    app.state.settings = settings
    app.state.events = events
    app.state.metrics = metrics
    app.state.auth = auth
    app.state.auth_precheck = lambda request: (
        auth.check(request) if request.url.path.startswith("/v1/") else None
    )
    install_error_handlers(app)
    # The first middleware added is the innermost: the body limit's refusals (413, 408, 431)
    # pass through the ones added later, such as the CORS headers of WHIP and WHEP.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.api.max_body_bytes,
        body_timeout=settings.api.body_timeout,
    )
    app.include_router(health)
    app.include_router(v1)
    install_recordings(app, app.state.sfu, settings, events)
    install_whip(app, settings, events)
    app.include_router(reports_router(settings))
    if settings.demo.enabled:
        app.include_router(demo_router(settings, token_secret))
        if dev_tokens:
            log.info(
                "demo page on /demo; POST /demo/token gives participant tokens to local callers "
                "without an API key (set demo.enabled = false on shared machines)"
            )
        else:
            log.info("demo page on /demo (no development tokens: api.host is not loopback)")
    return app
