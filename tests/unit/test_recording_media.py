"""The media side of recording: depacketizers (bytes in, frames out), the container writers,
and the writer thread, checked by reading the files back with PyAV.

PyAV and aiortc are used here only: the relay's own recording code never decodes.
"""

from __future__ import annotations

import asyncio
import fractions
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from relay.recording.containers import OggOpusWriter, ogg_crc, opus_samples
from relay.recording.depacketize import (
    Av1Depacketizer,
    Frame,
    H264Depacketizer,
    OpusDepacketizer,
    Vp8Depacketizer,
    Vp9Depacketizer,
    leb128,
)
from relay.recording.writer import RecordingWriter

SSRC = 0x1234


def rtp(seq: int, ts: int, payload: bytes, marker: bool = False, pt: int = 96) -> bytes:
    """An RTP packet with a 12-byte header."""
    header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts, SSRC)
    return header + payload


class Feed:
    """Pushes payloads into a depacketizer as RTP packets and collects the frames."""

    def __init__(self, depacketizer, seq: int = 65530) -> None:
        self.d = depacketizer
        self.seq = seq
        self.frames: list[Frame] = []

    def send(self, ts: int, payload: bytes, marker: bool = False, skip: bool = False) -> int:
        seq = self.seq & 0xFFFF
        self.seq += 1
        if not skip:
            self.frames += self.d.push(rtp(seq, ts, payload, marker), 12, seq, ts, ts / 90000)
        return seq

    def flush(self) -> list[Frame]:
        self.frames += self.d.flush()
        return self.frames


# -- VP8 (RFC 7741) ----------------------------------------------------------------------------


# descriptor: X=1 S=1 PID=0 / I=1 / M=1 PictureID (15 bits)
def vp8_desc(start: bool, picture_id: int) -> bytes:
    return bytes((0x90 if start else 0x80, 0x80, 0x80 | picture_id >> 8, picture_id & 0xFF))


VP8_KEY_HEADER = b"\x10\x02\x00\x9d\x01\x2a\x40\x01\xf0\x00"  # P=0, 320x240
VP8_DELTA_HEADER = b"\x31\x01\x00"  # P=1


def test_vp8_fragmented_keyframe_and_delta_frame() -> None:
    feed = Feed(Vp8Depacketizer())
    feed.send(3000, vp8_desc(True, 7) + VP8_KEY_HEADER + b"AAAA")
    feed.send(3000, vp8_desc(False, 7) + b"BBBB")  # sequence number wraps here
    feed.send(3000, vp8_desc(False, 7) + b"CCCC", marker=True)
    feed.send(6000, vp8_desc(True, 8) + VP8_DELTA_HEADER + b"DD", marker=True)
    frames = feed.flush()
    assert [(f.ts, f.keyframe) for f in frames] == [(3000, True), (6000, False)]
    assert frames[0].data == VP8_KEY_HEADER + b"AAAABBBBCCCC"
    assert frames[1].data == VP8_DELTA_HEADER + b"DD"
    assert feed.d.lost_frames == 0


def test_vp8_starts_at_a_keyframe() -> None:
    feed = Feed(Vp8Depacketizer())
    feed.send(3000, vp8_desc(True, 7) + VP8_DELTA_HEADER, marker=True)
    feed.send(6000, vp8_desc(True, 8) + VP8_KEY_HEADER, marker=True)
    frames = feed.flush()
    assert [f.ts for f in frames] == [6000]
    assert feed.d.skipped_frames == 1


def test_vp8_lost_middle_packet_drops_the_frame_until_the_next_keyframe() -> None:
    feed = Feed(Vp8Depacketizer())
    feed.send(3000, vp8_desc(True, 1) + VP8_KEY_HEADER, marker=True)
    feed.send(6000, vp8_desc(True, 2) + VP8_DELTA_HEADER + b"x")
    feed.send(6000, vp8_desc(False, 2) + b"lost", skip=True)
    feed.send(6000, vp8_desc(False, 2) + b"z", marker=True)
    feed.send(9000, vp8_desc(True, 3) + VP8_DELTA_HEADER, marker=True)  # references the lost one
    feed.send(12000, vp8_desc(True, 4) + VP8_KEY_HEADER, marker=True)
    frames = feed.flush()
    assert [f.ts for f in frames] == [3000, 12000]
    assert (feed.d.lost_frames, feed.d.skipped_frames, feed.d.lost_packets) == (1, 1, 1)


def test_vp8_reordered_packets_are_put_back_in_order() -> None:
    d = Vp8Depacketizer()
    parts = [
        (10, vp8_desc(True, 1) + VP8_KEY_HEADER + b"1", False),
        (11, vp8_desc(False, 1) + b"2", False),
        (12, vp8_desc(False, 1) + b"3", True),
    ]
    frames: list[Frame] = []
    for seq, payload, marker in (parts[0], parts[2], parts[1]):
        frames += d.push(rtp(seq, 90, payload, marker), 12, seq, 90, 0.0)
    assert [f.data for f in frames] == [VP8_KEY_HEADER + b"123"]
    assert d.lost_frames == 0


def test_vp8_whole_frame_lost_between_frames_waits_for_a_keyframe() -> None:
    feed = Feed(Vp8Depacketizer())
    feed.send(3000, vp8_desc(True, 1) + VP8_KEY_HEADER, marker=True)
    feed.send(6000, vp8_desc(True, 2) + VP8_DELTA_HEADER, marker=True, skip=True)
    feed.send(9000, vp8_desc(True, 3) + VP8_DELTA_HEADER, marker=True)
    frames = feed.flush()  # the gap is given up at the end of the stream
    assert [f.ts for f in frames] == [3000]
    assert feed.d.lost_frames == 1 and feed.d.skipped_frames == 1


def test_frame_without_marker_ends_at_the_next_timestamp_when_nothing_was_lost() -> None:
    feed = Feed(Vp8Depacketizer())
    feed.send(3000, vp8_desc(True, 1) + VP8_KEY_HEADER + b"a")
    feed.send(3000, vp8_desc(False, 1) + b"b")  # the last packet, but no marker
    feed.send(6000, vp8_desc(True, 2) + VP8_DELTA_HEADER + b"c")
    feed.send(6000, vp8_desc(False, 2) + b"d", skip=True)
    feed.send(9000, vp8_desc(True, 3) + VP8_KEY_HEADER, marker=True)
    frames = feed.flush()
    assert [f.data for f in frames] == [VP8_KEY_HEADER + b"ab", VP8_KEY_HEADER]
    assert feed.d.lost_frames == 1


def test_vp8_sender_restarting_its_sequence_numbers_goes_on_at_its_keyframe() -> None:
    feed = Feed(Vp8Depacketizer(), seq=30000)
    feed.send(3000, vp8_desc(True, 1) + VP8_KEY_HEADER, marker=True)
    feed.send(6000, vp8_desc(True, 2) + VP8_DELTA_HEADER, marker=True)
    feed.seq = 100  # a new source: far behind, not late
    feed.send(9000, vp8_desc(True, 1) + VP8_KEY_HEADER, marker=True)
    feed.send(12000, vp8_desc(True, 2) + VP8_DELTA_HEADER, marker=True)
    frames = feed.flush()
    assert [f.ts for f in frames] == [3000, 6000, 9000, 12000]
    assert feed.d.late == 0


def test_vp8_late_duplicate_is_ignored() -> None:
    d = Vp8Depacketizer()
    key = rtp(7, 90, vp8_desc(True, 1) + VP8_KEY_HEADER, marker=True)
    assert len(d.push(key, 12, 7, 90, 0.0)) == 1
    assert d.push(key, 12, 7, 90, 0.0) == []  # a retransmission after the frame was written
    assert d.late == 1 and d.frames == 1


# -- VP9 (RFC 9628) ----------------------------------------------------------------------------


def test_vp9_non_layered_frame_over_two_packets() -> None:
    feed = Feed(Vp9Depacketizer())
    # I=1 (7-bit PictureID), B=1 / E=1; P=0 on the keyframe, P=1 after
    feed.send(900, bytes((0x88, 5)) + b"key-")
    feed.send(900, bytes((0x84, 5)) + b"frame", marker=True)
    feed.send(1800, bytes((0xCC, 6)) + b"delta", marker=True)
    frames = feed.flush()
    assert [(f.data, f.keyframe) for f in frames] == [(b"key-frame", True), (b"delta", False)]


def test_vp9_spatial_layers_become_a_superframe() -> None:
    feed = Feed(Vp9Depacketizer())
    # I=1, L=1, B/E; layer octet TID|U|SID|D, TL0PICIDX
    feed.send(900, bytes((0xAC, 5, 0x00, 0)) + b"S0" * 150)  # SID 0, 300 bytes
    feed.send(900, bytes((0xA8, 5, 0x03, 0)) + b"S1-")  # SID 1, D=1
    feed.send(900, bytes((0xA4, 5, 0x03, 0)) + b"end", marker=True)
    frames = feed.flush()
    assert len(frames) == 1 and frames[0].keyframe
    data = frames[0].data
    layer0, layer1 = b"S0" * 150, b"S1-end"
    # index: marker 110 MM NNN (2 bytes per size, 2 frames), sizes little-endian, marker again
    assert data == layer0 + layer1 + bytes((0xC9,)) + struct.pack("<HH", 300, 6) + bytes((0xC9,))


def test_vp9_missing_layer_end_drops_the_picture() -> None:
    feed = Feed(Vp9Depacketizer())
    feed.send(900, bytes((0x88, 5)) + b"a")
    feed.send(900, bytes((0x80, 5)) + b"b", skip=True)
    feed.send(900, bytes((0x84, 5)) + b"c", marker=True)
    assert feed.flush() == [] and feed.d.lost_frames == 1


# -- H.264 (RFC 6184) --------------------------------------------------------------------------

SPS = b"\x67\x42\xc0\x1e\xda\x02\x80\xbf\xe5\x84"
PPS = b"\x68\xce\x3c\x80"
IDR = b"\x65\x88\x84" + bytes(range(40))
SLICE = b"\x41\x9a\x02\x03"


def stap_a(*nals: bytes) -> bytes:
    return b"\x78" + b"".join(struct.pack("!H", len(n)) + n for n in nals)


def fu_a(nal: bytes, pieces: int) -> list[bytes]:
    body = nal[1:]
    step = -(-len(body) // pieces)
    out = []
    for i in range(pieces):
        header = nal[0] & 0x1F | (0x80 if i == 0 else 0) | (0x40 if i == pieces - 1 else 0)
        out.append(bytes(((nal[0] & 0xE0) | 28, header)) + body[i * step : (i + 1) * step])
    return out


def annexb(*nals: bytes) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + n for n in nals)


def test_h264_stap_a_and_fu_a_make_annex_b_access_units() -> None:
    feed = Feed(H264Depacketizer())
    feed.send(3000, stap_a(SPS, PPS))
    for i, piece in enumerate(fu_a(IDR, 3)):
        feed.send(3000, piece, marker=i == 2)
    feed.send(6000, SLICE, marker=True)  # single NAL unit packet
    frames = feed.flush()
    assert [(f.data, f.keyframe) for f in frames] == [
        (annexb(SPS, PPS, IDR), True),
        (annexb(SLICE), False),
    ]


def test_h264_fu_a_with_a_lost_fragment_is_dropped_and_sps_pps_are_kept_for_the_idr() -> None:
    feed = Feed(H264Depacketizer())
    feed.send(3000, stap_a(SPS, PPS, IDR), marker=True)
    pieces = fu_a(SLICE + bytes(30), 3)
    feed.send(6000, pieces[0])
    feed.send(6000, pieces[1], skip=True)
    feed.send(6000, pieces[2], marker=True)
    feed.send(9000, SLICE, marker=True)  # skipped: waits for an IDR
    feed.send(12000, IDR, marker=True)  # an IDR without parameter sets gets the last ones
    frames = feed.flush()
    assert [f.data for f in frames] == [annexb(SPS, PPS, IDR), annexb(SPS, PPS, IDR)]
    assert (feed.d.lost_frames, feed.d.skipped_frames) == (1, 1)


def test_h264_fu_a_without_its_start_is_not_a_frame() -> None:
    feed = Feed(H264Depacketizer())
    feed.send(3000, stap_a(SPS, PPS, IDR), marker=True)
    pieces = fu_a(SLICE + bytes(30), 2)
    feed.send(6000, pieces[0], skip=True)
    feed.send(6000, pieces[1], marker=True)
    frames = feed.flush()
    assert len(frames) == 1 and feed.d.lost_frames == 1


# -- AV1 (RTP payload format for AV1) ----------------------------------------------------------

# OBU headers without size field: sequence header (type 1), frame (type 6)
SEQ_OBU = bytes((1 << 3,)) + b"\x00\x00\x00\x0a\x0b\x0c"
FRAME_OBU = bytes((6 << 3,)) + bytes(range(100))
DELTA_OBU = bytes((6 << 3,)) + b"\x31\x32"


def sized(obu: bytes) -> bytes:
    """The OBU with obu_has_size_field set and its size."""
    return bytes((obu[0] | 0x02,)) + leb128(len(obu) - 1) + obu[1:]


def test_av1_fragmented_obu_becomes_a_temporal_unit_with_sizes() -> None:
    feed = Feed(Av1Depacketizer())
    # Z=0 Y=1 W=2 N=1: the sequence header (with its length), the frame's first part
    feed.send(3000, bytes((0x68,)) + leb128(len(SEQ_OBU)) + SEQ_OBU + FRAME_OBU[:40])
    # Z=1 Y=1 W=1: a middle part
    feed.send(3000, bytes((0xD0,)) + FRAME_OBU[40:70])
    # Z=1 Y=0 W=1: the last part
    feed.send(3000, bytes((0x90,)) + FRAME_OBU[70:], marker=True)
    # W=0: every element has a length; a temporal delimiter is dropped (the writer adds one)
    td = bytes((2 << 3,))
    feed.send(6000, bytes((0x00,)) + leb128(1) + td + leb128(3) + DELTA_OBU, marker=True)
    frames = feed.flush()
    assert [(f.data, f.keyframe) for f in frames] == [
        (b"\x12\x00" + sized(SEQ_OBU) + sized(FRAME_OBU), True),
        (b"\x12\x00" + sized(DELTA_OBU), False),
    ]


def test_av1_lost_fragment_drops_the_temporal_unit() -> None:
    feed = Feed(Av1Depacketizer())
    feed.send(3000, bytes((0x68,)) + leb128(len(SEQ_OBU)) + SEQ_OBU + FRAME_OBU[:40])
    feed.send(3000, bytes((0xD0,)) + FRAME_OBU[40:70], skip=True)
    feed.send(3000, bytes((0x90,)) + FRAME_OBU[70:], marker=True)
    feed.send(6000, bytes((0x10,)) + DELTA_OBU, marker=True)  # waits for a keyframe
    assert feed.flush() == []
    assert (feed.d.lost_frames, feed.d.skipped_frames) == (1, 1)


# -- Opus and Ogg ------------------------------------------------------------------------------


def crc_by_the_book(data: bytes) -> int:
    """RFC 3533's CRC, bit by bit: polynomial 0x04C11DB7, MSB first, initial 0, no final XOR."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def test_ogg_crc_known_values() -> None:
    assert crc_by_the_book(b"123456789") == 0x89A1897F  # the check value of this CRC
    assert ogg_crc(b"123456789") == 0x89A1897F
    page = bytes(range(256)) * 17 + b"OggS"
    assert ogg_crc(page) == crc_by_the_book(page)


def test_ogg_pages_carry_a_valid_crc(tmp_path: Path) -> None:
    path = tmp_path / "a.ogg"
    with open(path, "wb") as f:
        w = OggOpusWriter(f, 2)
        for i in range(120):
            w.write(i * 960, b"\xfc" + bytes(range(i % 50 + 10)))  # 20 ms CELT FB packets
        w.close()
    data = path.read_bytes()
    pages = 0
    i = 0
    while i < len(data):
        assert data[i : i + 4] == b"OggS"
        count = data[i + 26]
        size = 27 + count + sum(data[i + 27 : i + 27 + count])
        page = data[i : i + size]
        zeroed = page[:22] + b"\0\0\0\0" + page[26:]
        assert int.from_bytes(page[22:26], "little") == crc_by_the_book(zeroed)
        i += size
        pages += 1
    assert pages >= 4  # OpusHead, OpusTags, the audio, the end of stream
    assert data[5] == 0x02 and data[i - size + 5] & 0x04  # BOS first, EOS last
    assert int.from_bytes(data[i - size + 6 : i - size + 14], "little") == 120 * 960


def test_opus_packet_durations() -> None:
    assert opus_samples(b"\xfc") == 960  # config 31 (CELT FB 20 ms), code 0
    assert opus_samples(b"\x78") == 960  # config 15 (hybrid FB 20 ms)
    assert opus_samples(b"\x11\x00") == 1920 * 2  # SILK NB 40 ms, code 1 (two frames)
    assert opus_samples(b"\x0b\x02") == 960 * 2  # SILK NB 20 ms, code 3, two frames
    assert opus_samples(b"\x1b\x03") is None  # three 60 ms frames: more than 120 ms
    assert opus_samples(b"\x03\x00") is None  # code 3 with no frames
    assert opus_samples(b"") is None


def test_opus_depacketizer_one_frame_per_packet_and_counts_loss() -> None:
    d = OpusDepacketizer()
    frames: list[Frame] = []
    for seq in (1, 2, 4, 5):
        frames += d.push(rtp(seq, seq * 960, b"\xfc\x01", pt=111), 12, seq, seq * 960, 0.0)
    frames += d.flush()
    assert [f.ts for f in frames] == [960, 1920, 3840, 4800]
    assert d.lost_packets == 1


# -- end to end: aiortc's encoders, our writer, PyAV reads the files ----------------------------

COLOUR = (40, 160, 220)  # RGB of the test picture
FPS = 30


def encode_video(
    codec: str, seconds: float = 3.0, noise_rows: int = 0, keyframes: tuple[int, ...] = ()
) -> list[list[tuple[bytes, int]]]:
    """Frames of a ``COLOUR`` picture (with ``noise_rows`` rows of fresh noise on top),
    encoded and packetized by aiortc: per frame, a list of (payload, timestamp)."""
    params = RTCRtpCodecParameters(mimeType=f"video/{codec}", clockRate=90000, payloadType=96)
    encoder = get_encoder(params)
    rng = np.random.default_rng(7)
    out = []
    for i in range(int(seconds * FPS)):
        image = np.empty((240, 320, 3), np.uint8)
        image[:] = COLOUR
        if noise_rows:
            image[:noise_rows] = rng.integers(0, 256, (noise_rows, 320, 3), np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i * 90000 // FPS
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(frame, force_keyframe=i in keyframes)
        out.append([(p, ts) for p in payloads])
    return out


def encode_opus(seconds: float = 3.0) -> list[tuple[bytes, int]]:
    """A 440 Hz tone, 20 ms Opus packets by aiortc's encoder: (payload, timestamp)."""
    params = RTCRtpCodecParameters(
        mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111
    )
    encoder = get_encoder(params)
    out = []
    for i in range(int(seconds * 50)):
        t = (np.arange(960) + i * 960) / 48000
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone, 2).reshape(1, -1), "s16", "stereo")
        frame.sample_rate = 48000
        frame.pts = i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        payloads, ts = encoder.encode(frame)
        out += [(p, ts) for p in payloads]
    return out


def feed_video(track, frames, ts_base: int = 123456, seq: int = 4000, drop=()) -> int:
    """RTP packets of encoded frames into a track file (marker on each frame's last packet;
    ``drop``: (frame index, packet index) pairs not sent). The number of packets made."""
    n = 0
    for i, packets in enumerate(frames):
        for j, (payload, ts) in enumerate(packets):
            ts = (ts + ts_base) & 0xFFFFFFFF
            if (i, j) not in drop:
                data = rtp(seq, ts, payload, marker=j == len(packets) - 1)
                track.packet(data, 12, seq & 0xFFFF, ts, 1000.0 + i / FPS)
            seq += 1
            n += 1
    return n


def feed_audio(track, packets, ts_base: int = 0xFFFF0000, skip: range = range(0)) -> None:
    for i, (payload, ts) in enumerate(packets):
        if i in skip:
            continue
        ts = (ts + ts_base) & 0xFFFFFFFF  # wraps
        track.packet(rtp(i, ts, payload, pt=111), 12, i, ts, 1000.0 + i * 0.02)


def read_video(path: str) -> tuple[str, list, list[bool], float]:
    """codec name, decoded frames (rgb arrays), keyframe flags of the packets, and the
    duration from the frames' timestamps (last - first + one frame interval)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        name = stream.codec_context.name
        keys = []
        pts = []
        images = []
        for packet in container.demux(stream):
            if packet.size:  # (the last, empty packet flushes the decoder)
                keys.append(packet.is_keyframe)
                if packet.pts is not None:
                    pts.append(float(packet.pts * stream.time_base))
            for frame in packet.decode():
                images.append(frame.to_ndarray(format="rgb24"))
    duration = pts[-1] - pts[0] + 1 / FPS if pts else 0.0
    return name, images, keys, duration


def assert_colour(image: np.ndarray, top: int = 0) -> None:
    mean = image[top + 8 :].reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(mean - np.array(COLOUR)) < 20), mean


def make_writer(**kw) -> tuple[RecordingWriter, list[tuple[str, str]]]:
    failures: list[tuple[str, str]] = []
    kw.setdefault("queue_packets", 4096)
    kw.setdefault("min_free_bytes", 0)
    writer = RecordingWriter(on_failure=lambda p, r: failures.append((p, r)), **kw)
    return writer, failures


def test_vp8_and_opus_end_to_end(tmp_path: Path) -> None:
    writer, failures = make_writer()
    video = writer.open_track(str(tmp_path / "rec" / "p1-video"), "video", "VP8", 90000)
    audio = writer.open_track(str(tmp_path / "rec" / "p1-audio"), "audio", "opus", 48000)
    assert video.path.endswith("p1-video.ivf") and video.container == "ivf"
    assert audio.path.endswith("p1-audio.ogg") and audio.container == "ogg"
    feed_video(video, encode_video("VP8"))
    feed_audio(audio, encode_opus())
    video.close()
    audio.close()
    writer.close()
    assert failures == []

    name, images, keys, duration = read_video(video.path)
    assert name == "vp8"
    assert keys[0] is True
    assert len(images) == 90
    assert abs(duration - 3.0) < 0.3
    assert_colour(images[0])
    assert_colour(images[-1])
    info = video.info()
    assert info["frames"] == 90 and info["state"] == "closed" and info["first_ts"] == 123456

    with av.open(audio.path) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus"
        assert container.duration is not None
        assert abs(container.duration / 1e6 - 3.0) < 0.3
        samples = sum(frame.samples for frame in container.decode(stream))
    assert abs(samples / 48000 - 3.0) < 0.3
    assert audio.info()["frames"] == 150

    mode = stat.S_IMODE(os.stat(video.path).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "rec").st_mode) & 0o077 == 0


def test_h264_end_to_end(tmp_path: Path) -> None:
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "h"), "video", "h264", 90000)
    assert track.path.endswith("h.h264")
    feed_video(track, encode_video("H264", noise_rows=32))
    track.close()
    writer.close()
    assert failures == []
    name, images, keys, _ = read_video(track.path)
    assert name == "h264"
    assert keys[0] is True
    assert len(images) == 90  # raw H.264 has no timestamps: count the frames
    assert_colour(images[0], top=32)
    assert_colour(images[-1], top=32)


def test_opus_gap_keeps_the_duration(tmp_path: Path) -> None:
    """A second of lost packets (or DTX) still lasts a second in the file."""
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "a"), "audio", "opus", 48000)
    feed_audio(track, encode_opus(), skip=range(50, 100))
    track.close()
    writer.close()
    with av.open(track.path) as container:
        assert container.duration is not None
        assert abs(container.duration / 1e6 - 3.0) < 0.3
        samples = sum(f.samples for f in container.decode(container.streams.audio[0]))
    assert abs(samples / 48000 - 3.0) < 0.3
    info = track.info()
    assert info["frames"] == 100 and abs(info["duration"] - 3.0) < 0.05


def test_lost_packet_mid_frame_does_not_corrupt_the_file(tmp_path: Path) -> None:
    frames = encode_video("VP8", noise_rows=120, keyframes=(45,))
    assert len(frames[20]) >= 3  # a frame of several packets
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "v"), "video", "vp8", 90000)
    feed_video(track, frames, drop={(20, 1)})
    track.close()
    writer.close()
    info = track.info()
    # frame 20 is lost, 21..44 reference it and are skipped, 45 is a keyframe
    assert (info["lost_frames"], info["skipped_frames"], info["frames"]) == (1, 24, 65)
    name, images, keys, duration = read_video(track.path)
    assert len(images) == 65 and keys[0]
    assert keys[20] is True  # the file goes on at the keyframe
    assert abs(duration - 3.0) < 0.3
    assert_colour(images[30], top=120)


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    writer, failures = make_writer(queue_packets=16)
    track = writer.open_track(str(tmp_path / "a"), "audio", "opus", 48000)
    release = threading.Event()
    real_open = track._open

    def slow_open() -> None:  # the writer thread stalls on the disk
        release.wait(10)
        real_open()

    track._open = slow_open  # type: ignore[method-assign]
    packets = encode_opus(2.0)
    feed_audio(track, packets[:1])
    deadline = time.monotonic() + 5
    while writer._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)  # until the thread took it and stalls
    started = time.monotonic()
    feed_audio(track, packets)
    elapsed = time.monotonic() - started
    release.set()
    track.close()
    writer.close()
    assert elapsed < 1.0
    # the thread took the first packet and stalled; 16 waited in the queue; the rest dropped
    assert track.dropped == writer.dropped == len(packets) + 1 - 17
    assert track.info()["packets"] == 17 and track.info()["dropped"] == len(packets) + 1 - 17


async def test_disk_full_reports_on_the_loop_and_leaves_a_readable_file(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    reported: list[tuple[str, str, bool]] = []
    done = asyncio.Event()

    def on_failure(path: str, reason: str) -> None:
        reported.append((path, reason, threading.current_thread() is threading.main_thread()))
        done.set()

    writer = RecordingWriter(16, 0, on_failure, loop)
    track = writer.open_track(str(tmp_path / "v"), "video", "vp8", 90000)
    frames = encode_video("VP8", seconds=2.0)
    feed_video(track, frames[:30])  # one second is written
    await asyncio.sleep(0.7)  # past the next check of the free space
    writer.min_free_bytes = 1 << 62  # more than any disk has
    feed_video(track, frames[30:], seq=4000 + sum(len(f) for f in frames[:30]))
    await asyncio.wait_for(done.wait(), 5)
    writer.close()
    assert reported == [(track.path, "disk_full", True)]
    assert track.info()["state"] == "failed" and track.info()["failure"] == "disk_full"
    name, images, keys, duration = read_video(track.path)
    assert name == "vp8" and 1 <= len(images) <= 60 and keys[0]
    assert len(images) == track.info()["frames"]


def test_disk_full_at_the_start_still_gives_a_file_that_opens(tmp_path: Path) -> None:
    writer, failures = make_writer(min_free_bytes=1 << 62)
    track = writer.open_track(str(tmp_path / "a"), "audio", "opus", 48000)
    feed_audio(track, encode_opus(0.5))
    track.close()
    writer.close()
    assert failures == [(track.path, "disk_full")]
    with av.open(track.path) as container:
        assert container.streams.audio[0].codec_context.name == "opus"


def test_io_error_is_reported(tmp_path: Path) -> None:
    (tmp_path / "taken.ogg").write_bytes(b"not ours")  # never overwritten
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "taken"), "audio", "opus", 48000)
    feed_audio(track, encode_opus(0.2))
    track.close()
    writer.close()
    assert failures == [(track.path, "io_error")]
    assert (tmp_path / "taken.ogg").read_bytes() == b"not ours"


def test_unknown_codec_is_refused() -> None:
    writer, _ = make_writer()
    try:
        with pytest.raises(ValueError):
            writer.open_track("/nonexistent/x", "video", "theora", 90000)
    finally:
        writer.close()


def test_packet_is_a_put_nowait(tmp_path: Path) -> None:
    """The packet path's cost: a queue put; no parsing, no file work in the caller."""
    writer, _ = make_writer()
    track = writer.open_track(str(tmp_path / "a"), "audio", "opus", 48000)
    calls: list[tuple] = []
    put: Callable = track._put
    track._put = lambda item: (calls.append(item), put(item))  # type: ignore[method-assign]
    data = rtp(1, 960, b"\xfc\x00", pt=111)
    track.packet(data, 12, 1, 960, 5.0)
    assert calls == [(track, data, 12, 1, 960, 5.0)]
    track.close()
    writer.close()


# -- VP9 and AV1 end to end: PyAV's encoders, packetized here by the RTP formats ---------------


def encode_with(codec: str, options: dict[str, str], seconds: float = 3.0) -> list[tuple]:
    """(bytes, keyframe, frame index) of each coded frame of the test picture (noise on top)."""
    # SVT-AV1 switches the calling thread to SCHED_FIFO when it may (as root): the test runner
    # gets its own policy back, or every process the suite starts afterwards (relays, browsers)
    # would inherit real-time scheduling
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        return _encode(codec, options, seconds)
    finally:
        os.sched_setscheduler(0, policy, param)


def _encode(codec: str, options: dict[str, str], seconds: float) -> list[tuple]:
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = 320, 240, "yuv420p"
    context.time_base = fractions.Fraction(1, FPS)
    context.framerate = FPS
    context.options = options
    rng = np.random.default_rng(3)
    out = []
    for i in range(int(seconds * FPS)):
        image = np.empty((240, 320, 3), np.uint8)
        image[:] = COLOUR
        image[:40] = rng.integers(0, 256, (40, 320, 3), np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out += [(bytes(p), p.is_keyframe, p.pts) for p in context.encode(frame)]
    out += [(bytes(p), p.is_keyframe, p.pts) for p in context.encode(None)]
    return out


def chunks(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def vp9_layer_payloads(frame: bytes, key: bool, picture_id: int, sid: int | None) -> list[bytes]:
    """RFC 9628 payloads of one layer frame: I (15-bit PictureID), P, L (when ``sid`` is
    given: TID 0, SID, D=1 above layer 0; TL0PICIDX 0), B on the first, E on the last."""
    parts = chunks(frame)
    out = []
    for n, part in enumerate(parts):
        first = 0x80 | (0 if key else 0x40) | (0x20 if sid is not None else 0)
        first |= (0x08 if n == 0 else 0) | (0x04 if n == len(parts) - 1 else 0)
        desc = bytes((first, 0x80 | picture_id >> 8 & 0x7F, picture_id & 0xFF))
        if sid is not None:
            desc += bytes((sid << 1 | (1 if sid else 0), 0))
        out.append(desc + part)
    return out


def test_vp9_end_to_end(tmp_path: Path) -> None:
    coded = encode_with("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8"})
    assert coded[0][1] and len(coded) == 90
    frames = [
        [(p, index * 3000) for p in vp9_layer_payloads(data, key, index, None)]
        for data, key, index in coded
    ]
    assert max(len(f) for f in frames) > 1  # frames of several packets
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "v"), "video", "VP9", 90000)
    feed_video(track, frames)
    track.close()
    writer.close()
    assert failures == []
    name, images, keys, duration = read_video(track.path)
    assert name in ("vp9", "libvpx-vp9") and keys[0]
    assert len(images) == 90 and abs(duration - 3.0) < 0.3
    assert_colour(images[-1], top=40)
    with open(track.path, "rb") as f:
        header = f.read(32)
    width, height, rate, scale, length = struct.unpack("<HHIII", header[12:28])
    assert header[8:12] == b"VP90" and (width, height, rate, scale) == (320, 240, 90000, 1)
    # the length field is the duration in timebase units, as ffmpeg reads it
    assert abs(length / 90000 - 3.0) < 0.1, length
    import av

    with av.open(track.path) as container:
        assert container.duration is not None
        assert abs(container.duration / 1e6 - 3.0) < 0.1, container.duration


def test_vp9_two_layer_frames_of_a_picture_become_a_superframe_a_decoder_reads(
    tmp_path: Path,
) -> None:
    """Two coded frames sent as spatial layers 0 and 1 of one picture come out as one
    superframe; the decoder splits it by its index and shows both."""
    coded = encode_with("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8"}, seconds=1.0)
    frames = []
    for pair in range(0, len(coded), 2):
        packets = []
        for sid, (data, key, _index) in enumerate(coded[pair : pair + 2]):
            packets += vp9_layer_payloads(data, key and sid == 0, pair, sid)
        frames.append([(p, pair * 3000) for p in packets])
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "v"), "video", "VP9", 90000)
    feed_video(track, frames)
    track.close()
    writer.close()
    assert track.info()["frames"] == 15
    name, images, keys, _ = read_video(track.path)
    assert len(images) == 30
    assert_colour(images[-1], top=40)


def av1_payloads(tu: bytes, key: bool) -> list[bytes]:
    """AV1 RTP payloads of a temporal unit (low-overhead format): temporal delimiters dropped,
    size fields removed, each OBU in packets of its own (W=1), fragmented with Z/Y, N=1 on
    the first packet of a keyframe."""
    out = []
    i = 0
    while i < len(tu):
        header = tu[i]
        start = i + (2 if header & 0x04 else 1)
        size = shift = 0
        while True:
            byte = tu[start]
            start += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if (header >> 3) & 0x0F != 2:
            obu = bytes((header & ~0x02,)) + tu[i + 1 : i + (2 if header & 0x04 else 1)]
            parts = chunks(obu + tu[start : start + size])
            for n, part in enumerate(parts):
                agg = 0x10 | (0x80 if n else 0) | (0x40 if n < len(parts) - 1 else 0)
                if key and not out:
                    agg |= 0x08
                out.append(bytes((agg,)) + part)
        i = start + size
    return out


def test_av1_end_to_end(tmp_path: Path) -> None:
    coded = encode_with("libsvtav1", {"preset": "12", "svtav1-params": "pred-struct=1"})
    assert coded[0][1]
    frames = [[(p, index * 3000) for p in av1_payloads(data, key)] for data, key, index in coded]
    writer, failures = make_writer()
    track = writer.open_track(str(tmp_path / "v"), "video", "AV1", 90000)
    feed_video(track, frames)
    track.close()
    writer.close()
    assert failures == []
    name, images, keys, duration = read_video(track.path)
    assert name in ("av1", "libdav1d", "libaom-av1") and keys[0]
    assert len(images) == len(coded) and abs(duration - 3.0) < 0.3
    assert_colour(images[-1], top=40)
    with open(track.path, "rb") as f:
        header = f.read(32)
    assert header[8:12] == b"AV01" and header[12:16] == struct.pack("<HH", 320, 240)
