"""The browser demo: a page at ``/demo`` and, on loopback only, a development token endpoint.

The page (``relay/static/demo.html``, ``demo.js``, ``demo.css``: no build step, nothing loaded
from elsewhere) joins a room with a participant token. It takes the token from its URL
fragment (``#room=...&participant=...&token=...``, as a signaling server would hand it out) or
asks ``POST /demo/token`` for one. That endpoint exists only while ``demo.enabled`` is true
and ``api.host`` is a loopback address, and it answers only requests that come from this
machine for a loopback host name and were not forwarded by a proxy: it creates rooms and
participants without an API key.

With a passphrase the page asks for ``e2ee``: a room it creates requires end-to-end
encryption, and the participant and its token are ``e2ee``; the page then encrypts every media
frame (``demo-e2ee.js``, a worker, documents the frame format).
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request, Response, status

from relay.api.schemas import DemoToken, DemoTokenRequest, ErrorResponse
from relay.api.tokens import encode_token
from relay.config import Settings, is_loopback_host
from relay.sfu.errors import Conflict, Draining, Forbidden, NotFound

__all__ = ["DEMO_TOKEN_TTL", "demo_router", "dev_tokens_enabled", "host_of"]

#: Seconds a development token stays valid.
DEMO_TOKEN_TTL = 12 * 3600

#: Files of the page, served from memory: name -> media type.
ASSETS = {
    "demo.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "demo-e2ee.js": "text/javascript; charset=utf-8",  # worker: frame encryption (E2EE rooms)
    "demo.css": "text/css; charset=utf-8",
}

#: The page may talk to this relay and (for automated tests) post its statistics to a
#: collector on this machine; it loads nothing from anywhere else.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self' http://127.0.0.1:* http://localhost:* http://[::1]:*",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=(self)",
}

#: Headers a reverse proxy adds: a request carrying one did not come from this machine.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def dev_tokens_enabled(settings: Settings) -> bool:
    """Whether ``POST /demo/token`` exists: demo on and the API bound to loopback."""
    return settings.demo.enabled and is_loopback_host(settings.api.host)


def host_of(header: str) -> str:
    """The host name of a ``Host`` header value (``[::1]:8080`` -> ``::1``)."""
    value = header.strip()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") > 1:  # a bare IPv6 address (not valid in Host, but unambiguous)
        return value
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() else value


def _check_local(request: Request) -> None:
    """Refuse anything but a same-origin request made on this machine to a loopback name."""
    client = request.client.host if request.client is not None else ""
    if not client or not is_loopback_host(client):
        raise Forbidden("development tokens are only handed out to this machine")
    if not is_loopback_host(host_of(request.headers.get("host", ""))):
        raise Forbidden("development tokens need a loopback host name (127.0.0.1, localhost)")
    if any(name in request.headers for name in FORWARDING_HEADERS):
        raise Forbidden("development tokens are not handed out through a proxy")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("development tokens are only handed out to the relay's own page")


def _read_assets() -> dict[str, bytes]:
    folder = resources.files("relay").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


def demo_router(settings: Settings, token_secret: str) -> APIRouter:
    """Routes of the demo page; ``token_secret`` signs development tokens (if enabled)."""
    router = APIRouter(tags=["demo"])
    assets = _read_assets()

    def asset(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    @router.get("/demo", include_in_schema=False)
    async def demo_page() -> Response:
        return asset("demo.html")

    for name in ASSETS:
        if name != "demo.html":
            router.add_api_route(
                f"/demo/{name}",
                lambda name=name: asset(name),
                methods=["GET"],
                include_in_schema=False,
            )

    if not dev_tokens_enabled(settings):
        return router
    if not token_secret:
        raise ValueError("development tokens need a token secret")

    @router.post(
        "/demo/token",
        status_code=status.HTTP_201_CREATED,
        response_model=DemoToken,
        summary="Development only: join a room and get a participant token",
        responses={
            code: {"model": ErrorResponse, "description": description}
            for code, description in {
                403: "Not a same-origin request from this machine to a loopback host name.",
                404: "Never: the route does not exist unless the demo is on and the API is "
                "on loopback.",
                409: "The participant id is taken (`participant_exists`), or an end-to-end "
                "encrypted participant asks to join a room that exists without end-to-end "
                "encryption (`room_not_e2ee`).",
                422: "The body does not match the schema.",
                429: "A configured limit is reached.",
                503: "The relay is draining.",
            }.items()
        },
    )
    async def demo_token(request: Request, body: DemoTokenRequest) -> Any:
        """Creates the room if needed and a participant in it, and returns a participant
        token for that participant. Exists only while `demo.enabled` is true and `api.host`
        is a loopback address; needs no API key."""
        _check_local(request)
        sfu = request.app.state.sfu
        if sfu.draining:
            raise Draining("the relay is draining and accepts no new sessions")
        try:
            room = await sfu.get_room(body.room_id)
        except NotFound:
            try:
                room = await sfu.create_room(
                    room_id=body.room_id,
                    max_participants=None,
                    e2ee_required=body.e2ee,
                    empty_timeout=None,
                    codec_preference=None,
                )
            except Conflict:  # another page created it meanwhile
                room = await sfu.get_room(body.room_id)
        e2ee_required = bool(room.get("e2ee_required"))
        if body.e2ee and not e2ee_required:
            # the others in the room would see and hear nothing of this page's media
            raise Conflict(
                f"room {body.room_id} exists without end-to-end encryption: "
                "choose another room name for an encrypted call",
                code="room_not_e2ee",
            )
        participant = await sfu.add_participant(
            body.room_id,
            participant_id=body.participant_id,
            metadata=None,
            can_publish=body.can_publish,
            can_subscribe=body.can_subscribe,
            auto_subscribe=True,
            e2ee=body.e2ee,
        )
        expires_at = float(int(time.time()) + DEMO_TOKEN_TTL)
        token = encode_token(
            body.room_id,
            participant["participant_id"],
            secret=token_secret,
            expires_at=expires_at,
            can_publish=body.can_publish,
            can_subscribe=body.can_subscribe,
            e2ee=body.e2ee,
        )
        return DemoToken(
            room_id=body.room_id,
            participant_id=participant["participant_id"],
            token=token,
            expires_at=expires_at,
            e2ee_required=e2ee_required,
        )

    return router
