"""Real VP8 frames for the load a decoding server (the naive aiortc relay) can take.

Encoded once, before the measurement, with aiortc's own VP8 encoder (libvpx through PyAV);
the sender then loops over the RTP payloads. A keyframe opens every second so that a loop
restart decodes cleanly.
"""

from __future__ import annotations

import fractions

import numpy as np


def vp8_frames(
    seconds: float = 2.0, fps: int = 15, width: int = 320, height: int = 240
) -> list[list[bytes]]:
    """RTP payloads (VP8 payload descriptor included), one list per frame."""
    from aiortc.codecs.vpx import Vp8Encoder
    from av import VideoFrame

    encoder = Vp8Encoder()
    frames: list[list[bytes]] = []
    y, x = np.mgrid[0:height, 0:width]
    for i in range(int(seconds * fps)):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        image[..., 0] = (x + 4 * i) % 256
        image[..., 1] = (y + 2 * i) % 256
        image[..., 2] = (x + y + 8 * i) % 256
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i * (90000 // fps)
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, _ = encoder.encode(frame, force_keyframe=i % fps == 0)
        frames.append(payloads)
    return frames
