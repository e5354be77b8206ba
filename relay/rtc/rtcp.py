"""RTCP packets (RFC 3550, RFC 4585, RFC 5104, REMB): parse compound packets, build the few we send.

Sans-I/O: bytes in, small dataclasses out, and builders returning bytes. ``parse_rtcp`` raises
only :class:`RtcpError` on malformed input.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "RtcpError",
    "RtcpPacket",
    "ReportBlock",
    "SenderReport",
    "ReceiverReport",
    "Pli",
    "Fir",
    "Nack",
    "Remb",
    "Bye",
    "Sdes",
    "TransportFeedback",
    "UnknownRtcp",
    "parse_rtcp",
    "serialize",
    "sender_report",
    "receiver_report",
    "pli",
    "fir",
    "nack",
    "remb",
    "bye",
    "sdes_cname",
    "transport_feedback",
    "ntp_from_unix",
    "unix_from_ntp",
    "ntp_middle32",
]

# Packet types (RFC 3550 §12.1, RFC 4585 §6.1).
PT_SR = 200
PT_RR = 201
PT_SDES = 202
PT_BYE = 203
PT_APP = 204
PT_RTPFB = 205
PT_PSFB = 206

# Feedback message types.
FMT_NACK = 1  # RTPFB generic NACK (RFC 4585 §6.2.1)
FMT_TWCC = 15  # RTPFB transport-wide congestion control feedback
FMT_PLI = 1  # PSFB picture loss indication (RFC 4585 §6.3.1)
FMT_FIR = 4  # PSFB full intra request (RFC 5104 §4.3.1)
FMT_AFB = 15  # PSFB application layer feedback (REMB lives here)

SDES_CNAME = 1

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01

_HEADER = struct.Struct("!BBH")
_SR_BODY = struct.Struct("!IIIIII")  # ssrc, ntp msw, ntp lsw, rtp ts, packets, octets
_BLOCK = struct.Struct("!IIIIII")  # ssrc, fraction|lost, highest, jitter, lsr, dlsr
_FB = struct.Struct("!BBHII")  # header + sender ssrc + media ssrc
_U32 = struct.Struct("!I")
_II = struct.Struct("!II")
_HH = struct.Struct("!HH")


class RtcpError(ValueError):
    """A malformed RTCP packet."""


def _header(count: int, packet_type: int, body_length: int) -> bytes:
    # body_length excludes the 4-byte common header and is a multiple of 4.
    return _HEADER.pack(0x80 | count, packet_type, body_length // 4)


@dataclass(slots=True)
class ReportBlock:
    """One reception report block (RFC 3550 §6.4.1)."""

    ssrc: int
    fraction_lost: int = 0  # 0..255, fixed point with the binary point at the left
    packets_lost: int = 0  # cumulative, 24-bit signed
    highest_sequence: int = 0  # extended highest sequence number received (32 bits)
    jitter: int = 0  # interarrival jitter in timestamp units
    lsr: int = 0  # middle 32 bits of the NTP timestamp of the last SR received
    dlsr: int = 0  # delay since that SR, in 1/65536 s

    def to_bytes(self) -> bytes:
        lost = max(-0x800000, min(0x7FFFFF, self.packets_lost)) & 0xFFFFFF
        return _BLOCK.pack(
            self.ssrc & 0xFFFFFFFF,
            ((self.fraction_lost & 0xFF) << 24) | lost,
            self.highest_sequence & 0xFFFFFFFF,
            self.jitter & 0xFFFFFFFF,
            self.lsr & 0xFFFFFFFF,
            self.dlsr & 0xFFFFFFFF,
        )

    @classmethod
    def parse(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, word, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
        lost = word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        return cls(ssrc, word >> 24, lost, highest, jitter, lsr, dlsr)


def _blocks_bytes(reports: Sequence[ReportBlock]) -> bytes:
    if len(reports) > 31:
        raise RtcpError("at most 31 report blocks fit in one SR/RR")
    return b"".join(r.to_bytes() for r in reports)


@dataclass(slots=True)
class SenderReport:
    """SR (RFC 3550 §6.4.1)."""

    ssrc: int
    ntp_timestamp: int  # 64-bit NTP timestamp
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: list[ReportBlock] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        blocks = _blocks_bytes(self.reports)
        body = (
            _SR_BODY.pack(
                self.ssrc & 0xFFFFFFFF,
                (self.ntp_timestamp >> 32) & 0xFFFFFFFF,
                self.ntp_timestamp & 0xFFFFFFFF,
                self.rtp_timestamp & 0xFFFFFFFF,
                self.packet_count & 0xFFFFFFFF,
                self.octet_count & 0xFFFFFFFF,
            )
            + blocks
        )
        return _header(len(self.reports), PT_SR, len(body)) + body


@dataclass(slots=True)
class ReceiverReport:
    """RR (RFC 3550 §6.4.2)."""

    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        body = _U32.pack(self.ssrc & 0xFFFFFFFF) + _blocks_bytes(self.reports)
        return _header(len(self.reports), PT_RR, len(body)) + body


@dataclass(slots=True)
class Pli:
    """Picture loss indication (RFC 4585 §6.3.1)."""

    sender_ssrc: int
    media_ssrc: int

    def to_bytes(self) -> bytes:
        return _FB.pack(0x80 | FMT_PLI, PT_PSFB, 2, self.sender_ssrc, self.media_ssrc)


@dataclass(slots=True)
class Fir:
    """Full intra request (RFC 5104 §4.3.1): (media ssrc, command sequence number) entries."""

    sender_ssrc: int
    entries: list[tuple[int, int]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        fci = b"".join(
            _II.pack(ssrc & 0xFFFFFFFF, (seq & 0xFF) << 24) for ssrc, seq in self.entries
        )
        # The media source SSRC of the common feedback header is unused (0) for FIR.
        return _FB.pack(0x80 | FMT_FIR, PT_PSFB, 2 + len(fci) // 4, self.sender_ssrc, 0) + fci


def _nack_pairs(lost: Iterable[int]) -> list[tuple[int, int]]:
    """Pack sequence numbers into (PID, BLP) pairs; wrap-aware for ascending input."""
    pairs: list[tuple[int, int]] = []
    pid = -1
    blp = 0
    for seq in lost:
        seq &= 0xFFFF
        if pid >= 0:
            delta = (seq - pid) & 0xFFFF
            if delta == 0:
                continue
            if delta <= 16:
                blp |= 1 << (delta - 1)
                continue
            pairs.append((pid, blp))
        pid = seq
        blp = 0
    if pid >= 0:
        pairs.append((pid, blp))
    return pairs


@dataclass(slots=True)
class Nack:
    """Generic NACK (RFC 4585 §6.2.1); ``lost`` holds the expanded sequence numbers."""

    sender_ssrc: int
    media_ssrc: int
    lost: list[int] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        pairs = _nack_pairs(self.lost)
        fci = b"".join(_HH.pack(pid, blp) for pid, blp in pairs)
        return (
            _FB.pack(0x80 | FMT_NACK, PT_RTPFB, 2 + len(pairs), self.sender_ssrc, self.media_ssrc)
            + fci
        )


def _remb_encode(bitrate: int) -> tuple[int, int]:
    """Bitrate -> (6-bit exponent, 18-bit mantissa), rounding down."""
    if bitrate < 0:
        raise RtcpError("negative REMB bitrate")
    exp = 0
    mantissa = bitrate
    while mantissa > 0x3FFFF:
        mantissa >>= 1
        exp += 1
    if exp > 63:
        raise RtcpError("REMB bitrate out of range")
    return exp, mantissa


@dataclass(slots=True)
class Remb:
    """Receiver estimated maximum bitrate (draft-alvestrand-rmcat-remb), bits per second."""

    sender_ssrc: int
    bitrate: int
    ssrcs: list[int] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        if len(self.ssrcs) > 255:
            raise RtcpError("at most 255 SSRCs in a REMB")
        exp, mantissa = _remb_encode(self.bitrate)
        fci = b"REMB" + _U32.pack((len(self.ssrcs) << 24) | (exp << 18) | mantissa)
        fci += b"".join(_U32.pack(s & 0xFFFFFFFF) for s in self.ssrcs)
        return _FB.pack(0x80 | FMT_AFB, PT_PSFB, 2 + len(fci) // 4, self.sender_ssrc, 0) + fci


@dataclass(slots=True)
class Bye:
    """BYE (RFC 3550 §6.6)."""

    ssrcs: list[int] = field(default_factory=list)
    reason: bytes = b""

    def to_bytes(self) -> bytes:
        if len(self.ssrcs) > 31:
            raise RtcpError("at most 31 SSRCs in a BYE")
        body = b"".join(_U32.pack(s & 0xFFFFFFFF) for s in self.ssrcs)
        if self.reason:
            reason = self.reason[:255]
            body += bytes([len(reason)]) + reason
            body += b"\x00" * (-len(body) % 4)
        return _header(len(self.ssrcs), PT_BYE, len(body)) + body


@dataclass(slots=True)
class Sdes:
    """Source description (RFC 3550 §6.5): chunks of (ssrc, [(item type, value)])."""

    chunks: list[tuple[int, list[tuple[int, bytes]]]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        if len(self.chunks) > 31:
            raise RtcpError("at most 31 chunks in an SDES")
        parts = []
        for ssrc, items in self.chunks:
            chunk = bytearray(_U32.pack(ssrc & 0xFFFFFFFF))
            for item_type, value in items:
                if not 1 <= item_type <= 255 or len(value) > 255:
                    raise RtcpError("invalid SDES item")
                chunk += bytes((item_type, len(value))) + value
            # At least one null octet ends the item list, then pad to a 32-bit boundary.
            chunk += b"\x00" * (4 - len(chunk) % 4)
            parts.append(bytes(chunk))
        body = b"".join(parts)
        return _header(len(self.chunks), PT_SDES, len(body)) + body


@dataclass(slots=True)
class TransportFeedback:
    """Transport-wide congestion control feedback (RTPFB fmt 15), kept undecoded.

    ``raw`` is the whole RTCP packet exactly as received (common header, and padding if the
    P bit is set); :attr:`fci` is the feedback control information after the two SSRCs,
    without padding.
    """

    sender_ssrc: int
    media_ssrc: int
    raw: bytes

    @property
    def fci(self) -> bytes:
        raw = self.raw
        if raw[0] & 0x20:
            return raw[12 : len(raw) - raw[-1]]
        return raw[12:]

    def to_bytes(self) -> bytes:
        return self.raw


@dataclass(slots=True)
class UnknownRtcp:
    """Any other RTCP packet (APP, XR, other feedback types); ``raw`` is the whole packet as
    received, padding included."""

    packet_type: int
    fmt: int
    raw: bytes

    def to_bytes(self) -> bytes:
        return self.raw


RtcpPacket = (
    SenderReport
    | ReceiverReport
    | Pli
    | Fir
    | Nack
    | Remb
    | Bye
    | Sdes
    | TransportFeedback
    | UnknownRtcp
)


# --- parsing ---------------------------------------------------------------------------------


def _parse_blocks(data: bytes, offset: int, end: int, count: int) -> list[ReportBlock]:
    if offset + 24 * count > end:
        raise RtcpError("report blocks overrun the packet")
    return [ReportBlock.parse(data, offset + 24 * i) for i in range(count)]


def _parse_sdes(data: bytes, start: int, end: int, count: int) -> Sdes:
    chunks: list[tuple[int, list[tuple[int, bytes]]]] = []
    pos = start
    for _ in range(count):
        if pos + 4 > end:
            raise RtcpError("SDES chunk overruns the packet")
        (ssrc,) = _U32.unpack_from(data, pos)
        pos += 4
        items: list[tuple[int, bytes]] = []
        while True:
            if pos >= end:
                raise RtcpError("SDES chunk not terminated")
            item_type = data[pos]
            if item_type == 0:
                pos += 1
                break
            if pos + 2 > end:
                raise RtcpError("SDES item overruns the packet")
            length = data[pos + 1]
            if pos + 2 + length > end:
                raise RtcpError("SDES item overruns the packet")
            items.append((item_type, bytes(data[pos + 2 : pos + 2 + length])))
            pos += 2 + length
        # Skip the remaining null octets up to the next 32-bit boundary.
        pos += -(pos - start) % 4
        chunks.append((ssrc, items))
    return Sdes(chunks)


def _parse_bye(data: bytes, start: int, end: int, count: int) -> Bye:
    if start + 4 * count > end:
        raise RtcpError("BYE overruns the packet")
    ssrcs = [_U32.unpack_from(data, start + 4 * i)[0] for i in range(count)]
    reason = b""
    pos = start + 4 * count
    if pos < end:
        length = data[pos]
        if pos + 1 + length > end:
            raise RtcpError("BYE reason overruns the packet")
        reason = bytes(data[pos + 1 : pos + 1 + length])
    return Bye(ssrcs, reason)


def _parse_rtpfb(data: bytes, start: int, end: int, packet_end: int, fmt: int) -> RtcpPacket:
    if end - start < 12:
        raise RtcpError("RTPFB too short")
    _, _, _, sender, media = _FB.unpack_from(data, start)
    if fmt == FMT_NACK:
        lost: list[int] = []
        for pos in range(start + 12, end - 3, 4):
            pid, blp = _HH.unpack_from(data, pos)
            lost.append(pid)
            bit = 0
            while blp:
                if blp & 1:
                    lost.append((pid + bit + 1) & 0xFFFF)
                blp >>= 1
                bit += 1
        return Nack(sender, media, lost)
    if fmt == FMT_TWCC:
        return TransportFeedback(sender, media, _raw(data, start, packet_end))
    return UnknownRtcp(PT_RTPFB, fmt, _raw(data, start, packet_end))


def _parse_psfb(data: bytes, start: int, end: int, packet_end: int, fmt: int) -> RtcpPacket:
    if end - start < 12:
        raise RtcpError("PSFB too short")
    _, _, _, sender, media = _FB.unpack_from(data, start)
    if fmt == FMT_PLI:
        return Pli(sender, media)
    if fmt == FMT_FIR:
        entries = []
        for pos in range(start + 12, end - 7, 8):
            ssrc, word = _II.unpack_from(data, pos)
            entries.append((ssrc, word >> 24))
        return Fir(sender, entries)
    if fmt == FMT_AFB and end - start >= 20 and data[start + 12 : start + 16] == b"REMB":
        (word,) = _U32.unpack_from(data, start + 16)
        count = word >> 24
        if start + 20 + 4 * count > end:
            raise RtcpError("REMB SSRC list overruns the packet")
        bitrate = (word & 0x3FFFF) << ((word >> 18) & 0x3F)
        ssrcs = [_U32.unpack_from(data, start + 20 + 4 * i)[0] for i in range(count)]
        return Remb(sender, bitrate, ssrcs)
    return UnknownRtcp(PT_PSFB, fmt, _raw(data, start, packet_end))


def _raw(data: bytes, start: int, end: int) -> bytes:
    return bytes(data[start:end])


def parse_rtcp(data: bytes) -> list[RtcpPacket]:
    """Split a (compound) RTCP packet into its packets; raises :class:`RtcpError` if malformed."""
    n = len(data)
    if n < 4:
        raise RtcpError("RTCP packet too short")
    packets: list[RtcpPacket] = []
    pos = 0
    while pos < n:
        if pos + 4 > n:
            raise RtcpError("truncated RTCP header")
        first, packet_type, words = _HEADER.unpack_from(data, pos)
        if first >> 6 != 2:
            raise RtcpError("bad RTCP version")
        end = pos + 4 * (words + 1)
        if end > n:
            raise RtcpError("RTCP length overruns the datagram")
        body_end = end
        if first & 0x20:
            pad = data[end - 1]
            if pad == 0 or pad > end - pos - 4:
                raise RtcpError("bad RTCP padding")
            body_end = end - pad
        count = first & 0x1F
        body = pos + 4
        if packet_type == PT_SR:
            if body + 24 > body_end:
                raise RtcpError("SR too short")
            ssrc, msw, lsw, rtp_ts, packets_sent, octets = _SR_BODY.unpack_from(data, body)
            reports = _parse_blocks(data, body + 24, body_end, count)
            packets.append(
                SenderReport(ssrc, (msw << 32) | lsw, rtp_ts, packets_sent, octets, reports)
            )
        elif packet_type == PT_RR:
            if body + 4 > body_end:
                raise RtcpError("RR too short")
            (ssrc,) = _U32.unpack_from(data, body)
            packets.append(ReceiverReport(ssrc, _parse_blocks(data, body + 4, body_end, count)))
        elif packet_type == PT_SDES:
            packets.append(_parse_sdes(data, body, body_end, count))
        elif packet_type == PT_BYE:
            packets.append(_parse_bye(data, body, body_end, count))
        elif packet_type == PT_RTPFB:
            packets.append(_parse_rtpfb(data, pos, body_end, end, count))
        elif packet_type == PT_PSFB:
            packets.append(_parse_psfb(data, pos, body_end, end, count))
        else:
            packets.append(UnknownRtcp(packet_type, count, _raw(data, pos, end)))
        pos = end
    return packets


# --- building --------------------------------------------------------------------------------


def serialize(packets: Iterable[RtcpPacket]) -> bytes:
    """A compound RTCP packet from its packets."""
    return b"".join(p.to_bytes() for p in packets)


def sender_report(
    ssrc: int,
    ntp_timestamp: int,
    rtp_timestamp: int,
    packet_count: int,
    octet_count: int,
    reports: Sequence[ReportBlock] = (),
) -> bytes:
    """An SR packet."""
    return SenderReport(
        ssrc, ntp_timestamp, rtp_timestamp, packet_count, octet_count, list(reports)
    ).to_bytes()


def receiver_report(ssrc: int, reports: Sequence[ReportBlock]) -> bytes:
    """An RR packet."""
    return ReceiverReport(ssrc, list(reports)).to_bytes()


def pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    """A PLI packet."""
    return _FB.pack(0x80 | FMT_PLI, PT_PSFB, 2, sender_ssrc, media_ssrc)


def fir(sender_ssrc: int, media_ssrc: int, seq_nr: int) -> bytes:
    """A FIR packet with one entry for ``media_ssrc`` (``seq_nr`` is the 8-bit command number)."""
    return Fir(sender_ssrc, [(media_ssrc, seq_nr)]).to_bytes()


def nack(sender_ssrc: int, media_ssrc: int, lost: Iterable[int]) -> bytes:
    """A generic NACK; ``lost`` in ascending (wrap-aware) order packs into the fewest pairs."""
    return Nack(sender_ssrc, media_ssrc, list(lost)).to_bytes()


def remb(sender_ssrc: int, bitrate: int, ssrcs: Sequence[int]) -> bytes:
    """A REMB packet (bitrate in bits per second, rounded down to what the format holds)."""
    return Remb(sender_ssrc, bitrate, list(ssrcs)).to_bytes()


def bye(ssrcs: Sequence[int], reason: bytes = b"") -> bytes:
    """A BYE packet."""
    return Bye(list(ssrcs), reason).to_bytes()


def sdes_cname(ssrc: int, cname: str) -> bytes:
    """An SDES packet with a single CNAME item."""
    return Sdes([(ssrc, [(SDES_CNAME, cname.encode())])]).to_bytes()


def transport_feedback(sender_ssrc: int, media_ssrc: int, fci: bytes) -> bytes:
    """An RTPFB fmt 15 packet around an already encoded FCI.

    An FCI that is not a multiple of 32 bits gets RTCP padding (P bit, count in the last byte),
    as libwebrtc does, since the FCI has no room for trailing zeros.
    """
    pad = -len(fci) % 4
    first = 0x80 | FMT_TWCC
    tail = b""
    if pad:
        first |= 0x20
        tail = b"\x00" * (pad - 1) + bytes((pad,))
    words = 2 + (len(fci) + pad) // 4
    return _FB.pack(first, PT_RTPFB, words, sender_ssrc, media_ssrc) + bytes(fci) + tail


def ntp_from_unix(t: float) -> int:
    """64-bit NTP timestamp (32.32 fixed point, seconds since 1900) for a Unix time."""
    seconds = int(t // 1)
    fraction = int((t - seconds) * 4294967296.0)
    if fraction > 0xFFFFFFFF:
        fraction = 0xFFFFFFFF
    return (((seconds + NTP_EPOCH_OFFSET) & 0xFFFFFFFF) << 32) | fraction


def unix_from_ntp(ntp: int) -> float:
    """Unix time for a 64-bit NTP timestamp (era 0)."""
    return (ntp >> 32) - NTP_EPOCH_OFFSET + (ntp & 0xFFFFFFFF) / 4294967296.0


def ntp_middle32(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp, as used in LSR."""
    return (ntp >> 16) & 0xFFFFFFFF
