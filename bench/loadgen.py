"""The load generator: WebRTC connections on loopback sockets, pre-encrypted RTP sent on a
schedule, receivers that count and time packets without decoding them.

Each connection (:class:`Conn`) owns one UDP socket bound to 127.0.0.1 with kernel receive
timestamps (``SO_TIMESTAMPNS``). The handshake is :class:`relay.client.peer.ClientPeer` (ICE,
DTLS, SRTP); two things a full ICE agent on the other side (Janus, aiortc) needs and the
client does not do are added here: answering the server's own Binding requests, and a host
candidate line in our SDP. The client always takes the controlling role (largest
tie-breaker), which a full agent that offered accepts by switching to controlled.

Every payload carries a stamp: a 1-byte VP8 payload descriptor, the magic ``RB``, the stream
id, the packet index ``k`` and its scheduled send time. A frame's packets go to the kernel in
one ``sendmmsg`` (a burst, as an encoder's frame leaves a browser unpaced), and the sender logs
the wall-clock time (``CLOCK_REALTIME``) right before that call for every packet of the frame;
a receiver's latency sample is its kernel receive timestamp (same clock) minus that log entry.
So a sample is the time from the frame's hand-over to the packet's arrival in the receiving
socket: the server's queueing and processing plus two loopback hops. The generator's own
scheduling cannot reshape the burst (a server process that preempts the generator between
two ``sendto`` calls would otherwise receive the frame paced, and look faster than it is).

Only loopback addresses (and, for Janus, the bench namespace's own two addresses) are ever
sent to: any other remote candidate is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import math
import socket
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aioice import stun

from bench import netns
from relay.client.peer import (
    AUDIO_PT,
    MID_EXT_ID,
    VIDEO_PT,
    ClientPeer,
    RemoteDescription,
    build_rtp,
)
from relay.rtc.dtls import Certificate
from relay.rtc.rtp import build_extension_block
from relay.rtc.srtp import SrtpError
from relay.udp import BatchSender

Address = tuple[str, int]

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux
MAGIC = b"RB"
_STAMP = struct.Struct("!IIq")  # stream id, packet index, scheduled send time (ns)
_TIMESPEC = struct.Struct("@qq")
MAX_TIEBREAKER = (1 << 64) - 1
#: Receive buffer of every generator socket (SO_RCVBUFFORCE, root only; else SO_RCVBUF).
RCVBUF = 4 << 20


def allowed(host: str) -> bool:
    """Loopback, or an address of the bench's own network namespace: nothing else is sent to."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return False
    return host in netns.namespace_addresses()


def with_candidate(sdp: str, host: str, port: int) -> str:
    """Our host candidate and end-of-candidates after every ice-pwd line."""
    out = []
    for line in sdp.split("\r\n"):
        out.append(line)
        if line.startswith("a=ice-pwd:"):
            out.append(f"a=candidate:1 1 udp 2130706431 {host} {port} typ host")
            out.append("a=end-of-candidates")
    return "\r\n".join(out)


class Recorder:
    """What one receiving connection got: (stream, k, kernel receive time) per stamped packet."""

    __slots__ = ("stream", "index", "time", "packets", "bytes", "unstamped", "errors", "rtcp")

    def __init__(self) -> None:
        self.stream = array("i")
        self.index = array("i")
        self.time = array("q")
        self.packets = 0
        self.bytes = 0
        self.unstamped = 0
        self.errors = 0
        self.rtcp = 0

    def clear(self) -> None:
        del self.stream[:]
        del self.index[:]
        del self.time[:]


class Conn:
    """One WebRTC connection of the generator (or a plain UDP one for the ceiling)."""

    def __init__(
        self,
        name: str,
        certificate: Certificate | None,
        *,
        plain: bool = False,
        stamped: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        if not allowed(host):
            raise ValueError(f"refusing to bind {host}: not loopback nor the bench namespace")
        self.name = name
        self.host = host
        self.plain = plain
        self.stamped = stamped
        self.loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind((host, 0))
        sock.setblocking(False)
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        #: media out: a frame's packets in one system call; what the socket refuses is dropped
        #: (and counted), as the plain ``sendto`` it replaces dropped it
        self.send_dropped = 0
        self.sender = BatchSender(sock, self._drop)
        self.peer: ClientPeer | None = None
        if not plain:
            self.peer = ClientPeer(certificate, consent_interval=2.0)
            self.peer.tie_breaker = MAX_TIEBREAKER
        self.remote_addr: Address | None = None
        self.rec = Recorder()
        self.stun_answered = 0
        self.foreign = 0
        self.datagrams = 0
        self.closed = False
        self._connected = asyncio.Event()
        self._unprotect: Callable[[bytes], bytes] | None = None
        self.loop.add_reader(sock.fileno(), self._readable)

    # -- signalling helpers -----------------------------------------------------------
    def offer(self, tracks: Sequence[Any], setup: str = "actpass") -> str:
        assert self.peer is not None
        return with_candidate(self.peer.create_offer(tracks, setup=setup), self.host, self.port)

    def answer(self, remote: RemoteDescription, setup: str = "active") -> str:
        assert self.peer is not None
        return with_candidate(self.peer.create_answer(remote, setup=setup), self.host, self.port)

    def set_remote(self, remote: RemoteDescription, apply: bool = True) -> None:
        """Take the server's description (once ``apply``-ed to the peer) and its address."""
        assert self.peer is not None
        addrs = [c for c in remote.candidates if allowed(c[0])]
        if not addrs:
            raise RuntimeError(
                f"{self.name}: no loopback/namespace candidate in {remote.candidates}"
            )
        if apply:
            self.peer.set_remote_description(remote)
        self.remote_addr = addrs[0]

    def start(self) -> None:
        assert self.peer is not None
        self._send_all(self.peer.start(self.loop.time()))

    async def connected(self, timeout: float = 20.0) -> None:
        assert self.peer is not None
        deadline = self.loop.time() + timeout
        while not self.peer.connected:
            if self.peer.failed or self.peer.closed:
                raise RuntimeError(f"{self.name}: {self.peer.failure_reason or 'closed'}")
            if self.loop.time() > deadline:
                raise RuntimeError(
                    f"{self.name}: not connected within {timeout:g} s {self.peer.stats()}"
                    f" (port {self.port}: {self.datagrams} datagrams, answered"
                    f" {self.stun_answered} checks, {self.foreign} foreign)"
                )
            self._connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 0.1)
        srtp = self.peer.srtp
        assert srtp is not None
        self._unprotect = srtp.unprotect

    def tick(self) -> None:
        """Drive ICE retransmissions, consent checks and DTLS timers."""
        peer = self.peer
        if peer is None or self.closed or self.remote_addr is None:
            return
        deadline = peer.next_timeout()
        now = self.loop.time()
        if deadline is not None and now >= deadline:
            self._send_all(peer.handle_timeout(now))
            if peer.connected:
                self._connected.set()

    def plain_register(self, addr: Address, message: bytes) -> None:
        """Ceiling: register this socket with the forwarder."""
        if not allowed(addr[0]):
            raise ValueError(f"refusing to send to {addr[0]}")
        self.remote_addr = addr
        self.sock.sendto(message, addr)

    def sendto(self, data: bytes) -> None:
        assert self.remote_addr is not None
        with contextlib.suppress(BlockingIOError):
            self.sock.sendto(data, self.remote_addr)

    def _send_all(self, datagrams: list[bytes]) -> None:
        addr = self.remote_addr
        if addr is None:
            return
        for datagram in datagrams:
            with contextlib.suppress(BlockingIOError):
                self.sock.sendto(datagram, addr)

    def _drop(self, data: Any, addr: Address) -> None:
        self.send_dropped += 1

    # -- receiving --------------------------------------------------------------------
    def _readable(self) -> None:
        recvmsg = self.sock.recvmsg
        rec = self.rec
        unpack_ts = _TIMESPEC.unpack_from
        while True:
            try:
                data, anc, _flags, addr = recvmsg(2048, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.datagrams += 1
            if not data:
                continue
            first = data[0]
            if 127 < first < 192 and (self.plain or self._unprotect is not None):
                if 63 < (data[1] & 0x7F) < 96:  # RTCP (RFC 5761): counted, not read
                    rec.rtcp += 1
                    continue
                sec, nsec = unpack_ts(anc[0][2]) if anc else (0, time.time_ns())
                self._media(data, sec * 1_000_000_000 + nsec)
            elif addr != self.remote_addr and not allowed(addr[0]):
                self.foreign += 1
            elif self.plain:
                continue  # forwarder control replies
            elif first < 4:
                self._stun(data, addr)
            else:
                peer = self.peer
                assert peer is not None
                self._send_all(peer.receive(data, self.loop.time()))
                if peer.connected:
                    self._connected.set()

    def _media(self, data: bytes, ts: int) -> None:
        rec = self.rec
        rec.packets += 1
        rec.bytes += len(data)
        if not self.plain:
            try:
                data = self._unprotect(data)  # type: ignore[misc]
            except SrtpError:
                rec.errors += 1
                return
        if not self.stamped:
            return
        b0 = data[0]
        off = 12 + ((b0 & 0x0F) << 2)
        if b0 & 0x10:
            off += 4 + (((data[off + 2] << 8) | data[off + 3]) << 2)
        if data[off + 1 : off + 3] != MAGIC:
            rec.unstamped += 1
            return
        sid, k, _sched = _STAMP.unpack_from(data, off + 3)
        rec.stream.append(sid)
        rec.index.append(k)
        rec.time.append(ts)

    def _stun(self, data: bytes, addr: Address) -> None:
        """Answer a full ICE agent's Binding requests; hand responses to the client."""
        peer = self.peer
        assert peer is not None
        if len(data) >= 2 and data[0] == 0x00 and data[1] == 0x01:  # Binding request
            try:
                request = stun.parse_message(data)
            except Exception:
                return
            username = request.attributes.get("USERNAME", "")
            pwd = peer.local.pwd.encode()
            if not str(username).startswith(peer.local.ufrag + ":"):
                return
            if not request.check_message_integrity(pwd):
                return
            response = stun.Message(
                stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=request.transaction_id
            )
            response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
            response.add_message_integrity(pwd)
            with contextlib.suppress(BlockingIOError):
                self.sock.sendto(bytes(response), addr)
            self.stun_answered += 1
            return
        self._send_all(peer.receive(data, self.loop.time()))
        if peer.connected:
            self._connected.set()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            if self.peer is not None and self.remote_addr is not None:
                for datagram in self.peer.close():
                    self.sock.sendto(datagram, self.remote_addr)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Sending


@dataclass
class MediaSpec:
    """What one published stream sends."""

    kind: str  # "audio" | "video"
    size: int  # on-wire datagram size in bytes (SRTP)
    fps: float  # frames (audio: packets) per second
    packets_per_frame: float  # average; frames alternate floor/ceil to hit it

    @classmethod
    def audio(cls, size: int = 120) -> MediaSpec:
        return cls("audio", size, 50.0, 1.0)

    @classmethod
    def video(cls, bitrate: float = 1e6, size: int = 1200, fps: float = 30.0) -> MediaSpec:
        return cls("video", size, fps, max(1.0, bitrate / 8 / fps / size))

    @property
    def packets_per_second(self) -> float:
        return self.fps * self.packets_per_frame

    @property
    def bitrate(self) -> float:
        return self.packets_per_second * self.size * 8


class SendStream:
    """One published stream: packets protected ahead of time, sent frame by frame."""

    def __init__(
        self,
        sid: int,
        conn: Conn,
        spec: MediaSpec,
        ssrc: int,
        *,
        mid: str | None = None,
        frames: list[list[bytes]] | None = None,
    ) -> None:
        self.sid = sid
        # the sdes:mid header extension on every packet, as browsers send it
        self.mid_block = (
            build_extension_block([(MID_EXT_ID, mid.encode())])
            if mid is not None and conn.peer is not None
            else b""
        )
        self.conn = conn
        self.spec = spec
        self.ssrc = ssrc
        self.pt = AUDIO_PT if spec.kind == "audio" else VIDEO_PT
        self.clock_step = 960 if spec.kind == "audio" else int(90000 / spec.fps)
        self.interval = 1.0 / spec.fps
        self.frames = frames  # real codec payloads (no stamp) instead of stamped filler
        # send time (CLOCK_REALTIME ns) of packet k: right before its frame's sendmmsg
        self.log = array("q")
        self.packets: list[bytes] = []
        self.frame_sizes: list[int] = []
        self.frame = 0  # next frame to send
        self.k = 0  # next packet to send
        self.epoch_ns = time.time_ns()
        self.seq0 = 1000 + sid * 7
        self.receivers: list[Conn] = []
        self.next_due = 0.0
        self._protected_frames = 0

    def _frame_packets(self, frame: int) -> int:
        if self.frames is not None:
            return len(self.frames[frame % len(self.frames)])
        x = self.spec.packets_per_frame
        return int(math.floor((frame + 1) * x) - math.floor(frame * x))

    def protect_ahead(self, seconds: float) -> None:
        """Protect every packet of the next ``seconds`` of frames not yet protected."""
        want = self.frame + int(seconds / self.interval) + 1
        peer = self.conn.peer
        protect = peer.srtp.protect if peer is not None and peer.srtp is not None else None
        mid_block = self.mid_block
        overhead = 12 + len(mid_block) + (16 if protect is not None else 0)
        payload_len = max(16, self.spec.size - overhead)
        while self._protected_frames < want:
            f = self._protected_frames
            n = self._frame_packets(f)
            ts = (f * self.clock_step) & 0xFFFFFFFF
            for i in range(n):
                k = len(self.packets)
                if self.frames is not None:
                    payload = self.frames[f % len(self.frames)][i]
                else:
                    sched = self.epoch_ns + int(f * self.interval * 1e9)
                    stamp = b"\x10" + MAGIC + _STAMP.pack(self.sid, k, sched)
                    payload = stamp + bytes(payload_len - len(stamp))
                marker = i == n - 1 and self.spec.kind == "video"
                packet = build_rtp(
                    self.ssrc, self.pt, self.seq0 + k, ts, payload, marker, mid_block
                )
                self.packets.append(protect(packet) if protect is not None else packet)
            self.frame_sizes.append(n)
            self._protected_frames += 1

    def send_frame(self) -> None:
        if self.frame >= len(self.frame_sizes):  # the schedule ran ahead of the protection
            self.protect_ahead(Sender.AHEAD)
        n = self.frame_sizes[self.frame]
        addr = self.conn.remote_addr
        assert addr is not None
        packets = self.packets
        k = self.k
        batch = [(packets[i], addr) for i in range(k, k + n)]
        handed = time.time_ns()
        self.log.extend([handed] * n)
        self.conn.sender.send(batch)
        for i in range(k, k + n):
            packets[i] = b""  # sent once: release it
        self.k = k + n
        self.frame += 1


class Sender:
    """Sends every stream's frames on time from one task; protects ahead in small chunks."""

    AHEAD = 1.0  # seconds of packets kept protected ahead of the schedule

    def __init__(self) -> None:
        self.streams: list[SendStream] = []
        self.loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._heap: list[tuple[float, int]] = []
        self.late = 0  # frames sent more than one interval late

    def add(self, stream: SendStream, phase: float) -> None:
        stream.protect_ahead(self.AHEAD)
        stream.next_due = self.loop.time() + 0.05 + phase
        self.streams.append(stream)
        heapq.heappush(self._heap, (stream.next_due, len(self.streams) - 1))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = self.loop
        heap = self._heap
        streams = self.streams
        last_refill = loop.time()
        while True:
            now = loop.time()
            while heap and heap[0][0] <= now:
                due, i = heapq.heappop(heap)
                s = streams[i]
                if now - due > s.interval:
                    self.late += 1
                s.send_frame()
                heapq.heappush(heap, (due + s.interval, i))
            if now - last_refill > 0.1:
                last_refill = now
                for s in streams:
                    s.protect_ahead(self.AHEAD)
            delay = heap[0][0] - loop.time() if heap else 0.05
            await asyncio.sleep(max(0.0, delay))


# ---------------------------------------------------------------------------------------------
# Window statistics


@dataclass
class WindowMarks:
    """Where each stream's log stood when a measurement window opened and closed."""

    start: dict[int, int] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)


def mark(streams: Sequence[SendStream]) -> dict[int, int]:
    return {s.sid: s.k for s in streams}


def window_stats(
    streams: Sequence[SendStream], receivers: Sequence[Conn], marks: WindowMarks
) -> dict[str, Any]:
    """Delivery, loss, duplicates, reordering and latency of the packets sent in a window."""
    sids = [s.sid for s in streams]
    if not sids:
        return {"expected": 0, "received": 0}
    n = max(sids) + 1
    k0 = np.zeros(n, dtype=np.int64)
    k1 = np.zeros(n, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    logs = []
    pos = 0
    expected = 0
    by_sid = {}
    for s in streams:
        a, b = marks.start[s.sid], marks.end[s.sid]
        k0[s.sid], k1[s.sid] = a, b
        offset[s.sid] = pos - a
        log = np.frombuffer(s.log, dtype=np.int64)[a:b]
        logs.append(log)
        pos += b - a
        expected += (b - a) * len(s.receivers)
        by_sid[s.sid] = s
    sent = np.concatenate(logs) if logs else np.zeros(0, dtype=np.int64)
    latencies = []
    received = duplicates = reordered = 0
    for conn in receivers:
        rec = conn.rec
        st = np.frombuffer(rec.stream, dtype=np.int32).astype(np.int64)
        k = np.frombuffer(rec.index, dtype=np.int32).astype(np.int64)
        ts = np.frombuffer(rec.time, dtype=np.int64)
        if st.size == 0:
            continue
        valid = st < n
        st, k, ts = st[valid], k[valid], ts[valid]
        inwin = (k >= k0[st]) & (k < k1[st])
        st, k, ts = st[inwin], k[inwin], ts[inwin]
        if st.size == 0:
            continue
        key = st * (1 << 32) + k
        uniq, first = np.unique(key, return_index=True)
        received += uniq.size
        duplicates += key.size - uniq.size
        lat = ts[first] - sent[offset[st[first]] + k[first]]
        latencies.append(lat)
        # reordering: a packet whose index is below one already received on the same stream
        for sid in np.unique(st):
            seq = k[st == sid]
            if seq.size > 1:
                reordered += int(np.count_nonzero(seq[1:] < np.maximum.accumulate(seq)[:-1]))
    lat_ns = np.concatenate(latencies) if latencies else np.zeros(0, dtype=np.int64)
    return {
        "expected": int(expected),
        "received": int(received),
        "lost": int(max(0, expected - received)),
        "loss": float((expected - received) / expected) if expected else 0.0,
        "duplicates": int(duplicates),
        "reordered": int(reordered),
        "latency_ns": lat_ns,
    }
