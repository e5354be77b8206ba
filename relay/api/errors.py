"""Error responses of the control API: one JSON shape for every failure.

Every error is ``{"error": {"code": "...", "message": "..."}}`` (plus ``details`` for schema
errors) with a fitting status. Errors the SFU core raises (:class:`relay.sfu.errors.SfuError`)
carry their own status and code; the handlers below map framework errors onto the same shape,
and a last-resort handler turns a genuine bug into a bare 500 without a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from relay.sfu.errors import SfuError

__all__ = [
    "Unauthorized",
    "error_body",
    "error_response",
    "install_error_handlers",
    "validation_message",
]

log = logging.getLogger("relay.api")

#: Error codes for statuses raised by the framework itself (routing, body parsing).
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "limit_reached",
    431: "headers_too_large",
    503: "unavailable",
}


class Unauthorized(SfuError):
    """Missing or unknown credentials."""

    status = 401
    code = "unauthorized"
    headers: Mapping[str, str] = {"WWW-Authenticate": "Bearer"}


def error_body(code: str, message: str, details: Sequence[Any] | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = list(details)
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: Sequence[Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error as a JSON response."""
    return JSONResponse(
        error_body(code, message, details), status_code=status, headers=dict(headers or {})
    )


def _location(loc: Sequence[Any]) -> str:
    """A field path such as ``body.metadata.x`` or ``path.room_id``."""
    return ".".join(str(part) for part in loc) or "request"


def _details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors reduced to JSON-safe fields; the offending input is never echoed."""
    details: list[dict[str, Any]] = []
    for error in errors:
        if not isinstance(error, Mapping):
            details.append({"loc": [], "msg": str(error), "type": "invalid"})
            continue
        loc = [part if isinstance(part, int | str) else str(part) for part in error.get("loc", ())]
        kind = str(error.get("type", ""))
        msg = str(error.get("msg", ""))
        if kind == "json_invalid":
            # loc is ("body", <character offset>): name the offset in the message instead.
            ctx = error.get("ctx") or {}
            position = loc[1] if len(loc) > 1 else "?"
            msg = f"invalid JSON at character {position}: {ctx.get('error', 'cannot decode')}"
            loc = loc[:1]
        detail = {"loc": loc, "msg": msg, "type": kind}
        if detail not in details:  # a parameter shared with a dependency is checked twice
            details.append(detail)
    return details


def validation_message(details: Sequence[Mapping[str, Any]]) -> str:
    """``<field path>: <msg>`` of the first error, with a count of the others."""
    if not details:
        return "invalid request"
    first = details[0]
    message = f"{_location(first['loc'])}: {first['msg']}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more)"
    return message


async def _sfu_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SfuError)
    return error_response(exc.status, exc.code, exc.message, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # A caller without valid credentials learns nothing about the schema: answer 401 first.
    precheck = getattr(request.app.state, "auth_precheck", None)
    if precheck is not None:
        denied = precheck(request)
        if denied is not None:
            return await _sfu_error(request, denied)
    details = _details(exc.errors())
    return error_response(422, "invalid_request", validation_message(details), details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400:
        # The framework raises a bare 400 only when a body cannot be parsed at all
        # (for example JSON nested too deeply): report it like any other schema error.
        details = [{"loc": ["body"], "msg": "could not parse the request body", "type": "body"}]
        return error_response(422, "invalid_request", validation_message(details), details=details)
    code = HTTP_CODES.get(status, "error" if status < 500 else "unavailable")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if status == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    if status == 405:
        message = f"method {request.method} not allowed for {request.url.path}"
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return error_response(status, code, message, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts for the request's path (for the ``Allow`` header)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        try:
            if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
                allowed.append(method)
        except Exception:  # routing internals: the header is a courtesy
            return []
    return allowed


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "internal error handling %s %s",
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(500, "internal", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the common JSON shape."""
    app.add_exception_handler(SfuError, _sfu_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
