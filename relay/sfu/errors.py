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
