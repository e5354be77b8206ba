"""An aiortc participant for calls with browsers: it authenticates with a participant token and
counts what it decodes per publisher (the msid stream id), since browsers' fake cameras have
no colour of their own to recognise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from tests.browser.harness import sdp_streams
from tests.integration.clients import CallClient


class AiortcParticipant(CallClient):
    """Publishes a colour and a tone; counts video frames and audio frames per publisher."""

    def __init__(self, api: str, token: str, room: str, participant_id: str, identity: str) -> None:
        super().__init__(api, token, room, identity)
        self.participant_id = participant_id
        self.video_frames: dict[str, int] = {}
        self.audio_frames: dict[str, int] = {}
        self.first_frame_at: dict[str, float] = {}
        self.events_open = asyncio.Event()
        self._streams: tuple[str, dict[str, str]] = ("", {})

    async def join(self) -> None:
        """The participant exists already (made with the API key): follow the room's events."""
        self.joined_at = time.monotonic()
        self._tasks.append(asyncio.create_task(self._follow_events()))
        await asyncio.wait_for(self.events_open.wait(), 10)

    async def _follow_events(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.api, headers=self.http.headers, timeout=None
        ) as http:
            params = {"room_id": self.room}
            async with http.stream("GET", "/v1/events", params=params) as stream:
                stream.raise_for_status()
                self.events_open.set()
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

    def _publisher_of(self, track: MediaStreamTrack) -> str | None:
        """The msid stream id (publisher) of the m-line that now carries ``track``."""
        assert self.sub is not None
        description = self.sub.remoteDescription
        if description is None:
            return None
        if self._streams[0] != description.sdp:
            self._streams = (description.sdp, sdp_streams(description.sdp))
        for transceiver in self.sub.getTransceivers():
            if transceiver.receiver.track is track:
                return self._streams[1].get(transceiver.mid or "")
        return None

    async def _consume(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                publisher = self._publisher_of(track)
                if publisher is None:
                    continue
                counts = self.video_frames if track.kind == "video" else self.audio_frames
                counts[publisher] = counts.get(publisher, 0) + 1
                if track.kind == "video":
                    self.first_frame_at.setdefault(publisher, time.monotonic())
