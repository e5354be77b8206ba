"""ICE-TCP: the media port number over TCP, for clients on networks that block UDP.

The relay announces passive TCP host candidates (RFC 6544) next to its UDP ones, with a lower
priority, and listens on TCP on the media port number. Every packet on a connection is framed
as in RFC 4571: a 16-bit big-endian length, then that many bytes. A frame is handed to the
media port (:class:`relay.sfu.port.MediaPort`) exactly as a datagram would be, from the
connection's address, so STUN, DTLS and SRTP take the same demultiplexing, latching and
authentication path as over UDP: the latch is the connection.

The parts:

- :class:`FrameDecoder` and :func:`frame`: the RFC 4571 codec, sans-I/O (bytes in, frames out).
- :class:`TcpAddress`: a connection's remote address as the port and the legs see it. It is
  ``(host, port)`` for logging and STUN's XOR-MAPPED-ADDRESS, but equal only to itself, so a
  client's TCP connection never shares a latch with a UDP 5-tuple of the same host and port
  number, and a reconnection from the same port is a new address; it carries its connection.
- :class:`MediaSender`: the packet path's sender. Datagrams go to the UDP batch sender, except
  those addressed to a :class:`TcpAddress`, which are written, framed, on their connection.
- :class:`TcpConnection`: one accepted connection (an asyncio protocol). Its writes are
  bounded: a packet that does not fit in ``tcp_write_buffer_bytes`` of unsent data is dropped
  and counted, never queued, so a slow reader costs the relay a bounded amount of memory and
  nobody else anything.
- :class:`IceTcpServer`: the listener's state: the connections, their limits (how many; how
  long a connection may stay without an authenticated STUN check; how long it may stay
  silent) and counters.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from relay.privacy import client_address
from relay.udp import BatchSender

if TYPE_CHECKING:
    from relay.config import MediaSettings
    from relay.metrics import Metrics
    from relay.sfu.port import MediaPort
    from relay.sfu.timers import Timer, Timers

__all__ = [
    "MAX_FRAME",
    "FrameDecoder",
    "FrameError",
    "IceTcpServer",
    "MediaSender",
    "TcpAddress",
    "TcpConnection",
    "bind_tcp",
    "frame",
]

log = logging.getLogger(__name__)

#: Longest frame accepted from a client. WebRTC packets (STUN, DTLS records, SRTP) fit in a
#: path MTU; anything this long is not one, and closes the connection.
MAX_FRAME = 8192
#: Seconds between two sweeps of the connections (handshake and idle timeouts).
SWEEP_INTERVAL = 1.0
#: Pending connections the kernel keeps before the relay accepts them.
BACKLOG = 128

#: Why the relay closed a connection, each counted in ``relay_tcp_closed_<reason>_total``.
CLOSE_REASONS = ("refused", "address_limit", "bad_frame", "unauthenticated", "idle")


class FrameError(ValueError):
    """A frame length of 0, or longer than the decoder accepts."""


def frame(data: bytes) -> bytes:
    """``data`` with its RFC 4571 length prefix."""
    n = len(data)
    if not 0 < n <= 0xFFFF:
        raise FrameError(f"cannot frame {n} bytes")
    return n.to_bytes(2, "big") + data


class FrameDecoder:
    """RFC 4571 frames out of a byte stream, whatever the reads' boundaries.

    :meth:`feed` returns the frames completed by a read; a partial frame (at most
    ``max_frame + 1`` bytes) waits for the next one. A length of 0 or above ``max_frame``
    raises :class:`FrameError`: the stream cannot be resynchronised, so the connection ends.
    """

    __slots__ = ("_pending", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._pending = b""

    @property
    def pending(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[bytes]:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        frames: list[bytes] = []
        end = len(data)
        pos = 0
        max_frame = self.max_frame
        while end - pos >= 2:
            n = (data[pos] << 8) | data[pos + 1]
            if n == 0 or n > max_frame:
                raise FrameError(f"frame length {n} (1-{max_frame} accepted)")
            start = pos + 2
            if end - start < n:
                break
            frames.append(data[start : start + n])
            pos = start + n
        if pos < end:
            self._pending = data[pos:]
        return frames


class TcpAddress(tuple[str, int]):
    """The remote address of one ICE-TCP connection: ``(host, port)``, equal only to itself."""

    conn: TcpConnection

    def __new__(cls, host: str, port: int, conn: TcpConnection) -> TcpAddress:
        self = super().__new__(cls, (host, port))
        self.conn = conn
        return self

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return id(self) >> 4

    def __repr__(self) -> str:
        return f"TcpAddress({self[0]!r}, {self[1]!r})"


class MediaSender:
    """The packet path's :class:`~relay.sfu.leg.DatagramSender` when ICE-TCP is on: the UDP
    batch sender, except for datagrams to a :class:`TcpAddress`, which go to its connection.

    Until the first TCP connection is accepted, :attr:`send` and :attr:`sendto` *are* the UDP
    sender's own methods: the UDP path costs exactly what it costs without ICE-TCP. From then
    on (:meth:`use_tcp`), the only per-datagram cost on the UDP path is the class check of its
    address; a batch is split only when it holds a TCP address."""

    def __init__(self, udp: BatchSender) -> None:
        self.udp = udp
        self.send: Callable[[list[tuple[bytes, Any]]], None] = udp.send
        self.sendto: Callable[[bytes, Any], None] = udp.sendto

    @property
    def tcp(self) -> bool:
        """Whether datagrams are routed to TCP connections (since the first was accepted)."""
        return self.send == self._send

    def use_tcp(self) -> None:
        """Route from now on (never undone: a leg may keep the address of a closed connection,
        whose packets must not go out over UDP)."""
        self.send = self._send
        self.sendto = self._sendto

    def _sendto(self, data: bytes, addr: Any) -> None:
        if addr.__class__ is TcpAddress:
            addr.conn.send(data)
        else:
            self.udp.sendto(data, addr)

    def _send(self, batch: list[tuple[bytes, Any]]) -> None:
        for _, addr in batch:
            if addr.__class__ is TcpAddress:
                self._split(batch)
                return
        self.udp.send(batch)

    def _split(self, batch: list[tuple[bytes, Any]]) -> None:
        udp: list[tuple[bytes, Any]] = []
        for item in batch:
            addr = item[1]
            if addr.__class__ is TcpAddress:
                addr.conn.send(item[0])
            else:
                udp.append(item)
        if udp:
            self.udp.send(udp)


class TcpConnection(asyncio.Protocol):
    """One accepted ICE-TCP connection: frames in to the media port, framed packets out."""

    def __init__(self, server: IceTcpServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.max_frame)
        self.transport: asyncio.Transport | None = None
        self.addr: TcpAddress | None = None
        self.closed = False
        #: passed an authenticated STUN check (the port knows its address)
        self.authenticated = False
        self.opened_at = self.last_received = server.clock()
        self.limit = server.write_buffer_bytes

    # -- asyncio ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.addr = TcpAddress(str(peer[0]), int(peer[1]), self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # the kernel's buffer is bounded too (it doubles the value): a stalled reader
                # backs up into the relay's own bounded buffer within a second or so, and a
                # packet dropped there is one the client would have got too late anyway
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limit)
            except OSError:
                pass
        self.server.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = self.server.clock()
        try:
            frames = self.decoder.feed(data)
        except FrameError as error:
            self.server.close(self, "bad_frame", str(error))
            return
        port = self.server.port
        addr = self.addr
        if port is None or addr is None:
            return
        receive = port.datagram_received
        for packet in frames:
            receive(packet, addr)

    def eof_received(self) -> bool:
        return False  # close the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.lost(self)

    # -- sending ----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """One packet, framed; dropped and counted when the connection is closed or its
        unsent data would go over the limit."""
        transport = self.transport
        if self.closed or transport is None:
            self.server.dropped_closed += 1
            return
        n = len(data)
        if transport.get_write_buffer_size() + n + 2 > self.limit or n > 0xFFFF:
            self.server.dropped += 1
            self.server.dropped_bytes += n
            return
        transport.write(n.to_bytes(2, "big") + data)
        self.server.sent += 1

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        transport = self.transport
        if transport is None or self.closed:
            return 0
        return transport.get_write_buffer_size() + self.decoder.pending


class IceTcpServer:
    """The ICE-TCP listener's state: its connections, their limits, and their counters.

    ``port`` (the media port frames are handed to) is set once the SFU around it exists;
    frames that arrive before are dropped. :meth:`start_timers` arms the sweep on the media
    plane's deadline queue."""

    def __init__(
        self,
        media: MediaSettings,
        metrics: Metrics,
        clock: Callable[[], float],
        idle_timeout: float,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.port: MediaPort | None = None
        self.sender: MediaSender | None = None
        self.max_connections = media.tcp_max_connections
        self.max_pending_per_address = media.tcp_max_pending_per_address
        #: connections not yet known to be authenticated, by :func:`client_key`
        self.pending: dict[str, dict[TcpConnection, None]] = {}
        self.write_buffer_bytes = media.tcp_write_buffer_bytes
        self.handshake_timeout = media.tcp_handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_frame = MAX_FRAME
        self.connections: dict[TcpConnection, None] = {}
        self.accepted = 0
        self.sent = 0
        self.closes: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.dropped = 0
        self.dropped_bytes = 0
        self.dropped_closed = 0
        self._timer: Timer | None = None
        self._register_metrics()

    def protocol(self) -> TcpConnection:
        """The protocol factory for ``loop.create_server``."""
        return TcpConnection(self)

    def _register_metrics(self) -> None:
        m = self.metrics
        m.gauge("tcp_connections", "Open ICE-TCP connections.", lambda: len(self.connections))
        m.gauge(
            "tcp_write_buffer_bytes",
            "Bytes held unsent on ICE-TCP connections (each bounded by "
            "media.tcp_write_buffer_bytes), with partial frames received.",
            lambda: sum(c.buffered() for c in self.connections),
        )
        m.counter("tcp_accepted_total", "ICE-TCP connections accepted.", lambda: self.accepted)
        m.counter(
            "tcp_packets_sent_total",
            "Packets (STUN, DTLS, SRTP, SRTCP) written on ICE-TCP connections.",
            lambda: self.sent,
        )
        m.counter(
            "tcp_dropped_total",
            "Packets not sent on an ICE-TCP connection because its write buffer was full "
            "(a client reading too slowly).",
            lambda: self.dropped,
        )
        m.counter(
            "tcp_dropped_bytes_total",
            "Bytes of the packets counted in tcp_dropped_total.",
            lambda: self.dropped_bytes,
        )
        m.counter(
            "tcp_dropped_closed_total",
            "Packets addressed to an ICE-TCP connection that had closed.",
            lambda: self.dropped_closed,
        )
        help_texts = {
            "refused": "ICE-TCP connections closed at once: media.tcp_max_connections reached.",
            "address_limit": "ICE-TCP connections closed at once: their address already had "
            "media.tcp_max_pending_per_address connections without an authenticated STUN check.",
            "bad_frame": "ICE-TCP connections closed for a frame length of 0 or too long.",
            "unauthenticated": "ICE-TCP connections closed for not passing an authenticated "
            "STUN check within media.tcp_handshake_timeout.",
            "idle": "ICE-TCP connections closed after session.consent_timeout without data.",
        }
        for reason in CLOSE_REASONS:
            m.counter(
                f"tcp_closed_{reason}_total",
                help_texts[reason],
                lambda reason=reason: self.closes[reason],  # type: ignore[misc]
            )

    # -- connections ------------------------------------------------------------------------
    def opened(self, conn: TcpConnection) -> None:
        if len(self.connections) >= self.max_connections:
            self.close(conn, "refused", "too many connections")
            return
        assert conn.addr is not None
        key = client_key(conn.addr[0])
        for other in [c for c in self.pending.get(key, ()) if self._checked(c)]:
            self._authenticated(other)
        pending = self.pending.setdefault(key, {})
        if len(pending) >= self.max_pending_per_address:  # never empty here: the limit is >= 1
            self.close(conn, "address_limit", "too many connections without a STUN check")
            return
        pending[conn] = None
        self.accepted += 1
        self.connections[conn] = None
        if self.sender is not None and not self.sender.tcp:
            self.sender.use_tcp()
        log.debug("ICE-TCP connection from %s", client_address(conn.addr))

    def close(self, conn: TcpConnection, reason: str, detail: str = "") -> None:
        """Close ``conn`` for ``reason`` (counted), dropping whatever it had unsent."""
        if conn.closed:
            return
        self.closes[reason] += 1
        log.debug(
            "ICE-TCP connection from %s closed: %s%s",
            client_address(conn.addr),
            reason,
            f" ({detail})" if detail else "",
        )
        conn.closed = True
        if conn.transport is not None:
            conn.transport.abort()
        self.lost(conn)

    def lost(self, conn: TcpConnection) -> None:
        """``conn`` is closed (by either side): forget it and its address (a leg may keep the
        address, and through it the connection, until it latches elsewhere or ends)."""
        conn.closed = True
        conn.transport = None
        self._checked_or_gone(conn)
        if self.connections.pop(conn, False) is None and conn.addr is not None:
            if self.port is not None:
                self.port.address_closed(conn.addr)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()  # what was written (DTLS close_notify) goes out first
            self.lost(conn)
        if self._timer is not None:
            self._timer.cancel()

    def _checked(self, conn: TcpConnection) -> bool:
        """Whether ``conn`` passed an authenticated STUN check (the port latched its address)."""
        port, addr = self.port, conn.addr
        return (
            port is not None
            and addr is not None
            and (addr in port.by_addr or addr in port.alt_addrs)
        )

    def _authenticated(self, conn: TcpConnection) -> None:
        """``conn`` passed its check: marked, and no longer pending for its address."""
        conn.authenticated = True
        self._checked_or_gone(conn)

    def _checked_or_gone(self, conn: TcpConnection) -> None:
        """``conn`` no longer counts against its address's pending connections."""
        if conn.addr is None:
            return
        key = client_key(conn.addr[0])
        pending = self.pending.get(key)
        if pending is not None and pending.pop(conn, False) is None and not pending:
            del self.pending[key]

    # -- timers ----------------------------------------------------------------------------
    def start_timers(self, timers: Timers) -> None:
        self._timer = timer = timers.timer(self.sweep)
        timer.arm(self.clock() + SWEEP_INTERVAL)

    def sweep(self, now: float) -> None:
        """Close connections that never authenticated in time, or went silent; rearm."""
        for conn in list(self.connections):
            if not conn.authenticated:
                if self._checked(conn):
                    self._authenticated(conn)
                elif now - conn.opened_at >= self.handshake_timeout:
                    self.close(conn, "unauthenticated")
                    continue
            if now - conn.last_received >= self.idle_timeout:
                self.close(conn, "idle")
        if self._timer is not None:
            self._timer.arm(now + SWEEP_INTERVAL)


def client_key(host: str) -> str:
    """What ``media.tcp_max_pending_per_address`` counts by: an IPv4 address (also written as
    an IPv4-mapped IPv6 one, as a dual-stack socket reports it), or an IPv6 address's /64
    prefix (one host commonly holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (``::`` takes IPv4 too); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
