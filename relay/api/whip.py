"""WHIP (RFC 9725) and WHEP (draft-ietf-wish-whep): publish or watch with one HTTP POST.

A broadcast tool (OBS, GStreamer, ffmpeg) or a browser page that speaks plain HTTP, without the
control API, publishes into a room with ``POST /whip/{room_id}`` and watches it with
``POST /whep/{room_id}``: the body is the client's SDP offer, the answer comes back in a
``201 Created`` with the ``Location`` of the session. ``DELETE`` on that Location ends it,
``PATCH`` with ``application/trickle-ice-sdpfrag`` takes trickled candidates (the relay is
ICE-lite and needs none: ``204``) or restarts ICE (new credentials: ``200`` with the relay's
new ones and a new ``ETag``), and ``OPTIONS`` answers CORS preflight so that a page on another
origin can do all of it with ``fetch``.

Each session is one participant of the room: with an API key the relay creates it (its id
generated, or from ``?participant=`` for WHIP), with a participant token it is the token's
participant, created when it does not exist yet. The session id in the Location is the
participant id. The WHIP participant publishes and never subscribes; the WHEP participant
subscribes to the tracks its answer carries (see :meth:`relay.sfu.sfu.Sfu.viewer_offer`) and
never publishes. Everything goes through the control core's async methods, so it works alike
with one process and with worker processes.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.api.auth import Auth, Principal
from relay.api.core import ControlCore
from relay.api.events import EventBus
from relay.api.schemas import ID_DESCRIPTION, ID_PATTERN, ParticipantIdParam, RoomIdParam
from relay.config import Settings
from relay.rtc import sdp as sdpmod
from relay.sfu import events
from relay.sfu.errors import BadRequest, Conflict, Draining, Forbidden, NotFound, SfuError, TooLarge

__all__ = [
    "CORS_ALLOW_HEADERS",
    "CORS_EXPOSE_HEADERS",
    "SDP",
    "TRICKLE_ICE_SDPFRAG",
    "WhipSessions",
    "install_whip",
    "parse_ice_fragment",
]

log = logging.getLogger("relay.api.whip")

SDP = "application/sdp"
TRICKLE_ICE_SDPFRAG = "application/trickle-ice-sdpfrag"
#: Request headers a page on another origin may send.
CORS_ALLOW_HEADERS = "Authorization, Content-Type, If-Match"
#: Response headers a page on another origin may read.
CORS_EXPOSE_HEADERS = "Location, ETag, Link, Accept-Patch, Accept-Post"
#: How long a browser may cache a preflight answer, in seconds.
CORS_MAX_AGE = "600"
#: Most sessions remembered; the oldest is forgotten first (its participant stays).
MAX_SESSIONS = 65536
#: The two protocols: path prefix -> (the participant's connection, what it does).
KINDS = {"whip": "publisher", "whep": "subscriber"}


#: What a POST does with the offer: (core, participant id, offer, caller) -> the answer.
Negotiate = Callable[[ControlCore, str, str, Principal], Awaitable[str]]


class UnsupportedMediaType(SfuError):
    status = 415
    code = "unsupported_media_type"


class PreconditionFailed(SfuError):
    status = 412
    code = "precondition_failed"


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass
class Session:
    """One WHIP or WHEP session: the participant behind its Location, and its ICE state."""

    kind: str  # "whip" | "whep"
    room_id: str
    participant_id: str
    #: the entity-tag of the current ICE session (RFC 9725 section 4.3.1), quoted
    etag: str
    #: the client's ICE credentials now: a PATCH with others is an ICE restart
    remote_ufrag: str
    remote_pwd: str

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.room_id}/{self.participant_id}"


def _new_etag() -> str:
    return f'"{secrets.token_urlsafe(12)}"'


class WhipSessions:
    """The live sessions by Location (bounded; a session ends with its participant)."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self._sessions: OrderedDict[tuple[str, str, str], Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, kind: str, room_id: str, participant_id: str) -> Session | None:
        return self._sessions.get((kind, room_id, participant_id))

    def add(self, session: Session) -> None:
        self._sessions[(session.kind, session.room_id, session.participant_id)] = session
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)

    def discard(self, kind: str, room_id: str, participant_id: str) -> None:
        self._sessions.pop((kind, room_id, participant_id), None)

    def observe(self, event: events.Event) -> None:
        """Event observer: a participant that left, or a closed room, ends its sessions."""
        if isinstance(event, events.ParticipantLeft):
            for kind in KINDS:
                self.discard(kind, event.room_id, event.participant_id)
        elif isinstance(event, events.RoomClosed):
            for key in [k for k in self._sessions if k[1] == event.room_id]:
                del self._sessions[key]


# --------------------------------------------------------------------------------------------
# Request helpers


def _principal(request: Request) -> Principal:
    """The caller's principal from ``Authorization: Bearer``; 401 without valid credentials."""
    auth: Auth = request.app.state.auth
    header = request.headers.get("authorization") or ""
    scheme, _, token = header.strip().partition(" ")
    principal = auth.principal_for(token.strip() if scheme.lower() == "bearer" else None)
    request.state.principal = principal
    return principal


def _require_type(request: Request, wanted: str) -> None:
    given = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if given != wanted:
        raise UnsupportedMediaType(
            f"Content-Type must be {wanted} (got {given or 'none'})",
        )


async def _text_body(request: Request, limit: int, what: str) -> str:
    body = await request.body()
    if len(body) > limit:
        raise TooLarge(f"{what} larger than {limit} bytes", code="too_large")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not UTF-8", code="bad_sdp") from None


async def _offer(request: Request, settings: Settings) -> tuple[str, sdpmod.RemoteTransport]:
    """The SDP offer of a POST, checked enough to refuse garbage before anything is created."""
    _require_type(request, SDP)
    text = await _text_body(request, settings.limits.max_sdp_bytes, "SDP offer")
    if not text.strip():
        raise BadRequest("the body must be an SDP offer", code="bad_sdp")
    try:
        offer = sdpmod.parse_sdp(text)
        transport = sdpmod.remote_transport(offer)
    except sdpmod.SdpError as exc:
        raise BadRequest(f"bad offer: {exc}", code="bad_sdp") from None
    return text, transport


def _core(request: Request) -> ControlCore:
    core: ControlCore = request.app.state.sfu
    return core


def _sessions(request: Request) -> WhipSessions:
    sessions: WhipSessions = request.app.state.whip_sessions
    return sessions


def _link_headers(settings: Settings) -> list[str]:
    """``Link: <url>; rel="ice-server"`` per configured ICE server (RFC 9725 section 4.6),
    with the TURN credentials on ``turn:``/``turns:`` URLs."""
    whip = settings.whip
    links = []
    for url in whip.ice_servers:
        link = f'<{url}>; rel="ice-server"'
        if url.startswith(("turn:", "turns:")) and whip.ice_username:
            link += (
                f'; username="{whip.ice_username}"; credential="{whip.ice_credential}"'
                '; credential-type="password"'
            )
        links.append(link)
    return links


async def _participant(
    request: Request,
    principal: Principal,
    room_id: str,
    requested: str | None,
    *,
    publish: bool,
) -> tuple[str, bool]:
    """The session's participant: (id, whether this request created it)."""
    core = _core(request)
    if core.draining:
        raise Draining("the relay is draining and accepts no new sessions")
    if principal.is_admin:
        info = await core.add_participant(
            room_id,
            requested,
            None,
            can_publish=publish,
            can_subscribe=not publish,
            auto_subscribe=False,
        )
        return str(info["participant_id"]), True
    participant_id = principal.participant_id
    assert participant_id is not None
    try:
        info = await core.get_participant(room_id, participant_id)
    except NotFound as exc:
        if exc.code != "participant_not_found":
            raise
    else:
        if publish and info.get("tracks"):
            raise Conflict(
                f"participant {participant_id} already publishes (through the control API)",
                code="already_publishing",
            )
        return participant_id, False
    await core.add_participant(
        room_id,
        participant_id,
        None,
        can_publish=publish and principal.can_publish,
        can_subscribe=not publish and principal.can_subscribe,
        auto_subscribe=False,
        e2ee=principal.e2ee,
    )
    return participant_id, True


async def _create(
    request: Request,
    kind: str,
    room_id: str,
    requested: str | None,
    negotiate: Negotiate,
) -> Response:
    """POST: check the caller and the offer, make the participant, negotiate, answer 201."""
    settings: Settings = request.app.state.settings
    principal = _principal(request)
    publish = kind == "whip"
    if not principal.may_access(room_id):
        raise Forbidden("these credentials are not valid for this room")
    if publish and not principal.can_publish:
        raise Forbidden("this token does not allow publishing (can_publish is false)")
    if not publish and not principal.can_subscribe:
        raise Forbidden("this token does not allow subscribing (can_subscribe is false)")
    if not principal.is_admin and requested not in (None, principal.participant_id):
        raise Forbidden("a participant token publishes as its own participant only")
    offer, remote = await _offer(request, settings)
    sessions = _sessions(request)
    if not principal.is_admin:
        assert principal.participant_id is not None
        if sessions.get(kind, room_id, principal.participant_id) is not None:
            raise Conflict(
                f"participant {principal.participant_id} already has a {kind.upper()} session; "
                "DELETE it first",
                code="session_exists",
            )
    participant_id, created = await _participant(
        request, principal, room_id, requested if publish else None, publish=publish
    )
    core = _core(request)
    try:
        answer: str = await negotiate(core, participant_id, offer, principal)
    except Exception:
        if created:
            try:
                await core.remove_participant(room_id, participant_id, "left")
            except SfuError:
                pass
        raise
    session = Session(kind, room_id, participant_id, _new_etag(), remote.ice_ufrag, remote.ice_pwd)
    sessions.add(session)
    response = Response(
        answer,
        status_code=201,
        media_type=SDP,
        headers={"Location": session.location, "ETag": session.etag},
    )
    for link in _link_headers(settings):
        response.headers.append("Link", link)
    log.info("%s session %s in room %s", kind.upper(), participant_id, room_id)
    return response


def _session(request: Request, kind: str, room_id: str, session_id: str) -> Session:
    principal = _principal(request)
    session = _sessions(request).get(kind, room_id, session_id)
    if session is None:
        raise NotFound(
            f"no {kind.upper()} session {session_id} in room {room_id}", code="session_not_found"
        )
    if not principal.may_access(room_id, session.participant_id):
        raise Forbidden("these credentials are not valid for this session")
    return session


async def _delete(request: Request, kind: str, room_id: str, session_id: str) -> Response:
    session = _session(request, kind, room_id, session_id)
    _sessions(request).discard(kind, room_id, session_id)
    try:
        await _core(request).remove_participant(room_id, session.participant_id, "left")
    except NotFound:
        pass  # it left already: the session is over either way
    return Response(status_code=204)


def parse_ice_fragment(text: str) -> tuple[str | None, str | None, list[str], list[str]]:
    """An ``application/trickle-ice-sdpfrag`` body (RFC 8840): (ice-ufrag, ice-pwd,
    candidate lines, the ``m=`` and ``a=mid`` lines of the first media section). Raises
    BadRequest for a line that is not SDP."""
    ufrag = pwd = None
    candidates: list[str] = []
    media: list[str] = []
    in_media = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise BadRequest("bad SDP fragment: not an SDP line", code="bad_sdp")
        if line.startswith("m="):
            if in_media:
                break  # max-bundle: the first m-section carries the transport
            in_media = True
            media.append(line)
        elif line.startswith("a=mid:") and in_media:
            media.append(line)
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line[len("a=ice-ufrag:") :].strip()
        elif line.startswith("a=ice-pwd:"):
            pwd = line[len("a=ice-pwd:") :].strip()
        elif line.startswith("a=candidate:"):
            candidates.append(line)
    return ufrag, pwd, candidates, media


def _if_match(header: str, etag: str) -> bool:
    """Whether an If-Match field value matches the current entity-tag (RFC 9110 13.1.1)."""
    values = [v.strip() for v in header.split(",")]
    return "*" in values or etag in values or etag in (v.removeprefix("W/") for v in values)


async def _patch(request: Request, kind: str, room_id: str, session_id: str) -> Response:
    session = _session(request, kind, room_id, session_id)
    _require_type(request, TRICKLE_ICE_SDPFRAG)
    settings: Settings = request.app.state.settings
    text = await _text_body(request, settings.limits.max_sdp_bytes, "SDP fragment")
    if_match = request.headers.get("if-match")
    if if_match is not None and not _if_match(if_match, session.etag):
        raise PreconditionFailed(f"If-Match {if_match} is not the session's current ETag")
    ufrag, pwd, _, media = parse_ice_fragment(text)
    if ufrag is None or (ufrag == session.remote_ufrag and pwd in (None, session.remote_pwd)):
        # Trickled candidates: the relay is ICE-lite and learns the client's addresses from
        # its connectivity checks, so there is nothing to do (and no new ETag).
        return Response(status_code=204)
    if pwd is None:
        raise BadRequest("an ICE restart needs both a=ice-ufrag and a=ice-pwd", code="bad_sdp")
    result = await _core(request).ice_restart(
        room_id, session.participant_id, KINDS[kind], ufrag, pwd
    )
    session.remote_ufrag, session.remote_pwd = ufrag, pwd
    session.etag = _new_etag()
    lines = ["a=ice-lite", f"a=ice-ufrag:{result['ice_ufrag']}", f"a=ice-pwd:{result['ice_pwd']}"]
    if media:
        lines += media
        lines += sdpmod.ice_candidate_lines(
            [(ip, int(port)) for ip, port in result["candidates"]],
            [(ip, int(port)) for ip, port in result.get("tcp_candidates", [])],
        )
    return Response(
        "\r\n".join(lines) + "\r\n",
        status_code=200,
        media_type=TRICKLE_ICE_SDPFRAG,
        headers={"ETag": session.etag},
    )


def _preflight(methods: str, accept: dict[str, str]) -> Response:
    return Response(
        status_code=204,
        headers={
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
            **accept,
        },
    )


# --------------------------------------------------------------------------------------------
# Routes

# The bodies (application/sdp, application/trickle-ice-sdpfrag) are read from the request as
# they are and described in the routes' text: an OpenAPI requestBody of these media types
# leaves generic clients and schema fuzzers without a way to write one.
_CREATED: dict[int | str, dict[str, Any]] = {
    201: {
        "content": {SDP: {}},
        "description": "The relay's SDP answer; `Location` of the session and its `ETag`.",
    }
}
_RESTARTED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {TRICKLE_ICE_SDPFRAG: {}},
        "description": "ICE restarted: the relay's new credentials and candidates, new `ETag`.",
    },
    204: {"description": "Candidates taken (the relay is ICE-lite and needs none)."},
}

whip_router = APIRouter(tags=["whip"])


@whip_router.post(
    "/whip/{room_id}",
    status_code=201,
    response_class=Response,
    summary="WHIP: publish into a room (RFC 9725)",
    responses=_CREATED,
)
async def whip_publish(
    room_id: RoomIdParam,
    request: Request,
    participant: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=ID_PATTERN,
            description="API key only: the new participant's id. " + ID_DESCRIPTION,
        ),
    ] = None,
) -> Response:
    """The body is the client's SDP offer (`Content-Type: application/sdp`). With an API key
    the relay creates a publishing participant (its id from `participant`, or generated); with
    a participant token (`can_publish`) it is the token's participant, created when it does
    not exist yet."""

    async def negotiate(core: ControlCore, pid: str, offer: str, principal: Principal) -> str:
        return await core.publisher_offer(room_id, pid, offer, e2ee=principal.e2ee)

    return await _create(request, "whip", room_id, participant, negotiate)


@whip_router.post(
    "/whep/{room_id}",
    status_code=201,
    response_class=Response,
    summary="WHEP: watch a room",
    responses=_CREATED,
)
async def whep_watch(
    room_id: RoomIdParam,
    request: Request,
    participant: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=ID_PATTERN,
            description="Watch this participant's tracks only. " + ID_DESCRIPTION,
        ),
    ] = None,
    track: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=ID_PATTERN,
            description="Watch this track only. " + ID_DESCRIPTION,
        ),
    ] = None,
) -> Response:
    """The body is the viewer's SDP offer (`Content-Type: application/sdp`) with `recvonly`
    audio and video m-lines. Each takes one track of its kind of the room (of `participant`, or
    only `track`), in the order the publishers joined and published; m-lines left over are
    answered inactive. The m-lines are fixed by the answer: a track published later gets no
    m-line of its own, but an m-line whose track ended takes the next track of its kind and
    format within the viewer's choice (a publisher that reconnects), on the same SSRC, its
    numbering unbroken; a `track` viewer stays on its track. With an API key the relay
    creates the viewer (its id generated); with a participant token (`can_subscribe`) it is
    the token's participant, created when it does not exist yet."""

    async def negotiate(core: ControlCore, pid: str, offer: str, principal: Principal) -> str:
        return await core.viewer_offer(
            room_id, pid, offer, publisher_id=participant, track_id=track
        )

    return await _create(request, "whep", room_id, None, negotiate)


def _session_routes(kind: str) -> None:
    path = f"/{kind}/{{room_id}}/{{session_id}}"
    name = kind.upper()

    async def delete(
        room_id: RoomIdParam, session_id: ParticipantIdParam, request: Request
    ) -> Response:
        return await _delete(request, kind, room_id, session_id)

    async def patch(
        room_id: RoomIdParam, session_id: ParticipantIdParam, request: Request
    ) -> Response:
        return await _patch(request, kind, room_id, session_id)

    async def options(room_id: RoomIdParam, session_id: ParticipantIdParam) -> Response:
        return _preflight("PATCH, DELETE, OPTIONS", {"Accept-Patch": TRICKLE_ICE_SDPFRAG})

    whip_router.add_api_route(
        path,
        delete,
        methods=["DELETE"],
        status_code=204,
        response_class=Response,
        summary=f"{name}: end a session",
        description="Removes the session's participant (`participant.left`, reason `left`).",
        name=f"{kind}_delete",
    )
    whip_router.add_api_route(
        path,
        patch,
        methods=["PATCH"],
        response_class=Response,
        summary=f"{name}: trickle ICE or restart ICE",
        description=(
            "Body: `application/trickle-ice-sdpfrag` (RFC 8840). Candidates alone (or the "
            "session's ICE credentials again) are taken with 204: the relay is ICE-lite and needs "
            "none. New `a=ice-ufrag` and `a=ice-pwd` restart ICE: 200 with the relay's new "
            "credentials and candidates and a new `ETag` (send `If-Match: *`). An `If-Match` "
            "other than `*` or the current ETag is 412."
        ),
        name=f"{kind}_patch",
        responses=_RESTARTED,
    )
    whip_router.add_api_route(
        path,
        options,
        methods=["OPTIONS"],
        status_code=204,
        response_class=Response,
        summary=f"{name}: CORS preflight of a session",
        name=f"{kind}_session_options",
    )

    async def endpoint_options(room_id: RoomIdParam) -> Response:
        return _preflight("POST, OPTIONS", {"Accept-Post": SDP})

    whip_router.add_api_route(
        f"/{kind}/{{room_id}}",
        endpoint_options,
        methods=["OPTIONS"],
        status_code=204,
        response_class=Response,
        summary=f"{name}: CORS preflight",
        name=f"{kind}_options",
    )


for _kind in KINDS:
    _session_routes(_kind)


# --------------------------------------------------------------------------------------------
# CORS


class CorsMiddleware:
    """``Access-Control-Allow-Origin`` and ``-Expose-Headers`` on every WHIP and WHEP response
    (errors included), so that a page on another origin can read the answer, ``Location`` and
    ``ETag``. Credentials are bearer tokens in a header, never cookies."""

    def __init__(self, app: ASGIApp, origin: str) -> None:
        self.app = app
        self.origin = origin.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(("/whip/", "/whep/")):
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"access-control-allow-origin", self.origin))
                headers.append((b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode()))
                headers.append((b"vary", b"Origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)


# --------------------------------------------------------------------------------------------
# The example page (with the demo): /demo/whip

#: The page's files in ``relay/static``, by route.
PAGE_FILES = {
    "/demo/whip": ("whip.html", "text/html; charset=utf-8"),
    "/demo/whip.js": ("whip.js", "text/javascript; charset=utf-8"),
}
#: The page talks to any WHIP/WHEP endpoint the fragment names, and to a loopback report URL.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "img-src 'self' data:",
            "media-src 'self' blob: mediastream:",
            "connect-src 'self' http: https:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=(self)",
}


def page_router() -> APIRouter:
    """``GET /demo/whip``: a page that publishes (WHIP) or watches (WHEP) with ``fetch``."""
    router = APIRouter(tags=["demo"])
    folder = resources.files("relay").joinpath("static")
    for path, (name, media_type) in PAGE_FILES.items():
        body = folder.joinpath(name).read_bytes()

        def serve(body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=PAGE_HEADERS)

        router.add_api_route(path, serve, methods=["GET"], include_in_schema=False)
    return router


def install_whip(app: FastAPI, settings: Settings, bus: EventBus) -> None:
    """Serve WHIP and WHEP on ``app`` (its ``state.sfu``, ``state.auth``, ``state.settings``),
    and their example page at ``/demo/whip`` while the demo is on."""
    sessions = WhipSessions()
    app.state.whip_sessions = sessions
    bus.add_observer(sessions.observe)
    app.include_router(whip_router)
    if settings.demo.enabled:
        app.include_router(page_router())
    app.add_middleware(CorsMiddleware, origin=settings.whip.allow_origin)
