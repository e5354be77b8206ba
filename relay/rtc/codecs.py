"""Codec payload descriptors, read only as far as forwarding needs: where a keyframe starts.

A subscription starts (and a source switch takes effect) on the first packet of a keyframe, so
that a subscriber's decoder never gets a picture it cannot decode and its numbering has no gap.
Each function looks at the RTP payload descriptor (RFC 7741 VP8, RFC 9628 VP9, RFC 6184 H.264,
the AV1 RTP specification's aggregation header) and, for VP8, the first byte of the payload
header; never at the picture itself. The descriptors stay in the clear under end-to-end
encryption, which leaves the codec header bytes the SFU needs unencrypted.

Every function takes the plain RTP packet and the offset of its payload, and returns whether
that packet is the first packet of a keyframe. Malformed or truncated payloads give False.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.rtc.vp8 import Vp8Error, parse_vp8

__all__ = [
    "KeyframeStart",
    "av1_keyframe_start",
    "h264_keyframe_size",
    "h264_keyframe_start",
    "keyframe_detector",
    "keyframe_size_reader",
    "vp8_keyframe_size",
    "vp8_keyframe_start",
    "vp9_keyframe_start",
]

KeyframeStart = Callable[[bytes, int], bool]

# H.264 NAL unit types (RFC 6184 §5.2 and H.264 Table 7-1)
_NAL_IDR = 5
_NAL_SPS = 7
_NAL_STAP_A = 24
_NAL_FU_A = 28


def _payload_end(packet: bytes) -> int:
    """End of the payload: the packet's length less its RTP padding (P bit)."""
    if packet[0] & 0x20:
        return len(packet) - packet[-1]
    return len(packet)


def vp8_keyframe_start(packet: bytes, offset: int) -> bool:
    """First packet of a VP8 keyframe: S=1 and PID=0 in the payload descriptor, and the
    inverse key-frame flag P=0 in the payload header (RFC 7741 §4.2, §4.3)."""
    end = _payload_end(packet)
    if offset >= end:
        return False
    first = packet[offset]
    if first & 0x17 != 0x10:  # S set, partition index 0
        return False
    i = offset + 1
    if first & 0x80:  # X: extension byte follows
        if i >= end:
            return False
        ext = packet[i]
        i += 1
        if ext & 0x80:  # I: PictureID, 7 or 15 bits
            if i >= end:
                return False
            i += 2 if packet[i] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            i += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX byte
            i += 1
    return i < end and not packet[i] & 0x01


def vp8_keyframe_size(packet: bytes, offset: int) -> tuple[int, int] | None:
    """(width, height) of a VP8 keyframe from the first packet of its partition 0: the
    keyframe header after the 3-byte frame tag is the start code 9d 01 2a and two 16-bit
    little-endian fields whose low 14 bits are the size (RFC 6386 §9.1). None for any other
    packet."""
    try:
        desc = parse_vp8(packet, offset)
    except Vp8Error:
        return None
    i = offset + desc.size
    if not desc.keyframe or i + 10 > _payload_end(packet):
        return None
    if packet[i + 3 : i + 6] != b"\x9d\x01\x2a":
        return None
    width = (packet[i + 6] | packet[i + 7] << 8) & 0x3FFF
    height = (packet[i + 8] | packet[i + 9] << 8) & 0x3FFF
    return width, height


def vp9_keyframe_start(packet: bytes, offset: int) -> bool:
    """First packet of a VP9 keyframe: B=1 (start of a frame) and P=0 (not inter-predicted),
    of spatial layer 0 when layer indices are present (RFC 9628 §4.2)."""
    end = _payload_end(packet)
    if offset >= end:
        return False
    first = packet[offset]
    if first & 0x48 != 0x08:  # B set, P clear
        return False
    if not first & 0x20:  # L: no layer indices, a single spatial layer
        return True
    i = offset + 1
    if first & 0x80:  # I: picture ID, 7 or 15 bits
        if i >= end:
            return False
        i += 2 if packet[i] & 0x80 else 1
    if i >= end:
        return False
    return (packet[i] >> 1) & 0x07 == 0  # SID


def h264_keyframe_start(packet: bytes, offset: int) -> bool:
    """First packet of an H.264 IDR access unit: a single SPS or IDR NAL unit, a STAP-A that
    holds one, or the start fragment of an FU-A of one (RFC 6184 §5.6-5.8)."""
    end = _payload_end(packet)
    if offset >= end:
        return False
    nal = packet[offset] & 0x1F
    if nal == _NAL_SPS or nal == _NAL_IDR:
        return True
    if nal == _NAL_STAP_A:
        i = offset + 1
        while i + 2 < end:
            size = (packet[i] << 8) | packet[i + 1]
            inner = packet[i + 2] & 0x1F
            if inner == _NAL_SPS or inner == _NAL_IDR:
                return True
            i += 2 + size
        return False
    if nal == _NAL_FU_A and offset + 1 < end:
        header = packet[offset + 1]
        return bool(header & 0x80) and (header & 0x1F) in (_NAL_SPS, _NAL_IDR)
    return False


class _Bits:
    """A reader of an RBSP: bits MSB first, Exp-Golomb codes (H.264 §9.1)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def bit(self) -> int:
        byte = self.pos >> 3
        if byte >= len(self.data):
            raise ValueError("SPS ends early")
        value = (self.data[byte] >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return value

    def bits(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = value << 1 | self.bit()
        return value

    def ue(self) -> int:
        zeros = 0
        while not self.bit():
            zeros += 1
            if zeros > 31:
                raise ValueError("Exp-Golomb code too long")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


#: profile_idc values whose SPS carries chroma format, bit depths and scaling matrices
_HIGH_PROFILES = frozenset((100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135))


def h264_sps_size(nal: bytes) -> tuple[int, int]:
    """(width, height) of the cropped picture a sequence parameter set NAL unit describes
    (H.264 §7.3.2.1.1, §7.4.2.1.1); ValueError when it is malformed."""
    rbsp = nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")  # emulation prevention bytes
    r = _Bits(rbsp)
    profile = r.bits(8)
    r.bits(16)  # constraint flags, level_idc
    r.ue()  # seq_parameter_set_id
    chroma_format = 1
    if profile in _HIGH_PROFILES:
        chroma_format = r.ue()
        if chroma_format > 3:
            raise ValueError("chroma_format_idc out of range")
        if chroma_format == 3:
            r.bit()  # separate_colour_plane_flag
        r.ue()  # bit_depth_luma_minus8
        r.ue()  # bit_depth_chroma_minus8
        r.bit()  # qpprime_y_zero_transform_bypass_flag
        if r.bit():  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format != 3 else 12):
                if r.bit():  # this scaling list is present: skip it
                    last = following = 8
                    for _ in range(16 if i < 6 else 64):
                        if following:
                            following = (last + r.se() + 256) % 256
                        last = following or last
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        r.bit()
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.bit()  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = r.bit()
    if not frame_mbs_only:
        r.bit()  # mb_adaptive_frame_field_flag
    r.bit()  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = (2 - frame_mbs_only) * height_units * 16
    if r.bit():  # frame_cropping_flag
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        sub_width, sub_height = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}[chroma_format]
        width -= sub_width * (left + right)
        height -= sub_height * (2 - frame_mbs_only) * (top + bottom)
    if width <= 0 or height <= 0:
        raise ValueError("SPS crops the whole picture")
    return width, height


def h264_keyframe_size(packet: bytes, offset: int) -> tuple[int, int] | None:
    """(width, height) from the sequence parameter set a packet carries, alone or in a STAP-A
    (browsers send SPS and PPS ahead of every IDR picture); None for any other packet."""
    end = _payload_end(packet)
    if offset >= end:
        return None
    nal = packet[offset] & 0x1F
    units: list[bytes] = []
    if nal == _NAL_SPS:
        units.append(packet[offset:end])
    elif nal == _NAL_STAP_A:
        i = offset + 1
        while i + 2 < end:
            size = (packet[i] << 8) | packet[i + 1]
            if i + 2 + size > end:
                break
            if packet[i + 2] & 0x1F == _NAL_SPS:
                units.append(packet[i + 2 : i + 2 + size])
                break
            i += 2 + size
    for unit in units:
        try:
            return h264_sps_size(unit)
        except (ValueError, KeyError):
            return None
    return None


def av1_keyframe_start(packet: bytes, offset: int) -> bool:
    """First packet of a new AV1 coded video sequence (a keyframe): N=1 in the aggregation
    header (AV1 RTP specification §4.4)."""
    return offset < _payload_end(packet) and bool(packet[offset] & 0x08)


_DETECTORS: dict[str, KeyframeStart] = {
    "vp8": vp8_keyframe_start,
    "vp9": vp9_keyframe_start,
    "h264": h264_keyframe_start,
    "av1": av1_keyframe_start,
}


KeyframeSize = Callable[[bytes, int], "tuple[int, int] | None"]

_SIZE_READERS: dict[str, KeyframeSize] = {
    "vp8": vp8_keyframe_size,
    "h264": h264_keyframe_size,
}


def keyframe_size_reader(codec_name: str) -> KeyframeSize | None:
    """The reader of the picture size a keyframe's first packet announces, for the codecs
    whose payloads say it where forwarding can see it (VP8's keyframe header, H.264's SPS),
    else None."""
    return _SIZE_READERS.get(codec_name.lower())


def keyframe_detector(codec_name: str) -> KeyframeStart | None:
    """The keyframe-start test of a video codec (by its rtpmap name), or None (audio, or a
    codec the relay cannot read: any newest packet is a good start)."""
    return _DETECTORS.get(codec_name.lower())
