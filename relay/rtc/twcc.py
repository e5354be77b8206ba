"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01).

Receiver side (publisher legs): :class:`TwccRecorder` notes the transport-wide sequence number
and arrival time of every packet of one transport and builds RTCP RTPFB fmt 15 feedback.
Sender side (subscriber legs): :class:`TwccSendHistory` stamps the relay's own transport-wide
sequence numbers, and matches parsed feedback (:func:`parse_feedback`) against what was sent
into :class:`DeliveryStats` (acked/lost, delivery rate, delay variation) for bandwidth
estimation and simulcast layer choice.

Feedback layout (draft §3.1), after the RTCP common header and the two SSRCs::

    base sequence number (16) | packet status count (16)
    reference time (24, signed, 64 ms units) | feedback packet count (8)
    packet chunks (16 bits each) ... | receive deltas (8 or 16 bits each) ... | padding

Packet status symbols (§3.1.1): 00 not received, 01 received with a small delta (one byte,
0..63.75 ms in 250 µs units), 10 received with a large or negative delta (two bytes signed),
11 reserved (the draft's own example uses it for "received, without receive delta": decoded
so, never produced). Chunks (§3.1.3, §3.1.4): a run-length chunk ``0 SS LLLLLLLLLLLLL``, or a
status vector chunk ``1 S ...`` with fourteen 1-bit symbols (S=0; 0 not received, 1 received
with a small delta, as implementations and the draft's example use them) or seven 2-bit
symbols (S=1).

Sans-I/O: sequence numbers and times (seconds, any monotonic clock) in, bytes and statistics
out. The per-packet calls (:meth:`TwccRecorder.on_packet`, :meth:`TwccSendHistory.next_seq`)
are a few list operations. Building a feedback (:meth:`TwccRecorder.build_feedback`) uses
numpy on the batch; matching one (:meth:`TwccSendHistory.on_feedback`, some ten packets at a
time) is plain Python, which costs less than numpy's per-call overhead at that size.
"""

from __future__ import annotations

import operator
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from relay.rtc import rtcp
from relay.rtc.extensions import TRANSPORT_CC_URI
from relay.rtc.rtcp import RtcpError
from relay.rtc.rtp import (
    ONE_BYTE_PROFILE,
    TWO_BYTE_PROFILE,
    RtpError,
    extension_profile,
    parse_rtp,
)

__all__ = [
    "TRANSPORT_CC_URI",
    "SYMBOL_NOT_RECEIVED",
    "SYMBOL_SMALL_DELTA",
    "SYMBOL_LARGE_DELTA",
    "SYMBOL_NO_DELTA",
    "TwccPacket",
    "TwccFeedback",
    "TwccRecorder",
    "TwccSendHistory",
    "DeliveryStats",
    "encode_status_chunks",
    "decode_status_chunks",
    "parse_feedback",
    "transport_seq",
    "write_transport_seq",
]


SYMBOL_NOT_RECEIVED = 0
SYMBOL_SMALL_DELTA = 1
SYMBOL_LARGE_DELTA = 2
SYMBOL_NO_DELTA = 3  # reserved; "received, w/o recv delta" in the draft's examples

TICK = 0.00025  # receive delta unit: 250 µs
_TICKS_PER_SECOND = 4000.0
_REFERENCE_TICKS = 256  # reference time unit: 64 ms = 256 ticks
_MAX_RUN = 0x1FFF  # 13-bit run length
_MAX_STATUS_COUNT = 0xFFFF

_FCI_HEAD = struct.Struct("!HHI")  # base seq, status count, reference time << 8 | fb count
_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")


# --- packet status chunks (draft §3.1.2-3.1.4) ------------------------------------------------


class _ChunkWriter:
    """Packs status symbols into chunks, greedily (the scheme libwebrtc uses): symbols gather in
    a buffer that is always encodable as one chunk — all equal (run length, up to 8191),
    or at most 7 mixed (2-bit vector), or at most 14 mixed without a large delta (1-bit
    vector); a symbol that would break that emits the buffer first (a 2-bit vector emits its
    first 7 symbols and keeps the rest)."""

    __slots__ = ("words", "n", "first", "all_same", "has_large", "syms")

    def __init__(self) -> None:
        self.words: list[int] = []
        self.n = 0
        self.first = 0
        self.all_same = True
        self.has_large = False
        self.syms: list[int] = []  # the buffer, materialised up to 14 symbols

    @property
    def size(self) -> int:
        """Bytes the chunks take so far, the buffered symbols included."""
        return 2 * len(self.words) + (2 if self.n else 0)

    def add(self, sym: int) -> None:
        n = self.n
        if n and not (
            n < 7
            or (n < 14 and not self.has_large and sym != SYMBOL_LARGE_DELTA)
            or (self.all_same and sym == self.first and n < _MAX_RUN)
        ):
            self._emit()
            n = self.n
        if n == 0:
            self.n = 1
            self.first = sym
            self.all_same = True
            self.has_large = sym == SYMBOL_LARGE_DELTA
            self.syms = [sym]
            return
        if sym != self.first:
            self.all_same = False
        if sym == SYMBOL_LARGE_DELTA:
            self.has_large = True
        if len(self.syms) < 14:
            self.syms.append(sym)
        self.n = n + 1

    def add_run(self, sym: int, count: int) -> None:
        """``count`` equal symbols, without a Python step per symbol for long runs."""
        while count > 0:
            n = self.n
            if n == 0 or (self.all_same and self.first == sym):
                if n == _MAX_RUN:
                    self._emit()
                    continue
                k = min(count, _MAX_RUN - n)
                if n == 0:
                    self.first = sym
                    self.all_same = True
                    self.has_large = sym == SYMBOL_LARGE_DELTA
                    self.syms = []
                room = 14 - len(self.syms)
                if room > 0:
                    self.syms.extend([sym] * min(room, k))
                self.n = n + k
                count -= k
            else:
                self.add(sym)
                count -= 1

    def _emit(self) -> None:
        n = self.n
        syms = self.syms
        if self.all_same:
            self.words.append((self.first << 13) | n)
            self.n = 0
        elif n == 14:  # never holds a large delta here
            word = 0x8000
            for i, s in enumerate(syms):
                word |= (s & 1) << (13 - i)
            self.words.append(word)
            self.n = 0
        else:
            word = 0xC000
            for i in range(7):
                word |= syms[i] << (12 - 2 * i)
            self.words.append(word)
            rest = syms[7:n]
            self.n = 0
            for s in rest:
                self.add(s)

    def finish(self) -> bytes:
        """The encoded chunks; the last one may describe fewer symbols than it has room for
        (the decoder stops at the packet status count)."""
        n = self.n
        if n:
            syms = self.syms
            if self.all_same:
                self.words.append((self.first << 13) | n)
            elif n <= 7:
                word = 0xC000
                for i, s in enumerate(syms):
                    word |= s << (12 - 2 * i)
                self.words.append(word)
            else:
                word = 0x8000
                for i, s in enumerate(syms):
                    word |= (s & 1) << (13 - i)
                self.words.append(word)
            self.n = 0
        return b"".join(_U16.pack(w) for w in self.words)


def encode_status_chunks(symbols: Sequence[int]) -> bytes:
    """Packet status chunks (draft §3.1.2) for a list of 2-bit status symbols."""
    writer = _ChunkWriter()
    for sym in symbols:
        if not 0 <= sym <= 2:
            raise ValueError(f"cannot encode status symbol {sym}")
        writer.add(sym)
    return writer.finish()


# Vector chunk symbol lists by bit pattern: 1-bit symbols 7 at a time (two lookups per
# chunk), 2-bit symbols 4 then 3 at a time.
_ONE_BIT_7 = [tuple((v >> (6 - i)) & 1 for i in range(7)) for v in range(128)]
_TWO_BIT_4 = [tuple((v >> (6 - 2 * i)) & 3 for i in range(4)) for v in range(256)]
_TWO_BIT_3 = [tuple((v >> (4 - 2 * i)) & 3 for i in range(3)) for v in range(64)]


def decode_status_chunks(data: bytes, offset: int, count: int) -> tuple[list[int], int]:
    """``(symbols, offset after the chunks)``: the first ``count`` status symbols of the chunks
    at ``offset``. Raises :class:`~relay.rtc.rtcp.RtcpError` when the chunks run out."""
    symbols: list[int] = []
    extend = symbols.extend
    n = len(data)
    while len(symbols) < count:
        if offset + 2 > n:
            raise RtcpError("transport-cc feedback: packet chunks overrun the packet")
        word = (data[offset] << 8) | data[offset + 1]
        offset += 2
        if not word & 0x8000:
            run = min(word & _MAX_RUN, count - len(symbols))
            extend([(word >> 13) & 3] * run)
        elif not word & 0x4000:
            extend(_ONE_BIT_7[(word >> 7) & 0x7F])
            extend(_ONE_BIT_7[word & 0x7F])
        else:
            extend(_TWO_BIT_4[(word >> 6) & 0xFF])
            extend(_TWO_BIT_3[word & 0x3F])
    del symbols[count:]
    return symbols, offset


# --- feedback parsing ---------------------------------------------------------------------


class TwccPacket(NamedTuple):
    """One packet's status in a feedback."""

    seq: int  # 16-bit transport-wide sequence number
    received: bool
    #: arrival in seconds on the feedback sender's clock (reference time + deltas); None when
    #: not received, or received without a delta (reserved symbol 11)
    arrival: float | None


@dataclass(slots=True)
class TwccFeedback:
    """A decoded transport-cc feedback FCI (draft §3.1): per status, starting at
    ``base_seq``, its symbol and arrival time."""

    base_seq: int
    status_count: int
    reference_time: int  # raw 24-bit value, in 64 ms units
    fb_count: int
    #: status symbols (0 not received, 1 small delta, 2 large delta, 3 received w/o delta)
    symbols: list[int] = field(default_factory=list)
    #: arrival in seconds on the feedback sender's clock (reference time + deltas), None when
    #: not received or without a delta
    arrivals: list[float | None] = field(default_factory=list)

    @property
    def packets(self) -> list[TwccPacket]:
        """The statuses as :class:`TwccPacket` tuples (convenience, not for the hot path)."""
        base = self.base_seq
        return [
            TwccPacket((base + k) & 0xFFFF, sym != SYMBOL_NOT_RECEIVED, arrival)
            for k, (sym, arrival) in enumerate(zip(self.symbols, self.arrivals, strict=True))
        ]

    @property
    def received(self) -> int:
        return len(self.symbols) - self.symbols.count(SYMBOL_NOT_RECEIVED)


def parse_feedback(fci: bytes) -> TwccFeedback:
    """Decode the FCI of an RTPFB fmt 15 packet (``rtcp.TransportFeedback.fci``).

    Bytes after the last receive delta (zero padding) are ignored. Raises
    :class:`~relay.rtc.rtcp.RtcpError` when the chunks or deltas overrun the FCI.
    """
    if len(fci) < 8:
        raise RtcpError("transport-cc feedback shorter than 8 bytes")
    base, count, word = _FCI_HEAD.unpack_from(fci, 0)
    reference = word >> 8
    symbols, pos = decode_status_chunks(fci, 8, count)
    n = len(fci)
    ticks = reference * _REFERENCE_TICKS
    arrivals: list[float | None] = []
    append = arrivals.append
    for sym in symbols:
        if sym == SYMBOL_SMALL_DELTA:
            if pos >= n:
                raise RtcpError("transport-cc feedback: receive deltas overrun the packet")
            ticks += fci[pos]
            pos += 1
            append(ticks * TICK)
        elif sym == SYMBOL_NOT_RECEIVED or sym == SYMBOL_NO_DELTA:
            append(None)
        else:
            if pos + 2 > n:
                raise RtcpError("transport-cc feedback: receive deltas overrun the packet")
            d = (fci[pos] << 8) | fci[pos + 1]
            ticks += d - 0x10000 if d & 0x8000 else d
            pos += 2
            append(ticks * TICK)
    return TwccFeedback(base, count, reference, word & 0xFF, symbols, arrivals)


# --- receiver side: feedback for a publisher's transport ---------------------------------


class TwccRecorder:
    """Arrival times of ONE publisher transport's packets, by transport-wide sequence number,
    turned into feedback packets (draft §3.1). What libwebrtc's ``RemoteEstimatorProxy`` does
    in periodic mode.

    :meth:`on_packet` for every RTP packet carrying the transport-cc extension (media, RTX and
    padding alike); :meth:`build_feedback` every 50-100 ms, or as soon as :meth:`on_packet`
    returns True (a batch is full). Each feedback continues where the previous one ended and
    runs to the highest sequence number recorded since; the missing ones in between are "not
    received". A packet arriving late, from before that point, moves the base back to it: the
    packets in between that were reported already are "not received" this time, as the draft
    says (§3.1.1). One call yields several packets
    when the batch does not fit ``max_packet_size`` bytes, would need a delta beyond ±8191.75 ms,
    or more than 65535 statuses.

    Bounds: ``max_pending`` recorded packets between two feedbacks (more are counted in
    :attr:`overflow` and dropped), and packets more than ``reorder_window`` behind the
    highest sequence number are ignored (:attr:`too_old`), as are duplicates.
    """

    __slots__ = (
        "sender_ssrc",
        "media_ssrc",
        "max_packet_size",
        "batch",
        "max_pending",
        "fb_count",
        "packets_recorded",
        "duplicates",
        "too_old",
        "overflow",
        "feedbacks_sent",
        "last_feedback",
        "_started",
        "_highest",
        "_window",
        "_mask",
        "_seen",
        "_seqs",
        "_times",
        "_next_base",
    )

    def __init__(
        self,
        sender_ssrc: int,
        media_ssrc: int = 0,
        *,
        max_packet_size: int = 1200,
        batch: int = 256,
        max_pending: int = 4096,
        reorder_window: int = 4096,
    ) -> None:
        if max_packet_size < 64:
            raise ValueError("max_packet_size too small for a feedback packet")
        self.sender_ssrc = sender_ssrc
        #: "SSRC of media source" of the feedback: any media SSRC of the transport, or 0
        self.media_ssrc = media_ssrc
        self.max_packet_size = max_packet_size
        self.batch = batch
        self.max_pending = max_pending
        #: the next feedback packet count (8 bits)
        self.fb_count = 0
        self.packets_recorded = 0
        self.duplicates = 0
        self.too_old = 0
        self.overflow = 0
        self.feedbacks_sent = 0
        self.last_feedback = float("-inf")
        self._started = False
        self._highest = 0  # extended highest sequence number
        window = 1
        while window < max(reorder_window, max_pending, 2):
            window <<= 1
        self._window = min(window, 0x8000)
        self._mask = self._window - 1
        self._seen = [-1] * self._window  # extended seq recorded in each slot (duplicate check)
        self._seqs: list[int] = []
        self._times: list[float] = []
        self._next_base: int | None = None  # extended seq right after the last one reported

    @property
    def pending(self) -> int:
        """Packets recorded since the last feedback."""
        return len(self._seqs)

    def on_packet(self, transport_seq: int, arrival: float) -> bool:
        """Record a packet's 16-bit transport-wide sequence number and arrival time (seconds).
        True when a batch is full: build the feedback now rather than at the next tick."""
        if self._started:
            highest = self._highest
            delta = ((transport_seq - highest + 0x8000) & 0xFFFF) - 0x8000
            ext = highest + delta
            if delta > 0:
                self._highest = ext
            elif -delta >= self._window:
                self.too_old += 1
                return False
        else:
            self._started = True
            ext = self._highest = transport_seq | 0x10000  # room below for reordering
        i = ext & self._mask
        seen = self._seen
        if seen[i] == ext:
            self.duplicates += 1
            return False
        seen[i] = ext
        seqs = self._seqs
        n = len(seqs)
        if n >= self.max_pending:
            self.overflow += 1
            return True
        seqs.append(ext)
        self._times.append(arrival)
        return n >= self.batch - 1

    def build_feedback(self, now: float) -> list[bytes]:
        """Complete RTPFB fmt 15 packets for the packets recorded since the last call (an
        empty list when there are none). ``now`` is only recorded as :attr:`last_feedback`."""
        if not self._seqs:
            return []
        seqs = np.array(self._seqs, dtype=np.int64)
        times = np.array(self._times, dtype=np.float64)
        self._seqs.clear()
        self._times.clear()
        self.packets_recorded += len(seqs)
        self.last_feedback = now
        order = np.argsort(seqs, kind="stable")
        seqs = seqs[order]
        ticks = np.rint(times[order] * _TICKS_PER_SECOND).astype(np.int64)
        if len(seqs) > 1:
            keep = np.empty(len(seqs), dtype=bool)
            keep[0] = True
            np.not_equal(seqs[1:], seqs[:-1], out=keep[1:])
            if not keep.all():
                seqs = seqs[keep]
                ticks = ticks[keep]
        # Everything but the first delta of each packet is the difference to the previous
        # packet in sequence order: symbols and gaps for the whole batch at once.
        deltas = np.diff(ticks)
        gaps = (np.diff(seqs) - 1).tolist()
        small = (deltas >= 0) & (deltas <= 255)
        fits = (deltas >= -0x8000) & (deltas <= 0x7FFF)
        symbols = np.where(small, SYMBOL_SMALL_DELTA, np.where(fits, SYMBOL_LARGE_DELTA, 0))
        seq_list = seqs.tolist()
        # Continue where the last feedback ended, so that packets lost right after it are
        # reported too; a reordered packet from before that point moves the start back.
        first = seq_list[0]
        start = self._next_base
        if start is None or not 0 <= first - start < self._window:
            start = first
        last = seq_list[-1] + 1
        if self._next_base is None or last > self._next_base:
            self._next_base = last
        n = len(seq_list)
        if (
            start == first
            and last - first == n  # no loss
            and n <= _MAX_RUN
            and 8 + 2 + n <= self.max_packet_size - 15
            and bool(small.all())
        ):
            # The common case, without a Python step per packet: one run-length chunk of
            # "received, small delta" and one byte per delta.
            reference = int(ticks[0]) >> 8
            fci = (
                _FCI_HEAD.pack(first & 0xFFFF, n, ((reference & 0xFFFFFF) << 8) | self.fb_count)
                + _U16.pack((SYMBOL_SMALL_DELTA << 13) | n)
                + bytes((int(ticks[0]) - (reference << 8),))
                + deltas.astype(np.uint8).tobytes()
            )
            self.fb_count = (self.fb_count + 1) & 0xFF
            self.feedbacks_sent += 1
            return [rtcp.transport_feedback(self.sender_ssrc, self.media_ssrc, fci)]
        return self._encode(
            start, seq_list, ticks.tolist(), deltas.tolist(), symbols.tolist(), gaps
        )

    def _encode(
        self,
        start: int,
        seqs: list[int],
        ticks: list[int],
        deltas: list[int],
        symbols: list[int],
        gaps: list[int],
    ) -> list[bytes]:
        out: list[bytes] = []
        n = len(seqs)
        max_fci = self.max_packet_size - 12 - 3  # common header + SSRCs, worst-case padding
        i = 0
        while i < n:
            reference = ticks[i] >> 8  # floor, in 64 ms units
            writer = _ChunkWriter()
            lead = seqs[i] - start  # not received since the end of the previous feedback
            if lead:
                writer.add_run(SYMBOL_NOT_RECEIVED, lead)
            writer.add(SYMBOL_SMALL_DELTA)
            recv = bytearray((ticks[i] - (reference << 8),))  # 0..255 by construction
            count = lead + 1
            j = i + 1
            while j < n:
                sym = symbols[j - 1]
                if sym == 0:
                    break  # delta beyond ±8191.75 ms: a new reference time is needed
                gap = gaps[j - 1]
                if count + gap + 1 > _MAX_STATUS_COUNT:
                    break
                # Worst case growth: the delta, two chunks emitted, one per full run of gap.
                if 8 + writer.size + len(recv) + sym + 4 + 2 * (gap // _MAX_RUN) > max_fci:
                    break
                if gap:
                    writer.add_run(SYMBOL_NOT_RECEIVED, gap)
                writer.add(sym)
                d = deltas[j - 1]
                if sym == SYMBOL_SMALL_DELTA:
                    recv.append(d)
                else:
                    recv += _I16.pack(d)
                count += gap + 1
                j += 1
            fci = (
                _FCI_HEAD.pack(start & 0xFFFF, count, ((reference & 0xFFFFFF) << 8) | self.fb_count)
                + writer.finish()
                + recv
            )
            self.fb_count = (self.fb_count + 1) & 0xFF
            out.append(rtcp.transport_feedback(self.sender_ssrc, self.media_ssrc, fci))
            start = seqs[j - 1] + 1
            i = j
        self.feedbacks_sent += len(out)
        return out


# --- sender side: what the relay sent to one subscriber transport, and what arrived -------


@dataclass(slots=True)
class DeliveryStats:
    """What one feedback report says about the packets it covers (only packets this history
    sent and not acknowledged before count)."""

    time: float  # when the feedback was processed (our clock)
    acked: int = 0  # packets newly reported received
    lost: int = 0  # packets reported not received (and not acknowledged before)
    bytes_acked: int = 0
    loss_fraction: float = 0.0  # lost / (acked + lost) of this report
    #: bits/s received over the report's arrival span; None when the span is too short
    delivery_rate: float | None = None
    arrival_span: float = 0.0  # seconds between the first and last arrival in the report
    #: per consecutive received pair (send order): arrival delta minus send delta, seconds
    delay_variation_mean: float | None = None
    delay_variation_last: float | None = None
    #: one-way delay of the report's last packet above the minimum of the recent past
    #: (a queue building up on the path), seconds
    queuing_delay: float | None = None
    #: now minus the send time of the newest packet reported received (RTT + feedback delay)
    feedback_delay: float | None = None
    unknown: int = 0  # statuses for sequence numbers not (or no longer) in the history
    #: the packets newly reported received with an arrival time, in sequence order: (send
    #: time on our clock, arrival time on the receiver's clock unwrapped, size); what a
    #: bandwidth estimator needs (relay/rtc/gcc.py)
    received: list[tuple[float, float, int]] = field(default_factory=list)
    #: packets newly reported received without an arrival time
    received_without_time: int = 0
    #: the packets reported lost for the first time: (send time, size)
    lost_packets: list[tuple[float, int]] = field(default_factory=list)


class TwccSendHistory:
    """The relay's transport-wide sequence numbers towards ONE subscriber transport, and the
    matching of that subscriber's transport-cc feedback against them (libwebrtc's
    ``TransportFeedbackAdapter``, reduced).

    :meth:`next_seq` for every RTP packet sent on the transport (media, retransmissions,
    padding): put the returned 16-bit number in the packet's transport-cc extension.
    :meth:`on_feedback` for every :class:`TwccFeedback` the subscriber sends back; it returns
    that report's :class:`DeliveryStats` and keeps a running summary in the attributes
    (:attr:`delivery_rate`, :attr:`loss_fraction`, :attr:`delay_variation`,
    :attr:`queuing_delay`), the input for bandwidth estimation and layer choice.

    Bounded: a ring of ``capacity`` packets (power of two); feedback about older packets is
    counted as ``unknown``.
    """

    __slots__ = (
        "capacity",
        "rate_window",
        "baseline_window",
        "bytes_sent",
        "packets_acked",
        "packets_lost",
        "bytes_acked",
        "feedbacks",
        "feedbacks_lost",
        "delivery_rate",
        "loss_fraction",
        "delay_variation",
        "queuing_delay",
        "last_stats",
        "_mask",
        "_first",
        "_next",
        "_ext",
        "_time",
        "_size",
        "_state",
        "_fb_count",
        "_reference",
        "_min_owd",
    )

    def __init__(
        self,
        capacity: int = 4096,
        *,
        initial_seq: int = 1,
        rate_window: float = 0.5,
        baseline_window: float = 10.0,
    ) -> None:
        size = 1
        while size < capacity:
            size <<= 1
        if size > 0x8000:
            raise ValueError("send history capacity above 32768 cannot be told apart by seq")
        self.capacity = size
        self.rate_window = rate_window
        self.baseline_window = baseline_window
        self.bytes_sent = 0
        self.packets_acked = 0
        #: reported lost and not acknowledged later
        self.packets_lost = 0
        self.bytes_acked = 0
        self.feedbacks = 0
        #: feedback packets missed, from gaps in their feedback packet count
        self.feedbacks_lost = 0
        #: smoothed delivery rate, bits/s (None before the first usable report)
        self.delivery_rate: float | None = None
        #: smoothed loss fraction of the reports
        self.loss_fraction = 0.0
        #: smoothed mean delay variation, seconds (positive: a queue is growing)
        self.delay_variation = 0.0
        #: latest queuing delay estimate, seconds
        self.queuing_delay: float | None = None
        self.last_stats: DeliveryStats | None = None
        self._mask = size - 1
        self._next = (initial_seq & 0xFFFF) | 0x10000  # extended; room below for unwrapping
        self._first = self._next
        self._ext = [-1] * size
        self._time = [0.0] * size
        self._size = [0] * size
        self._state = bytearray(size)  # 0 unreported, 1 reported lost, 2 acknowledged
        self._fb_count: int | None = None
        self._reference: int | None = None  # unwrapped reference time of the last feedback
        self._min_owd: deque[tuple[float, float]] = deque()  # (time, min one-way delay)

    @property
    def packets_sent(self) -> int:
        return self._next - self._first

    def next_seq(self, size: int, now: float) -> int:
        """Allocate the transport-wide sequence number of a packet of ``size`` bytes sent at
        ``now``; returns the 16-bit value for the header extension."""
        ext = self._next
        self._next = ext + 1
        i = ext & self._mask
        self._ext[i] = ext
        self._time[i] = now
        self._size[i] = size
        self._state[i] = 0
        self.bytes_sent += size
        return ext & 0xFFFF

    def on_feedback(self, fb: TwccFeedback, now: float) -> DeliveryStats:
        """Match a feedback report against the packets sent; see :class:`DeliveryStats`."""
        stats = DeliveryStats(now)
        self.feedbacks += 1
        if self._fb_count is not None:
            missed = (fb.fb_count - self._fb_count - 1) & 0xFF
            if missed < 0x80:  # else: a reordered or duplicate feedback
                self.feedbacks_lost += missed
        self._fb_count = fb.fb_count
        # The reference time is 24 bits of 64 ms (~12.4 days): unwrap against the last one.
        raw = fb.reference_time & 0xFFFFFF
        if self._reference is None:
            reference = raw
        else:
            last = self._reference
            reference = last + ((((raw - last) & 0xFFFFFF) + 0x800000) & 0xFFFFFF) - 0x800000
        self._reference = reference
        clock_offset = (reference - raw) * (_REFERENCE_TICKS * TICK)

        highest = self._next - 1
        delta = ((fb.base_seq - highest + 0x8000) & 0xFFFF) - 0x8000
        base = highest + delta
        mask = self._mask
        ext_list = self._ext
        state = self._state
        sizes = self._size
        times = self._time
        sends: list[float] = []
        arrivals: list[float] = []
        acked_sizes: list[int] = []
        acked = lost = bytes_acked = unknown = untimed = 0
        lost_packets = stats.lost_packets
        fb_arrivals = fb.arrivals
        for k, sym in enumerate(fb.symbols):
            ext = base + k
            i = ext & mask
            if ext_list[i] != ext:
                unknown += 1
                continue
            st = state[i]
            if sym:
                if st == 2:
                    continue
                if st == 1:
                    self.packets_lost -= 1  # reported missing before, arrived after all
                state[i] = 2
                acked += 1
                bytes_acked += sizes[i]
                arrival = fb_arrivals[k]
                if arrival is not None:
                    sends.append(times[i])
                    arrivals.append(arrival + clock_offset)
                    acked_sizes.append(sizes[i])
                else:
                    untimed += 1
            elif st == 0:
                state[i] = 1
                lost += 1
                lost_packets.append((times[i], sizes[i]))
        stats.acked = acked
        stats.lost = lost
        stats.received = list(zip(sends, arrivals, acked_sizes, strict=True))
        stats.received_without_time = untimed
        stats.bytes_acked = bytes_acked
        stats.unknown = unknown
        if acked + lost:
            stats.loss_fraction = lost / (acked + lost)
        self.packets_acked += acked
        self.packets_lost += lost
        self.bytes_acked += bytes_acked
        if arrivals:
            self._delivery(stats, sends, arrivals, acked_sizes, now)
        # Smoothed summary.
        if acked + lost:
            self.loss_fraction += (stats.loss_fraction - self.loss_fraction) * 0.25
        if stats.delivery_rate is not None:
            weight = min(1.0, stats.arrival_span / self.rate_window)
            if self.delivery_rate is None:
                self.delivery_rate = stats.delivery_rate
            else:
                self.delivery_rate += (stats.delivery_rate - self.delivery_rate) * weight
        if stats.delay_variation_mean is not None:
            self.delay_variation += (stats.delay_variation_mean - self.delay_variation) * 0.25
        if stats.queuing_delay is not None:
            self.queuing_delay = stats.queuing_delay
        self.last_stats = stats
        return stats

    def _delivery(
        self,
        stats: DeliveryStats,
        sends: list[float],
        arrivals: list[float],
        sizes: list[int],
        now: float,
    ) -> None:
        # Plain Python: a feedback reports some ten packets, too few for numpy's per-call cost.
        earliest = min(arrivals)
        first = arrivals.index(earliest)
        span = max(arrivals) - earliest
        stats.arrival_span = span
        if span >= 0.005:  # below, the 250 µs resolution and bursts make the rate meaningless
            stats.delivery_rate = (sum(sizes) - sizes[first]) * 8.0 / span
        n = len(sends)
        if n > 1:
            # the mean of the arrival deltas less the send deltas: the sums telescope
            stats.delay_variation_mean = ((arrivals[-1] - arrivals[0]) - (sends[-1] - sends[0])) / (
                n - 1
            )
            stats.delay_variation_last = (arrivals[-1] - arrivals[-2]) - (sends[-1] - sends[-2])
        # Queuing delay: one-way delay (unknown constant clock offset included) above its
        # minimum over baseline_window.
        owd = list(map(operator.sub, arrivals, sends))
        low = min(owd)
        window = self._min_owd
        while window and window[-1][1] >= low:
            window.pop()
        window.append((now, low))
        while window[0][0] < now - self.baseline_window:
            window.popleft()
        stats.queuing_delay = owd[-1] - window[0][1]
        stats.feedback_delay = now - max(sends)


# --- the transport-cc header extension ------------------------------------------------------


def transport_seq(value: bytes) -> int:
    """The sequence number in a transport-cc header extension element's value."""
    if len(value) < 2:
        raise RtpError("transport-cc extension element shorter than 2 bytes")
    return (value[0] << 8) | value[1]


def write_transport_seq(packet: bytes, ext_id: int, seq: int) -> bytes:
    """A copy of ``packet`` with the value of its transport-cc element ``ext_id`` replaced by
    ``seq`` (for a retransmission from a packet history, which needs a fresh number). Raises
    :class:`~relay.rtc.rtp.RtpError` when the packet has no such 2-byte element."""
    _, _, _, _, _, _, ext_offset, ext_length = parse_rtp(packet)
    profile = extension_profile(packet)
    end = ext_offset + ext_length
    i = ext_offset
    while i < end:
        if profile == ONE_BYTE_PROFILE:
            b = packet[i]
            ident = b >> 4
            if ident == 0:
                i += 1
                continue
            if ident == 15:
                break
            start = i + 1
            length = (b & 0x0F) + 1
        elif profile == TWO_BYTE_PROFILE:
            ident = packet[i]
            if ident == 0:
                i += 1
                continue
            if i + 2 > end:
                break
            start = i + 2
            length = packet[i + 1]
        else:
            break
        if start + length > end:
            raise RtpError("extension element overruns the block")
        if ident == ext_id:
            if length != 2:
                raise RtpError("transport-cc extension element is not 2 bytes")
            return packet[:start] + _U16.pack(seq & 0xFFFF) + packet[start + 2 :]
        i = start + length
    raise RtpError(f"no transport-cc extension element with id {ext_id}")
