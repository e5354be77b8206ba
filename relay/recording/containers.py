"""Container writers for recorded tracks: Ogg Opus, IVF and raw H.264 (Annex B).

Each writer takes coded frames (from :mod:`relay.recording.depacketize`) with their position
on the track's timeline and writes them to a binary file object it does not own (the caller
opens and closes the file). Nothing is decoded; only the headers the containers need are read.

* Ogg Opus (RFC 7845 on RFC 3533): the ID header (``OpusHead``, pre-skip 0, 48 kHz) and the
  comment header (``OpusTags``) on pages of their own, then the audio packets, several to a
  page, never split over pages. A page's granule position is the 48 kHz sample position at the
  end of its last packet. A gap in the RTP timestamps (DTX, loss) is filled with packets that
  ask for packet loss concealment (RFC 7845 §4.1: a TOC byte and zero-length frames), so the
  granule positions and the packets' durations agree and the file lasts as long as the call.
  The last page has the end-of-stream flag.
* IVF (the libvpx container): a 32-byte header (``DKIF``, the FourCC ``VP80``/``VP90``/
  ``AV01``, the picture size, the timebase, the frame count), then a 12-byte header per frame
  (size, 64-bit timestamp). The timebase is 1/clock rate (1/90000): a frame's timestamp is its
  RTP timestamp less the first frame's. The size and frame count are filled in at close.
* H.264 (``.h264``): the Annex B byte stream as it is; it has no timestamps, so a player
  assumes a frame rate.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

__all__ = [
    "AnnexBWriter",
    "IvfWriter",
    "OggOpusWriter",
    "ivf_frame_size",
    "ogg_crc",
    "opus_samples",
]

# -- Ogg ----------------------------------------------------------------------------------

# The Ogg CRC (RFC 3533 §6: polynomial 0x04C11DB7, initial value 0, no reflection, no final
# XOR) computed by zlib: zlib's CRC-32 is the same polynomial bit-reflected, so the CRC of the
# input with every byte's bits reversed is the bit reversal of the Ogg CRC, once zlib's
# initial and final inversions are undone.
_REVERSE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc(data: bytes) -> int:
    """The CRC-32 of an Ogg page (with its CRC field zeroed)."""
    reflected = zlib.crc32(data.translate(_REVERSE), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


_PAGE_HEADER = struct.Struct("<4sBBqIIIB")
_CONTINUED, _BOS, _EOS = 0x01, 0x02, 0x04

# Opus frame durations in 48 kHz samples by TOC configuration (RFC 6716 §3.1, Table 2)
_SILK = (480, 960, 1920, 2880)
_HYBRID = (480, 960)
_CELT = (120, 240, 480, 960)
_FRAME_SAMPLES = _SILK * 3 + _HYBRID * 2 + _CELT * 4
#: a code 3 packet of one zero-length 2.5 ms CELT fullband frame: "conceal 2.5 ms"
_EMPTY_PACKET = bytes(((28 << 3) | 0x03, 1))
#: most samples one Opus packet may hold (120 ms)
_MAX_PACKET_SAMPLES = 5760


def opus_samples(packet: bytes) -> int | None:
    """The 48 kHz samples an Opus packet holds, from its TOC byte and, for code 3, the frame
    count byte (RFC 6716 §3.1-3.2); None for a packet that is not valid Opus framing."""
    if not packet:
        return None
    toc = packet[0]
    per_frame = _FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return None
        frames = packet[1] & 0x3F
        if frames == 0:
            return None
    samples = frames * per_frame
    return samples if samples <= _MAX_PACKET_SAMPLES else None


def _loss_packets(previous_toc: int, samples: int) -> list[tuple[bytes, int]]:
    """Packets that ask the decoder to conceal ``samples`` lost samples (a multiple of 120):
    code 3 packets (CBR, no padding) of zero-length frames with the previous packet's
    configuration, then 2.5 ms CELT frames of its bandwidth for any rest (RFC 7845 §4.1)."""
    out = []
    config = previous_toc >> 3
    stereo = previous_toc & 0x04
    per_frame = _FRAME_SAMPLES[config]
    if samples >= per_frame:
        most = _MAX_PACKET_SAMPLES // per_frame
        count, samples = divmod(samples, per_frame)
        toc = (config << 3) | stereo | 0x03
        while count:
            n = min(count, most)
            out.append((bytes((toc, n)), n * per_frame))
            count -= n
    if samples >= 120:
        # CELT, 2.5 ms; the bandwidth of the previous configuration (NB/WB/SWB/FB; CELT has no
        # MB: that becomes WB)
        if config < 12:
            bandwidth = (0, 1, 1)[config // 4]  # SILK NB, MB, WB
        elif config < 16:
            bandwidth = 2 if config < 14 else 3  # hybrid SWB, FB
        else:
            bandwidth = (config - 16) // 4
        toc = ((16 + 4 * bandwidth) << 3) | stereo | 0x03
        count = samples // 120
        while count:
            n = min(count, 48)
            out.append((bytes((toc, n)), n * 120))
            count -= n
    return out


class OggOpusWriter:
    """An Ogg Opus stream (one logical bitstream) written to ``file``.

    :meth:`write` takes each packet with its position in 48 kHz samples on the track's
    timeline (0 for the first packet); a position past the end of the previous packet is a
    gap, filled with concealment packets. :meth:`close` writes the end-of-stream page.
    """

    #: a page is written when it holds this many packets (about one second of 20 ms packets)
    PAGE_PACKETS = 50

    def __init__(self, file: BinaryIO, channels: int = 2, serial: int = 0x52454331) -> None:
        self._file = file
        self._serial = serial
        self._sequence = 0
        self._granule = 0  # sample position at the end of the last packet
        self._packets: list[bytes] = []
        self._lacing = bytearray()
        self._toc: int | None = None
        #: concealment samples written for gaps
        self.filled = 0
        #: packets written (without concealment packets)
        self.packets = 0
        #: bytes written to the file
        self.bytes = 0
        #: packets refused (not valid Opus framing)
        self.invalid = 0
        # channel mapping family 0 (RFC 7845 §5.1.1): mono or stereo, whatever the SDP said
        channels = 1 if channels == 1 else 2
        head = struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, 0, 48000, 0, 0)
        vendor = b"relay"
        tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        self._page([head], _BOS, 0)
        self._page([tags], 0, 0)

    @property
    def duration(self) -> int:
        """Samples (48 kHz) written so far, concealment included."""
        return self._granule

    def write(self, position: int, packet: bytes) -> None:
        """Append one Opus packet that starts at ``position`` samples."""
        samples = opus_samples(packet)
        if samples is None or len(packet) > 255 * 255 - 1:
            self.invalid += 1
            return
        gap = position - self._granule
        if gap >= 120 and self._toc is not None:
            for filler, length in _loss_packets(self._toc, gap - gap % 120):
                self._append(filler, length)
                self.filled += length
        self._toc = packet[0]
        self._append(packet, samples)
        self.packets += 1

    def _append(self, packet: bytes, samples: int) -> None:
        lacing = bytes((255,) * (len(packet) // 255) + (len(packet) % 255,))
        if len(self._lacing) + len(lacing) > 255:
            self._flush(0)
        self._packets.append(packet)
        self._lacing += lacing
        self._granule += samples
        if len(self._packets) >= self.PAGE_PACKETS:
            self._flush(0)

    def _flush(self, flags: int) -> None:
        if self._packets or flags:
            self._page(self._packets, flags, self._granule, bytes(self._lacing))
        self._packets = []
        self._lacing = bytearray()

    def flush(self) -> None:
        """Write the packets waiting for a page (a short page)."""
        self._flush(0)

    def close(self) -> None:
        """Write the last page, flagged end of stream. A stream without audio gets one 2.5 ms
        concealment packet (silence): players refuse an Ogg Opus stream without packets."""
        if not self._granule:
            self._append(_EMPTY_PACKET, 120)
        self._flush(_EOS)

    def _page(self, packets: list[bytes], flags: int, granule: int, lacing: bytes = b"") -> None:
        if not lacing:
            for p in packets:
                lacing += bytes((255,) * (len(p) // 255) + (len(p) % 255,))
        header = _PAGE_HEADER.pack(
            b"OggS", 0, flags, granule, self._serial, self._sequence, 0, len(lacing)
        )
        page = b"".join((header, lacing, *packets))
        crc = ogg_crc(page)
        page = page[:22] + crc.to_bytes(4, "little") + page[26:]
        self._file.write(page)
        self._sequence += 1
        self.bytes += len(page)


# -- IVF ----------------------------------------------------------------------------------

_IVF_HEADER = struct.Struct("<4sHH4sHHIIII")
_IVF_FRAME = struct.Struct("<IQ")
_FOURCC = {"vp8": b"VP80", "vp9": b"VP90", "av1": b"AV01"}


class _Bits:
    """Most-significant-bit-first reader."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self._pos >> 3
            if byte >= len(self._data):
                raise ValueError("truncated")
            value = (value << 1) | ((self._data[byte] >> (7 - (self._pos & 7))) & 1)
            self._pos += 1
        return value


def _vp8_size(data: bytes) -> tuple[int, int] | None:
    # keyframe: 3-byte frame tag (P=0), start code 9d 01 2a, 14-bit width and height (RFC 6386 §9.1)
    if len(data) < 10 or data[0] & 0x01 or data[3:6] != b"\x9d\x01\x2a":
        return None
    return (data[6] | data[7] << 8) & 0x3FFF, (data[8] | data[9] << 8) & 0x3FFF


def _vp9_size(data: bytes) -> tuple[int, int] | None:
    # the last frame of a superframe is the highest spatial layer
    if len(data) > 2 and data[-1] & 0xE0 == 0xC0:
        marker = data[-1]
        mag = ((marker >> 3) & 0x03) + 1
        count = (marker & 0x07) + 1
        size = 2 + mag * count
        if len(data) >= size and data[-size] == marker:
            sizes = [
                int.from_bytes(data[-size + 1 + mag * i : -size + 1 + mag * (i + 1)], "little")
                for i in range(count)
            ]
            start = sum(sizes[:-1])
            data = data[start : start + sizes[-1]]
    # uncompressed header of a keyframe (VP9 bitstream specification §6.2)
    bits = _Bits(data)
    if bits.read(2) != 2:
        return None
    profile = bits.read(1) | bits.read(1) << 1
    if profile == 3:
        bits.read(1)
    if bits.read(1):  # show_existing_frame
        return None
    if bits.read(1):  # frame_type: 1 is a non-key frame
        return None
    bits.read(2)  # show_frame, error_resilient_mode
    if bits.read(24) != 0x498342:
        return None
    if profile >= 2:
        bits.read(1)  # ten_or_twelve_bit
    if bits.read(3) != 7:  # color_space other than sRGB
        bits.read(1)  # color_range
        if profile in (1, 3):
            bits.read(3)  # subsampling_x, subsampling_y, reserved_zero
    elif profile in (1, 3):
        bits.read(1)
    return bits.read(16) + 1, bits.read(16) + 1


def _av1_size(data: bytes) -> tuple[int, int] | None:
    # the sequence header OBU's max_frame_width/height (AV1 specification §5.5)
    i = 0
    while i < len(data):
        header = data[i]
        kind = (header >> 3) & 0x0F
        start = i + (2 if header & 0x04 else 1)
        size, value = 0, 0
        for n in range(8):
            byte = data[start + n]
            value |= (byte & 0x7F) << (7 * n)
            if not byte & 0x80:
                size = n + 1
                break
        body = data[start + size : start + size + value]
        i = start + size + value
        if kind != 1:
            continue
        bits = _Bits(body)
        bits.read(3)  # seq_profile
        bits.read(1)  # still_picture
        if bits.read(1):  # reduced_still_picture_header
            bits.read(5)
        else:
            decoder_model = False
            delay_length = 0
            if bits.read(1):  # timing_info_present_flag
                bits.read(64)
                if bits.read(1):  # equal_picture_interval: uvlc
                    zeros = 0
                    while not bits.read(1):
                        zeros += 1
                    bits.read(zeros)
                decoder_model = bool(bits.read(1))
                if decoder_model:
                    delay_length = bits.read(5) + 1
                    bits.read(32 + 5 + 5)
            initial_display_delay = bits.read(1)
            for _ in range(bits.read(5) + 1):
                bits.read(12)
                if bits.read(5) > 7:
                    bits.read(1)
                if decoder_model and bits.read(1):
                    bits.read(2 * delay_length + 1)
                if initial_display_delay and bits.read(1):
                    bits.read(4)
        width_bits = bits.read(4) + 1
        height_bits = bits.read(4) + 1
        return bits.read(width_bits) + 1, bits.read(height_bits) + 1
    return None


def ivf_frame_size(codec: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) from a keyframe's headers, or None when they cannot be read."""
    try:
        if codec == "vp8":
            return _vp8_size(data)
        if codec == "vp9":
            return _vp9_size(data)
        if codec == "av1":
            return _av1_size(data)
    except (ValueError, IndexError):
        return None
    return None


class IvfWriter:
    """An IVF file of VP8, VP9 or AV1 (``codec`` in lower case) with timebase 1/``rate``."""

    def __init__(self, file: BinaryIO, codec: str, rate: int = 90000) -> None:
        self._file = file
        self._codec = codec
        self._fourcc = _FOURCC[codec]
        self._rate = rate
        self._size: tuple[int, int] | None = None
        self._last: int | None = None
        #: frames written
        self.frames = 0
        #: bytes written to the file
        self.bytes = 0
        self._header()

    def _header(self) -> None:
        width, height = self._size or (0, 0)
        self._file.write(
            _IVF_HEADER.pack(
                b"DKIF", 0, 32, self._fourcc, width, height, self._rate, 1, self._length(), 0
            )
        )

    def _length(self) -> int:
        """The header's length field: the duration in timebase units (the last frame's
        timestamp plus one average frame interval), which is how ffmpeg and ffprobe read it
        (libvpx's tools, which call it a frame count, do not rely on it)."""
        if self._last is None or self.frames == 0:
            return 0
        interval = self._last // (self.frames - 1) if self.frames > 1 else 0
        return min(self._last + interval, 0xFFFFFFFF)

    def write(self, pts: int, data: bytes, keyframe: bool) -> None:
        """Append a frame at ``pts`` (timebase units); timestamps are kept increasing."""
        if self._last is not None and pts <= self._last:
            pts = self._last + 1
        self._last = pts
        if keyframe and self._size is None:
            self._size = ivf_frame_size(self._codec, data)
        self._file.write(_IVF_FRAME.pack(len(data), pts))
        self._file.write(data)
        self.frames += 1
        self.bytes += _IVF_FRAME.size + len(data)

    def close(self) -> None:
        """Fill in the picture size and the duration."""
        self._file.seek(0)
        self._header()
        self._file.seek(0, 2)


class AnnexBWriter:
    """A raw H.264 Annex B byte stream: access units one after the other, no timestamps."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.frames = 0
        self.bytes = 0

    def write(self, pts: int, data: bytes, keyframe: bool) -> None:
        self._file.write(data)
        self.frames += 1
        self.bytes += len(data)

    def close(self) -> None:
        pass
