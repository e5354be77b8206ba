"""A Safari-style publisher and a Chromium subscriber: the relay picks a codec both can use.

Safari lists H.264 Constrained High (profile-level-id 640c1f) as its first video codec, which
not every subscriber decodes. The relay must answer with the first codec of the room's
preference the publisher offers (VP8 by default), and the publisher then really sends it: here
the project's own client signals the offer of tests/fixtures/sdp/safari_offer.sdp (with its
own ICE credentials and fingerprint) and sends VP8 encoded by aiortc's libvpx encoder in the
payload type the relay answered. A receive-only Chromium page must decode it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiortc.codecs.vpx import Vp8Encoder
from av import VideoFrame

from relay.client.peer import ClientPeer, RemoteDescription, TrackSpec, UdpClientPeer
from tests.browser.conftest import Call
from tests.browser.harness import API_KEY, PEER_ADDRESS, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(150)]

SAFARI_OFFER = Path(__file__).resolve().parents[1] / "fixtures" / "sdp" / "safari_offer.sdp"
#: The fixture's SSRCs and mids (sdes:mid is extension 4 there, as in ClientPeer).
AUDIO = TrackSpec("audio", 2381920443, "0")
VIDEO = TrackSpec("video", 1174406389, "1")
#: framesDecoded must grow by this much in Chromium
FRAMES = 45
FPS = 15
VIDEO_CLOCK = 90000
OPUS_SILENCE = b"\xf8\xff\xfe"


def safari_offer(peer: ClientPeer) -> str:
    """The Safari fixture with the client's own ICE credentials and DTLS fingerprint and no
    candidates of its own (the relay is ICE-lite and learns them from the checks)."""
    peer.create_offer([AUDIO, VIDEO])  # sets the client's mid extension
    return peer.adopt_offer(SAFARI_OFFER.read_text())


def answered_video(sdp: str) -> tuple[int, str, str]:
    """(payload type, codec name, fmtp) of the video m-line of the relay's answer."""
    section = sdp[sdp.index("m=video") :]
    pt = int(section.split("\r\n", 1)[0].split()[3])
    name = re.search(rf"^a=rtpmap:{pt} ([^/]+)/", section, re.M)
    fmtp = re.search(rf"^a=fmtp:{pt} (.*)$", section, re.M)
    assert name is not None
    return pt, name.group(1), fmtp.group(1).strip() if fmtp else ""


class SafariStylePublisher:
    """Publishes the Safari offer and then audio (Opus silence) and VP8 video from libvpx."""

    def __init__(self, api: str, room: str, participant_id: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=api, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        )
        self.room = room
        self.participant_id = participant_id
        self.peer = ClientPeer()
        self.answer = ""
        self.frames_sent = 0
        self._task: asyncio.Task[None] | None = None
        self._udp: UdpClientPeer | None = None
        self._context: contextlib.AbstractAsyncContextManager[UdpClientPeer] | None = None

    async def start(self) -> None:
        base = f"/v1/rooms/{self.room}/participants"
        r = await self.http.post(base, json={"participant_id": self.participant_id})
        assert r.status_code == 201, r.text
        r = await self.http.post(
            f"{base}/{self.participant_id}/publisher",
            json={"type": "offer", "sdp": safari_offer(self.peer)},
        )
        assert r.status_code == 200, r.text
        self.answer = r.json()["sdp"]
        remote = RemoteDescription.parse(self.answer)
        self.peer.set_remote_description(remote)
        self._context = UdpClientPeer.connect(self.peer, remote.address, local_host=PEER_ADDRESS)
        self._udp = await self._context.__aenter__()
        await self._udp.connected(timeout=15)
        video_pt = answered_video(self.answer)[0]
        self._task = asyncio.create_task(self._send(self._udp, video_pt))

    async def _send(self, udp: UdpClientPeer, video_pt: int) -> None:
        """15 fps of a moving picture in VP8 (a keyframe every second), Opus every 20 ms."""
        loop = asyncio.get_running_loop()
        encoder = Vp8Encoder()
        rng = np.random.default_rng(5)
        picture = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        start = loop.time()
        video_seq = audio_seq = 0
        audio_due = 0.0
        while True:
            frame = VideoFrame.from_ndarray(np.roll(picture, 4 * self.frames_sent, axis=1))
            frame.pts = self.frames_sent * (VIDEO_CLOCK // FPS)
            frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            payloads, timestamp = encoder.encode(frame, force_keyframe=self.frames_sent % FPS == 0)
            for i, payload in enumerate(payloads):
                video_seq += 1
                last = i == len(payloads) - 1
                udp.send_rtp(VIDEO.ssrc, video_pt, video_seq, timestamp, payload, marker=last)
            self.frames_sent += 1
            due = start + self.frames_sent / FPS
            while audio_due < due - start:
                audio_seq += 1
                udp.send_rtp(AUDIO.ssrc, 111, audio_seq, audio_seq * 960, OPUS_SILENCE)
                audio_due += 0.02
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._context is not None:
            await self._context.__aexit__(None, None, None)
        await self.http.aclose()


def test_safari_h264_high_offer_reaches_chromium_as_vp8(call: Call) -> None:
    """The relay answers the Safari offer with VP8, not the H.264 High it lists first; the
    publisher sends VP8 and a Chromium subscriber decodes it."""
    call.open_page("chromium", "viewer", camera=False)
    viewer = call.wait_joined("viewer")
    assert viewer["mode"] == "recvonly"

    publisher = SafariStylePublisher(call.relay.api, call.room, "safari")
    try:
        call.loop.run(publisher.start())
        pt, name, fmtp = answered_video(publisher.answer)
        assert (pt, name) == (102, "VP8"), (pt, name, fmtp)
        track = call.api("GET", f"/v1/rooms/{call.room}/participants/safari").json()
        assert sorted(t["codec"] for t in track["tracks"]) == ["audio/opus", "video/VP8"]

        def decoded() -> int:
            return int(call.inbound("viewer", "safari", "video").get("framesDecoded") or 0)

        wait_until(
            lambda: decoded() > 0,
            45,
            what=lambda: (
                f"Chromium's first decoded frame ({call.inbound('viewer', 'safari', 'video')})"
            ),
        )
        first = decoded()
        wait_until(
            lambda: decoded() >= first + FRAMES,
            30,
            what=lambda: f"{FRAMES} more frames ({decoded() - first} so far)",
        )
        assert call.inbound("viewer", "safari", "video").get("codec") == "VP8"
        unsupported = [e for _, e in call.events if e.get("type") == "track.unsupported"]
        assert unsupported == []
    finally:
        call.loop.run(publisher.close())
