"""ICE-lite, sans-I/O: answering STUN Binding requests (RFC 8445 §2.5, RFC 8489, RFC 7675).

A lite agent never sends checks of its own. It answers the client's Binding requests on its
single host candidate, authenticates them with its own password (short-term credentials), and
learns the client's address from the checks that pass. The controlling client nominates a pair
with USE-CANDIDATE; a later valid check from another address (NAT rebinding) moves the latch.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from aioice import stun

__all__ = [
    "StunError",
    "BindingRequest",
    "IceCredentials",
    "parse_binding_request",
    "binding_success",
    "binding_error",
    "random_ufrag",
    "random_password",
]

_ICE_CHARS = string.ascii_letters + string.digits + "+/"


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message we can answer."""


def random_ufrag() -> str:
    """A fresh ICE username fragment (RFC 8839 §5.4: at least 4 ice-chars; we use 16)."""
    return "".join(secrets.choice(_ICE_CHARS) for _ in range(16))


def random_password() -> str:
    """A fresh ICE password (at least 22 ice-chars; we use 32)."""
    return "".join(secrets.choice(_ICE_CHARS) for _ in range(32))


@dataclass(frozen=True)
class IceCredentials:
    """One side's short-term credentials."""

    ufrag: str
    pwd: str

    @classmethod
    def generate(cls) -> IceCredentials:
        return cls(random_ufrag(), random_password())


@dataclass
class BindingRequest:
    """A parsed Binding request, not yet authenticated."""

    message: stun.Message
    local_ufrag: str
    remote_ufrag: str
    use_candidate: bool
    priority: int | None
    controlling: bool

    def authenticate(self, local_pwd: str) -> bool:
        """True when MESSAGE-INTEGRITY matches our password (the fingerprint was checked on parse)."""
        return self.message.check_message_integrity(local_pwd.encode())


def parse_binding_request(data: bytes) -> BindingRequest:
    """Parse a STUN Binding request addressed to an ICE agent.

    Raises StunError for anything else: garbage, a bad fingerprint, another method or class, a
    missing or malformed USERNAME ("ours:theirs"), a request without MESSAGE-INTEGRITY.
    """
    try:
        message = stun.parse_message(data)
    except Exception as exc:  # the codec raises several types for malformed input
        raise StunError(f"malformed STUN message: {exc}") from None
    if message.message_method != stun.Method.BINDING:
        raise StunError(f"unexpected STUN method {message.message_method.name}")
    if message.message_class != stun.Class.REQUEST:
        raise StunError(f"unexpected STUN class {message.message_class.name}")
    username = message.attributes.get("USERNAME")
    if not isinstance(username, str) or username.count(":") != 1:
        raise StunError("Binding request without a valid USERNAME")
    local_ufrag, remote_ufrag = username.split(":")
    if not local_ufrag or not remote_ufrag:
        raise StunError("Binding request with an empty username fragment")
    if "MESSAGE-INTEGRITY" not in message.attributes:
        raise StunError("Binding request without MESSAGE-INTEGRITY")
    return BindingRequest(
        message=message,
        local_ufrag=local_ufrag,
        remote_ufrag=remote_ufrag,
        use_candidate="USE-CANDIDATE" in message.attributes,
        priority=message.attributes.get("PRIORITY"),
        controlling="ICE-CONTROLLING" in message.attributes,
    )


def binding_success(request: BindingRequest, addr: tuple[str, int], local_pwd: str) -> bytes:
    """The success response: XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY (our password), FINGERPRINT."""
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE,
        transaction_id=request.message.transaction_id,
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
    response.add_message_integrity(local_pwd.encode())
    return bytes(response)


def binding_error(
    request: BindingRequest, code: int, reason: str, local_pwd: str | None = None
) -> bytes:
    """An error response (e.g. 401 Unauthorized, 487 Role Conflict)."""
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.ERROR,
        transaction_id=request.message.transaction_id,
    )
    response.attributes["ERROR-CODE"] = (code, reason)
    if local_pwd is not None:
        response.add_message_integrity(local_pwd.encode())
    else:
        response.add_fingerprint()
    return bytes(response)
