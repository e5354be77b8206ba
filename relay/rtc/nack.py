"""Loss repair: the packet history a NACK is answered from, RTX (RFC 4588) wrapping, and the
receiver-side NACK generator (RFC 4585 §6.2.1 generic NACK) for a publisher's streams.

Sans-I/O: sequence numbers, packets and times in, packets and lists of sequence numbers out.
The per-packet calls (:meth:`PacketHistory.store`, :meth:`NackGenerator.on_packet`) are a few
list/int operations and allocate nothing in the common (in-order, no loss) case.
"""

from __future__ import annotations

import struct

from relay.rtc.rtp import RTP_HEADER, RtpError, parse_rtp

__all__ = [
    "PacketHistory",
    "RetransmissionBudget",
    "NackGenerator",
    "rtx_wrap",
    "rtx_unwrap",
]

_OSN = struct.Struct("!H")

#: a packet is resent at most this many times, however often it is NACKed
MAX_RESENDS = 3
#: the least time between two resends of one packet (seconds), whatever the RTT estimate says
MIN_RESEND_INTERVAL = 0.01
#: bytes a retransmission adds to the stored packet: RTX OSN (2) and the SRTP tag (16 at most)
RESEND_OVERHEAD = 18


# --- responder side: what was sent, to resend it -------------------------------------------


class PacketHistory:
    """A bounded ring of the packets recently received on ONE stream, by 16-bit sequence number
    (mediasoup ``RtpStreamSend`` / libwebrtc ``RtpPacketHistory``, much reduced).

    A track keeps one, whatever its number of subscribers: the plain RTP packet as the
    publisher sent it is stored once and rewritten for whichever subscriber asks for it again.
    The slot of a sequence number is ``seq & (capacity - 1)`` (capacity rounded up to a power
    of two, at most 32768), and a slot only answers for the exact sequence number stored in
    it, so a request for a packet that was overwritten (or never stored, or from before a
    16-bit wrap) gets ``None``. ``max_age`` (seconds, optional) additionally hides packets too
    old to be worth resending: a retransmission arriving after the receiver's jitter buffer
    gave up on the packet only costs bandwidth.
    """

    __slots__ = ("capacity", "max_age", "_mask", "_seqs", "_packets", "_times")

    def __init__(self, capacity: int, max_age: float | None = None) -> None:
        if capacity < 1:
            raise ValueError("packet history capacity must be positive")
        size = 1
        while size < capacity:
            size <<= 1
        if size > 0x8000:
            raise ValueError("packet history capacity above 32768 cannot be told apart by seq")
        self.capacity = size
        self.max_age = max_age
        self._mask = size - 1
        self._seqs = [-1] * size
        self._packets: list[bytes | None] = [None] * size
        self._times = [0.0] * size

    def store(self, seq: int, packet: bytes, now: float) -> None:
        """Remember ``packet`` (plain RTP) under its 16-bit sequence number."""
        i = seq & self._mask
        self._seqs[i] = seq
        self._packets[i] = packet
        self._times[i] = now

    def get(self, seq: int, now: float | None = None) -> bytes | None:
        """The packet stored under ``seq``, or None when evicted, never stored or (with ``now``
        and ``max_age``) too old."""
        i = seq & self._mask
        if self._seqs[i] != seq:
            return None
        if now is not None and self.max_age is not None and now - self._times[i] > self.max_age:
            return None
        return self._packets[i]

    def clear(self) -> None:
        """Forget every packet (the stream restarted)."""
        for i in range(self.capacity):
            self._seqs[i] = -1
            self._packets[i] = None


class RetransmissionBudget:
    """What one subscriber's NACKs may make the relay resend: a token bucket in bytes.

    It fills with ``fraction`` of the bytes forwarded to the subscription (so the repair
    traffic is at most that share of the stream) plus ``floor`` bytes per second (so a stream
    that just started, or a low-rate one, can still be repaired), up to ``burst`` bytes; it
    starts full. Sans-I/O: :meth:`refill` takes the subscription's forwarded-bytes counter and
    the time, :meth:`take` spends.
    """

    __slots__ = ("fraction", "floor", "burst", "tokens", "_forwarded", "_last")

    #: default ``floor``, bytes per second
    FLOOR = 8000.0
    #: default ``burst``, bytes: a few dozen full-size packets
    BURST = 48000.0

    def __init__(self, fraction: float, floor: float = FLOOR, burst: float = BURST) -> None:
        if fraction < 0 or floor < 0 or burst <= 0:
            raise ValueError("retransmission budget needs fraction, floor >= 0 and burst > 0")
        self.fraction = fraction
        self.floor = floor
        self.burst = burst
        #: bytes that may be resent right now
        self.tokens = burst
        self._forwarded: int | None = None
        self._last = 0.0

    def refill(self, forwarded: int, now: float) -> None:
        """Add the share of what was forwarded since the last call (``forwarded``: the
        subscription's running total of bytes sent) and the floor for the time elapsed."""
        last = self._forwarded
        if last is None:
            # the bucket starts full: what was forwarded before the first NACK is not credited
            self._forwarded = forwarded
            self._last = now
            return
        elapsed = now - self._last
        added = self.fraction * max(0, forwarded - last) + self.floor * max(0.0, elapsed)
        self.tokens = min(self.burst, self.tokens + added)
        self._forwarded = forwarded
        self._last = now

    def take(self, size: int) -> bool:
        """Spend ``size`` bytes if the bucket holds them; False (nothing spent) if not."""
        if self.tokens < size:
            return False
        self.tokens -= size
        return True


# --- RTX (RFC 4588 §4) ---------------------------------------------------------------------


def rtx_wrap(packet: bytes, rtx_ssrc: int, rtx_pt: int, rtx_seq: int) -> bytes:
    """The RTX packet retransmitting ``packet`` (RFC 4588 §4): the RTX SSRC, payload type and
    sequence number; timestamp, marker, CSRCs and header extensions of the original; payload =
    original sequence number (OSN, 2 bytes) + original payload. The original's padding is
    dropped (P cleared): padding is not part of the payload being repaired.

    Raises :class:`~relay.rtc.rtp.RtpError` on a malformed packet.
    """
    _, seq, ts, _, _, payload_offset, _, _ = parse_rtp(packet)
    b0 = packet[0]
    end = len(packet) - packet[-1] if b0 & 0x20 else len(packet)
    return (
        RTP_HEADER.pack(
            b0 & 0xDF,  # P cleared, X and CC kept
            (packet[1] & 0x80) | (rtx_pt & 0x7F),
            rtx_seq & 0xFFFF,
            ts,
            rtx_ssrc & 0xFFFFFFFF,
        )
        + packet[12:payload_offset]
        + _OSN.pack(seq)
        + packet[payload_offset:end]
    )


def rtx_unwrap(packet: bytes, media_ssrc: int, media_pt: int) -> tuple[int, bytes]:
    """``(original sequence number, original packet)`` from an RTX packet (RFC 4588 §4):
    the media SSRC and payload type restored, the OSN as sequence number, the OSN removed
    from the payload, RTX padding dropped; timestamp, marker, CSRCs and extensions kept.

    Raises :class:`~relay.rtc.rtp.RtpError` on a malformed packet, and on a padding-only RTX
    packet (no OSN: what senders use for bandwidth probing; count it, then drop it).
    """
    _, _, ts, _, _, payload_offset, _, _ = parse_rtp(packet)
    b0 = packet[0]
    end = len(packet) - packet[-1] if b0 & 0x20 else len(packet)
    if end - payload_offset < 2:
        raise RtpError("RTX packet without an original sequence number")
    (osn,) = _OSN.unpack_from(packet, payload_offset)
    original = (
        RTP_HEADER.pack(
            b0 & 0xDF,
            (packet[1] & 0x80) | (media_pt & 0x7F),
            osn,
            ts,
            media_ssrc & 0xFFFFFFFF,
        )
        + packet[12:payload_offset]
        + packet[payload_offset + 2 : end]
    )
    return osn, original


# --- requester side: which packets of a publisher's stream to NACK -------------------------


class NackGenerator:
    """Receiver-side loss detection for ONE incoming stream (pion/interceptor's NACK generator,
    libwebrtc's ``NackRequester``, simplified).

    :meth:`on_packet` for every packet of the stream (media SSRC, and the OSN of every RTX
    packet); :meth:`poll` on a timer (every 10-20 ms) for the sequence numbers to NACK now.

    A missing packet is NACKed first ``reorder_delay`` after its gap was seen (reordering by
    a few packets is common and must not cost a retransmission), then again every
    ``max(rtt, min_retry_interval) * retry_factor`` (a retransmission that was requested
    cannot arrive before one RTT), at most ``max_retries`` times, and forgotten ``max_age``
    after it went missing (later, the receiver's jitter buffer has moved on). At most
    ``max_missing`` packets are tracked: more missing than that (or one gap larger) cannot be
    repaired by retransmission; the oldest are dropped and :attr:`keyframe_needed` is set —
    the caller requests a keyframe (PLI) and clears the flag. Giving up on a packet (retries
    exhausted or too old) sets the flag too.
    """

    __slots__ = (
        "clock_rate",
        "reorder_delay",
        "min_retry_interval",
        "retry_factor",
        "max_retries",
        "max_age",
        "max_missing",
        "keyframe_needed",
        "nacks_sent",
        "recovered",
        "reordered",
        "lost_unrepaired",
        "rtt",
        "_started",
        "_highest",
        "_missing",
    )

    def __init__(
        self,
        clock_rate: int | None = None,
        *,
        reorder_delay: float = 0.015,
        min_retry_interval: float = 0.02,
        retry_factor: float = 1.5,
        max_retries: int = 10,
        max_age: float = 1.0,
        max_missing: int = 500,
    ) -> None:
        self.clock_rate = clock_rate  # informational: the stream's RTP clock
        self.reorder_delay = reorder_delay
        self.min_retry_interval = min_retry_interval
        self.retry_factor = retry_factor
        self.max_retries = max_retries
        self.max_age = max_age
        self.max_missing = max_missing
        #: loss too large to repair by NACK happened: request a keyframe, then reset to False
        self.keyframe_needed = False
        #: smoothed round-trip time to the sender, from NACKs answered after one request
        self.rtt: float | None = None
        #: sequence numbers put in NACKs (a retry counts again)
        self.nacks_sent = 0
        #: missing packets that arrived after being NACKed at least once
        self.recovered = 0
        #: missing packets that arrived before their first NACK (reordering)
        self.reordered = 0
        #: missing packets given up on (retries exhausted, too old, or dropped on overflow)
        self.lost_unrepaired = 0
        self._started = False
        self._highest = 0  # extended highest sequence number
        # extended seq -> [time it went missing, time of the last NACK, NACKs sent];
        # insertion order is ascending seq (gaps are found in order)
        self._missing: dict[int, list] = {}

    @property
    def missing(self) -> int:
        """How many packets are currently tracked as missing."""
        return len(self._missing)

    def on_packet(self, seq: int, now: float) -> None:
        """A packet with 16-bit sequence number ``seq`` arrived."""
        if not self._started:
            self._started = True
            self._highest = seq | 0x10000  # room below for reordered packets around a wrap
            return
        highest = self._highest
        delta = ((seq - highest + 0x8000) & 0xFFFF) - 0x8000
        if delta == 1:
            self._highest = highest + 1
            return
        if delta > 1:
            self._highest = highest + delta
            self._add_gap(highest + 1, delta - 1, now)
            return
        missing = self._missing
        if missing:
            entry = missing.pop(highest + delta, None)
            if entry is not None:
                if entry[2]:
                    self.recovered += 1
                    if entry[2] == 1:
                        # answered after exactly one NACK: an unambiguous round trip (Karn)
                        sample = now - entry[1]
                        rtt = self.rtt
                        self.rtt = sample if rtt is None else rtt + (sample - rtt) / 8
                else:
                    self.reordered += 1

    def _add_gap(self, first: int, count: int, now: float) -> None:
        missing = self._missing
        limit = self.max_missing
        if count > limit:
            # Not repairable by retransmission: forget everything, ask for a keyframe.
            self.lost_unrepaired += count + len(missing)
            missing.clear()
            self.keyframe_needed = True
            return
        overflow = len(missing) + count - limit
        if overflow > 0:
            for _ in range(overflow):
                del missing[next(iter(missing))]
            self.lost_unrepaired += overflow
            self.keyframe_needed = True
        for ext in range(first, first + count):
            missing[ext] = [now, now, 0]

    def poll(self, now: float, rtt: float | None = None) -> list[int]:
        """The 16-bit sequence numbers to NACK now, ascending (wrap-aware); ``rtt`` in seconds
        (None: 100 ms). Pass the result to :func:`relay.rtc.rtcp.nack`."""
        missing = self._missing
        if not missing:
            return []
        if rtt is None:
            rtt = 0.1
        retry = (rtt if rtt > self.min_retry_interval else self.min_retry_interval) * (
            self.retry_factor
        )
        first_after = self.reorder_delay
        max_age = self.max_age
        max_retries = self.max_retries
        out: list[int] = []
        expired: list[int] = []
        for ext, entry in missing.items():
            since, last, sent = entry
            if now - since > max_age:
                expired.append(ext)
            elif sent == 0:
                if now - since >= first_after:
                    entry[1] = now
                    entry[2] = 1
                    out.append(ext & 0xFFFF)
            elif now - last >= retry:
                if sent >= max_retries:
                    expired.append(ext)  # the last retransmission had its chance
                else:
                    entry[1] = now
                    entry[2] = sent + 1
                    out.append(ext & 0xFFFF)
        if expired:
            for ext in expired:
                del missing[ext]
            self.lost_unrepaired += len(expired)
            # recovery gave up: only a keyframe repairs what depended on these packets
            self.keyframe_needed = True
        self.nacks_sent += len(out)
        return out

    def is_missing(self, seq: int) -> bool:
        """Whether the packet with 16-bit sequence number ``seq`` is missing and still being
        recovered (NACKed, or about to be)."""
        if not self._missing:
            return False
        highest = self._highest
        return highest + (((seq - highest + 0x8000) & 0xFFFF) - 0x8000) in self._missing

    def clear(self) -> None:
        """Forget the missing packets (e.g. a keyframe made them irrelevant, or a new source)."""
        self._missing.clear()

    def reset(self) -> None:
        """Start over: the next packet is the first of a new sequence."""
        self._missing.clear()
        self._started = False
