"""RTP depacketizers for recording: packets in, whole coded frames out, never decoded.

Sans-I/O. One :class:`Depacketizer` per recorded track takes the decrypted RTP packets of one
stream in arrival order (:meth:`Depacketizer.push`) and returns the frames that became complete:

* Opus (RFC 7587): one packet is one frame.
* VP8 (RFC 7741): the payload descriptor is stripped; a frame is the packets of one RTP
  timestamp up to the marker bit; a keyframe has P=0 in the VP8 payload header (§4.3).
* VP9 (RFC 9628): the payload descriptor is stripped; a layer frame runs from B=1 to E=1; a
  picture of several spatial layers becomes a superframe with its index (VP9 bitstream
  specification, Annex B); a keyframe has B=1, P=0 in spatial layer 0.
* H.264 (RFC 6184, packetization modes 0 and 1): single NAL unit packets, STAP-A and FU-A
  become an Annex B access unit (each NAL unit behind a 4-byte start code). A keyframe is an
  access unit with an IDR slice; the last SPS and PPS seen are put in front of an IDR access
  unit that does not carry its own.
* AV1 (the AV1 RTP payload format): the aggregation header is read, OBU fragments are joined,
  and a temporal unit goes out in the low-overhead bitstream format (a temporal delimiter
  first, every OBU with ``obu_has_size_field`` set), as IVF files hold it. A keyframe is a
  temporal unit whose first packet has N=1 or that carries a sequence header; the last
  sequence header seen is put in front of a keyframe that does not carry one.

Packets are put back in sequence-number order by a small reorder window
(:data:`REORDER_WINDOW` packets); a sequence number that does not arrive while the window is
full is lost. Loss is handled honestly: a frame with a lost packet is dropped and counted
(``lost_frames``), and a video depacketizer then drops every frame until the next keyframe
(``skipped_frames``): the simplest rule under which every frame written can be decoded. Video
also starts at the first keyframe. Malformed payloads count as loss of their frame.
"""

from __future__ import annotations

from typing import NamedTuple

from relay.rtc.vp8 import Vp8Error, parse_vp8
from relay.rtc.vp9 import Vp9Error, parse_vp9

__all__ = [
    "MAX_FRAME_BYTES",
    "REORDER_WINDOW",
    "RESTART_DISTANCE",
    "Av1Depacketizer",
    "Depacketizer",
    "Frame",
    "H264Depacketizer",
    "OpusDepacketizer",
    "Vp8Depacketizer",
    "Vp9Depacketizer",
    "depacketizer_for",
    "leb128",
    "read_leb128",
]

#: packets held to put reordered packets back in order; a missing sequence number is given up
#: (lost) when this many later packets are waiting
REORDER_WINDOW = 48

#: a packet this many sequence numbers behind the next one expected starts the numbering anew
#: (the sender restarted); a packet less far behind is late and dropped
RESTART_DISTANCE = 1000

#: a frame with more payload than this is dropped (a sender that never ends its frame)
MAX_FRAME_BYTES = 16 << 20

_START_CODE = b"\x00\x00\x00\x01"


class Frame(NamedTuple):
    """One coded frame (an Opus packet, a video picture or access unit, an AV1 temporal unit)."""

    #: RTP timestamp of its packets (32 bits, as received)
    ts: int
    #: the coded bytes, in the form the container stores
    data: bytes
    #: whether a decoder can start here (always True for audio)
    keyframe: bool
    #: arrival time (seconds, the caller's clock) of the packet that completed the frame
    now: float


class _Malformed(Exception):
    """A payload that cannot be part of a frame (the frame is dropped as lost)."""


def _payload_end(packet: bytes) -> int:
    """End of the RTP payload: less the padding when the P bit is set."""
    if packet[0] & 0x20:
        pad = packet[-1]
        if pad == 0 or pad > len(packet):
            raise _Malformed("bad RTP padding")
        return len(packet) - pad
    return len(packet)


def read_leb128(data: bytes, i: int, end: int = -1) -> tuple[int, int]:
    """The unsigned LEB128 value at ``data[i]`` (at most 8 bytes, before ``end``, default the
    end of ``data``) and the index after it."""
    if end < 0:
        end = len(data)
    value = 0
    for n in range(8):
        if i >= end:
            raise _Malformed("truncated leb128")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << (7 * n)
        if not byte & 0x80:
            return value, i
    raise _Malformed("leb128 longer than 8 bytes")


def leb128(value: int) -> bytes:
    """``value`` as unsigned LEB128 in the fewest bytes."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Depacketizer:
    """Common part: reordering, loss, and (video) the wait for a keyframe.

    Subclasses implement :meth:`_begin`, :meth:`_add` and :meth:`_finish` for one frame; a
    frame ends at the packet with the RTP marker bit, or (a sender that does not set it) at
    the next packet, of another timestamp, when no sequence number between was lost. Counters (read them any time): ``packets`` (pushed), ``late``
    (arrived after their sequence number was given up, or duplicates), ``lost_packets``
    (sequence numbers never seen), ``frames`` (returned), ``lost_frames``, ``skipped_frames``.
    """

    #: video waits for a keyframe at the start and after every lost frame
    video = True

    def __init__(self) -> None:
        self.packets = 0
        self.late = 0
        self.lost_packets = 0
        self.frames = 0
        self.lost_frames = 0
        self.skipped_frames = 0
        # reordering: unwrapped sequence number -> (packet, offset, ts, now)
        self._window: dict[int, tuple[bytes, int, int, float]] = {}
        self._next: int | None = None  # next unwrapped sequence number to release
        # the frame being assembled
        self._ts: int | None = None
        self._dropped_ts: int | None = None  # the timestamp of the frame dropped last
        self._pending_loss = False  # packets were lost between two frames
        self._ok = False
        self._size = 0  # payload bytes of the frame so far
        self._now = 0.0  # arrival time of its last packet
        self._need_key = self.video
        self._out: list[Frame] = []

    # -- input ----------------------------------------------------------------------------

    def push(self, packet: bytes, offset: int, seq: int, ts: int, now: float) -> list[Frame]:
        """Take one RTP packet (``packet[offset:]`` is its payload); the frames it completes."""
        self.packets += 1
        nxt = self._next
        if nxt is None:
            nxt = self._next = seq
            useq = seq
        else:
            useq = nxt + ((seq - nxt + 0x8000) & 0xFFFF) - 0x8000
            if useq < nxt - RESTART_DISTANCE:
                # far behind: the sender started its sequence numbers anew
                self._release(force=True)
                self._gap()
                nxt = self._next = useq = seq
            elif useq < nxt or useq in self._window:
                self.late += 1
                return []
        self._window[useq] = (packet, offset, ts, now)
        self._release(force=False)
        out, self._out = self._out, []
        return out

    def flush(self) -> list[Frame]:
        """The end of the stream: release every waiting packet; the frames completed."""
        self._release(force=True)
        if self._ts is not None or self._pending_loss:
            self._drop()
        out, self._out = self._out, []
        return out

    def _release(self, force: bool) -> None:
        window = self._window
        nxt = self._next
        assert nxt is not None or not window
        while window:
            assert nxt is not None
            item = window.pop(nxt, None)
            if item is None:
                if not force and len(window) < REORDER_WINDOW:
                    break
                later = min(window)
                self.lost_packets += later - nxt
                self._gap()
                nxt = later
                item = window.pop(nxt)
            nxt += 1
            self._next = nxt
            self._packet(*item)
        self._next = nxt

    # -- frame assembly -----------------------------------------------------------------------

    def _gap(self) -> None:
        """Packets were lost here: the frame in progress is gone, or (between frames) the
        start of the next frame or a whole frame: counted once, when the next frame ends."""
        if self._ts is not None:
            self._drop()
        else:
            self._pending_loss = True

    def _packet(self, packet: bytes, offset: int, ts: int, now: float) -> None:
        try:
            end = _payload_end(packet)
        except _Malformed:
            end = -1
        if 0 <= end <= offset:
            return  # padding only: no media, not part of a frame
        if self._ts is not None and ts != self._ts:
            # no marker, but every packet came (a gap would have ended the frame): complete
            self._complete(self._ts, self._now)
        if self._ts is None and ts == self._dropped_ts:
            return  # the rest of a frame already dropped
        try:
            if end < 0:
                raise _Malformed("bad RTP padding")
            if self._ts is None:
                self._ts = ts
                self._ok = True
                self._size = end - offset
                self._begin()
                self._add(packet, offset, end, True)
            elif self._ok:
                self._size += end - offset
                if self._size > MAX_FRAME_BYTES:
                    raise _Malformed("frame too large")
                self._add(packet, offset, end, False)
        except _Malformed:
            if self._ts is None:
                self._ts = ts
            self._ok = False
        self._now = now
        if packet[1] & 0x80:  # marker: the last packet of the frame
            self._complete(ts, now)

    def _complete(self, ts: int, now: float) -> None:
        """Every packet of the frame at ``ts`` is in: emit it, unless it is broken."""
        if not self._ok:
            self._drop()
            return
        self._ts = None
        try:
            result = self._finish()
        except _Malformed:
            self._lost()
            return
        if self._pending_loss:
            self._lost()  # a whole frame was lost before this one
        if result is not None:
            self._emit(Frame(ts, result[0], result[1], now))

    def _drop(self) -> None:
        self._dropped_ts = self._ts
        self._ts = None
        self._ok = False
        self._lost()

    def _lost(self) -> None:
        self._pending_loss = False
        self.lost_frames += 1
        if self.video:
            self._need_key = True

    def _emit(self, frame: Frame) -> None:
        if self._need_key:
            if not frame.keyframe:
                self.skipped_frames += 1
                return
            self._need_key = False
        self.frames += 1
        self._out.append(frame)

    def _begin(self) -> None:
        """A new frame starts (reset the per-frame state)."""

    def _add(self, packet: bytes, offset: int, end: int, first: bool) -> None:
        """Take ``packet[offset:end]``; raise :class:`_Malformed` when it cannot belong."""
        raise NotImplementedError

    def _finish(self) -> tuple[bytes, bool] | None:
        """The frame's bytes and whether it is a keyframe (None: nothing to write)."""
        raise NotImplementedError


class OpusDepacketizer(Depacketizer):
    """Opus (RFC 7587): every packet is one frame; loss shows as a gap in RTP timestamps."""

    video = False

    def _packet(self, packet: bytes, offset: int, ts: int, now: float) -> None:
        try:
            end = _payload_end(packet)
        except _Malformed:
            self.lost_frames += 1
            return
        if offset < end:
            self._emit(Frame(ts, packet[offset:end], True, now))

    def _gap(self) -> None:
        pass  # lost packets are counted in lost_packets; the timestamps show the gap

    def flush(self) -> list[Frame]:
        self._release(force=True)
        out, self._out = self._out, []
        return out


class Vp8Depacketizer(Depacketizer):
    """VP8 (RFC 7741)."""

    def _begin(self) -> None:
        self._parts: list[bytes] = []
        self._key = False

    def _add(self, packet: bytes, offset: int, end: int, first: bool) -> None:
        try:
            desc = parse_vp8(packet, offset)
        except Vp8Error as exc:
            raise _Malformed(str(exc)) from exc
        if first:
            if not desc.frame_start:
                raise _Malformed("VP8 frame without its first packet")
            self._key = desc.keyframe
        elif desc.frame_start:
            raise _Malformed("VP8 frame start inside a frame")
        self._parts.append(packet[offset + desc.size : end])

    def _finish(self) -> tuple[bytes, bool] | None:
        return b"".join(self._parts), self._key


def vp9_superframe(frames: list[bytes]) -> bytes:
    """Several VP9 frames as one superframe: the frames, then the superframe index (VP9
    bitstream specification, Annex B): a marker byte ``110MMNNN`` (M: bytes per size - 1,
    N: frames - 1), each size little-endian, the marker byte again."""
    largest = max(len(f) for f in frames)
    mag = 1 if largest < 1 << 8 else 2 if largest < 1 << 16 else 3 if largest < 1 << 24 else 4
    marker = 0xC0 | ((mag - 1) << 3) | (len(frames) - 1)
    index = bytearray((marker,))
    for f in frames:
        index += len(f).to_bytes(mag, "little")
    index.append(marker)
    return b"".join(frames) + bytes(index)


class Vp9Depacketizer(Depacketizer):
    """VP9 (RFC 9628), with spatial layers: up to 8 layer frames of one picture become a
    superframe."""

    def _begin(self) -> None:
        self._layers: list[bytes] = []
        self._layer: list[bytes] | None = None
        self._key = False

    def _add(self, packet: bytes, offset: int, end: int, first: bool) -> None:
        try:
            desc = parse_vp9(packet, offset)
        except Vp9Error as exc:
            raise _Malformed(str(exc)) from exc
        payload = packet[offset + desc.size : end]
        if desc.begin:
            if self._layer is not None:
                raise _Malformed("VP9 layer frame without its end")
            if first:
                self._key = not desc.inter_predicted and desc.sid == 0
            self._layer = [payload]
        elif self._layer is None:
            raise _Malformed("VP9 layer frame without its beginning")
        else:
            self._layer.append(payload)
        if desc.end:
            self._layers.append(b"".join(self._layer))
            self._layer = None

    def _finish(self) -> tuple[bytes, bool] | None:
        if self._layer is not None:  # the marker without E=1: the layer frame ends here
            self._layers.append(b"".join(self._layer))
        layers = [layer for layer in self._layers if layer]
        if not layers or len(layers) > 8:
            raise _Malformed("VP9 picture without frames, or with more than 8")
        data = layers[0] if len(layers) == 1 else vp9_superframe(layers)
        return data, self._key


# H.264 NAL unit types (H.264 Table 7-1, RFC 6184 Table 1)
_IDR = 5
_SPS = 7
_PPS = 8
_STAP_A = 24
_FU_A = 28


class H264Depacketizer(Depacketizer):
    """H.264 (RFC 6184), packetization modes 0 and 1 (no STAP-B, MTAP, FU-B)."""

    def __init__(self) -> None:
        super().__init__()
        self._sps: bytes | None = None
        self._pps: bytes | None = None

    def _begin(self) -> None:
        self._nals: list[bytes] = []
        self._fu: bytearray | None = None

    def _add(self, packet: bytes, offset: int, end: int, first: bool) -> None:
        kind = packet[offset] & 0x1F
        if 1 <= kind <= 23:
            if self._fu is not None:
                raise _Malformed("H.264 NAL unit inside an FU-A")
            self._nals.append(packet[offset:end])
        elif kind == _STAP_A:
            if self._fu is not None:
                raise _Malformed("H.264 STAP-A inside an FU-A")
            i = offset + 1
            while i < end:
                if i + 2 > end:
                    raise _Malformed("H.264 STAP-A: truncated size")
                size = (packet[i] << 8) | packet[i + 1]
                i += 2
                if size == 0 or i + size > end:
                    raise _Malformed("H.264 STAP-A: bad NAL unit size")
                self._nals.append(packet[i : i + size])
                i += size
        elif kind == _FU_A:
            if offset + 2 > end:
                raise _Malformed("H.264 FU-A: truncated")
            header = packet[offset + 1]
            if header & 0x80:  # S
                if self._fu is not None:
                    raise _Malformed("H.264 FU-A start inside an FU-A")
                self._fu = bytearray(((packet[offset] & 0xE0) | (header & 0x1F),))
            elif self._fu is None:
                raise _Malformed("H.264 FU-A without its start")
            self._fu += packet[offset + 2 : end]
            if header & 0x40:  # E
                self._nals.append(bytes(self._fu))
                self._fu = None
        else:
            raise _Malformed(f"H.264 packet type {kind} not supported")

    def _finish(self) -> tuple[bytes, bool] | None:
        if self._fu is not None:
            raise _Malformed("H.264 FU-A without its end")
        nals = self._nals
        kinds = [nal[0] & 0x1F for nal in nals]
        for nal, kind in zip(nals, kinds, strict=True):
            if kind == _SPS:
                self._sps = nal
            elif kind == _PPS:
                self._pps = nal
        if not any(1 <= kind <= 5 for kind in kinds):
            return None  # no picture (parameter sets, SEI): kept for the next IDR
        key = _IDR in kinds
        if key and (_SPS not in kinds or _PPS not in kinds):
            if self._sps is None or self._pps is None:
                key = False  # undecodable without its parameter sets
            else:
                nals = [self._sps, self._pps, *nals]
        return b"".join(_START_CODE + nal for nal in nals), key


# AV1 OBU types (AV1 specification §6.2.2)
_OBU_SEQUENCE_HEADER = 1
_OBU_TEMPORAL_DELIMITER = 2
_OBU_TILE_LIST = 8
#: a temporal delimiter OBU with obu_has_size_field set and size 0
_TEMPORAL_DELIMITER = b"\x12\x00"


class Av1Depacketizer(Depacketizer):
    """AV1 (the AV1 RTP payload format): aggregation header ``Z Y W W N - - -``, OBU elements
    with a LEB128 length (W=0: all of them; W=1..3: all but the last of W)."""

    def __init__(self) -> None:
        super().__init__()
        self._sequence_header: bytes | None = None

    def _begin(self) -> None:
        self._obus: list[bytes] = []
        self._frag: bytearray | None = None
        self._key = False

    def _add(self, packet: bytes, offset: int, end: int, first: bool) -> None:
        agg = packet[offset]
        z, y, w = agg & 0x80, agg & 0x40, (agg >> 4) & 0x03
        if first:
            if z:
                raise _Malformed("AV1 temporal unit starts with a fragment")
            self._key = bool(agg & 0x08)
        elif bool(z) != (self._frag is not None):
            raise _Malformed("AV1 fragment continuation mismatch")
        i = offset + 1
        elements: list[bytes] = []
        while i < end:
            if w == 0 or len(elements) < w - 1:
                size, i = read_leb128(packet, i, end)
            else:
                size = end - i
            if i + size > end:
                raise _Malformed("AV1 OBU element overruns the packet")
            elements.append(packet[i : i + size])
            i += size
        if w and len(elements) != w:
            raise _Malformed("AV1 OBU element count differs from W")
        last = len(elements) - 1
        for n, element in enumerate(elements):
            if n == 0 and z:
                assert self._frag is not None
                self._frag += element
            else:
                self._frag = bytearray(element)
            if n < last or not y:
                if self._frag:
                    self._obus.append(bytes(self._frag))
                self._frag = None

    def _finish(self) -> tuple[bytes, bool] | None:
        if self._frag is not None:
            raise _Malformed("AV1 OBU fragment without its end")
        out = [_TEMPORAL_DELIMITER]
        has_sequence_header = False
        for obu in self._obus:
            header = obu[0]
            kind = (header >> 3) & 0x0F
            start = 2 if header & 0x04 else 1  # obu_extension_flag
            if start > len(obu):
                raise _Malformed("AV1 OBU header truncated")
            if header & 0x02:  # obu_has_size_field: keep only what the size covers
                size, body_start = read_leb128(obu, start)
                body = obu[body_start : body_start + size]
                if len(body) != size:
                    raise _Malformed("AV1 OBU shorter than its size field")
            else:
                body = obu[start:]
            if kind in (_OBU_TEMPORAL_DELIMITER, _OBU_TILE_LIST):
                continue
            element = bytes((header | 0x02,)) + obu[1:start] + leb128(len(body)) + body
            if kind == _OBU_SEQUENCE_HEADER:
                has_sequence_header = True
                self._sequence_header = element
            out.append(element)
        if len(out) == 1:
            return None
        key = self._key or has_sequence_header
        if key and not has_sequence_header:
            if self._sequence_header is None:
                key = False
            else:
                out.insert(1, self._sequence_header)
        return b"".join(out), key


_DEPACKETIZERS: dict[str, type[Depacketizer]] = {
    "opus": OpusDepacketizer,
    "vp8": Vp8Depacketizer,
    "vp9": Vp9Depacketizer,
    "h264": H264Depacketizer,
    "av1": Av1Depacketizer,
}


def depacketizer_for(codec: str) -> Depacketizer:
    """A new depacketizer for ``codec`` ("opus", "VP8", "VP9", "H264", "AV1"; any case).
    Raises ValueError for another codec."""
    try:
        return _DEPACKETIZERS[codec.lower()]()
    except KeyError:
        raise ValueError(f"recording does not support codec {codec!r}") from None
