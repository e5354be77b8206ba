"""Who is calling: bearer credentials turned into a :class:`Principal`.

Authentication is a chain of :class:`Authenticator` objects asked in turn:
:class:`ApiKeyAuthenticator` (API keys, whose principals may do everything) and, when
``auth.token_secret`` is set, :class:`TokenAuthenticator` (participant tokens, see
:mod:`relay.api.tokens`). A participant principal carries its ``room_id`` and
``participant_id``; the route dependencies below restrict it to that participant's own
endpoints, its room's event stream, and what its ``can_*`` flags allow.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from relay.api.errors import Unauthorized
from relay.api.schemas import ParticipantIdParam, RoomIdParam
from relay.api.tokens import ExpiredToken, InvalidToken, decode_token, looks_like_jwt
from relay.sfu.errors import Forbidden

__all__ = [
    "PARTICIPANT_TOKEN",
    "ApiKeyAuthenticator",
    "Auth",
    "Authenticator",
    "InvalidTokenError",
    "Principal",
    "TokenAuthenticator",
    "authenticate",
    "bearer_scheme",
    "require_admin",
    "require_participant",
    "require_publisher",
    "require_room",
    "require_subscriber",
]

#: ``Principal.kind`` of a caller holding a participant token.
PARTICIPANT_TOKEN = "participant_token"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. Never holds the credential itself."""

    kind: str
    #: a non-secret name for logs, e.g. ``api_key:0`` (the index of the matching key)
    subject: str
    #: set for principals limited to one room (and possibly one participant in it)
    room_id: str | None = None
    participant_id: str | None = None
    #: may offer a publisher connection (participant tokens: the ``can_publish`` claim)
    can_publish: bool = True
    #: may negotiate a subscriber connection (participant tokens: the ``can_subscribe`` claim)
    can_subscribe: bool = True
    #: may read its room (``GET /v1/rooms/{room_id}``); participant tokens may not
    can_read_room: bool = True
    #: a participant token's ``e2ee`` claim: the client encrypts its media end to end
    e2ee: bool = False

    @property
    def is_admin(self) -> bool:
        """True for callers allowed to manage every room (API keys)."""
        return self.kind == "api_key"

    def may_access(self, room_id: str | None, participant_id: str | None = None) -> bool:
        """Whether this caller may act on ``room_id`` (and ``participant_id`` in it)."""
        if self.is_admin:
            return True
        if self.room_id is None or room_id != self.room_id:
            return False
        return participant_id is None or participant_id == self.participant_id


class Authenticator(Protocol):
    """Turns a bearer token into a principal, or None when the token is not its kind."""

    def authenticate(self, token: str) -> Principal | None: ...


class ApiKeyAuthenticator:
    """Static API keys from the configuration, compared in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode("utf-8") for key in keys)

    def authenticate(self, token: str) -> Principal | None:
        presented = token.encode("utf-8", "surrogateescape")
        match = None
        # Compare with every key so the time taken does not depend on which one matched.
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(presented, key):
                match = index
        if match is None:
            return None
        return Principal(kind="api_key", subject=f"api_key:{match}")


class InvalidTokenError(Unauthorized):
    """A participant token that is malformed, forged or expired (RFC 6750 ``invalid_token``)."""

    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class TokenAuthenticator:
    """Participant tokens (HS256 JWT) signed with one secret.

    Values that do not look like a JWT are left to the other authenticators; a JWT that fails
    verification is refused outright with :class:`InvalidTokenError`, so that the caller learns
    why (expired, bad signature, missing claim) rather than a bare "invalid credentials".
    """

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("a token secret is required")
        self._secret = secret
        self._clock = clock

    def authenticate(self, token: str) -> Principal | None:
        if not looks_like_jwt(token):
            return None
        try:
            claims = decode_token(token, self._secret, self._clock())
        except ExpiredToken as error:
            raise InvalidTokenError(f"participant token rejected: {error}") from None
        except InvalidToken as error:
            raise InvalidTokenError(f"invalid participant token: {error}") from None
        return Principal(
            kind=PARTICIPANT_TOKEN,
            subject=f"participant:{claims.participant_id}",
            room_id=claims.room_id,
            participant_id=claims.participant_id,
            can_publish=claims.can_publish,
            can_subscribe=claims.can_subscribe,
            can_read_room=False,
            e2ee=claims.e2ee,
        )


class Auth:
    """The authenticator chain of one app (``app.state.auth``)."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = list(authenticators)

    def principal_for(self, token: str | None) -> Principal:
        """The principal for a bearer token; raises :class:`Unauthorized`."""
        if not token:
            raise Unauthorized("missing bearer token in the Authorization header")
        for authenticator in self.authenticators:
            principal = authenticator.authenticate(token)
            if principal is not None:
                return principal
        raise Unauthorized("invalid credentials")

    def check(self, request: Request) -> Unauthorized | None:
        """The error a request would get for its credentials, or None if they are valid."""
        try:
            self.principal_for(_token(request.headers.get("authorization")))
        except Unauthorized as error:
            return error
        return None


def _token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


#: Documents the scheme in OpenAPI; missing credentials are reported by :func:`authenticate`.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description=(
        "An API key from `api.keys` (every call), or a participant token: an HS256 JWT signed "
        "with `auth.token_secret`, with claims `room`, `sub` (participant id), `can_publish`, "
        "`can_subscribe` and `exp`. A participant token may call only its own participant's "
        "endpoints (read, leave, publisher, subscriber, stats) and `GET /v1/events?room_id=` "
        "of its room; anything else is 403. Expired or forged tokens are 401."
    ),
)


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """Dependency: the caller's principal, or 401."""
    auth: Auth = request.app.state.auth
    token = credentials.credentials if credentials is not None else None
    principal = auth.principal_for(token)
    request.state.principal = principal
    return principal


async def require_admin(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """Dependency: a caller that may manage every room (create, list, delete)."""
    if not principal.is_admin:
        raise Forbidden("these credentials cannot manage rooms")
    return principal


async def require_room(
    room_id: RoomIdParam, principal: Annotated[Principal, Depends(authenticate)]
) -> Principal:
    """Dependency: a caller allowed to read the room of the path."""
    if not principal.may_access(room_id) or not principal.can_read_room:
        raise Forbidden("these credentials are not valid for this room")
    return principal


async def require_participant(
    room_id: RoomIdParam,
    participant_id: ParticipantIdParam,
    principal: Annotated[Principal, Depends(authenticate)],
) -> Principal:
    """Dependency: a caller allowed to act on the participant of the path."""
    if not principal.may_access(room_id, participant_id):
        raise Forbidden("these credentials are not valid for this participant")
    return principal


async def require_publisher(
    principal: Annotated[Principal, Depends(require_participant)],
) -> Principal:
    """Dependency: the participant of the path, allowed to publish."""
    if not principal.can_publish:
        raise Forbidden("this token does not allow publishing (can_publish is false)")
    return principal


async def require_subscriber(
    principal: Annotated[Principal, Depends(require_participant)],
) -> Principal:
    """Dependency: the participant of the path, allowed to subscribe."""
    if not principal.can_subscribe:
        raise Forbidden("this token does not allow subscribing (can_subscribe is false)")
    return principal
