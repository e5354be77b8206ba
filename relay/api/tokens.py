"""Participant tokens: HS256 JSON Web Tokens (RFC 7519) that a signaling server hands to clients.

A token names one participant of one room (claims ``room`` and ``sub``), what it may do
(``can_publish``, ``can_subscribe``) and until when (``exp``, Unix seconds). It is signed with
HMAC-SHA256 under ``auth.token_secret``. Only ``alg: HS256`` is accepted (never ``none`` or an
asymmetric algorithm), the signature is compared in constant time before any claim is read,
and every claim above is required. ``nbf`` is honoured when present; ``e2ee`` (boolean, default
false) says the client encrypts its media end to end; other claims are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALGORITHM",
    "MAX_TOKEN_LENGTH",
    "ExpiredToken",
    "InvalidToken",
    "ParticipantToken",
    "decode_token",
    "encode_token",
    "looks_like_jwt",
]

ALGORITHM = "HS256"
#: Longer bearer values are refused before any decoding.
MAX_TOKEN_LENGTH = 4096

_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]*$")


class InvalidToken(ValueError):
    """The token is malformed, forged, or lacks a required claim."""


class ExpiredToken(InvalidToken):
    """The token's ``exp`` has passed (or its ``nbf`` has not come yet)."""


@dataclass(frozen=True)
class ParticipantToken:
    """The verified claims of a participant token."""

    room_id: str
    participant_id: str
    can_publish: bool
    can_subscribe: bool
    #: Unix time (seconds) after which the token is refused
    expires_at: float
    #: the client encrypts its media end to end (optional claim ``e2ee``, default false)
    e2ee: bool = False


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: str, what: str) -> bytes:
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise InvalidToken(f"malformed {what}")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken(f"malformed {what}") from None
    if _b64encode(data) != segment:  # non-canonical spare bits: one token, one spelling
        raise InvalidToken(f"malformed {what}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidToken(f"duplicate member {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise InvalidToken(f"non-standard JSON constant {name}")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidToken(f"malformed {what}") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"{what} is not a JSON object")
    return value


def _signature(signing_input: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()


def looks_like_jwt(token: str) -> bool:
    """True for a compact JWS shape (three dot-separated segments), before any checking."""
    return token.count(".") == 2


def encode_token(
    room_id: str,
    participant_id: str,
    *,
    secret: str,
    expires_at: float,
    can_publish: bool = True,
    can_subscribe: bool = True,
    e2ee: bool = False,
) -> str:
    """A signed participant token. ``expires_at`` is Unix time in seconds."""
    if not secret:
        raise ValueError("a token secret is required")
    for value, name in ((room_id, "room_id"), (participant_id, "participant_id")):
        if not _ID.fullmatch(value):
            raise ValueError(f"{name} must be 1-64 characters of [A-Za-z0-9._-]")
    header = {"alg": ALGORITHM, "typ": "JWT"}
    exp: int | float = int(expires_at) if float(expires_at).is_integer() else float(expires_at)
    claims = {
        "room": room_id,
        "sub": participant_id,
        "can_publish": bool(can_publish),
        "can_subscribe": bool(can_subscribe),
        "exp": exp,
    }
    if e2ee:
        claims["e2ee"] = True
    signing_input = (
        _b64encode(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = _signature(signing_input.encode("ascii"), secret)
    return signing_input + "." + _b64encode(signature)


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken(f"claim {name!r} must be a number (Unix seconds)")
    return float(value)


def decode_token(token: str, secret: str, now: float) -> ParticipantToken:
    """Verify a token against ``secret`` at Unix time ``now``; raises :class:`InvalidToken`.

    :class:`ExpiredToken` (a subclass) means the token was genuine but is not valid at ``now``.
    """
    if not secret:
        raise InvalidToken("participant tokens are not enabled")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a compact JWT (header.payload.signature)")
    if not all(_SEGMENT.fullmatch(part) for part in parts):
        raise InvalidToken("malformed token: segments must be base64url without padding")
    header_b64, payload_b64, signature_b64 = parts
    header = _json_object(_b64decode(header_b64, "header"), "header")
    if header.get("alg") != ALGORITHM:
        raise InvalidToken(f"unsupported algorithm: only {ALGORITHM} is accepted")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise InvalidToken("unsupported token type")
    if "crit" in header:
        raise InvalidToken("unsupported critical header parameters")
    presented = _b64decode(signature_b64, "signature")
    expected = _signature(f"{header_b64}.{payload_b64}".encode("ascii"), secret)
    if not hmac.compare_digest(presented, expected):
        raise InvalidToken("signature does not match")
    # Only a genuine token gets this far: its claims can be trusted to be ours.
    claims = _json_object(_b64decode(payload_b64, "payload"), "payload")
    missing = [
        name
        for name in ("room", "sub", "can_publish", "can_subscribe", "exp")
        if name not in claims
    ]
    if missing:
        raise InvalidToken("missing claim " + ", ".join(repr(name) for name in missing))
    for name in ("room", "sub"):
        if not isinstance(claims[name], str) or not _ID.fullmatch(claims[name]):
            raise InvalidToken(f"claim {name!r} must be an identifier ([A-Za-z0-9._-]{{1,64}})")
    for name in ("can_publish", "can_subscribe"):
        if not isinstance(claims[name], bool):
            raise InvalidToken(f"claim {name!r} must be true or false")
    e2ee = claims.get("e2ee", False)
    if not isinstance(e2ee, bool):
        raise InvalidToken("claim 'e2ee' must be true or false")
    expires_at = _number(claims, "exp")
    if now >= expires_at:
        raise ExpiredToken("token expired")
    if "nbf" in claims and now < _number(claims, "nbf"):
        raise ExpiredToken("token not valid yet (nbf)")
    return ParticipantToken(
        room_id=claims["room"],
        participant_id=claims["sub"],
        can_publish=claims["can_publish"],
        can_subscribe=claims["can_subscribe"],
        expires_at=expires_at,
        e2ee=e2ee,
    )
