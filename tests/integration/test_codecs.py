"""A track that a subscriber cannot decode, through `relay serve`: the relay says so.

A publisher (the project's own client) sends Opus audio and VP9-only video. The subscriber is
aiortc, which decodes VP8 and H.264 but not VP9. A libwebrtc client answers such an m-line with
port 0; aiortc instead fails to apply the offer, so this subscriber leaves such m-lines out of
what it gives aiortc and answers them with port 0 itself, as a browser would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from aiortc import RTCSessionDescription

from relay.client.peer import ClientPeer, RemoteDescription, TrackSpec, UdpClientPeer
from tests.integration.clients import CallClient
from tests.integration.conftest import (
    EventListener,
    RunningRelay,
    add_participant,
    add_room,
    api_client,
    wait_until,
)

pytestmark = pytest.mark.integration


_rooms = itertools.count()
VP9_PT = 98
#: codecs aiortc decodes
AIORTC_VIDEO = {"vp8", "h264"}
TRACKS = [TrackSpec("audio", 0x5A5A0001), TrackSpec("video", 0x5A5A0002)]


def vp9_only_offer(peer: ClientPeer) -> str:
    """The client's publisher offer (audio, video) with VP9 profile 0 as the only video codec."""
    offer = peer.create_offer(TRACKS)
    video_at = offer.index("m=video")
    head, video = offer[:video_at], offer[video_at:]
    video = video.replace("UDP/TLS/RTP/SAVPF 96", f"UDP/TLS/RTP/SAVPF {VP9_PT}")
    video = video.replace("a=rtpmap:96 VP8/90000", f"a=rtpmap:{VP9_PT} VP9/90000")
    video = video.replace("a=rtcp-fb:96 ", f"a=rtcp-fb:{VP9_PT} ")
    assert "VP8" not in video and ":96 " not in video
    return head + video


@contextlib.asynccontextmanager
async def vp9_publisher(
    http: httpx.AsyncClient, room: str, participant_id: str
) -> AsyncIterator[UdpClientPeer]:
    """A connected publisher whose video the relay can only take as VP9."""
    await add_participant(http, room, participant_id)
    peer = ClientPeer()
    r = await http.post(
        f"/v1/rooms/{room}/participants/{participant_id}/publisher",
        json={"type": "offer", "sdp": vp9_only_offer(peer)},
    )
    assert r.status_code == 200, r.text
    remote = RemoteDescription.parse(r.json()["sdp"])
    assert [(m.kind, m.codec.name if m.codec else None) for m in remote.media] == [
        ("audio", "opus"),
        ("video", "VP9"),
    ]
    peer.set_remote_description(remote)
    async with UdpClientPeer.connect(peer, remote.address) as udp:
        await udp.connected(timeout=15)
        yield udp


async def send_media(udp: UdpClientPeer, stop: asyncio.Event) -> None:
    """Opus-sized audio every 20 ms and a VP9-sized packet every 33 ms (payloads opaque)."""
    audio, video = TRACKS
    seq = 0
    while not stop.is_set():
        seq += 1
        udp.send_rtp(audio.ssrc, 111, seq, seq * 960, b"\xf8\xff\xfe")
        if seq % 2:
            udp.send_rtp(video.ssrc, VP9_PT, seq, seq * 3000, b"\x8c" + bytes(300), marker=True)
        await asyncio.sleep(0.02)


def _sections(sdp: str) -> tuple[str, list[str]]:
    head, *sections = re.split(r"(?=^m=)", sdp, flags=re.M)
    return head, sections


def _undecodable(section: str) -> bool:
    """A video m-line none of whose codecs aiortc decodes."""
    if not section.startswith("m=video") or section.split(" ", 2)[1] == "0":
        return False
    names = {n.lower() for n in re.findall(r"^a=rtpmap:\d+ ([^/\s]+)/", section, flags=re.M)}
    return not names & AIORTC_VIDEO


class DecodingSubscriber(CallClient):
    """An aiortc subscriber that answers m-lines it cannot decode with port 0."""

    rejected: list[str]

    async def negotiate(self, revision: int | None = None) -> None:
        assert self.sub is not None
        async with self._lock:
            if revision is not None and revision <= self.applied_revision:
                return
            for _ in range(10):
                r = await self.http.post(f"{self._base()}/subscriber")
                r.raise_for_status()
                offer = r.json()
                answer = await self._answer(offer["sdp"])
                r = await self.http.put(
                    f"{self._base()}/subscriber",
                    json={"type": "answer", "sdp": answer, "revision": offer["revision"]},
                )
                if r.status_code == 409:
                    continue
                r.raise_for_status()
                self.applied_revision = offer["revision"]
                return
            raise AssertionError("subscriber negotiation kept conflicting")

    async def _answer(self, offer_sdp: str) -> str:
        assert self.sub is not None
        head, sections = _sections(offer_sdp)
        rejected = [s for s in sections if _undecodable(s)]
        mids = [re.search(r"^a=mid:(\S+)", s, flags=re.M).group(1) for s in rejected]  # type: ignore[union-attr]
        self.rejected = mids
        kept_head = re.sub(
            r"^a=group:BUNDLE .*$",
            lambda m: " ".join(w for w in m.group(0).split() if w not in mids),
            head,
            flags=re.M,
        )
        kept = kept_head + "".join(s for s in sections if s not in rejected)
        await self.sub.setRemoteDescription(RTCSessionDescription(sdp=kept, type="offer"))
        await self.sub.setLocalDescription(await self.sub.createAnswer())
        answer_head, answered = _sections(self.sub.localDescription.sdp)
        lines = iter(answered)
        out = []
        for section in sections:
            if section in rejected:
                first = section.split("\r\n", 1)[0].split()
                mid = re.search(r"^a=mid:(\S+)", section, flags=re.M).group(1)  # type: ignore[union-attr]
                out.append(f"{first[0]} 0 {first[2]} {' '.join(first[3:])}\r\n")
                out.append(f"c=IN IP4 0.0.0.0\r\na=mid:{mid}\r\n")
            else:
                out.append(next(lines))
        return answer_head + "".join(out)


async def test_vp9_only_publisher_and_a_subscriber_without_vp9(relay: RunningRelay) -> None:
    room = f"codecs{next(_rooms)}"
    async with api_client(relay) as http:
        await add_room(http, room)
        async with EventListener(relay, room) as events:
            listener = DecodingSubscriber(relay.api, relay.key, room, "green")
            try:
                await listener.join()
                await listener.subscribe()
                async with vp9_publisher(http, room, "vp9") as udp:
                    stop = asyncio.Event()
                    sender = asyncio.create_task(send_media(udp, stop))
                    try:
                        event = await events.wait_for(
                            "track.unsupported", 20, participant_id="green"
                        )
                        assert event is not None, (events.events, relay.log()[-3000:])
                        video = await http.get(f"/v1/rooms/{room}/participants/vp9")
                        track = next(t for t in video.json()["tracks"] if t["kind"] == "video")
                        assert event["track_id"] == track["track_id"]
                        assert event["publisher_id"] == "vp9"
                        assert event["codec"] == "video/VP9"
                        assert event["reason"] == "rejected by the subscriber"
                        assert listener.rejected  # the answer really said port 0

                        async def outbound() -> dict[str, dict]:
                            r = await http.get(f"/v1/rooms/{room}/participants/green/stats")
                            return {s["kind"]: s for s in r.json()["outbound"]}

                        # audio is forwarded to the subscriber, the VP9 track is not
                        assert await wait_until(lambda: _audio_flows(outbound), 20), (
                            await outbound()
                        )
                        stats = await outbound()
                        assert stats["video"]["forwarded"] is False
                        assert stats["video"]["reason"] == "rejected by the subscriber"
                        assert stats["video"]["packets"] == 0
                        # further renegotiations repeat the answer, not the event
                        await listener.negotiate()
                        await asyncio.sleep(0.5)
                        unsupported = [e for e in events.events if e["type"] == "track.unsupported"]
                        assert len(unsupported) == 1, unsupported
                    finally:
                        stop.set()
                        await sender
            finally:
                await listener.close()
        assert "cannot take track" in relay.log()


async def _audio_flows(outbound) -> bool:
    stats = await outbound()
    audio = stats.get("audio") or {}
    return bool(audio.get("forwarded")) and audio.get("packets", 0) > 20
