"""Real VP8 and Opus from the project's own client (relay/client/peer.py): frames encoded and
packetized by aiortc's encoders, sent as SRTP at real time, for publishers that aiortc itself
cannot play (an offer without a=ssrc or a=extmap, say)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass

from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import MediaStreamTrack

from relay.client.peer import UdpClientPeer
from relay.rtc import rtcp
from tests.integration.clients import IDENTITIES, ColourTrack, ToneTrack


@dataclass
class Stream:
    """One stream to send: its SSRC, payload type and header extensions (none: ``[]``)."""

    ssrc: int
    payload_type: int
    extensions: list[tuple[int, bytes]]


class EncodedSender:
    """Sends an identity's colour (VP8) and tone (Opus) over a connected peer (``async with``).

    A keyframe is encoded whenever the relay asks for one (PLI or FIR), as a real sender does.
    """

    def __init__(
        self,
        udp: UdpClientPeer,
        identity: str,
        video: Stream | None,
        audio: Stream | None,
        size: tuple[int, int] = (160, 120),
    ) -> None:
        self.udp = udp
        rgb, tone = IDENTITIES[identity]
        self.video = video
        self.audio = audio
        self.video_track = ColourTrack(rgb, size[0], size[1], moving=True)
        self.audio_track = ToneTrack(tone)
        self.keyframe_wanted = False
        self.keyframe_requests = 0
        self.frames_sent = 0
        self.errors: list[BaseException] = []
        self._tasks: list[asyncio.Task] = []
        udp.peer.on_rtcp = self._on_rtcp

    def _on_rtcp(self, packets: list) -> None:
        for packet in packets:
            if isinstance(packet, (rtcp.Pli, rtcp.Fir)):
                self.keyframe_wanted = True
                self.keyframe_requests += 1

    async def __aenter__(self) -> EncodedSender:
        if self.video is not None:
            self._tasks.append(
                asyncio.create_task(self._run(self.video, self.video_track, Vp8Encoder()))
            )
        if self.audio is not None:
            self._tasks.append(
                asyncio.create_task(self._run(self.audio, self.audio_track, OpusEncoder()))
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.video_track.stop()
        self.audio_track.stop()

    async def _run(self, stream: Stream, track: MediaStreamTrack, encoder) -> None:
        seq = secrets.randbits(15)
        ts_base = secrets.randbits(31)
        is_video = track.kind == "video"
        try:
            while True:
                frame = await track.recv()
                force = is_video and self.keyframe_wanted
                if force:
                    self.keyframe_wanted = False
                payloads, timestamp = encoder.encode(frame, force_keyframe=force)
                for i, payload in enumerate(payloads):
                    self.udp.send_rtp(
                        stream.ssrc,
                        stream.payload_type,
                        seq,
                        ts_base + timestamp,
                        payload,
                        marker=is_video and i == len(payloads) - 1,
                        extensions=stream.extensions,
                    )
                    seq = (seq + 1) & 0xFFFF
                if is_video:
                    self.frames_sent += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a closed peer: keep the reason for the test
            self.errors.append(exc)
