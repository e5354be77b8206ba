"""Errors the SFU core raises for what a caller asked; the control API maps them to responses."""

from __future__ import annotations


class SfuError(Exception):
    """A request the relay refuses, with an error code and an HTTP status for the API."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(SfuError):
    status = 400
    code = "bad_request"


class Forbidden(SfuError):
    status = 403
    code = "forbidden"


class NotFound(SfuError):
    status = 404
    code = "not_found"


class Conflict(SfuError):
    status = 409
    code = "conflict"


class TooLarge(SfuError):
    status = 413
    code = "too_large"


class LimitReached(SfuError):
    status = 429
    code = "limit_reached"


class Draining(SfuError):
    status = 503
    code = "draining"


class Overloaded(SfuError):
    """The relay sheds load: no new sessions for now; ``Retry-After`` says when to try again."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


def room_not_found(room_id: str) -> NotFound:
    """No room ``room_id`` (the SFU core's rooms, or the front process's directory)."""
    return NotFound(f"room {room_id} not found", code="room_not_found")


def participant_not_found(room_id: str, participant_id: str) -> NotFound:
    return NotFound(
        f"participant {participant_id} not found in room {room_id}", code="participant_not_found"
    )


def participant_exists(room_id: str, participant_id: str) -> Conflict:
    return Conflict(
        f"participant {participant_id} already in room {room_id}", code="participant_exists"
    )


def room_full(room_id: str, max_participants: int) -> LimitReached:
    return LimitReached(f"room {room_id} is full ({max_participants})", code="room_full")
