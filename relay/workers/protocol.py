"""The wire format of the front <-> worker channel, without any I/O.

A frame is a 4-byte big-endian length ``L`` of the rest, one byte of kind and ``L - 1`` bytes of
UTF-8 JSON (compact separators)::

    kind 1  request       {"id": int, "method": str, "params": {...}}
    kind 2  response      {"id": int, "result": any}
                       or {"id": int, "error": {"type", "code", "message", "status",
                                                "retry_after"?}}
    kind 3  notification  {"method": str, "params": {...}}

``params`` may be left out (an empty object); unknown keys are ignored. ``L`` is at most
:data:`MAX_FRAME`: the ``encode_*`` functions raise :class:`FrameTooLarge` above it.

:class:`FrameDecoder` turns received bytes into messages. A frame whose body is wrong (not JSON,
an unknown kind, a missing or mistyped field) becomes a :class:`ProtocolError` item and decoding
goes on with the next frame. A length of zero or above :data:`MAX_FRAME` leaves no way to find
the next frame: :meth:`FrameDecoder.feed` raises a :class:`FatalProtocolError` and the
connection has to be closed.

Errors travel as their fields: :func:`error_fields` on the answering side,
:func:`remote_exception` / :func:`raise_remote` on the calling side re-create the same
:class:`~relay.sfu.errors.SfuError` class with the same code, message, status (and
``retry_after``). Any other exception travels as a generic internal error, never its text.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeGuard

from relay.sfu import errors
from relay.sfu.errors import Overloaded, SfuError

__all__ = [
    "ERROR_CLASSES",
    "INTERNAL",
    "KIND_NOTIFICATION",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "MAX_FRAME",
    "EmptyFrame",
    "ErrorResponse",
    "FatalProtocolError",
    "FrameDecoder",
    "FrameTooLarge",
    "Message",
    "Notification",
    "ProtocolError",
    "RemoteError",
    "Request",
    "Response",
    "decode_frame",
    "encode_error",
    "encode_message",
    "encode_notification",
    "encode_request",
    "encode_response",
    "error_fields",
    "raise_remote",
    "remote_exception",
]

#: Largest value of the length prefix (kind byte plus body), in bytes.
MAX_FRAME = 16 * 1024 * 1024

KIND_REQUEST = 1
KIND_RESPONSE = 2
KIND_NOTIFICATION = 3

_KIND_NAMES = {
    KIND_REQUEST: "request",
    KIND_RESPONSE: "response",
    KIND_NOTIFICATION: "notification",
}
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IB")

#: The ``type`` of an error that is not an SfuError (a bug on the answering side).
INTERNAL = "internal"


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A call: the answer is a :class:`Response` or an :class:`ErrorResponse` with the same id."""

    id: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    """The result of the request ``id``."""

    id: int
    result: Any


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The request ``id`` failed; ``error`` holds the fields of :func:`error_fields`."""

    id: int
    error: dict[str, Any]

    def exception(self) -> SfuError:
        """The error as an exception of its own class (see :func:`remote_exception`)."""
        return remote_exception(self.error)


@dataclass(frozen=True, slots=True)
class Notification:
    """A one-way message: no answer."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)


Message = Request | Response | ErrorResponse | Notification


# -- protocol errors --------------------------------------------------------------------------


class ProtocolError(Exception):
    """A frame that breaks the wire format.

    ``kind`` is the frame's kind byte and ``id`` the request or response id when they could be
    read, so that the receiver can still answer (or fail) that one call.
    """

    def __init__(self, message: str, kind: int | None = None, id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.id = id


class FatalProtocolError(ProtocolError):
    """The byte stream cannot be resynchronised: the connection must be closed.

    ``decoded`` holds what the same :meth:`FrameDecoder.feed` call decoded before the bad frame.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.decoded: list[Message | ProtocolError] = []


class FrameTooLarge(FatalProtocolError):
    """A length prefix above :data:`MAX_FRAME` (or a message too large to encode)."""


class EmptyFrame(FatalProtocolError):
    """A length prefix of zero: not even a kind byte."""


# -- encoding ---------------------------------------------------------------------------------


def _frame(kind: int, body: Mapping[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    length = len(data) + 1
    if length > MAX_FRAME:
        raise FrameTooLarge(
            f"{_KIND_NAMES[kind]} of {length} bytes is larger than MAX_FRAME ({MAX_FRAME} bytes)"
        )
    return _HEADER.pack(length, kind) + data


def encode_request(id: int, method: str, params: Mapping[str, Any] | None = None) -> bytes:
    """A request frame. Params that are not JSON raise TypeError or ValueError."""
    return _frame(KIND_REQUEST, {"id": id, "method": method, "params": dict(params or {})})


def encode_response(id: int, result: Any) -> bytes:
    """A response frame carrying ``result`` (any JSON value)."""
    return _frame(KIND_RESPONSE, {"id": id, "result": result})


def encode_error(id: int, error: BaseException | Mapping[str, Any]) -> bytes:
    """An error response frame, from an exception (see :func:`error_fields`) or its fields."""
    fields = error_fields(error) if isinstance(error, BaseException) else dict(error)
    return _frame(KIND_RESPONSE, {"id": id, "error": fields})


def encode_notification(method: str, params: Mapping[str, Any] | None = None) -> bytes:
    """A notification frame."""
    return _frame(KIND_NOTIFICATION, {"method": method, "params": dict(params or {})})


def encode_message(message: Message) -> bytes:
    """The frame of any message object."""
    match message:
        case Request(id=id, method=method, params=params):
            return encode_request(id, method, params)
        case Response(id=id, result=result):
            return encode_response(id, result)
        case ErrorResponse(id=id, error=error):
            return encode_error(id, error)
        case Notification(method=method, params=params):
            return encode_notification(method, params)
    raise TypeError(f"not a message: {message!r}")


# -- decoding ---------------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_error(error: Any) -> str | None:
    """What is wrong with the ``error`` object of a response, or None."""
    if not isinstance(error, dict):
        return f'"error" must be an object, not {type(error).__name__}'
    for key in ("type", "code", "message"):
        if not isinstance(error.get(key), str):
            return f'"error" lacks the string field "{key}"'
    if not _is_int(error.get("status")):
        return '"error" lacks the integer field "status"'
    if "retry_after" in error and not _is_int(error["retry_after"]):
        return '"error.retry_after" must be an integer'
    return None


def decode_frame(kind: int, body: bytes) -> Message | ProtocolError:
    """One frame's message, from its kind byte and its body; a ProtocolError if it is wrong."""
    name = _KIND_NAMES.get(kind)
    if name is None:
        return ProtocolError(f"unknown frame kind {kind} ({len(body)} bytes of body)", kind=kind)
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return ProtocolError(f"{name} frame: body is not UTF-8 JSON ({exc})", kind=kind)
    if not isinstance(obj, dict):
        return ProtocolError(
            f"{name} frame: body must be a JSON object, not {type(obj).__name__}", kind=kind
        )
    id = obj.get("id")
    known_id = id if _is_int(id) else None

    def bad(problem: str) -> ProtocolError:
        where = f"{name} frame" if known_id is None else f"{name} frame (id {known_id})"
        return ProtocolError(f"{where}: {problem}", kind=kind, id=known_id)

    if kind != KIND_NOTIFICATION and known_id is None:
        return bad('lacks the integer field "id"' if id is None else '"id" must be an integer')
    params = obj.get("params", {})
    if kind == KIND_RESPONSE:
        assert known_id is not None
        has_result, has_error = "result" in obj, "error" in obj
        if has_result == has_error:
            return bad('needs exactly one of "result" and "error"')
        if has_result:
            return Response(known_id, obj["result"])
        problem = _check_error(obj["error"])
        if problem is not None:
            return bad(problem)
        return ErrorResponse(known_id, obj["error"])
    method = obj.get("method")
    if not isinstance(method, str):
        return bad(
            'lacks the string field "method"' if method is None else '"method" must be a string'
        )
    if not isinstance(params, dict):
        return bad(f'"params" must be an object, not {type(params).__name__}')
    if kind == KIND_REQUEST:
        assert known_id is not None
        return Request(known_id, method, params)
    return Notification(method, params)


class FrameDecoder:
    """Bytes in, messages out: frames may be split anywhere and several may come at once."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._fatal: FatalProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message | ProtocolError]:
        """Messages (or ProtocolError items for bad frames) completed by ``data``, in order.

        Raises FrameTooLarge or EmptyFrame when a length prefix is out of range (and again on
        every later call): the stream cannot be resynchronised.
        """
        if self._fatal is not None:
            raise self._fatal
        buffer = self._buffer
        buffer += data
        out: list[Message | ProtocolError] = []
        pos = 0
        end = len(buffer)
        while end - pos >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, pos)
            if length == 0 or length > self.max_frame:
                fatal: FatalProtocolError
                if length == 0:
                    fatal = EmptyFrame("frame with a length of 0 (no kind byte): cannot resync")
                else:
                    fatal = FrameTooLarge(
                        f"frame length {length} is larger than MAX_FRAME ({self.max_frame})"
                    )
                fatal.decoded = out
                self._fatal = fatal
                del buffer[:]
                raise fatal
            if end - pos - _LENGTH.size < length:
                break
            start = pos + _LENGTH.size
            out.append(decode_frame(buffer[start], bytes(buffer[start + 1 : start + length])))
            pos = start + length
        del buffer[:pos]
        return out

    def eof(self) -> ProtocolError | None:
        """The end of the stream: an error if it came in the middle of a frame."""
        rest, self._buffer = self._buffer, bytearray()
        have = len(rest)
        if have == 0 or self._fatal is not None:
            return None
        if have < _LENGTH.size:
            return ProtocolError(
                f"connection ended inside a frame header: {have} of {_LENGTH.size} bytes arrived"
            )
        (length,) = _LENGTH.unpack_from(rest, 0)
        kind = rest[_LENGTH.size] if have > _LENGTH.size else None
        name = _KIND_NAMES.get(kind, "frame") if kind is not None else "frame"
        return ProtocolError(
            f"connection ended inside a {name}: {have} of {_LENGTH.size + length} bytes arrived",
            kind=kind,
        )


# -- errors -----------------------------------------------------------------------------------


class RemoteError(SfuError):
    """An error whose type this side does not know: it keeps the status, code and type name."""

    status = 500
    code = INTERNAL

    def __init__(
        self,
        message: str,
        code: str = INTERNAL,
        status: int = 500,
        type_name: str = INTERNAL,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message, code)
        self.status = status
        self.type_name = type_name
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers = {"Retry-After": str(retry_after)}


def _error_classes() -> dict[str, type[SfuError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, SfuError)
    }


#: The classes an error's ``type`` names: those of :mod:`relay.sfu.errors`.
ERROR_CLASSES: dict[str, type[SfuError]] = _error_classes()


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The JSON fields of an error response for ``exc``.

    An SfuError keeps its class name, code, message, status and ``retry_after``; anything else is
    a bug of the answering side and becomes a generic internal error (no text, no traceback).
    """
    if not isinstance(exc, SfuError):
        return {"type": INTERNAL, "code": INTERNAL, "message": "internal error", "status": 500}
    type_name = exc.type_name if isinstance(exc, RemoteError) else type(exc).__name__
    fields: dict[str, Any] = {
        "type": type_name,
        "code": exc.code,
        "message": exc.message,
        "status": exc.status,
    }
    retry_after = getattr(exc, "retry_after", None)
    if _is_int(retry_after):
        fields["retry_after"] = retry_after
    return fields


def remote_exception(fields: Mapping[str, Any]) -> SfuError:
    """The exception that ``fields`` (of :func:`error_fields`) describe, of the same class.

    A type that is not a class of :mod:`relay.sfu.errors` (or that cannot be re-created from
    these fields) becomes a :class:`RemoteError` with the same code, message and status.
    """
    type_name = str(fields.get("type", INTERNAL))
    message = str(fields.get("message", ""))
    code = str(fields.get("code", INTERNAL))
    raw_status, raw_retry = fields.get("status"), fields.get("retry_after")
    status: int = raw_status if _is_int(raw_status) else 500
    retry_after: int | None = raw_retry if _is_int(raw_retry) else None
    exc = _local_exception(ERROR_CLASSES.get(type_name), message, code, retry_after)
    if exc is None:
        return RemoteError(message, code, status, type_name, retry_after)
    if exc.status != status:
        exc.status = status
    return exc


def _local_exception(
    cls: type[SfuError] | None, message: str, code: str, retry_after: int | None
) -> SfuError | None:
    if cls is None:
        return None
    if issubclass(cls, Overloaded):
        return None if retry_after is None else cls(message, retry_after, code)
    try:
        return cls(message, code)
    except TypeError:
        return None


def raise_remote(fields: Mapping[str, Any]) -> NoReturn:
    """Raise the exception that ``fields`` describe (see :func:`remote_exception`)."""
    raise remote_exception(fields)
