"""Two aiortc clients call each other through a running relay (`relay serve`).

    python examples/aiortc_call.py [--api http://127.0.0.1:8080] [--key devkey] [--seconds 10]

Alice and Bob each join one room, publish a test tone and a test picture, subscribe to each
other and report how many video frames and audio frames they decoded from the other side.
Needs aiortc (`pip install aiortc`, or the relay's `[test]` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets

import httpx
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack


def peer_connection() -> RTCPeerConnection:
    # no STUN server needed (the relay is ICE-lite); max-bundle: one transport for all m-lines
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


class Caller:
    def __init__(self, http: httpx.AsyncClient, room: str, name: str) -> None:
        self.http, self.room, self.name = http, room, name
        self.base = f"/v1/rooms/{room}/participants/{name}"
        self.publisher = peer_connection()
        self.subscriber = peer_connection()
        self.decoded = {"audio": 0, "video": 0}
        self.tasks: list[asyncio.Task] = []
        self.subscriber.on(
            "track", lambda track: self.tasks.append(asyncio.create_task(self.count(track)))
        )

    async def count(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.decoded[track.kind] += 1

    async def join(self) -> None:
        (
            await self.http.post(
                f"/v1/rooms/{self.room}/participants", json={"participant_id": self.name}
            )
        ).raise_for_status()
        self.publisher.addTransceiver(AudioStreamTrack(), direction="sendonly")
        self.publisher.addTransceiver(VideoStreamTrack(), direction="sendonly")
        await self.publisher.setLocalDescription(await self.publisher.createOffer())
        answer = await self.http.post(
            f"{self.base}/publisher",
            json={"type": "offer", "sdp": self.publisher.localDescription.sdp},
        )
        answer.raise_for_status()
        await self.publisher.setRemoteDescription(RTCSessionDescription(**answer.json()))

    async def receive(self) -> None:
        """Answer the relay's subscriber offer (again if it changed meanwhile: 409)."""
        while True:
            offer = (await self.http.post(f"{self.base}/subscriber")).json()
            await self.subscriber.setRemoteDescription(
                RTCSessionDescription(sdp=offer["sdp"], type="offer")
            )
            await self.subscriber.setLocalDescription(await self.subscriber.createAnswer())
            r = await self.http.put(
                f"{self.base}/subscriber",
                json={
                    "type": "answer",
                    "sdp": self.subscriber.localDescription.sdp,
                    "revision": offer["revision"],
                },
            )
            if r.status_code != 409:
                r.raise_for_status()
                return

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.publisher.close()
        await self.subscriber.close()
        await self.http.delete(self.base, params={"reason": "left"})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8080")
    parser.add_argument("--key", default="devkey")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    room = "demo-" + secrets.token_hex(3)
    async with httpx.AsyncClient(
        base_url=args.api, timeout=10, headers={"Authorization": f"Bearer {args.key}"}
    ) as http:
        (await http.post("/v1/rooms", json={"room_id": room})).raise_for_status()
        alice, bob = Caller(http, room, "alice"), Caller(http, room, "bob")
        await alice.join()
        await bob.join()
        # both published: each subscriber offer now carries the other's audio and video
        await alice.receive()
        await bob.receive()
        await asyncio.sleep(args.seconds)
        stats = {c.name: c.decoded for c in (alice, bob)}
        for caller in (alice, bob):
            await caller.close()
        await http.delete(f"/v1/rooms/{room}")
    print(json.dumps({"room": room, "decoded_from_the_other": stats}))
    if not all(d["video"] and d["audio"] for d in stats.values()):
        raise SystemExit("no media decoded: is the relay running?")


if __name__ == "__main__":
    asyncio.run(main())
