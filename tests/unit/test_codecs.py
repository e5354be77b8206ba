"""Keyframe starts read from codec payload descriptors, with bytes."""

from __future__ import annotations

import struct

import pytest

from relay.rtc.codecs import (
    av1_keyframe_start,
    h264_keyframe_size,
    h264_keyframe_start,
    h264_sps_size,
    keyframe_detector,
    keyframe_size_reader,
    vp8_keyframe_size,
    vp8_keyframe_start,
    vp9_keyframe_start,
)


def packet(payload: bytes, padding: int = 0) -> tuple[bytes, int]:
    """A plain RTP packet around ``payload`` and the offset of its payload."""
    first = 0xA0 if padding else 0x80
    header = struct.pack("!BBHII", first, 96, 1, 1, 1)
    tail = (b"\x00" * (padding - 1) + bytes([padding])) if padding else b""
    return header + payload + tail, len(header)


# VP8 (RFC 7741): descriptor, then the payload header whose bit 0 is P (0: keyframe)
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x10\x00\x9d\x01\x2a", True),  # S=1, PID=0, no extension; P=0
        (b"\x10\x01\x9d\x01\x2a", False),  # P=1: an interframe
        (b"\x00\x00\x9d\x01\x2a", False),  # S=0: a continuation packet of the frame
        (b"\x11\x00", False),  # partition 1 starts here, not the frame
        (b"\x90\x80\x05\x00", True),  # X, I with a 7-bit PictureID
        (b"\x90\x80\x85\x05\x00", True),  # X, I with a 15-bit PictureID (M bit)
        (b"\x90\x80\x85\x05\x01", False),  # same, interframe
        (b"\x90\xe0\x85\x05\x07\x20\x00", True),  # I (15-bit), L (TL0PICIDX), T (TID)
        (b"\x90\x10\x40\x00", True),  # K only: one KEYIDX byte
        (b"\x90\xe0\x85", False),  # truncated descriptor
        (b"\x10", False),  # no payload header
        (b"", False),
    ],
)
def test_vp8(payload: bytes, expected: bool) -> None:
    assert vp8_keyframe_start(*packet(payload)) is expected


def test_vp8_padding_is_not_payload() -> None:
    data, offset = packet(b"\x10", padding=4)  # the payload header would be padding
    assert not vp8_keyframe_start(data, offset)
    data, offset = packet(b"\x10\x00", padding=4)
    assert vp8_keyframe_start(data, offset)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x08", True),  # B=1, P=0, no layer indices
        (b"\x48", False),  # P=1: inter-predicted
        (b"\x00", False),  # B=0: not the start of a frame
        (b"\xa8\x05\x00", True),  # I (7-bit id), L: SID 0
        (b"\xa8\x85\x05\x00", True),  # I (15-bit id), L: SID 0
        (b"\xa8\x05\x02", False),  # SID 1: an upper spatial layer, not where to start
        (b"\xa8\x05", False),  # truncated
        (b"", False),
    ],
)
def test_vp9(payload: bytes, expected: bool) -> None:
    assert vp9_keyframe_start(*packet(payload)) is expected


def _stap_a(*nals: bytes) -> bytes:
    return b"\x18" + b"".join(struct.pack("!H", len(n)) + n for n in nals)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x67\x42\xe0\x1f", True),  # single NAL: SPS
        (b"\x65\x88\x84", True),  # single NAL: IDR slice
        (b"\x41\x9a\x00", False),  # single NAL: non-IDR slice
        (_stap_a(b"\x67\x42\xe0\x1f", b"\x68\xce\x3c\x80"), True),  # SPS + PPS
        (_stap_a(b"\x06\x05\x01", b"\x41\x9a"), False),  # SEI + non-IDR
        (b"\x7c\x85\x88", True),  # FU-A, start fragment of an IDR slice
        (b"\x7c\x05\x88", False),  # FU-A, middle fragment of an IDR slice
        (b"\x7c\x81\x9a", False),  # FU-A, start fragment of a non-IDR slice
        (b"\x18\x00\x09\x67", True),  # STAP-A whose first NAL is an SPS (length overruns)
        (b"\x18\x00", False),  # truncated STAP-A
        (b"", False),
    ],
)
def test_h264(payload: bytes, expected: bool) -> None:
    assert h264_keyframe_start(*packet(payload)) is expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b"\x18\x0a", True), (b"\x10\x0a", False), (b"\x58\x00", True), (b"", False)],
)
def test_av1(payload: bytes, expected: bool) -> None:
    assert av1_keyframe_start(*packet(payload)) is expected


def test_detector_by_codec_name() -> None:
    assert keyframe_detector("VP8") is vp8_keyframe_start
    assert keyframe_detector("h264") is h264_keyframe_start
    assert keyframe_detector("VP9") is vp9_keyframe_start
    assert keyframe_detector("AV1") is av1_keyframe_start
    assert keyframe_detector("opus") is None


# -- picture sizes from H.264 sequence parameter sets ---------------------------------------
#: x264, High profile, 1920x1080 (68 macroblock rows cropped by 8 lines), with an emulation
#: prevention byte (00 00 03) inside
SPS_1080P = bytes.fromhex(
    "6764002 8acd940780227e5c04400000300040000 0300f03c60c658".replace(" ", "")
)
#: Constrained Baseline as browsers send it, 640x480
SPS_480P = bytes.fromhex("6742c01f8c8d40501ed00f08846a")
PPS = bytes.fromhex("68ce3c80")


def stap_a(*units: bytes) -> bytes:
    return b"\x18" + b"".join(struct.pack("!H", len(u)) + u for u in units)


def test_h264_sps_gives_the_cropped_picture_size() -> None:
    assert h264_sps_size(SPS_1080P) == (1920, 1080)
    assert h264_sps_size(SPS_480P) == (640, 480)


def test_h264_keyframe_size_reads_the_sps_alone_or_in_a_stap_a() -> None:
    assert h264_keyframe_size(*packet(SPS_480P)) == (640, 480)
    assert h264_keyframe_size(*packet(stap_a(SPS_1080P, PPS, b"\x65\x88\x80"))) == (1920, 1080)
    assert h264_keyframe_size(*packet(stap_a(PPS, SPS_480P))) == (640, 480)
    # anything else, or a truncated SPS: no size
    assert h264_keyframe_size(*packet(b"\x65\x88\x80\x00")) is None
    assert h264_keyframe_size(*packet(b"\x7c\x87" + SPS_480P[1:])) is None  # FU-A
    assert h264_keyframe_size(*packet(SPS_480P[:6])) is None
    assert h264_keyframe_size(*packet(stap_a(PPS) + b"\x00\x40" + SPS_480P)) is None
    assert keyframe_size_reader("H264") is h264_keyframe_size
    assert keyframe_size_reader("VP8") is vp8_keyframe_size
    assert keyframe_size_reader("opus") is None
