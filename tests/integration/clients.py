"""aiortc call participants for integration tests: each publishes a colour and a tone, and
checks which colours and tones it decodes from the others."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

VIDEO_CLOCK = 90000
AUDIO_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms

#: what each test participant sends: (name of the colour, RGB, tone in Hz)
IDENTITIES = {
    "red": ((230, 30, 30), 440.0),
    "green": ((30, 210, 30), 880.0),
    "blue": ((30, 30, 230), 1320.0),
    "yellow": ((220, 210, 30), 1760.0),
}


class ColourTrack(MediaStreamTrack):
    """A small solid-colour video at 15 fps; `moving` adds a scrolling noise texture (same mean
    colour) so that every frame carries several packets of real picture data."""

    kind = "video"

    def __init__(
        self, rgb: tuple[int, int, int], width: int = 160, height: int = 120, moving: bool = False
    ) -> None:
        super().__init__()
        self.image = np.zeros((height, width, 3), dtype=np.uint8)
        self.image[:, :] = rgb
        if moving:
            noise = np.random.default_rng(3).integers(-25, 26, (height, width, 1))
            self.image = np.clip(self.image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        self.moving = moving
        self.frame_count = 0
        self.start: float | None = None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        due = self.start + self.frame_count / 15
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        image = np.roll(self.image, 3 * self.frame_count, axis=1) if self.moving else self.image
        frame = VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = self.frame_count * (VIDEO_CLOCK // 15)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.frame_count += 1
        return frame


class ToneTrack(MediaStreamTrack):
    """A continuous sine tone, 20 ms frames."""

    kind = "audio"

    def __init__(self, frequency: float) -> None:
        super().__init__()
        self.frequency = frequency
        self.sample = 0
        self.start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        due = self.start + self.sample / AUDIO_RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        t = (np.arange(FRAME_SAMPLES) + self.sample) / AUDIO_RATE
        samples = (np.sin(2 * np.pi * self.frequency * t) * 8000).astype(np.int16)
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self.sample
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self.sample += FRAME_SAMPLES
        return frame


def classify_colour(frame: VideoFrame) -> str:
    """The identity whose colour is nearest to the frame's mean colour."""
    mean = frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
    return min(IDENTITIES, key=lambda n: float(np.sum((np.array(IDENTITIES[n][0]) - mean) ** 2)))


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum[1:])) + 1])


def classify_tone(frequency: float) -> str | None:
    name = min(IDENTITIES, key=lambda n: abs(IDENTITIES[n][1] - frequency))
    return name if abs(IDENTITIES[name][1] - frequency) < 40 else None


@dataclass
class Received:
    """What one subscriber decoded, per identity."""

    frames: dict[str, int] = field(default_factory=dict)
    tones: dict[str, int] = field(default_factory=dict)
    first_frame_at: dict[str, float] = field(default_factory=dict)
    frame_times: dict[str, list[float]] = field(default_factory=dict)

    def longest_freeze(self, name: str, start: float, end: float) -> float:
        """The longest time without a decoded frame of `name` between start and end."""
        times = [start] + [t for t in self.frame_times.get(name, []) if start <= t <= end] + [end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def frames_between(self, name: str, start: float, end: float) -> int:
        return sum(1 for t in self.frame_times.get(name, []) if start <= t <= end)


async def consume(track: MediaStreamTrack, received: Received) -> None:
    """Decode ``track`` until it ends, counting in ``received`` the colour of every video frame
    (with its arrival time) and the tone of every 0.2 s of audio."""
    buffer: list[np.ndarray] = []
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            if track.kind == "video":
                name = classify_colour(frame)
                received.frames[name] = received.frames.get(name, 0) + 1
                now = time.monotonic()
                received.first_frame_at.setdefault(name, now)
                received.frame_times.setdefault(name, []).append(now)
                continue
            samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
            buffer.append(samples.astype(np.float64))
            if sum(len(b) for b in buffer) >= 9600:
                name = classify_tone(dominant_frequency(np.concatenate(buffer), frame.sample_rate))
                buffer.clear()
                if name is not None:
                    received.tones[name] = received.tones.get(name, 0) + 1


def new_peer_connection() -> RTCPeerConnection:
    """No STUN server (no network here), and max-bundle: with aiortc's default (balanced)
    policy a remote offer with two video m-lines leaves the second on a transport of its own."""
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


class CallClient:
    """One participant: joins over the API, publishes, subscribes, follows renegotiations."""

    def __init__(
        self,
        api: str,
        key: str,
        room: str,
        identity: str,
        proxies: dict[str, tuple[str, int]] | None = None,
        participant_id: str | None = None,
    ) -> None:
        self.api = api
        #: "publisher" / "subscriber" -> address of an impairing proxy to use instead of the relay
        self.proxies = proxies or {}
        self.room = room
        self.identity = identity
        #: the identity by default; another one lets an identity join again under a new id
        self.participant_id = participant_id or identity
        self.http = httpx.AsyncClient(
            base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        self.pub: RTCPeerConnection | None = None
        self.video_track: ColourTrack | None = None
        self.sub: RTCPeerConnection | None = None
        self.received = Received()
        self.revisions: asyncio.Queue[int] = asyncio.Queue()
        self.renegotiations = 0
        self.applied_revision = -1
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self.joined_at = 0.0

    def _base(self) -> str:
        return f"/v1/rooms/{self.room}/participants/{self.participant_id}"

    async def join(self) -> None:
        self.joined_at = time.monotonic()
        r = await self.http.post(
            f"/v1/rooms/{self.room}/participants", json={"participant_id": self.participant_id}
        )
        r.raise_for_status()
        self._tasks.append(asyncio.create_task(self._follow_events()))

    async def publish(
        self,
        audio: bool = True,
        video: bool = True,
        moving: bool = False,
        size: tuple[int, int] = (160, 120),
    ) -> None:
        rgb, tone = IDENTITIES[self.identity]
        self.pub = new_peer_connection()
        if audio:
            self.pub.addTransceiver(ToneTrack(tone), direction="sendonly")
        if video:
            self.video_track = ColourTrack(rgb, size[0], size[1], moving=moving)
            self.pub.addTransceiver(self.video_track, direction="sendonly")
        await self.pub.setLocalDescription(await self.pub.createOffer())
        r = await self.http.post(
            f"{self._base()}/publisher",
            json={"type": "offer", "sdp": self.pub.localDescription.sdp},
        )
        r.raise_for_status()
        answer = r.json()
        await self.pub.setRemoteDescription(
            RTCSessionDescription(sdp=self._via_proxy("publisher", answer["sdp"]), type="answer")
        )

    async def subscribe(self) -> None:
        self.sub = new_peer_connection()
        self.sub.on("track", self._on_track)
        await self.negotiate()

    async def negotiate(self, revision: int | None = None) -> None:
        """Fetch the current subscriber offer and answer it (again on a 409)."""
        assert self.sub is not None
        async with self._lock:
            if revision is not None and revision <= self.applied_revision:
                return  # already answered an offer that includes this change
            for _ in range(10):
                r = await self.http.post(f"{self._base()}/subscriber")
                r.raise_for_status()
                offer = r.json()
                await self.sub.setRemoteDescription(
                    RTCSessionDescription(
                        sdp=self._via_proxy("subscriber", offer["sdp"]), type="offer"
                    )
                )
                await self.sub.setLocalDescription(await self.sub.createAnswer())
                r = await self.http.put(
                    f"{self._base()}/subscriber",
                    json={
                        "type": "answer",
                        "sdp": self.sub.localDescription.sdp,
                        "revision": offer["revision"],
                    },
                )
                if r.status_code == 409:
                    continue
                r.raise_for_status()
                self.renegotiations += 1
                self.applied_revision = offer["revision"]
                return
            raise AssertionError("subscriber negotiation kept conflicting")

    def _via_proxy(self, role: str, sdp: str) -> str:
        """Point the relay's candidates (and m-line ports) at a proxy for this connection."""
        proxy = self.proxies.get(role)
        if proxy is None:
            return sdp
        lines = []
        for line in sdp.splitlines():
            if line.startswith("a=candidate:"):
                parts = line.split()
                parts[4], parts[5] = proxy[0], str(proxy[1])
                line = " ".join(parts)
            elif line.startswith("m=") and not line.split()[1] == "0":
                parts = line.split()
                parts[1] = str(proxy[1])
                line = " ".join(parts)
            lines.append(line)
        return "\r\n".join(lines) + "\r\n"

    async def _follow_events(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.api, headers=self.http.headers, timeout=None
        ) as http:
            async with http.stream("GET", "/v1/events", params={"room_id": self.room}) as stream:
                async for line in stream.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if (
                        event["type"] == "subscriber.renegotiate"
                        and event["participant_id"] == self.participant_id
                        and self.sub is not None
                    ):
                        self._tasks.append(asyncio.create_task(self.negotiate(event["revision"])))

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        await consume(track, self.received)

    async def leave(self, delete: bool = True) -> None:
        if delete:
            await self.http.delete(self._base(), params={"reason": "left"})
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for pc in (self.pub, self.sub):
            if pc is not None:
                await pc.close()
        await self.http.aclose()


async def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
