"""WHIP and WHEP through `relay serve`: aiortc clients that speak plain HTTP, no control API.

The WHIP publisher sends a colour and a tone; a subscriber joined through the control API must
decode exactly that colour and tone, and a WHEP viewer must too. DELETE on the session's
Location ends it within a second (``participant.left``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from relay.api.tokens import encode_token
from tests.integration.clients import (
    IDENTITIES,
    CallClient,
    ColourTrack,
    Received,
    ToneTrack,
    consume,
    new_peer_connection,
    wait_for,
)
from tests.integration.conftest import (
    EventListener,
    RunningRelay,
    auth_headers,
    new_room,
    start_relay,
    stop_relay,
)

pytestmark = pytest.mark.integration

SDP = {"Content-Type": "application/sdp"}
SECRET = "whip-test-secret-0123456789abcdef-0123456789"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    """The relay with participant tokens on (signed with SECRET)."""
    running = start_relay(
        tmp_path_factory.mktemp("relay"), api=f'[auth]\ntoken_secret = "{SECRET}"\n'
    )
    yield running
    stop_relay(running)


def token(room: str, participant: str, **flags: bool) -> str:
    return encode_token(room, participant, secret=SECRET, expires_at=time.time() + 600, **flags)


class WhipPublisher:
    """An aiortc publisher that speaks WHIP: one POST with its offer, DELETE to hang up."""

    def __init__(self, api: str, token: str, room: str, identity: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        self.room = room
        self.identity = identity
        self.pc = new_peer_connection()
        self.location: str | None = None
        self.etag: str | None = None
        self.posted_at = 0.0

    async def publish(self, participant: str | None = None) -> httpx.Response:
        rgb, tone = IDENTITIES[self.identity]
        self.pc.addTransceiver(ToneTrack(tone), direction="sendonly")
        self.pc.addTransceiver(ColourTrack(rgb), direction="sendonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.posted_at = time.monotonic()
        params = {"participant": participant} if participant else None
        r = await self.http.post(
            f"/whip/{self.room}",
            content=self.pc.localDescription.sdp,
            headers=SDP,
            params=params,
        )
        if r.status_code == 201:
            self.location = r.headers["location"]
            self.etag = r.headers["etag"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        return r

    async def delete(self) -> httpx.Response:
        assert self.location is not None
        return await self.http.delete(self.location)

    async def close(self) -> None:
        await self.pc.close()
        await self.http.aclose()


class WhepViewer:
    """An aiortc viewer that speaks WHEP: its own recvonly offer in one POST."""

    def __init__(self, api: str, token: str, room: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        self.room = room
        self.pc = new_peer_connection()
        self.received = Received()
        self.location: str | None = None
        self.posted_at = 0.0
        self._tasks: list[asyncio.Task] = []
        self.pc.on(
            "track", lambda track: self._tasks.append(asyncio.create_task(self._consume(track)))
        )

    async def watch(self, **params: str) -> httpx.Response:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.posted_at = time.monotonic()
        r = await self.http.post(
            f"/whep/{self.room}", content=self.pc.localDescription.sdp, headers=SDP, params=params
        )
        if r.status_code == 201:
            self.location = r.headers["location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        return r

    async def _consume(self, track: MediaStreamTrack) -> None:
        await consume(track, self.received)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        await self.http.aclose()


def _decodes(received: Received, name: str, frames: int = 20, tones: int = 2) -> bool:
    return received.frames.get(name, 0) >= frames and received.tones.get(name, 0) >= tones


async def _watched(viewer: WhepViewer, name: str, relay: RunningRelay) -> None:
    """The viewer decodes ``name``'s colour and tone within 30 s."""
    assert await wait_for(lambda: _decodes(viewer.received, name), 30), (
        viewer.received,
        relay.log()[-3000:],
    )


async def _inbound_stats(viewer: WhepViewer) -> list[Any]:
    """The viewer's inbound RTP stream statistics, one per stream received."""
    stats = []
    for receiver in viewer.pc.getReceivers():
        report = await receiver.getStats()
        stats += [s for s in report.values() if s.type == "inbound-rtp"]
    return stats


async def _inbound_ssrcs(viewer: WhepViewer) -> dict[str, int]:
    return {s.kind: s.ssrc for s in await _inbound_stats(viewer)}


async def test_whip_publisher_decoded_by_api_subscriber_and_whep_viewer(relay) -> None:
    room = new_room(relay, "whip")
    subscriber = CallClient(relay.api, relay.key, room, "green")
    publisher = WhipPublisher(relay.api, relay.key, room, "red")
    viewer = WhepViewer(relay.api, relay.key, room)
    try:
        await subscriber.join()
        await subscriber.subscribe()
        async with EventListener(relay, room) as listener:
            r = await publisher.publish()
            assert r.status_code == 201, r.text
            assert r.headers["content-type"] == "application/sdp"
            assert publisher.location is not None
            assert publisher.location.startswith(f"/whip/{room}/")
            session = publisher.location.rsplit("/", 1)[1]
            assert await wait_for(lambda: _decodes(subscriber.received, "red"), 30), (
                subscriber.received,
                relay.log()[-3000:],
            )
            whip_first = subscriber.received.first_frame_at["red"] - publisher.posted_at
            print(f"WHIP POST to first decoded frame (aiortc subscriber): {whip_first:.2f} s")
            # only the publisher's identity arrives
            assert set(subscriber.received.frames) == {"red"}

            r = await viewer.watch()
            assert r.status_code == 201, r.text
            assert viewer.location is not None and viewer.location.startswith(f"/whep/{room}/")
            assert await wait_for(lambda: _decodes(viewer.received, "red"), 30), (
                viewer.received,
                relay.log()[-3000:],
            )
            whep_first = viewer.received.first_frame_at["red"] - viewer.posted_at
            print(f"WHEP POST to first decoded frame (aiortc viewer): {whep_first:.2f} s")

            # DELETE on the Location ends the session within a second
            started = time.monotonic()
            r = await publisher.delete()
            assert r.status_code == 204, r.text
            left = await listener.wait_for("participant.left", 1.0, participant_id=session)
            assert left is not None and time.monotonic() - started < 1.0, listener.events
            assert left["reason"] == "left"
            r = await publisher.delete()
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "session_not_found"

            viewer_id = viewer.location.rsplit("/", 1)[1]
            r = await viewer.http.delete(viewer.location)
            assert r.status_code == 204
            assert await listener.wait_for("participant.left", 1.0, participant_id=viewer_id)
    finally:
        await asyncio.gather(
            subscriber.close(), publisher.close(), viewer.close(), return_exceptions=True
        )


async def test_whip_refuses_bad_credentials_and_bad_sdp(relay) -> None:
    room = new_room(relay, "whip")
    other = new_room(relay, "whip")
    async with httpx.AsyncClient(base_url=relay.api, timeout=10) as http:
        publisher = WhipPublisher(relay.api, relay.key, room, "blue")
        try:
            publisher.pc.addTransceiver(ToneTrack(440.0), direction="sendonly")
            await publisher.pc.setLocalDescription(await publisher.pc.createOffer())
            offer = publisher.pc.localDescription.sdp
        finally:
            await publisher.close()
        # no credentials, a wrong key, a forged token: 401
        r = await http.post(f"/whip/{room}", content=offer, headers=SDP)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await http.post(
            f"/whip/{room}", content=offer, headers={**SDP, **auth_headers("wrong")}
        )
        assert r.status_code == 401
        forged = "eyJhbGciOiJIUzI1NiJ9.eyJyb29tIjoieCJ9.c2lnbmF0dXJl"
        r = await http.post(f"/whip/{room}", content=offer, headers={**SDP, **auth_headers(forged)})
        assert r.status_code == 401
        # a malformed body: 400 bad_sdp, and nobody joined
        r = await http.post(
            f"/whip/{room}",
            content="v=0\r\nm=bogus\r\n",
            headers={**SDP, **auth_headers(relay.key)},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_sdp", r.text
        r = await http.get(f"/v1/rooms/{room}", headers=auth_headers(relay.key))
        assert r.json()["participants"] == []
        # not SDP: 415
        r = await http.post(
            f"/whip/{room}",
            content=offer,
            headers={"Content-Type": "text/plain", **auth_headers(relay.key)},
        )
        assert r.status_code == 415
        # a session of one room is not reachable through another
        r = await http.post(
            f"/whip/{room}", content=offer, headers={**SDP, **auth_headers(relay.key)}
        )
        assert r.status_code == 201, r.text
        session = r.headers["location"].rsplit("/", 1)[1]
        r = await http.delete(f"/whip/{other}/{session}", headers=auth_headers(relay.key))
        assert r.status_code == 404
        r = await http.delete(f"/whip/{room}/{session}", headers=auth_headers("wrong"))
        assert r.status_code == 401
        r = await http.delete(f"/whip/{room}/{session}", headers=auth_headers(relay.key))
        assert r.status_code == 204


async def test_whip_with_participant_tokens(relay) -> None:
    room = new_room(relay, "whip")
    other = new_room(relay, "whip")
    subscriber = CallClient(relay.api, relay.key, room, "green")
    publisher = WhipPublisher(relay.api, token(room, "cam1"), room, "yellow")
    try:
        await subscriber.join()
        await subscriber.subscribe()
        # a token of another room, or one that may not publish: 403
        for bad in (token(other, "cam1"), token(room, "cam1", can_publish=False)):
            intruder = WhipPublisher(relay.api, bad, room, "blue")
            try:
                r = await intruder.publish()
                assert r.status_code == 403, r.text
                assert r.json()["error"]["code"] == "forbidden"
            finally:
                await intruder.close()
        # the token's participant is created on the spot and publishes
        r = await publisher.publish()
        assert r.status_code == 201, r.text
        assert publisher.location == f"/whip/{room}/cam1"
        assert await wait_for(lambda: _decodes(subscriber.received, "yellow"), 30), (
            subscriber.received
        )
        # another participant's token may not end the session: 403
        r = await publisher.http.delete(
            publisher.location, headers=auth_headers(token(room, "cam2"))
        )
        assert r.status_code == 403
        async with EventListener(relay, room) as listener:
            started = time.monotonic()
            r = await publisher.delete()
            assert r.status_code == 204
            assert await listener.wait_for("participant.left", 1.0, participant_id="cam1")
            assert time.monotonic() - started < 1.0
    finally:
        await asyncio.gather(subscriber.close(), publisher.close(), return_exceptions=True)


async def test_whip_and_whep_across_two_workers(tmp_path) -> None:
    """With two worker processes (spread placement) the WHIP publisher and the WHEP viewer
    sit on different workers: the viewer's answer carries the track piped from the other."""
    workers = start_relay(
        tmp_path,
        extra='[workers]\ncount = 2\nplacement = "spread"\n',
        media_ports=2,
    )
    publisher = WhipPublisher(workers.api, workers.key, "", "blue")
    viewer = WhepViewer(workers.api, workers.key, "")
    try:
        async with httpx.AsyncClient(base_url=workers.api, timeout=10) as http:
            headers = auth_headers(workers.key)
            ready = False
            for _ in range(100):
                r = await http.get("/v1/workers", headers=headers)
                listed = r.json()["workers"]
                if len(listed) == 2 and all(w["state"] == "ready" for w in listed):
                    ready = True
                    break
                await asyncio.sleep(0.1)
            assert ready, workers.log()[-3000:]
            r = await http.post("/v1/rooms", json={"room_id": "spread"}, headers=headers)
            assert r.status_code == 201, r.text
            publisher.room = viewer.room = "spread"
            r = await publisher.publish(participant="cam")
            assert r.status_code == 201, r.text
            # the tracks are published before the viewer asks for it
            for _ in range(50):
                r = await http.get("/v1/rooms/spread/participants/cam", headers=headers)
                if len(r.json()["tracks"]) == 2:
                    break
                await asyncio.sleep(0.1)
            r = await viewer.watch(participant="cam")
            assert r.status_code == 201, r.text
            await _watched(viewer, "blue", workers)

            async def placement() -> dict[str, int]:
                room = (await http.get("/v1/rooms/spread", headers=headers)).json()
                return {p["participant_id"]: p["worker"] for p in room["participants"]}

            placed = await placement()
            assert len(placed) == 2 and len(set(placed.values())) == 2, placed
            ssrcs = await _inbound_ssrcs(viewer)

            # the publisher reconnects (a broadcast tool's new WHIP session): the viewer,
            # without a new POST, decodes it on the same streams, numbering unbroken
            r = await publisher.delete()
            assert r.status_code == 204
            again = WhipPublisher(workers.api, workers.key, "spread", "red")
            try:
                r = await again.publish(participant="cam")
                assert r.status_code == 201, r.text
                await _watched(viewer, "red", workers)
                placed = await placement()
                # on the emptier worker: the viewer's worker imports the new tracks
                assert len(set(placed.values())) == 2, placed
                inbound = await _inbound_stats(viewer)
                assert {s.kind: s.ssrc for s in inbound} == ssrcs
                # a jump in sequence numbers would count as thousands of lost packets
                assert all(s.packetsLost < 50 for s in inbound), inbound
                r = await again.delete()
                assert r.status_code == 204
            finally:
                await again.close()
            assert viewer.location is not None
            r = await viewer.http.delete(viewer.location)
            assert r.status_code == 204
            room = (await http.get("/v1/rooms/spread", headers=headers)).json()
            assert room["participants"] == []
    finally:
        await asyncio.gather(publisher.close(), viewer.close(), return_exceptions=True)
        stop_relay(workers)
