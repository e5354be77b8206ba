"""A sans-I/O SCTP association for WebRTC data channels (RFC 9260 over DTLS, RFC 8261).

Only what data channels need between a browser and the relay: one association per DTLS
connection, no multi-homing, no AUTH. Packets go in with :meth:`SctpAssociation.receive`;
packets to send (each one DTLS application record) come out of
:meth:`SctpAssociation.take_packets`; what happened comes out of
:meth:`SctpAssociation.take_events`. Time is passed in (``now``) and the one deadline is
:meth:`SctpAssociation.next_timeout`; nothing here reads a clock or touches a socket.

Implemented:

- the four-way handshake, INIT / INIT-ACK with a state cookie (HMAC-SHA256, a lifetime), then
  COOKIE-ECHO / COOKIE-ACK; the association exists only once a valid cookie comes back;
  colliding INITs (both sides start, as browsers do) answered as RFC 9260 §5.2.1 says;
- DATA with fragmentation and reassembly, ordered (per-stream sequence numbers) and
  unordered delivery; a SACK for every packet that carries DATA (gap blocks, duplicates);
- retransmission on the T3-rtx timer (RTO from measured round trips, RFC 9260 §6.3) and fast
  retransmission after three miss indications, within the congestion window and the peer's
  receive window;
- partial reliability (RFC 3758): messages with a retransmission limit or a lifetime are
  abandoned and skipped with FORWARD-TSN; a received FORWARD-TSN moves the cumulative TSN;
- stream reset (RFC 6525, outgoing SSN reset request and its response), which is how a data
  channel is closed (RFC 8831 §6.7);
- HEARTBEAT answered, ABORT, SHUTDOWN / SHUTDOWN-ACK / SHUTDOWN-COMPLETE.

Bounded: the receive buffer (``receive_window`` bytes, DATA beyond it is dropped unacknowledged
and the peer retransmits) and the send buffer (``send_buffer`` bytes: :meth:`send` refuses a
message that does not fit).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


def _make_crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _make_crc_table()


def crc32c_python(data: bytes) -> int:
    """CRC32c in pure Python (the fallback; about 100 us for a full packet)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_crc32c: Callable[[bytes], int] = crc32c_python
try:  # the C implementation when it is installed (google-crc32c), else the table above
    import google_crc32c

    def _crc32c_c(data: bytes) -> int:
        return int(google_crc32c.value(data))

    _crc32c = _crc32c_c
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = [
    "Aborted",
    "AssociationState",
    "Connected",
    "MessageReceived",
    "SctpAssociation",
    "SctpError",
    "StreamsReset",
    "crc32c",
]


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli) as SCTP uses it (RFC 9260 appendix A)."""
    return _crc32c(data)


class SctpError(Exception):
    """A malformed SCTP packet or chunk."""


# chunk types
DATA = 0
INIT = 1
INIT_ACK = 2
SACK = 3
HEARTBEAT = 4
HEARTBEAT_ACK = 5
ABORT = 6
SHUTDOWN = 7
SHUTDOWN_ACK = 8
ERROR = 9
COOKIE_ECHO = 10
COOKIE_ACK = 11
SHUTDOWN_COMPLETE = 14
RECONFIG = 130
FORWARD_TSN = 192

# parameters
PARAM_HEARTBEAT_INFO = 1
PARAM_STATE_COOKIE = 7
PARAM_COOKIE_PRESERVATIVE = 9
PARAM_SUPPORTED_EXTENSIONS = 0x8008
PARAM_FORWARD_TSN_SUPPORTED = 0xC000
PARAM_OUTGOING_RESET = 13
PARAM_INCOMING_RESET = 14
PARAM_RECONFIG_RESPONSE = 16
PARAM_ADD_OUTGOING_STREAMS = 17
PARAM_ADD_INCOMING_STREAMS = 18

RECONFIG_SUCCESS = 1
RECONFIG_DENIED = 2
RECONFIG_IN_PROGRESS = 6

# DATA chunk flags
FLAG_END = 0x01
FLAG_BEGIN = 0x02
FLAG_UNORDERED = 0x04
FLAG_IMMEDIATE = 0x08

COMMON_HEADER = 12
DATA_HEADER = 16
#: the largest SCTP packet handed to DTLS: fits a 1200-byte datagram with the DTLS record
#: overhead (13-byte header, up to 8-byte explicit nonce, 16-byte tag) and some margin
MAX_PACKET = 1140
MAX_FRAGMENT = MAX_PACKET - COMMON_HEADER - DATA_HEADER
MAX_STREAMS = 65535
#: DATA further ahead of the cumulative TSN than this is dropped (SACK gap offsets are 16-bit)
MAX_TSN_AHEAD = 16384
COOKIE_LIFETIME = 60.0
RTO_INITIAL = 1.0
RTO_MIN = 0.2
RTO_MAX = 10.0
#: consecutive T3-rtx expiries (or INIT/COOKIE retransmissions) before the peer is dead
MAX_RETRANSMISSIONS = 10
INIT_RETRANSMISSIONS = 8

_COOKIE = struct.Struct("!IIIIIHHdB")  # peer tag, peer TSN, peer rwnd, our tag, our TSN,
# outbound streams, inbound streams, created (now clock), flags (1: forward-tsn, 2: reconfig)


def _tsn_gt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit TSNs: a > b."""
    return a != b and ((a - b) & 0xFFFFFFFF) < 0x80000000


def _tsn_ge(a: int, b: int) -> bool:
    return a == b or _tsn_gt(a, b)


def _ssn_gt(a: int, b: int) -> bool:
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def _pad4(n: int) -> int:
    return (n + 3) & ~3


# -- wire format -------------------------------------------------------------------------------


def parse_packet(data: bytes) -> tuple[int, int, int, list[tuple[int, int, bytes]]]:
    """(source port, destination port, verification tag, [(type, flags, value)]).

    Raises SctpError for a short packet, a wrong checksum or a malformed chunk header."""
    if len(data) < COMMON_HEADER + 4:
        raise SctpError("packet shorter than a header and one chunk")
    src, dst, tag = struct.unpack_from("!HHI", data)
    # RFC 9260 appendix A: the CRC32c is written least significant byte first
    checksum = int.from_bytes(data[8:12], "little")
    if crc32c(bytes(data[:8]) + b"\x00\x00\x00\x00" + bytes(data[12:])) != checksum:
        raise SctpError("bad checksum")
    chunks = []
    pos = COMMON_HEADER
    size = len(data)
    while pos + 4 <= size:
        ctype, flags, length = struct.unpack_from("!BBH", data, pos)
        if length < 4 or pos + length > size:
            raise SctpError(f"chunk {ctype}: bad length {length}")
        chunks.append((ctype, flags, bytes(data[pos + 4 : pos + length])))
        pos += _pad4(length)
    if not chunks:
        raise SctpError("packet without chunks")
    return src, dst, tag, chunks


def serialize_packet(src: int, dst: int, tag: int, chunks: list[bytes]) -> bytes:
    """A packet from already-encoded chunks, with its CRC32c."""
    body = b"".join(chunks)
    header = struct.pack("!HHII", src, dst, tag, 0)
    checksum = crc32c(header + body)
    return header[:8] + checksum.to_bytes(4, "little") + body


def chunk(ctype: int, flags: int, value: bytes) -> bytes:
    """One chunk: header, value, padding to 4 bytes."""
    length = 4 + len(value)
    return struct.pack("!BBH", ctype, flags, length) + value + b"\x00" * (_pad4(length) - length)


def param(ptype: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("!HH", ptype, length) + value + b"\x00" * (_pad4(length) - length)


def parse_params(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        ptype, length = struct.unpack_from("!HH", data, pos)
        if length < 4 or pos + length > len(data):
            return
        yield ptype, data[pos + 4 : pos + length]
        pos += _pad4(length)


@dataclass
class InitChunk:
    """INIT or INIT-ACK."""

    initiate_tag: int
    a_rwnd: int
    outbound_streams: int
    inbound_streams: int
    initial_tsn: int
    forward_tsn: bool = False
    reconfig: bool = False
    cookie: bytes | None = None

    @classmethod
    def parse(cls, value: bytes) -> InitChunk:
        if len(value) < 16:
            raise SctpError("INIT shorter than 16 bytes")
        tag, rwnd, out_streams, in_streams, tsn = struct.unpack_from("!IIHHI", value)
        init = cls(tag, rwnd, out_streams, in_streams, tsn)
        for ptype, pvalue in parse_params(value[16:]):
            if ptype == PARAM_FORWARD_TSN_SUPPORTED:
                init.forward_tsn = True
            elif ptype == PARAM_SUPPORTED_EXTENSIONS:
                if FORWARD_TSN in pvalue:
                    init.forward_tsn = True
                if RECONFIG in pvalue:
                    init.reconfig = True
            elif ptype == PARAM_STATE_COOKIE:
                init.cookie = bytes(pvalue)
        return init

    def encode(self) -> bytes:
        value = struct.pack(
            "!IIHHI",
            self.initiate_tag,
            self.a_rwnd,
            self.outbound_streams,
            self.inbound_streams,
            self.initial_tsn,
        )
        if self.cookie is not None:
            value += param(PARAM_STATE_COOKIE, self.cookie)
        value += param(PARAM_FORWARD_TSN_SUPPORTED, b"")
        value += param(PARAM_SUPPORTED_EXTENSIONS, bytes([RECONFIG, FORWARD_TSN]))
        return value


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """The association is established (both sides may send DATA)."""


@dataclass(frozen=True)
class MessageReceived:
    """A whole user message."""

    stream_id: int
    ppid: int
    data: bytes
    ordered: bool


@dataclass(frozen=True)
class StreamsReset:
    """The peer reset these streams (a data channel closing); ours are reset in reply."""

    stream_ids: tuple[int, ...]


@dataclass(frozen=True)
class Aborted:
    """The association is gone: an ABORT, a shutdown or too many retransmissions."""

    reason: str


Event = Connected | MessageReceived | StreamsReset | Aborted


class AssociationState(enum.Enum):
    CLOSED = "closed"
    COOKIE_WAIT = "cookie-wait"
    COOKIE_ECHOED = "cookie-echoed"
    ESTABLISHED = "established"
    SHUTDOWN_SENT = "shutdown-sent"
    SHUTDOWN_ACK_SENT = "shutdown-ack-sent"


@dataclass
class _OutChunk:
    tsn: int
    stream_id: int
    ssn: int
    ppid: int
    flags: int
    data: bytes
    #: the message this fragment belongs to (abandoned as a whole)
    message: _OutMessage
    sent_at: float | None = None
    transmissions: int = 0
    acked: bool = False
    misses: int = 0
    retransmit: bool = False
    abandoned: bool = False

    @property
    def size(self) -> int:
        return DATA_HEADER + len(self.data)

    def encode(self) -> bytes:
        header = struct.pack("!IHHI", self.tsn, self.stream_id, self.ssn, self.ppid)
        return chunk(DATA, self.flags, header + self.data)


@dataclass
class _OutMessage:
    stream_id: int
    ssn: int
    ordered: bool
    max_retransmits: int | None
    expires: float | None
    chunks: list[_OutChunk] = field(default_factory=list)
    abandoned: bool = False


@dataclass
class _InChunk:
    tsn: int
    stream_id: int
    ssn: int
    ppid: int
    flags: int
    data: bytes


class SctpAssociation:
    """One SCTP association over one DTLS connection; see the module docstring."""

    def __init__(
        self,
        *,
        local_port: int = 5000,
        remote_port: int = 5000,
        receive_window: int = 256 * 1024,
        send_buffer: int = 1024 * 1024,
        secret: bytes | None = None,
        random: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self.local_port = local_port
        self.remote_port = remote_port
        self.receive_window = receive_window
        self.send_buffer = send_buffer
        self._secret = secret or secrets.token_bytes(32)
        self._random = random
        self.state = AssociationState.CLOSED
        self.failure_reason: str | None = None
        self.local_tag = random(32) or 1
        self.remote_tag = 0
        self.forward_tsn = False
        self.reconfig = False
        self.outbound_streams = MAX_STREAMS
        self.inbound_streams = MAX_STREAMS
        # sending
        self._initial_tsn = random(32)
        self._next_tsn = self._initial_tsn
        self._last_acked = (self._initial_tsn - 1) & 0xFFFFFFFF
        self._advanced_peer_ack = self._last_acked
        self._out_ssn: dict[int, int] = {}
        self._queue: list[_OutChunk] = []  # not yet sent
        self._flight: dict[int, _OutChunk] = {}  # sent, not yet cumulatively acked; by TSN
        self._queued_bytes = 0
        self._flight_bytes = 0
        self.peer_rwnd = 0
        self.cwnd = 4 * MAX_PACKET
        self.ssthresh = 1 << 30
        self._partial_bytes_acked = 0
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = RTO_INITIAL
        self._t3_at: float | None = None
        self._t3_failures = 0
        self._forward_tsn_due = False
        # receiving
        self._cum_tsn = 0
        self._received: dict[int, _InChunk] = {}  # above cum_tsn or not yet delivered
        self._above: set[int] = set()  # TSNs received above cum_tsn
        self._dups: list[int] = []
        self._buffered = 0
        self._in_ssn: dict[int, int] = {}
        self._ordered_ready: dict[int, dict[int, tuple[int, bytes]]] = {}
        self._sack_due = False
        # handshake (when we start it)
        self._init_chunk: bytes | None = None
        self._cookie_chunk: bytes | None = None
        self._t1_at: float | None = None
        self._t1_count = 0
        # stream reset (RFC 6525)
        self._reconfig_seq = random(32)
        self._peer_reconfig_seq: int | None = None
        self._pending_peer_resets: list[tuple[int, int, tuple[int, ...]]] = []
        self._performed_resets: list[int] = []  # recent peer request numbers, answered again
        self._reset_out: list[int] = []  # our streams to reset
        self._reconfig_inflight: tuple[int, bytes] | None = None
        self._reconfig_at: float | None = None
        # output
        self._packets: list[bytes] = []
        self._control: list[bytes] = []  # chunks for the next packet(s)
        self._events: list[Event] = []
        self.max_message_size = 256 * 1024

    # -- public API ------------------------------------------------------------------------
    @property
    def established(self) -> bool:
        return self.state is AssociationState.ESTABLISHED

    def connect(self, now: float) -> None:
        """Start the handshake (send INIT). A side that waits for the peer's INIT does not."""
        if self.state is not AssociationState.CLOSED:
            return
        init = InitChunk(
            self.local_tag,
            self.receive_window,
            self.outbound_streams,
            self.inbound_streams,
            self._initial_tsn,
        )
        self._init_chunk = chunk(INIT, 0, init.encode())
        self.state = AssociationState.COOKIE_WAIT
        self._t1_count = 0
        self._t1_at = now + self.rto
        self._emit_packet([self._init_chunk], tag=0)

    def take_packets(self) -> list[bytes]:
        """SCTP packets to send, each in one DTLS record."""
        packets, self._packets = self._packets, []
        return packets

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def next_timeout(self) -> float | None:
        deadlines = [t for t in (self._t1_at, self._t3_at, self._reconfig_at) if t is not None]
        return min(deadlines) if deadlines else None

    @property
    def buffered_amount(self) -> int:
        """Bytes of user data queued or in flight."""
        return self._queued_bytes + self._flight_bytes

    def send(
        self,
        stream_id: int,
        ppid: int,
        data: bytes,
        now: float,
        *,
        ordered: bool = True,
        max_retransmits: int | None = None,
        lifetime: float | None = None,
    ) -> bool:
        """Queue one user message (fragmented as needed) and send what the windows allow.

        False (nothing queued) when the association is not established, the stream is out of
        range or the send buffer cannot take the message."""
        if self.state is not AssociationState.ESTABLISHED:
            return False
        if not 0 <= stream_id < self.outbound_streams:
            return False
        if self.buffered_amount + len(data) > self.send_buffer:
            return False
        if not self.forward_tsn:
            max_retransmits = lifetime = None
        ssn = self._out_ssn.get(stream_id, 0)
        if ordered:
            self._out_ssn[stream_id] = (ssn + 1) & 0xFFFF
        message = _OutMessage(
            stream_id,
            ssn if ordered else 0,
            ordered,
            max_retransmits,
            None if lifetime is None else now + lifetime,
        )
        pieces = [data[i : i + MAX_FRAGMENT] for i in range(0, len(data), MAX_FRAGMENT)] or [b""]
        for i, piece in enumerate(pieces):
            flags = (FLAG_BEGIN if i == 0 else 0) | (FLAG_END if i == len(pieces) - 1 else 0)
            if not ordered:
                flags |= FLAG_UNORDERED
            c = _OutChunk(self._next_tsn, stream_id, message.ssn, ppid, flags, piece, message)
            self._next_tsn = (self._next_tsn + 1) & 0xFFFFFFFF
            message.chunks.append(c)
            self._queue.append(c)
            self._queued_bytes += len(piece)
        self._transmit(now)
        return True

    def reset_streams(self, stream_ids: list[int], now: float) -> None:
        """Reset our outgoing streams (close data channels), when the peer supports it."""
        if not self.reconfig or self.state is not AssociationState.ESTABLISHED:
            return
        for sid in stream_ids:
            if sid not in self._reset_out:
                self._reset_out.append(sid)
        self._send_reconfig(now)

    def abort(self, reason: str = "aborted") -> None:
        """Send ABORT and close at once."""
        if self.state in (AssociationState.ESTABLISHED, AssociationState.COOKIE_ECHOED):
            self._emit_packet([chunk(ABORT, 0, b"")])
        self._close(reason)

    def shutdown(self, now: float) -> None:
        """Graceful close: SHUTDOWN (what is in flight is not waited for)."""
        if self.state is not AssociationState.ESTABLISHED:
            return
        self.state = AssociationState.SHUTDOWN_SENT
        self._emit_packet([chunk(SHUTDOWN, 0, struct.pack("!I", self._cum_tsn))])
        self._t3_at = now + self.rto

    def handle_timeout(self, now: float) -> None:
        if self._t1_at is not None and now >= self._t1_at:
            self._t1_count += 1
            if self._t1_count > INIT_RETRANSMISSIONS:
                self._close("handshake timed out")
                return
            self.rto = min(self.rto * 2, RTO_MAX)
            self._t1_at = now + self.rto
            if self.state is AssociationState.COOKIE_WAIT and self._init_chunk is not None:
                self._emit_packet([self._init_chunk], tag=0)
            elif self.state is AssociationState.COOKIE_ECHOED and self._cookie_chunk is not None:
                self._emit_packet([self._cookie_chunk])
        if self._reconfig_at is not None and now >= self._reconfig_at:
            self._reconfig_at = None
            if self._reconfig_inflight is not None:
                self._emit_packet([self._reconfig_inflight[1]])
                self._reconfig_at = now + self.rto
        if self._t3_at is not None and now >= self._t3_at:
            self._t3_expired(now)

    def receive(self, data: bytes, now: float) -> None:
        """One SCTP packet (a DTLS record's plaintext). Malformed packets are ignored."""
        try:
            src, dst, tag, chunks = parse_packet(data)
        except SctpError:
            return
        if self.state is AssociationState.CLOSED and self.failure_reason is not None:
            return
        first = chunks[0][0]
        if first == INIT:
            if tag != 0 or len(chunks) != 1:
                return
        elif first == ABORT or first == SHUTDOWN_COMPLETE:
            if tag != self.local_tag and not (chunks[0][1] & 1 and tag == self.remote_tag):
                return
        elif first == COOKIE_ECHO:
            pass  # the cookie itself is checked
        elif tag != self.local_tag:
            return
        data_seen = False
        for ctype, flags, value in chunks:
            try:
                if ctype == DATA:
                    data_seen = True
                    self._on_data(flags, value)
                elif ctype == INIT:
                    self._on_init(value, now)
                elif ctype == INIT_ACK:
                    self._on_init_ack(value, now)
                elif ctype == COOKIE_ECHO:
                    if not self._on_cookie_echo(value, tag, now):
                        return
                elif ctype == COOKIE_ACK:
                    self._on_cookie_ack()
                elif ctype == SACK:
                    self._on_sack(value, now)
                elif ctype == HEARTBEAT:
                    self._control.append(chunk(HEARTBEAT_ACK, 0, value))
                elif ctype == FORWARD_TSN:
                    data_seen = True
                    self._on_forward_tsn(value)
                elif ctype == RECONFIG:
                    self._on_reconfig(value, now)
                elif ctype == ABORT:
                    self._close("aborted by the peer")
                    return
                elif ctype == SHUTDOWN:
                    self._on_shutdown(value, now)
                elif ctype == SHUTDOWN_ACK:
                    self._emit_packet([chunk(SHUTDOWN_COMPLETE, 0, b"")])
                    self._close("shut down")
                    return
                elif ctype == SHUTDOWN_COMPLETE:
                    if self.state is AssociationState.SHUTDOWN_ACK_SENT:
                        self._close("shut down by the peer")
                    return
                elif ctype in (HEARTBEAT_ACK, ERROR):
                    pass
                elif ctype >> 6 in (0, 1):
                    break  # an unknown chunk whose upper bits say: stop processing the packet
            except (SctpError, struct.error):
                break
        if data_seen:
            self._sack_due = True
            self._deliver()
            self._maybe_perform_peer_resets(now)
        self._transmit(now)

    # -- handshake -------------------------------------------------------------------------
    def _make_cookie(self, init: InitChunk, now: float) -> tuple[bytes, int, int]:
        our_tag = self.local_tag
        our_tsn = self._initial_tsn
        flags = (1 if init.forward_tsn else 0) | (2 if init.reconfig else 0)
        body = _COOKIE.pack(
            init.initiate_tag,
            init.initial_tsn,
            init.a_rwnd,
            our_tag,
            our_tsn,
            min(self.outbound_streams, init.inbound_streams),
            min(self.inbound_streams, init.outbound_streams),
            now,
            flags,
        )
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()
        return body + mac, our_tag, our_tsn

    def _on_init(self, value: bytes, now: float) -> None:
        init = InitChunk.parse(value)
        if init.initiate_tag == 0:
            return
        if self.state not in (
            AssociationState.CLOSED,
            AssociationState.COOKIE_WAIT,
            AssociationState.COOKIE_ECHOED,
            AssociationState.ESTABLISHED,
        ):
            return
        # RFC 9260 §5.2.1/5.2.2: the INIT-ACK carries our tag (the one of our own INIT when
        # both started) and is sent with the peer's tag
        cookie, our_tag, our_tsn = self._make_cookie(init, now)
        ack = InitChunk(
            our_tag,
            self.receive_window,
            self.outbound_streams,
            self.inbound_streams,
            our_tsn,
            cookie=cookie,
        )
        self._emit_packet([chunk(INIT_ACK, 0, ack.encode())], tag=init.initiate_tag)

    def _on_init_ack(self, value: bytes, now: float) -> None:
        if self.state is not AssociationState.COOKIE_WAIT:
            return
        init = InitChunk.parse(value)
        if init.cookie is None or init.initiate_tag == 0:
            return
        self._setup_peer(
            init.initiate_tag,
            init.initial_tsn,
            init.a_rwnd,
            min(self.outbound_streams, init.inbound_streams),
            min(self.inbound_streams, init.outbound_streams),
            init.forward_tsn,
            init.reconfig,
        )
        self._cookie_chunk = chunk(COOKIE_ECHO, 0, init.cookie)
        self.state = AssociationState.COOKIE_ECHOED
        self._t1_count = 0
        self._t1_at = now + self.rto
        self._emit_packet([self._cookie_chunk])

    def _on_cookie_echo(self, value: bytes, tag: int, now: float) -> bool:
        if len(value) != _COOKIE.size + 32:
            return False
        body, mac = value[: _COOKIE.size], value[_COOKIE.size :]
        expected = hmac.new(self._secret, body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return False
        peer_tag, peer_tsn, peer_rwnd, our_tag, our_tsn, out_s, in_s, created, flags = (
            _COOKIE.unpack(body)
        )
        if tag != our_tag or our_tag != self.local_tag or not 0 <= now - created <= COOKIE_LIFETIME:
            return False
        if self.state is AssociationState.ESTABLISHED:
            if peer_tag == self.remote_tag:
                self._control.append(chunk(COOKIE_ACK, 0, b""))
            return True  # a restart (new peer tag) is not supported
        self._setup_peer(
            peer_tag, peer_tsn, peer_rwnd, out_s, in_s, bool(flags & 1), bool(flags & 2)
        )
        self._control.append(chunk(COOKIE_ACK, 0, b""))
        self._established()
        return True

    def _on_cookie_ack(self) -> None:
        if self.state is AssociationState.COOKIE_ECHOED:
            self._established()

    def _setup_peer(
        self,
        tag: int,
        tsn: int,
        rwnd: int,
        outbound: int,
        inbound: int,
        forward_tsn: bool,
        reconfig: bool,
    ) -> None:
        self.remote_tag = tag
        self._cum_tsn = (tsn - 1) & 0xFFFFFFFF
        self.peer_rwnd = rwnd
        self.outbound_streams = outbound
        self.inbound_streams = inbound
        self.forward_tsn = forward_tsn
        self.reconfig = reconfig
        self._peer_reconfig_seq = tsn  # RFC 6525 §5.2.1: starts at the peer's initial TSN

    def _established(self) -> None:
        self.state = AssociationState.ESTABLISHED
        self._t1_at = None
        self._init_chunk = self._cookie_chunk = None
        self._events.append(Connected())

    def _on_shutdown(self, value: bytes, now: float) -> None:
        if self.state not in (AssociationState.ESTABLISHED, AssociationState.SHUTDOWN_SENT):
            return
        self.state = AssociationState.SHUTDOWN_ACK_SENT
        self._emit_packet([chunk(SHUTDOWN_ACK, 0, b"")])
        self._t3_at = now + self.rto

    def _close(self, reason: str) -> None:
        if self.state is AssociationState.CLOSED and self.failure_reason is not None:
            return
        self.state = AssociationState.CLOSED
        self.failure_reason = reason
        self._t1_at = self._t3_at = self._reconfig_at = None
        self._queue.clear()
        self._flight.clear()
        self._received.clear()
        self._queued_bytes = self._flight_bytes = self._buffered = 0
        self._events.append(Aborted(reason))

    # -- receiving DATA --------------------------------------------------------------------
    def _on_data(self, flags: int, value: bytes) -> None:
        if self.state not in (AssociationState.ESTABLISHED, AssociationState.SHUTDOWN_SENT):
            return
        if len(value) < 12:
            raise SctpError("DATA shorter than its header")
        tsn, stream_id, ssn, ppid = struct.unpack_from("!IHHI", value)
        payload = bytes(value[12:])
        if not _tsn_gt(tsn, self._cum_tsn) or tsn in self._above:
            self._dups.append(tsn)
            return
        if (tsn - self._cum_tsn) & 0xFFFFFFFF > MAX_TSN_AHEAD:
            return  # far beyond anything the receive window allows: dropped
        if self._buffered + len(payload) > self.receive_window:
            return  # no room: not acknowledged, the peer sends it again
        if stream_id >= self.inbound_streams:
            # RFC 9260 §6.5: an invalid stream identifier; the TSN is acknowledged, the data
            # dropped
            self._mark_received(tsn)
            return
        self._received[tsn] = _InChunk(tsn, stream_id, ssn, ppid, flags, payload)
        self._buffered += len(payload)
        self._mark_received(tsn)

    def _mark_received(self, tsn: int) -> None:
        self._above.add(tsn)
        cum = self._cum_tsn
        above = self._above
        while (cum + 1) & 0xFFFFFFFF in above:
            cum = (cum + 1) & 0xFFFFFFFF
            above.discard(cum)
        self._cum_tsn = cum

    def _deliver(self) -> None:
        """Whole messages out of the reassembly buffer: unordered ones at once, ordered ones
        in stream-sequence order."""
        received = self._received
        for tsn in sorted(received, key=lambda t: (t - self._cum_tsn) & 0xFFFFFFFF):
            first = received.get(tsn)
            if first is None or not first.flags & FLAG_BEGIN:
                continue
            parts = [first]
            cursor = tsn
            while not parts[-1].flags & FLAG_END:
                cursor = (cursor + 1) & 0xFFFFFFFF
                nxt = received.get(cursor)
                if nxt is None or nxt.flags & FLAG_BEGIN or nxt.stream_id != first.stream_id:
                    parts = []
                    break
                parts.append(nxt)
            if not parts:
                continue
            payload = b"".join(p.data for p in parts)
            for p in parts:
                del received[p.tsn]
                self._buffered -= len(p.data)
            if first.flags & FLAG_UNORDERED:
                self._events.append(MessageReceived(first.stream_id, first.ppid, payload, False))
            else:
                expected = self._in_ssn.get(first.stream_id, 0)
                if _ssn_gt(expected, first.ssn):
                    continue  # an old message (skipped by FORWARD-TSN): drop
                self._ordered_ready.setdefault(first.stream_id, {})[first.ssn] = (
                    first.ppid,
                    payload,
                )
                self._buffered += len(payload)
        self._deliver_ordered()

    def _deliver_ordered(self) -> None:
        for stream_id, ready in list(self._ordered_ready.items()):
            expected = self._in_ssn.get(stream_id, 0)
            while expected in ready:
                ppid, payload = ready.pop(expected)
                self._buffered -= len(payload)
                self._events.append(MessageReceived(stream_id, ppid, payload, True))
                expected = (expected + 1) & 0xFFFF
            self._in_ssn[stream_id] = expected
            if not ready:
                del self._ordered_ready[stream_id]

    def _on_forward_tsn(self, value: bytes) -> None:
        if len(value) < 4:
            raise SctpError("FORWARD-TSN shorter than 4 bytes")
        (new_cum,) = struct.unpack_from("!I", value)
        if not _tsn_gt(new_cum, self._cum_tsn):
            return
        # drop every fragment up to the new cumulative TSN
        for tsn in list(self._received):
            if _tsn_ge(new_cum, tsn):
                self._buffered -= len(self._received.pop(tsn).data)
        self._above = {t for t in self._above if _tsn_gt(t, new_cum)}
        self._cum_tsn = new_cum
        self._mark_received(new_cum)  # folds what was received above it
        self._above.discard(new_cum)
        for pos in range(4, len(value) - 3, 4):
            stream_id, ssn = struct.unpack_from("!HH", value, pos)
            expected = self._in_ssn.get(stream_id, 0)
            if not _ssn_gt(expected, ssn):
                # the messages up to ssn are skipped; whatever was ready before them goes out
                ready = self._ordered_ready.get(stream_id, {})
                for s in sorted(ready, key=lambda s: (s - expected) & 0xFFFF):
                    if _ssn_gt(s, ssn):
                        break
                    ppid, payload = ready.pop(s)
                    self._buffered -= len(payload)
                    self._events.append(MessageReceived(stream_id, ppid, payload, True))
                self._in_ssn[stream_id] = (ssn + 1) & 0xFFFF

    def _sack_chunk(self) -> bytes:
        cum = self._cum_tsn
        blocks: list[tuple[int, int]] = []
        for tsn in sorted(self._above, key=lambda t: (t - cum) & 0xFFFFFFFF):
            offset = (tsn - cum) & 0xFFFFFFFF
            if blocks and offset == blocks[-1][1] + 1:
                blocks[-1] = (blocks[-1][0], offset)
            else:
                blocks.append((offset, offset))
        blocks = blocks[:64]
        dups = self._dups[:16]
        self._dups = []
        rwnd = max(0, self.receive_window - self._buffered)
        value = struct.pack("!IIHH", cum, rwnd, len(blocks), len(dups))
        value += b"".join(struct.pack("!HH", a, b) for a, b in blocks)
        value += b"".join(struct.pack("!I", d) for d in dups)
        return chunk(SACK, 0, value)

    # -- sending DATA ----------------------------------------------------------------------
    def _on_sack(self, value: bytes, now: float) -> None:
        if self.state not in (
            AssociationState.ESTABLISHED,
            AssociationState.SHUTDOWN_SENT,
            AssociationState.SHUTDOWN_ACK_SENT,
        ):
            return
        if len(value) < 12:
            raise SctpError("SACK shorter than 12 bytes")
        cum, rwnd, n_gaps, _n_dups = struct.unpack_from("!IIHH", value)
        if _tsn_gt(self._last_acked, cum):
            return  # an old SACK
        if _tsn_gt(cum, (self._next_tsn - 1) & 0xFFFFFFFF):
            return  # acknowledges what was never sent: ignored (a broken or hostile peer)
        blocks = [
            struct.unpack_from("!HH", value, 12 + 4 * i)
            for i in range(min(n_gaps, (len(value) - 12) // 4, 256))
        ]
        flight = self._flight
        acked_bytes = 0
        rtt_sample: float | None = None
        progressed = _tsn_gt(cum, self._last_acked)
        # cumulatively acknowledged
        tsn = (self._last_acked + 1) & 0xFFFFFFFF
        while progressed and _tsn_ge(cum, tsn):
            c = flight.pop(tsn, None)
            if c is not None:
                if not c.acked and not c.abandoned:
                    acked_bytes += c.size
                    if c.transmissions == 1 and c.sent_at is not None:
                        rtt_sample = now - c.sent_at
                if not c.acked:
                    self._flight_bytes -= len(c.data)
            tsn = (tsn + 1) & 0xFFFFFFFF
        if progressed:
            self._last_acked = cum
            if _tsn_gt(cum, self._advanced_peer_ack):
                self._advanced_peer_ack = cum
        # gap blocks
        highest_newly: int | None = None
        if blocks:
            # what is in flight, looked up in the blocks (never a walk over the blocks' ranges,
            # which a peer chooses)
            for t, c in flight.items():
                if c.acked:
                    continue
                off = (t - cum) & 0xFFFFFFFF
                if off > 0xFFFF or not any(start <= off <= end for start, end in blocks):
                    continue
                c.acked = True
                self._flight_bytes -= len(c.data)
                if not c.abandoned:
                    acked_bytes += c.size
                if c.transmissions == 1 and c.sent_at is not None and rtt_sample is None:
                    rtt_sample = now - c.sent_at
                if highest_newly is None or _tsn_gt(t, highest_newly):
                    highest_newly = t
        # miss indications (RFC 9260 §7.2.4)
        if highest_newly is not None:
            for t, c in flight.items():
                if c.acked or c.abandoned or not _tsn_gt(highest_newly, t):
                    continue
                c.misses += 1
                if c.misses == 3:
                    c.retransmit = True
                    self.ssthresh = max(self.cwnd // 2, 4 * MAX_PACKET)
                    self.cwnd = self.ssthresh
        self.peer_rwnd = max(0, rwnd - self._outstanding())
        if rtt_sample is not None:
            self._update_rto(rtt_sample)
        if acked_bytes:
            self._t3_failures = 0
            if self.cwnd <= self.ssthresh:
                self.cwnd += min(acked_bytes, MAX_PACKET)
            else:
                self._partial_bytes_acked += acked_bytes
                if self._partial_bytes_acked >= self.cwnd:
                    self._partial_bytes_acked -= self.cwnd
                    self.cwnd += MAX_PACKET
        self._abandon_expired(now)
        self._advance_peer_ack_point()
        if progressed:
            waiting = self._outstanding() or _tsn_gt(self._advanced_peer_ack, self._last_acked)
            self._t3_at = now + self.rto if waiting else None
        self._maybe_reset_streams(now)

    def _outstanding(self) -> int:
        return sum(c.size for c in self._flight.values() if not c.acked and not c.abandoned)

    def _update_rto(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(max(self.srtt + 4 * self.rttvar, RTO_MIN), RTO_MAX)

    def _t3_expired(self, now: float) -> None:
        self._t3_at = None
        if self.state in (AssociationState.SHUTDOWN_SENT, AssociationState.SHUTDOWN_ACK_SENT):
            self._close("shutdown timed out")
            return
        self._t3_failures += 1
        if self._t3_failures > MAX_RETRANSMISSIONS:
            self._close("peer unreachable (too many retransmissions)")
            return
        self.rto = min(self.rto * 2, RTO_MAX)
        self.ssthresh = max(self.cwnd // 2, 4 * MAX_PACKET)
        self.cwnd = MAX_PACKET
        for c in self._flight.values():
            if not c.acked and not c.abandoned:
                c.retransmit = True
        self._abandon_expired(now)
        self._advance_peer_ack_point()
        self._transmit(now)

    def _abandon(self, message: _OutMessage) -> None:
        if message.abandoned:
            return
        message.abandoned = True
        for c in message.chunks:
            c.abandoned = True
            c.retransmit = False
            if c in self._queue:
                self._queue.remove(c)
                self._queued_bytes -= len(c.data)
                # never sent: keep it "in flight" as abandoned so FORWARD-TSN covers its TSN
                self._flight[c.tsn] = c
                c.acked = True

    def _abandon_expired(self, now: float) -> None:
        if not self.forward_tsn:
            return
        for c in list(self._flight.values()):
            m = c.message
            if m.abandoned or c.acked:
                continue
            if (m.max_retransmits is not None and c.transmissions > m.max_retransmits) or (
                m.expires is not None and now >= m.expires
            ):
                if not c.acked:
                    self._flight_bytes -= len(c.data)
                    c.acked = True
                self._abandon(m)

    def _advance_peer_ack_point(self) -> None:
        """RFC 3758 §3.5: move the advanced peer ack point over abandoned chunks."""
        if not self.forward_tsn:
            return
        point = self._advanced_peer_ack
        while True:
            nxt = (point + 1) & 0xFFFFFFFF
            c = self._flight.get(nxt)
            if c is None or not c.abandoned:
                break
            point = nxt
        if _tsn_gt(point, self._advanced_peer_ack):
            self._advanced_peer_ack = point
        if _tsn_gt(self._advanced_peer_ack, self._last_acked):
            self._forward_tsn_due = True

    def _forward_tsn_chunk(self) -> bytes:
        point = self._advanced_peer_ack
        streams: dict[int, int] = {}
        tsn = (self._last_acked + 1) & 0xFFFFFFFF
        while _tsn_ge(point, tsn):
            c = self._flight.get(tsn)
            if c is not None and c.message.ordered:
                prev = streams.get(c.stream_id)
                if prev is None or _ssn_gt(c.ssn, prev):
                    streams[c.stream_id] = c.ssn
            tsn = (tsn + 1) & 0xFFFFFFFF
        value = struct.pack("!I", point) + b"".join(
            struct.pack("!HH", s, n) for s, n in streams.items()
        )
        return chunk(FORWARD_TSN, 0, value)

    def _transmit(self, now: float) -> None:
        """Build packets: control chunks, a SACK when due, a FORWARD-TSN when due,
        retransmissions, then new DATA within the windows."""
        control = self._control
        self._control = []
        if self._sack_due and self.state is not AssociationState.CLOSED:
            control.append(self._sack_chunk())
            self._sack_due = False
        if self._forward_tsn_due and self.state is AssociationState.ESTABLISHED:
            control.append(self._forward_tsn_chunk())
            self._forward_tsn_due = False
            if self._t3_at is None:  # sent again at the timer until acknowledged
                self._t3_at = now + self.rto
        data: list[_OutChunk] = []
        if self.state is AssociationState.ESTABLISHED:
            window = min(self.cwnd, self.peer_rwnd + MAX_PACKET)
            outstanding = self._outstanding()
            for c in sorted(
                (c for c in self._flight.values() if c.retransmit),
                key=lambda c: (c.tsn - self._last_acked) & 0xFFFFFFFF,
            ):
                if outstanding and outstanding + c.size > window:
                    break
                c.retransmit = False
                c.misses = 0
                data.append(c)
                outstanding += c.size
            while self._queue:
                c = self._queue[0]
                if outstanding and outstanding + c.size > window:
                    break
                self._queue.pop(0)
                self._queued_bytes -= len(c.data)
                self._flight_bytes += len(c.data)
                self._flight[c.tsn] = c
                data.append(c)
                outstanding += c.size
        for c in data:
            c.transmissions += 1
            c.sent_at = now
        if data and self._t3_at is None:
            self._t3_at = now + self.rto
        # pack chunks into packets of at most MAX_PACKET
        encoded = control + [c.encode() for c in data]
        batch: list[bytes] = []
        size = COMMON_HEADER
        for item in encoded:
            if batch and size + len(item) > MAX_PACKET:
                self._emit_packet(batch)
                batch, size = [], COMMON_HEADER
            batch.append(item)
            size += len(item)
        if batch:
            self._emit_packet(batch)

    def _emit_packet(self, chunks: list[bytes], tag: int | None = None) -> None:
        self._packets.append(
            serialize_packet(
                self.local_port,
                self.remote_port,
                self.remote_tag if tag is None else tag,
                chunks,
            )
        )

    # -- stream reset (RFC 6525) -----------------------------------------------------------
    def _send_reconfig(self, now: float) -> None:
        if self._reconfig_inflight is not None or not self._reset_out:
            return
        streams = self._reset_out[:]
        self._reset_out.clear()
        seq = self._reconfig_seq
        self._reconfig_seq = (seq + 1) & 0xFFFFFFFF
        last_tsn = (self._next_tsn - 1) & 0xFFFFFFFF
        value = struct.pack("!III", seq, (self._peer_reconfig_seq or 0) - 1 & 0xFFFFFFFF, last_tsn)
        value += b"".join(struct.pack("!H", s) for s in streams)
        encoded = chunk(RECONFIG, 0, param(PARAM_OUTGOING_RESET, value))
        self._reconfig_inflight = (seq, encoded)
        self._reconfig_at = now + self.rto
        for s in streams:
            self._out_ssn.pop(s, None)
        self._control.append(encoded)
        self._transmit(now)

    def _maybe_reset_streams(self, now: float) -> None:
        if self._reset_out and self._reconfig_inflight is None:
            self._send_reconfig(now)

    def _on_reconfig(self, value: bytes, now: float) -> None:
        for ptype, pvalue in parse_params(value):
            if ptype == PARAM_OUTGOING_RESET and len(pvalue) >= 12:
                seq, _resp, last_tsn = struct.unpack_from("!III", pvalue)
                streams = tuple(
                    struct.unpack_from("!H", pvalue, i)[0] for i in range(12, len(pvalue) - 1, 2)
                )
                if seq in self._performed_resets or any(
                    r[0] == seq for r in self._pending_peer_resets
                ):
                    if seq in self._performed_resets:
                        self._respond_reconfig(seq, RECONFIG_SUCCESS)
                    continue  # a retransmitted request
                self._pending_peer_resets.append((seq, last_tsn, streams))
                self._maybe_perform_peer_resets(now)
            elif ptype == PARAM_RECONFIG_RESPONSE and len(pvalue) >= 8:
                seq, result = struct.unpack_from("!II", pvalue)
                inflight = self._reconfig_inflight
                if inflight is not None and inflight[0] == seq:
                    if result == RECONFIG_IN_PROGRESS:
                        self._reconfig_at = now + self.rto  # asked again at the timer
                    else:
                        self._reconfig_inflight = None
                        self._reconfig_at = None
                        self._maybe_reset_streams(now)
            elif ptype == PARAM_INCOMING_RESET and len(pvalue) >= 4:
                (seq,) = struct.unpack_from("!I", pvalue)
                streams = tuple(
                    struct.unpack_from("!H", pvalue, i)[0] for i in range(4, len(pvalue) - 1, 2)
                )
                self._respond_reconfig(seq, RECONFIG_SUCCESS)
                for s in streams:
                    if s not in self._reset_out:
                        self._reset_out.append(s)
                self._maybe_reset_streams(now)
            elif ptype in (PARAM_ADD_OUTGOING_STREAMS, PARAM_ADD_INCOMING_STREAMS):
                if len(pvalue) >= 4:
                    (seq,) = struct.unpack_from("!I", pvalue)
                    self._respond_reconfig(seq, RECONFIG_DENIED)

    def _respond_reconfig(self, seq: int, result: int) -> None:
        self._control.append(
            chunk(RECONFIG, 0, param(PARAM_RECONFIG_RESPONSE, struct.pack("!II", seq, result)))
        )

    def _maybe_perform_peer_resets(self, now: float) -> None:
        """Perform a peer's outgoing reset once every DATA up to its last TSN arrived."""
        pending = self._pending_peer_resets
        while pending:
            seq, last_tsn, streams = pending[0]
            if not _tsn_ge(self._cum_tsn, last_tsn):
                self._respond_reconfig(seq, RECONFIG_IN_PROGRESS)
                return
            pending.pop(0)
            self._performed_resets = [*self._performed_resets[-7:], seq]
            self._deliver()
            for s in streams:
                self._in_ssn.pop(s, None)
                self._ordered_ready.pop(s, None)
            self._respond_reconfig(seq, RECONFIG_SUCCESS)
            if streams:
                self._events.append(StreamsReset(streams))
