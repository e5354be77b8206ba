"""The front <-> worker channel: calls, answers and notifications over one stream connection.

A :class:`Channel` wraps the ``StreamReader``/``StreamWriter`` pair of a connection (a Unix
socket between the front and a worker) and speaks :mod:`relay.workers.protocol` on it, in both
directions:

- :meth:`Channel.call` sends a request and waits for its answer: the result, the remote
  :class:`~relay.sfu.errors.SfuError` raised as its own class, :class:`ChannelTimeout` when no
  answer comes in time (a late answer is then dropped) or :class:`ChannelClosed` when the
  connection ends first (every pending call fails at once).
- :meth:`Channel.notify` writes a notification without waiting.
- Incoming requests go to the ``handler`` coroutine, one at a time in the order they arrived,
  in a task of their own: a slow request delays the requests behind it, never the reading of
  answers and notifications. An exception becomes an error response (:func:`error_fields`).
- Incoming notifications go to the ``on_notification`` callback, synchronously, in order.

:meth:`Channel.run` reads until the connection ends. A malformed frame is logged and skipped (a
request whose id could be read gets a ``bad_request`` answer; a call whose answer is malformed
fails with the :class:`~relay.workers.protocol.ProtocolError`); only a length prefix that
cannot be resynchronised closes the channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from relay.sfu.errors import BadRequest, NotFound, SfuError
from relay.workers.protocol import (
    KIND_REQUEST,
    KIND_RESPONSE,
    ErrorResponse,
    FatalProtocolError,
    FrameDecoder,
    Message,
    Notification,
    ProtocolError,
    Request,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_response,
)

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ChannelTimeout",
    "NotificationHandler",
    "RequestHandler",
]

log = logging.getLogger(__name__)

#: Answers a request: ``await handler(method, params)`` returns the result (JSON) or raises.
RequestHandler = Callable[[str, dict[str, Any]], Awaitable[Any]]
#: Receives a notification: ``on_notification(method, params)``.
NotificationHandler = Callable[[str, dict[str, Any]], None]

READ_SIZE = 1 << 16


class ChannelError(Exception):
    """The channel could not deliver a call's answer."""


class ChannelClosed(ChannelError):
    """The connection is closed, or ended before the answer came."""


class ChannelTimeout(ChannelError):
    """No answer within the call's timeout."""

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(f"no answer to {method!r} within {timeout:g} s")
        self.method = method
        self.timeout = timeout


class Channel:
    """Requests with ids, their answers and notifications over one connection.

    ``call_timeout`` bounds every :meth:`call` that gives no timeout of its own (None: no bound).
    ``name`` prefixes log lines (for example ``"worker 2"``).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        handler: RequestHandler | None = None,
        on_notification: NotificationHandler | None = None,
        call_timeout: float | None = None,
        name: str = "channel",
    ) -> None:
        self.name = name
        self.call_timeout = call_timeout
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._on_notification = on_notification
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._requests: asyncio.Queue[Request] = asyncio.Queue()
        self._serve_task: asyncio.Task[None] | None = None
        self._closed = False
        self._close_reason = ""

    @property
    def closed(self) -> bool:
        """Whether the channel is closed (by :meth:`close`, the peer or a fatal frame)."""
        return self._closed

    @property
    def pending(self) -> int:
        """Calls waiting for their answer."""
        return len(self._pending)

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Call ``method`` on the peer and return its result.

        Raises the peer's SfuError (same class, code, status), ChannelTimeout after ``timeout``
        seconds (default: ``call_timeout``), ChannelClosed if the connection ends first, or the
        ProtocolError of a malformed answer. Params that are not JSON raise TypeError here.
        """
        if self._closed:
            raise ChannelClosed(self._close_reason)
        id = next(self._ids)
        frame = encode_request(id, method, params)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[id] = future
        limit = self.call_timeout if timeout is None else timeout
        try:
            self._writer.write(frame)
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            raise ChannelTimeout(method, limit or 0.0) from None
        finally:
            self._pending.pop(id, None)

    def notify(self, method: str, params: Mapping[str, Any] | None = None) -> bool:
        """Send a notification without waiting; False (and nothing sent) once closed."""
        if self._closed or self._writer.is_closing():
            log.debug("%s: closed, notification %r dropped", self.name, method)
            return False
        self._writer.write(encode_notification(method, params))
        return True

    async def run(self) -> None:
        """Read and dispatch until the connection ends; then the channel is closed."""
        reason = "connection closed by the peer"
        try:
            while not self._closed:
                try:
                    data = await self._reader.read(READ_SIZE)
                except OSError as exc:
                    reason = f"connection lost: {exc}"
                    break
                if not data:
                    error = self._decoder.eof()
                    if error is not None:
                        log.warning("%s: %s", self.name, error)
                        reason = f"connection closed by the peer: {error}"
                    break
                try:
                    items = self._decoder.feed(data)
                except FatalProtocolError as exc:
                    self._dispatch(exc.decoded)
                    log.error("%s: %s; closing the connection", self.name, exc)
                    reason = f"protocol error: {exc}"
                    break
                self._dispatch(items)
        finally:
            self._shutdown(reason)

    def close(self) -> None:
        """Close the connection; pending calls fail with ChannelClosed."""
        self._shutdown("channel closed")

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the connection and the request task are done."""
        self.close()
        if self._serve_task is not None:
            await asyncio.wait([self._serve_task])
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    # -- internals ----------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ChannelClosed(reason))
        if self._serve_task is not None:
            self._serve_task.cancel()
        self._writer.close()

    def _write(self, frame: bytes) -> None:
        if not self._closed and not self._writer.is_closing():
            self._writer.write(frame)

    def _dispatch(self, items: list[Message | ProtocolError]) -> None:
        for item in items:
            match item:
                case Response(id=id, result=result):
                    self._resolve(id, result, None)
                case ErrorResponse():
                    self._resolve(item.id, None, item.exception())
                case Request():
                    if self._serve_task is None:
                        self._serve_task = asyncio.get_running_loop().create_task(self._serve())
                    self._requests.put_nowait(item)
                case Notification(method=method, params=params):
                    self._notification(method, params)
                case ProtocolError():
                    self._protocol_error(item)

    def _resolve(self, id: int, result: Any, error: BaseException | None) -> None:
        future = self._pending.get(id)
        if future is None or future.done():
            log.debug("%s: answer to call %d that is no longer waiting (late?)", self.name, id)
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def _notification(self, method: str, params: dict[str, Any]) -> None:
        if self._on_notification is None:
            log.debug("%s: notification %r ignored", self.name, method)
            return
        try:
            self._on_notification(method, params)
        except Exception:
            log.exception("%s: notification %r failed", self.name, method)

    def _protocol_error(self, error: ProtocolError) -> None:
        log.warning("%s: %s", self.name, error)
        if error.id is None:
            return
        if error.kind == KIND_REQUEST:
            answer = BadRequest(f"protocol error: {error.message}", code="protocol_error")
            self._write(encode_error(error.id, answer))
        elif error.kind == KIND_RESPONSE:
            self._resolve(error.id, None, error)

    async def _serve(self) -> None:
        """Answer the requests one at a time, in the order they came."""
        while True:
            request = await self._requests.get()
            self._write(await self._answer(request))

    async def _answer(self, request: Request) -> bytes:
        try:
            if self._handler is None:
                raise NotFound(f"{self.name} takes no requests ({request.method!r})")
            result = await self._handler(request.method, request.params)
            return encode_response(request.id, result)
        except Exception as exc:
            if not isinstance(exc, SfuError):
                log.exception("%s: request %r failed", self.name, request.method)
            return encode_error(request.id, exc)
