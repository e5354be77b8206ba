"""The project's own client cores (:class:`relay.client.peer.ClientPeer`) over ICE-TCP: an
active TCP connection to the relay's passive candidate, every datagram framed as RFC 4571.

Tests use it to reach a relay that announces TCP candidates only, and to be a subscriber that
stops reading its connection (:meth:`TcpClientPeer.stall`)."""

from __future__ import annotations

import asyncio
import socket

from relay.client.peer import ClientPeer, PeerError
from relay.tcp import FrameDecoder, FrameError, frame


def tcp_candidates(sdp: str) -> list[tuple[str, int]]:
    """``(address, port)`` of every passive TCP host candidate in an SDP."""
    found: list[tuple[str, int]] = []
    for line in sdp.splitlines():
        if not line.startswith("a=candidate:"):
            continue
        parts = line[len("a=candidate:") :].split()
        if len(parts) >= 10 and parts[2].lower() == "tcp" and parts[8:10] == ["tcptype", "passive"]:
            candidate = (parts[4], int(parts[5]))
            if candidate not in found:
                found.append(candidate)
    return found


class TcpClientPeer(asyncio.Protocol):
    """A :class:`ClientPeer` on one TCP connection with its timer, on the running loop."""

    def __init__(self, peer: ClientPeer, receive_buffer: int = 0) -> None:
        self.peer = peer
        self.receive_buffer = receive_buffer
        self.decoder = FrameDecoder(65535)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self.frames = 0
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    async def connect(self, address: tuple[str, int]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.receive_buffer:
            # before connecting, so the window the relay sees is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        await self._loop.sock_connect(sock, address)
        await self._loop.create_connection(lambda: self, sock=sock)
        self._send_all(self.peer.start(self._loop.time()))

    # -- asyncio ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError:
            self.close()
            return
        was = self.peer.connected
        now = self._loop.time()
        for packet in frames:
            self.frames += 1
            self._send_all(self.peer.receive(packet, now))
        if self.peer.connected != was or self.peer.failed or self.peer.closed:
            self._changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self._changed.set()
        if self._timer is not None:
            self._timer.cancel()

    # -- sending and timers ------------------------------------------------------------------
    def _send_all(self, datagrams: list[bytes]) -> None:
        transport = self.transport
        if transport is not None:
            for datagram in datagrams:
                transport.write(frame(datagram))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.peer.next_timeout()
        if deadline is not None and self.transport is not None:
            deadline = max(deadline, self._loop.time() + 0.002)
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._send_all(self.peer.handle_timeout(self._loop.time()))
        self._changed.set()

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are on the connection (no framing added)."""
        if self.transport is not None:
            self.transport.write(data)

    def send_rtp(self, ssrc: int, pt: int, seq: int, ts: int, payload: bytes) -> None:
        if self.transport is not None:
            self.transport.write(frame(self.peer.protect_rtp(ssrc, pt, seq, ts, payload)))

    async def connected(self, timeout: float = 15.0) -> None:
        deadline = self._loop.time() + timeout
        while not self.peer.connected:
            if self.peer.failed or self.peer.closed or self.closed.is_set():
                raise PeerError(f"connection failed: {self.peer.failure_reason or 'closed'}")
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise PeerError(f"not connected within {timeout:g} s ({self.peer.stats()})")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def stall(self) -> None:
        """Stop reading: the relay's writes back up (as a client whose reader hangs)."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
