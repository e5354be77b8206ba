"""The HTTP/1.1 connection handling of the control API: uvicorn's h11 protocol, bounded.

uvicorn closes a keep-alive connection that stays idle after a response, but a connection
that never completes a request head is held forever, and it has no cap on open connections
(``limit_concurrency`` answers a plain-text 503 only once a request arrives). A few thousand
silent sockets then exhaust the process's file descriptors and lock every caller out.
:func:`bounded_protocol` makes a protocol class that adds:

- a **header timeout**: a connection must deliver a complete request line and headers within
  ``header_timeout`` seconds of opening, or of the end of its previous response; otherwise it
  is closed;
- a **connection cap**: over ``max_connections`` open connections, the one that has waited
  longest without a request in progress is closed to make room; if every connection is busy
  (a request or an event stream), the new connection is answered at once with 503, the JSON
  error body and ``Retry-After``, and closed;
- **JSON protocol errors**: a malformed request gets 400 and headers over h11's limit get
  431 (``headers_too_large``), both with the JSON error body;
- a **clean shutdown** of requests whose body is still arriving: the connection is closed
  rather than left for the graceful-shutdown timeout to cancel the handler mid-read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from relay.api.errors import error_body

__all__ = ["RETRY_AFTER", "BoundedH11Protocol", "bounded_protocol", "raw_error_response"]

log = logging.getLogger("relay.api")

#: ``Retry-After`` seconds suggested when the connection cap refuses a connection.
RETRY_AFTER = 1
#: Seconds a refused connection is kept half-closed so the client reads the 503 (not a reset).
REFUSED_LINGER = 1.0

_PHRASES = {
    400: b"Bad Request",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def raw_error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response carrying the JSON error body."""
    body = json.dumps(error_body(code, message), separators=(",", ":")).encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"Error")),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a connection cap and JSON errors.

    Use :func:`bounded_protocol` to get a subclass with the limits set.
    """

    max_connections: int = 1024
    header_timeout: float = 10.0
    #: connections waiting for a request head, longest-waiting first (one per server)
    waiting: dict[BoundedH11Protocol, None] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: True while the connection waits for a request head (it may be evicted)
        self.awaiting_request = False
        #: loop time since when it has been waiting
        self.waiting_since = 0.0
        self._header_timer: Any = None
        self._refused = False

    # -- connection lifecycle ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server hands its protocols a (read-write) Transport, which is what uvicorn's
        # protocol declares it takes (narrower than BaseProtocol's signature).
        super().connection_made(cast(asyncio.Transport, transport))
        self._await_request()
        if len(self.connections) > self.max_connections and not self._evict_one():
            self._refuse()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the 503 is sent; the request is read and dropped
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived
            self._stop_waiting()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_request()
        super().on_response_complete()

    def shutdown(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # The request body is still arriving: no handler can answer it before the relay
            # stops, so close now rather than cancel the handler when the grace period ends.
            self._stop_waiting()
            self.transport.close()
            return
        super().shutdown()

    # -- header timeout ------------------------------------------------------------------

    def _await_request(self) -> None:
        self._stop_waiting()
        self.awaiting_request = True
        self.waiting_since = self.loop.time()
        self.waiting[self] = None
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _stop_waiting(self) -> None:
        self.awaiting_request = False
        self.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.awaiting_request:
            self._stop_waiting()
            self.transport.close()

    # -- connection cap ------------------------------------------------------------------

    def _evict_one(self) -> bool:
        """Close the connection waiting longest for a request; False if none is waiting."""
        oldest = next(iter(self.waiting), None)
        if oldest is None or oldest is self:
            return False
        oldest._stop_waiting()
        oldest.connections.discard(oldest)
        oldest.transport.close()
        return True

    def _refuse(self) -> None:
        """Answer 503 without reading the request, then close."""
        self._refused = True
        self._stop_waiting()
        self.connections.discard(self)
        log.warning(
            "control API: %d connections open, all busy (api.max_connections): 503",
            len(self.connections),
        )
        self.transport.write(
            raw_error_response(
                503,
                "unavailable",
                f"too many open connections (api.max_connections = {self.max_connections}); "
                "retry later",
                {"retry-after": str(RETRY_AFTER)},
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # Closing at once would reset a client whose request is still in flight, and a reset
        # can destroy the 503 before it is read: close after a short linger instead.
        self.loop.call_later(REFUSED_LINGER, self.transport.close)

    # -- protocol errors -----------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """Malformed request (400) or headers over the size limit (431), as the JSON error."""
        exc = sys.exception()
        status = 400
        if isinstance(exc, h11.RemoteProtocolError) and exc.error_status_hint == 431:
            status = 431
        if status == 431:
            code, message = "headers_too_large", "request line and headers larger than allowed"
        else:
            code, message = "bad_request", "invalid HTTP request"
        self._stop_waiting()
        self.transport.write(raw_error_response(status, code, message))
        self.transport.close()


def bounded_protocol(max_connections: int, header_timeout: float) -> type[BoundedH11Protocol]:
    """A :class:`BoundedH11Protocol` subclass with these limits (uvicorn's ``http=``)."""
    return type(
        "RelayH11Protocol",
        (BoundedH11Protocol,),
        {"max_connections": max_connections, "header_timeout": header_timeout, "waiting": {}},
    )
